//! What the controller writes: a hold told on the pod, and a decision recorded as an
//! EtcdRemediation.

use std::time::{Duration, Instant};

use kube::ResourceExt;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::runtime::events::EventType;

use super::observe::PodSeen;
use super::{Ctx, DECISION, Detected, Look, dispatch, metrics};
use crate::error::Error;
use etcd_medic_client::crd::{CANDIDACY, DETECTED_AT, DiagnosisStatus, EtcdRemediation, EtcdRemediationSpec, FAILING_SINCE, RESTARTS};
use etcd_medic_core::detect::{self, Hold};
use etcd_medic_core::signature::{self, Action, Signature};

/// A hold, told once per pod and reason: a log line, a decision counted, an Event.
pub(super) async fn tell_hold(ctx: &Ctx, pod: &PodSeen, hold: &Hold) {
    let reason = hold.as_str().to_string();
    if ctx.held.lock().unwrap().insert(pod.uid.clone(), reason.clone()).as_deref() == Some(reason.as_str()) {
        return;
    }
    let detail = serde_json::to_string(hold).unwrap_or_default();
    tracing::info!(namespace = %pod.namespace, pod = %pod.name, hold = %reason, detail = %detail, "remediation held");
    ctx.metrics.decision("hold", &reason);
    // The hold is in the Event's reason: Events of one reason fold into one series, whose
    // note stays the first one's.
    let note = format!("etcd-medic holds the remediation of this failing pod: {reason} {detail}");
    ctx.pod_event(pod, EventType::Warning, &format!("Held{reason}"), &note).await;
}

