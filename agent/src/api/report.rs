//! What a person watching a remediation sees: a log line per step, Kubernetes Events on the
//! pod at the moments that matter, and metrics. The engine reports snapshots of the
//! remediation; `transitions` turns two snapshots into what happened in between.

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};

use super::metrics::{CodeLabels, Metrics, OutcomeLabels, StepLabels};
use crate::kubeapi::KubeApi;
use crate::remediation::{Phase, Remediation};

#[derive(Clone, Debug, PartialEq)]
pub enum Transition {
    StepStarted { name: String },
    StepEnded { name: String, outcome: String, message: String, seconds: f64 },
    Finished { phase: Phase, code: Option<String>, message: String },
}

/// What happened between the snapshot `prev` (None: nothing seen yet) and `cur`.
pub fn transitions(prev: Option<&Remediation>, cur: &Remediation) -> Vec<Transition> {
    let mut out = Vec::new();
    let before = |i: usize| prev.and_then(|p| p.steps.get(i));
    for (i, s) in cur.steps.iter().enumerate() {
        let seen = before(i);
        if seen.is_none() {
            out.push(Transition::StepStarted { name: s.name.clone() });
        }
        if let Some(outcome) = &s.outcome
            && seen.is_none_or(|p| p.outcome.is_none())
        {
            let secs = |t: &Option<String>| t.as_deref().and_then(|t| t.parse::<jiff::Timestamp>().ok());
            let seconds = match (secs(&Some(s.start.clone())), secs(&s.end)) {
                (Some(a), Some(b)) => b.duration_since(a).as_secs_f64().max(0.0),
                _ => 0.0,
            };
            out.push(Transition::StepEnded { name: s.name.clone(), outcome: outcome.clone(), message: s.message.clone(), seconds });
        }
    }
    let finished = |r: &Remediation| r.finished_at.is_some();
    if finished(cur) && !prev.is_some_and(finished) {
        out.push(Transition::Finished {
            phase: cur.phase,
            code: cur.error.as_ref().map(|e| e.code.to_string()),
            message: cur.error.as_ref().map(|e| e.message.clone()).unwrap_or_default(),
        });
    }
    out
}

/// The Event a transition deserves, if any: (reason, type, note).
pub fn event_for(t: &Transition, r: &Remediation) -> Option<(&'static str, &'static str, String)> {
    match t {
        Transition::StepStarted { name } if (name == "Check" || name == "Resume") && r.steps.len() == 1 => {
            let why = r.reason.as_deref().map(|w| format!(" ({w})")).unwrap_or_default();
            let what = if name == "Resume" { "resumed" } else { "started" };
            Some(("RemediationStarted", "Normal", format!("etcd-medic remediation {} {what} on node {}{why}", r.id, r.node)))
        }
        Transition::StepEnded { name, outcome, message, .. } if outcome == "Done" => match name.as_str() {
            "Quarantine" => Some(("DataQuarantined", "Normal", message.clone())),
            "Restart" => Some(("PodRestarted", "Normal", message.clone())),
            "Verify" => Some(("MemberRejoined", "Normal", message.clone())),
            _ => None,
        },
        Transition::Finished { phase: Phase::Refused, code, message } => {
            Some(("RemediationRefused", "Warning", format!("{}: {message}", code.as_deref().unwrap_or("Refused"))))
        }
        Transition::Finished { phase: Phase::Failed, code, message } => {
            Some(("RemediationFailed", "Warning", format!("{}: {message}", code.as_deref().unwrap_or("Failed"))))
        }
        _ => None,
    }
}

/// Follows one remediation's snapshots: logs, metrics and (unless it is a dry run) Events.
pub struct Reporter<'a> {
    pub api: &'a KubeApi,
    pub metrics: &'a Metrics,
    pub events: bool,
    prev: Option<Remediation>,
}

impl<'a> Reporter<'a> {
    pub fn new(api: &'a KubeApi, metrics: &'a Metrics, events: bool) -> Self {
        Reporter { api, metrics, events, prev: None }
    }

    pub async fn report(&mut self, r: Remediation) {
        for t in transitions(self.prev.as_ref(), &r) {
            self.log_and_count(&t);
            if self.events
                && let Some((reason, kind, note)) = event_for(&t, &r)
                && let Err(e) = self.api.create_event(&r.namespace, &event(&r, reason, kind, &note)).await
            {
                // Events are for people; a remediation never fails for want of one.
                tracing::warn!(reason, "could not record the Event: {}", e.message);
            }
        }
        self.prev = Some(r);
    }

    fn log_and_count(&self, t: &Transition) {
        match t {
            Transition::StepStarted { name } => tracing::info!(step = %name, "step started"),
            Transition::StepEnded { name, outcome, message, seconds } => {
                self.metrics.steps.get_or_create(&StepLabels { step: name.clone(), outcome: outcome.clone() }).observe(*seconds);
                if outcome == "Done" {
                    tracing::info!(step = %name, seconds, "{message}");
                } else {
                    tracing::warn!(step = %name, code = %outcome, seconds, "{message}");
                }
            }
            Transition::Finished { phase, code, message } => {
                let code = code.clone().unwrap_or_default();
                self.metrics.remediations.get_or_create(&OutcomeLabels { outcome: format!("{phase:?}"), code: code.clone() }).inc();
                match phase {
                    Phase::Refused => {
                        self.metrics.refusals.get_or_create(&CodeLabels { code: code.clone() }).inc();
                        tracing::warn!(phase = ?phase, %code, "remediation refused: {message}");
                    }
                    Phase::Failed => tracing::error!(phase = ?phase, %code, "remediation failed: {message}"),
                    Phase::Succeeded => {
                        self.metrics.last_success.set(jiff::Timestamp::now().as_millisecond() as f64 / 1000.0);
                        tracing::info!(phase = ?phase, "remediation succeeded");
                    }
                    _ => tracing::info!(phase = ?phase, "remediation finished"),
                }
            }
        }
    }
}

