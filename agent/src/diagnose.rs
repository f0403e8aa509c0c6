//! Why the member fails, from what this node holds: the crashed container's last start as
//! the kubelet logged it, else the termination message in the pod's status. The table of
//! signatures and what each calls for is `etcd_medic_core::signature`; this reads the lines.

use std::path::Path;

use k8s_openapi::api::core::v1::Pod;

use crate::error::{Code, Error, Result};
use crate::host::podlogs;
use crate::profile::Detected;
use etcd_medic_core::signature::{self, Action, Diagnosis, Signature, Source};

/// The diagnosis of `container` of `pod`. Blocking (it reads the node's log files).
pub fn diagnose(log_root: &Path, pod: &Pod, container: &str, generation: &Detected) -> Diagnosis {
    let generation = Some((generation.generation, generation.by.clone()));
    let (ns, name, uid) = (
        pod.metadata.namespace.as_deref().unwrap_or_default(),
        pod.metadata.name.as_deref().unwrap_or_default(),
        pod.metadata.uid.as_deref().unwrap_or_default(),
    );
    // While the container waits in back-off, its last start is `<restartCount>.log`; a
    // newer file means a start the pod's status does not show yet, not the crash.
    let restarts = container_status(pod, container).map(|cs| cs.restart_count).and_then(|n| u32::try_from(n).ok());
    let from_log = match podlogs::last_attempt(log_root, ns, name, uid, container, restarts) {
        Ok(found) => found,
        Err(e) => {
            // A log the agent may not read is no evidence; the pod's status may still say it.
            tracing::warn!(code = %e.code, "not reading the container's log: {}", e.message);
            None
        }
    };
    let message = termination_message(pod, container);
    let from_status = || {
        let lines: Vec<&str> = message.lines().collect();
        signature::diagnose(&lines, Source::TerminationMessage, generation.clone())
    };
    match from_log {
        Some(log) if !log.lines.is_empty() => {
            let lines: Vec<&str> = log.lines.iter().map(String::as_str).collect();
            let mut d = signature::diagnose(&lines, Source::ContainerLog, generation.clone());
            d.log_file = Some(log.file.display().to_string());
            if let Some(rest) = d.unless_split.as_mut() {
                rest.log_file = d.log_file.clone();
            }
            // The log said nothing known; the termination message may (a script that
            // writes its own, a log rotated away).
            if d.signature == Signature::Unknown {
                let s = from_status();
                if s.signature != Signature::Unknown {
                    return s;
                }
            }
            d
        }
        _ => from_status(),
    }
}

fn container_status<'p>(pod: &'p Pod, container: &str) -> Option<&'p k8s_openapi::api::core::v1::ContainerStatus> {
    pod.status.as_ref().and_then(|s| s.container_statuses.as_ref()).and_then(|cs| cs.iter().find(|c| c.name == container))
}

/// `lastState.terminated.message` of the container, else `state.terminated.message`.
fn termination_message(pod: &Pod, container: &str) -> String {
    let Some(cs) = container_status(pod, container) else { return String::new() };
    let last = cs.last_state.as_ref().and_then(|s| s.terminated.as_ref()).and_then(|t| t.message.clone());
    last.or_else(|| cs.state.as_ref().and_then(|s| s.terminated.as_ref()).and_then(|t| t.message.clone())).unwrap_or_default()
}

/// The gate: a diagnosis that refuses stops the remediation with its code, unless `force`
/// may override it (an unknown failure, or a generation that heals itself). A split brain
/// and a lost quorum are never forced. Returns what the Check step says of it.
pub fn gate(d: &Diagnosis, force: bool) -> Result<String> {
    let summary = summary(d);
    match (d.action, d.code) {
        (Action::Refuse, Some(code @ (Code::UnknownFailure | Code::SelfHealing))) if force => Ok(format!("{summary}; forced past {code}")),
        (Action::Refuse, code) => {
            let code = code.unwrap_or(Code::UnknownFailure);
            let hint = if matches!(code, Code::UnknownFailure | Code::SelfHealing) { "; pass force to act anyway" } else { "" };
            Err(Error::new(code, format!("{summary}: {}{hint}", d.why)))
        }
        _ => Ok(summary),
    }
}