/// Records the decision for a candidate that may be dispatched: an EtcdRemediation that the
/// reconcile loop carries out, or, for a crash the agent must not touch, one that ends
/// `Refused` here with the reason and the evidence.
pub(super) async fn record(ctx: &Ctx, pod: &PodSeen, d: &Detected, by: detect::Candidacy, look: Look) {
    let (action, code, why) = match d.signature {
        // Anyone who reaches the member's peer port can make it print `cluster ID mismatch`:
        // the agent on its node asks the member's WAL, and refuses `SplitBrain` itself when
        // the data is another cluster's (that refusal settles the pod).
        Signature::ClusterIdMismatch => (Action::Heal, None, String::new()),
        s => signature::decide(s, None),
    };
    let evidence = d.evidence.clone().unwrap_or_default();
    if !ctx.leading() || ctx.create_failed.lock().unwrap().get(&pod.uid).is_some_and(|t| Instant::now() < *t) {
        return;
    }
    let cr = EtcdRemediation {
        metadata: ObjectMeta {
            name: Some(record_name(&pod.name, &pod.uid, records_of(ctx, pod))),
            namespace: Some(pod.namespace.clone()),
            labels: Some(
                [
                    ("app.kubernetes.io/managed-by".to_string(), "etcd-medic-controller".to_string()),
                    // A label value is at most 63 characters: a longer pod name is in the spec only.
                    ("etcd-medic.io/pod".to_string(), if pod.name.len() <= 63 { pod.name.clone() } else { String::new() }),
                    (DECISION.to_string(), if action == Action::Refuse { "refused" } else { "dispatch" }.to_string()),
                    (CANDIDACY.to_string(), by.as_str().to_string()),
                ]
                .into(),
            ),
            annotations: Some(
                [(DETECTED_AT.to_string(), d.at_wall.to_string()), (RESTARTS.to_string(), pod.restarts.to_string())]
                    .into_iter()
                    .chain(pod.not_ready_since.map(|t| (FAILING_SINCE.to_string(), t.to_string())))
                    .collect(),
            ),
            ..Default::default()
        },
        spec: EtcdRemediationSpec {
            pod: pod.name.clone(),
            pod_uid: Some(pod.uid.clone()),
            reason: Some(signature::truncate(&format!("{}: {evidence}", d.signature.as_str()), 1000)),
            dry_run: ctx.cfg.dry_run,
            force: false,
            restore: false,
            restore_force: false,
        },
        status: None,
    };
    let api: Api<EtcdRemediation> = Api::namespaced(ctx.api.client().clone(), &pod.namespace);
    let created = match api.create(&PostParams::default(), &cr).await {
        Ok(c) => c,
        // The name is this instance's and attempt's: a create whose answer was lost went
        // through, and the watch brings the record.
        Err(kube::Error::Api(s)) if s.code == 409 => return,
        Err(e) => {
            tracing::warn!(namespace = %pod.namespace, pod = %pod.name, "cannot record the EtcdRemediation: {e}; again in 30s");
            ctx.create_failed.lock().unwrap().insert(pod.uid.clone(), Instant::now() + Duration::from_secs(30));
            return;
        }
    };
    let key = (pod.namespace.clone(), created.name_any());
    ctx.rems.lock().unwrap().insert(key, created.clone());
    match (action, code) {
        (Action::Refuse, Some(code)) => {
            ctx.metrics.decision("refuse", code.as_str());
            let mut status = dispatch::ended(&Default::default(), created.metadata.generation, "Refused", &Error::new(code, why.clone()));
            status.diagnosis = Some(DiagnosisStatus {
                signature: d.signature.as_str().into(),
                action: "refuse".into(),
                evidence: d.evidence.clone().into_iter().collect(),
            });
            tracing::warn!(namespace = %pod.namespace, pod = %pod.name, code = %code, "refused: {why}");
            if dispatch::write_status(ctx, &pod.namespace, &created.name_any(), &status).await.is_ok() {
                let mut done = created.clone();
                done.status = Some(status);
                ctx.rems.lock().unwrap().insert((pod.namespace.clone(), created.name_any()), done);
            }
            ctx.metrics.remediations.get_or_create(&metrics::PhaseLabels { phase: "Refused".into() }).inc();
            ctx.event(&created, EventType::Warning, "RemediationRefused", &format!("{code}: {why} (evidence: {evidence})")).await;
        }
        _ => {
            ctx.metrics.decision("dispatch", d.signature.as_str());
            tracing::info!(
                namespace = %pod.namespace,
                pod = %pod.name,
                remediation = %created.name_any(),
                candidacy = by.as_str(),
                look = look.as_str(),
                restarts = pod.restarts,
                "dispatching"
            );
            ctx.event(&created, EventType::Normal, "Detected", &format!("{}: {evidence}", d.signature.as_str())).await;
        }
    }
    ctx.changed.notify_one();
}

/// The records of this pod instance so far.
pub(super) fn records_of(ctx: &Ctx, pod: &PodSeen) -> usize {
    ctx.rems
        .lock()
        .unwrap()
        .values()
        .filter(|r| r.namespace().as_deref() == Some(&pod.namespace) && r.spec.pod_uid.as_deref() == Some(&pod.uid))
        .count()
}

/// A record's name: the pod's, its instance (the UID's first 8 characters) and the attempt,
/// so that asking twice for one attempt is an AlreadyExists, never a second record. At most
/// 253 characters.
pub(super) fn record_name(pod: &str, uid: &str, earlier: usize) -> String {
    let suffix = format!("-{}-{}", uid.chars().filter(char::is_ascii_alphanumeric).take(8).collect::<String>().to_lowercase(), earlier + 1);
    let mut base = pod.to_string();
    base.truncate(253 - suffix.len());
    format!("{}{suffix}", base.trim_end_matches(['-', '.']))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_is_named_for_its_pod_instance_and_attempt() {
        assert_eq!(record_name("apisix-etcd-1", "4396a12d-23e6-4ea5", 0), "apisix-etcd-1-4396a12d-1");
        assert_eq!(record_name("apisix-etcd-1", "4396A12D-23e6", 2), "apisix-etcd-1-4396a12d-3");
        let long = record_name(&"e".repeat(300), "u1", 0);
        assert!(long.len() <= 253 && long.ends_with("-u1-1"), "{long}");
    }
}