/// An events.k8s.io/v1 Event about the pod, from this node's agent.
fn event(r: &Remediation, reason: &str, kind: &str, note: &str) -> Event {
    // A note is at most 1 KiB in the API; keep the end, which says what was seen last.
    let mut cut = note.len().saturating_sub(990);
    while !note.is_char_boundary(cut) {
        cut += 1;
    }
    let note = if cut > 0 { format!("…{}", &note[cut..]) } else { note.to_string() };
    Event {
        metadata: ObjectMeta {
            name: Some(format!("{}.{}-{}", r.pod, r.id, reason.to_ascii_lowercase())),
            namespace: Some(r.namespace.clone()),
            ..Default::default()
        },
        event_time: Some(MicroTime(jiff::Timestamp::now())),
        action: Some("Remediate".into()),
        reason: Some(reason.into()),
        note: Some(note),
        type_: Some(kind.into()),
        regarding: Some(ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            namespace: Some(r.namespace.clone()),
            name: Some(r.pod.clone()),
            uid: r.pod_uid.clone(),
            ..Default::default()
        }),
        reporting_controller: Some("etcd-medic.io/agent".into()),
        reporting_instance: Some(format!("etcd-medic-{}", r.node)),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remediation::{ErrorRecord, StepRecord};

    fn step(name: &str, outcome: Option<&str>) -> StepRecord {
        StepRecord {
            name: name.into(),
            start: "2026-11-24T10:00:00Z".into(),
            end: outcome.map(|_| "2026-11-24T10:00:01.5Z".into()),
            outcome: outcome.map(String::from),
            message: format!("{name} message"),
        }
    }

    fn r(steps: Vec<StepRecord>) -> Remediation {
        let mut r = Remediation::new("node-a", "apisix", "apisix-etcd-1", Some("uid-1"));
        r.steps = steps;
        r
    }

    #[test]
    fn each_step_start_and_end_is_seen_once() {
        let a = r(vec![step("Check", None)]);
        assert_eq!(transitions(None, &a), [Transition::StepStarted { name: "Check".into() }]);
        let b = r(vec![step("Check", Some("Done")), step("Lock", None)]);
        let t = transitions(Some(&a), &b);
        assert_eq!(t.len(), 2);
        assert!(matches!(&t[0], Transition::StepEnded { name, seconds, .. } if name == "Check" && (*seconds - 1.5).abs() < 1e-9));
        assert_eq!(t[1], Transition::StepStarted { name: "Lock".into() });
        assert!(transitions(Some(&b), &b).is_empty(), "the same snapshot twice says nothing");
        // Snapshots can be skipped: everything in between still shows.
        assert_eq!(transitions(None, &b).len(), 3);
    }

    #[test]
    fn the_events_of_a_heal_and_of_a_refusal() {
        let mut healed = r(["Check", "Lock", "Quarantine", "Membership", "Restart", "Verify"].map(|s| step(s, Some("Done"))).to_vec());
        healed.phase = Phase::Succeeded;
        healed.finished_at = Some("2026-11-24T10:01:00Z".into());
        let reasons: Vec<&str> = transitions(None, &healed).iter().filter_map(|t| event_for(t, &healed)).map(|e| e.0).collect();
        // Started is only told for the first step of a remediation as it happens.
        assert_eq!(reasons, ["DataQuarantined", "PodRestarted", "MemberRejoined"]);
        let first = r(vec![step("Check", None)]);
        assert_eq!(event_for(&transitions(None, &first)[0], &first).unwrap().0, "RemediationStarted");

        let mut refused = r(vec![step("Check", Some("QuorumAtRisk"))]);
        refused.phase = Phase::Refused;
        refused.finished_at = Some("2026-11-24T10:00:02Z".into());
        refused.error = Some(ErrorRecord { code: crate::Code::QuorumAtRisk, message: "2 of 3 down".into() });
        let events: Vec<_> = transitions(Some(&first), &refused).iter().filter_map(|t| event_for(t, &refused)).collect();
        assert_eq!(events, [("RemediationRefused", "Warning", "QuorumAtRisk: 2 of 3 down".to_string())]);
    }

    #[test]
    fn an_event_names_the_pod_and_fits_the_api() {
        let mut x = r(vec![]);
        x.pod_uid = Some("uid-9".into());
        let e = event(&x, "DataQuarantined", "Normal", &"é".repeat(2000));
        assert_eq!(e.regarding.as_ref().unwrap().uid.as_deref(), Some("uid-9"));
        assert!(e.note.as_ref().unwrap().len() <= 1024);
        assert!(e.metadata.name.unwrap().starts_with("apisix-etcd-1."));
    }
}