/// One line: the signature, the action, the generation, the latest evidence.
pub fn summary(d: &Diagnosis) -> String {
    let action = match d.action {
        Action::Heal => "heal",
        Action::Replace => "replace the member",
        Action::Refuse => "refuse",
    };
    let generation = d.generation.map(|g| format!(" [{}]", g.as_str())).unwrap_or_default();
    let seen = match (d.evidence.last(), d.source) {
        (Some(line), Source::ContainerLog) => format!(", log: {line:?}"),
        (Some(line), Source::TerminationMessage) => format!(", termination message: {line:?}"),
        (Some(line), Source::Data) => format!(", files: {line}"),
        _ => ", no log or termination message to read".to_string(),
    };
    format!("diagnosis {} → {action}{generation}{seen}", d.signature.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use etcd_medic_core::generation::Generation;
    use serde_json::json;

    fn pod(uid: &str, message: &str) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": "apisix-etcd-1", "namespace": "apisix", "uid": uid},
            "spec": {"containers": [{"name": "etcd"}]},
            "status": {"containerStatuses": [{"name": "etcd", "ready": false, "restartCount": 4, "image": "", "imageID": "",
                "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                "lastState": {"terminated": {"exitCode": 1, "message": message}}}]}}))
        .unwrap()
    }

    fn gen10() -> Detected {
        Detected { generation: Generation::Bitnami10, by: "label helm.sh/chart=etcd-9.7.3".into() }
    }

    #[test]
    fn the_log_first_then_the_termination_message() {
        let root = tempfile::tempdir().unwrap();
        let p = pod("u1", "");
        let d = diagnose(root.path(), &p, "etcd", &gen10());
        assert_eq!((d.signature, d.source), (Signature::Unknown, Source::None));
        let p = pod("u1", "Error: etcdserver: member not found");
        let d = diagnose(root.path(), &p, "etcd", &gen10());
        assert_eq!((d.signature, d.source), (Signature::MemberNotFound, Source::TerminationMessage));
        let dir = root.path().join(podlogs::container_dir("apisix", "apisix-etcd-1", "u1", "etcd"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("4.log"),
            "2026-12-04T10:00:00Z stderr F {\"level\":\"fatal\",\"msg\":\"discovery failed\",\"error\":\"walpb: crc mismatch\"}\n",
        )
        .unwrap();
        let d = diagnose(root.path(), &p, "etcd", &gen10());
        assert_eq!((d.signature, d.action, d.source), (Signature::CorruptData, Action::Replace, Source::ContainerLog));
        assert_eq!(d.evidence, ["fatal discovery failed: walpb: crc mismatch"]);
        assert_eq!(d.generation, Some(Generation::Bitnami10));
    }

    #[test]
    fn gates_by_action_and_force() {
        let d = |sig, generation| {
            let (action, code, why) = signature::decide(sig, generation);
            Diagnosis {
                signature: sig,
                action,
                code,
                why,
                evidence: vec![],
                source: Source::ContainerLog,
                log_file: None,
                generation,
                generation_by: None,
                unless_split: None,
            }
        };
        assert!(gate(&d(Signature::MemberNotFound, None), false).unwrap().contains("MemberNotFound → heal"));
        assert_eq!(gate(&d(Signature::Unknown, None), false).unwrap_err().code, Code::UnknownFailure);
        assert!(gate(&d(Signature::Unknown, None), true).unwrap().contains("forced past UnknownFailure"));
        assert_eq!(gate(&d(Signature::MemberRemoved, Some(Generation::Bitnami12)), false).unwrap_err().code, Code::SelfHealing);
        assert_eq!(gate(&d(Signature::ClusterIdMismatch, None), true).unwrap_err().code, Code::SplitBrain, "never forced");
        assert_eq!(gate(&d(Signature::QuorumLost, None), true).unwrap_err().code, Code::QuorumAtRisk, "never forced");
    }
}
