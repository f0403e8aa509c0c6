//! What a person watching a remediation sees: a log line per step, Kubernetes Events on the
//! pod at the moments that matter (through kube-runtime's `Recorder`, which also folds a
//! repeat into the first Event's `series`), and metrics. The engine's typed progress events
//! drive all three; which Event each deserves is `etcd_medic_core::progress::event_for`.

use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter as EventSource};

use super::metrics::{CodeLabels, Metrics, OutcomeLabels, StepLabels};
use crate::engine::{Phase, Remediation};
use crate::kubeapi::{Attempt, classify};
use etcd_medic_core::contract::Outcome;
use etcd_medic_core::progress::{EventNote, Progress, Update, event_for};

/// Who records the Events: this node's agent.
pub fn recorder(client: kube::Client, node: &str) -> Recorder {
    Recorder::new(client, EventSource { controller: "etcd-medic.io/agent".into(), instance: Some(format!("etcd-medic-{node}")) })
}

/// Follows one remediation's progress: logs, metrics and (unless it is a dry run) Events.
pub struct Reporter<'a> {
    pub recorder: &'a Recorder,
    pub metrics: &'a Metrics,
    pub events: bool,
}

impl<'a> Reporter<'a> {
    pub fn new(recorder: &'a Recorder, metrics: &'a Metrics, events: bool) -> Self {
        Reporter { recorder, metrics, events }
    }

    pub async fn report(&mut self, u: &Update) {
        self.log_and_count(&u.progress);
        if self.events
            && let Some(e) = event_for(&u.progress, &u.remediation)
        {
            self.publish(&u.remediation, e).await;
        }
    }

    /// Records an Event on the pod, retrying a blip briefly. Events are for people: a
    /// remediation never fails, nor waits long, for want of one.
    async fn publish(&self, r: &Remediation, e: EventNote) {
        let event = Event {
            type_: if e.warning { EventType::Warning } else { EventType::Normal },
            reason: e.reason.into(),
            note: Some(fit_note(&format!("remediation {}: {}", r.id, e.note))),
            action: "Remediate".into(),
            secondary: None,
        };
        let pod = regarding(r);
        let mut wait = Duration::from_millis(200);
        for attempt in 1..=4 {
            match self.recorder.publish(&event, &pod).await {
                Ok(()) => return,
                Err(err) if attempt < 4 && matches!(classify(&err), Attempt::Transient(_)) => {
                    tokio::time::sleep(wait).await;
                    wait *= 2;
                }
                Err(err) => {
                    tracing::warn!(reason = e.reason, "could not record the Event: {err}");
                    return;
                }
            }
        }
    }

    fn log_and_count(&self, p: &Progress) {
        match p {
            Progress::StepStarted { step } => tracing::info!(step = %step, "step started"),
            Progress::StepEnded { step, outcome, message, seconds } => {
                let labels = StepLabels { step: step.to_string(), outcome: outcome.to_string() };
                self.metrics.steps.get_or_create(&labels).observe(*seconds);
                if *outcome == Outcome::Done {
                    tracing::info!(step = %step, seconds, "{message}");
                } else {
                    tracing::warn!(step = %step, code = %outcome, seconds, "{message}");
                }
            }
            Progress::Paused => tracing::warn!("stopped at a safe point; the next start of the agent resumes it"),
            Progress::Finished { phase, error } => {
                let code = error.as_ref().map(|e| e.code.to_string()).unwrap_or_default();
                let message = error.as_ref().map(|e| e.message.as_str()).unwrap_or_default();
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

/// The pod instance the remediation is about.
fn regarding(r: &Remediation) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        namespace: Some(r.namespace.clone()),
        name: Some(r.pod.clone()),
        uid: r.pod_uid.clone(),
        ..Default::default()
    }
}

/// A note is at most 1 KiB in the API: keep the start (which remediation) and the end (what
/// was seen last).
fn fit_note(note: &str) -> String {
    const MAX: usize = 1000;
    if note.len() <= MAX {
        return note.to_string();
    }
    let mut head = 60;
    while !note.is_char_boundary(head) {
        head -= 1;
    }
    let mut tail = note.len() - (MAX - head - 4);
    while !note.is_char_boundary(tail) {
        tail += 1;
    }
    format!("{}…{}", &note[..head], &note[tail..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_note_fits_the_api_and_keeps_both_ends() {
        let long = format!("remediation abc: {}the end", "é".repeat(2000));
        let fitted = fit_note(&long);
        assert!(fitted.len() <= 1024, "{}", fitted.len());
        assert!(fitted.starts_with("remediation abc: ") && fitted.ends_with("the end"));
        assert_eq!(fit_note("short"), "short");
    }

    #[test]
    fn events_regard_the_pod_instance() {
        let r = Remediation::new("node-a", "apisix", "apisix-etcd-1", Some("uid-9"));
        let p = regarding(&r);
        assert_eq!((p.kind.as_deref(), p.name.as_deref(), p.uid.as_deref()), (Some("Pod"), Some("apisix-etcd-1"), Some("uid-9")));
    }
}
