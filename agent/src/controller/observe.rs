//! What the controller keeps of a watched pod, and what it reads from it: only the fields its
//! decisions use (a few hundred bytes a pod instead of the whole object, for clusters with
//! thousands of pods), turned into `etcd_medic_core::detect`'s inputs. Pure.

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Pod;

use etcd_medic_core::detect::ContainerSeen;

/// The annotation that pauses the controller for a pod, its StatefulSet or its namespace.
pub const PAUSED: &str = "etcd-medic.io/paused";

/// Kept of a termination message: the signature's lines are its last ones.
const MAX_MESSAGE: usize = 4096;

/// A watched pod, as the controller's decisions see it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodSeen {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub node: Option<String>,
    /// The StatefulSet that owns it: its etcd cluster.
    pub cluster: Option<String>,
    /// `etcd-medic.io/paused: "true"` on the pod.
    pub paused: bool,
    pub crash_loop: bool,
    pub exited_with_error: bool,
    pub running: bool,
    /// `state.terminated` is set: the crashed start is the current one (the kubelet has not
    /// started the next yet), so its log is the current log, not `--previous`.
    pub terminated_now: bool,
    pub restarts: u32,
    /// When its Ready condition turned False (else when it was created, while it has none).
    pub not_ready_since: Option<Timestamp>,
    /// The tail of `lastState.terminated.message` of the etcd container.
    pub message: String,
    /// Being deleted: its replacement is the one to look at.
    pub deleting: bool,
}

impl PodSeen {
    /// The detection's view at `now`.
    pub fn container(&self, now: Timestamp) -> ContainerSeen {
        ContainerSeen {
            crash_loop: self.crash_loop,
            exited_with_error: self.exited_with_error,
            running: self.running,
            restarts: self.restarts,
            not_ready_for_secs: self.not_ready_since.map(|t| now.duration_since(t).as_secs()),
        }
    }

    /// Ready now (its Ready condition is True).
    pub fn ready(&self) -> bool {
        self.running && self.not_ready_since.is_none()
    }

    pub fn key(&self) -> (String, String) {
        (self.namespace.clone(), self.name.clone())
    }
}

/// Is this annotation value a pause? (`"true"`, as the documentation says; any case.)
pub fn is_paused(annotations: Option<&std::collections::BTreeMap<String, String>>) -> bool {
    annotations.and_then(|a| a.get(PAUSED)).is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
}

/// What the controller keeps of `pod`; `container` names the etcd container (else the one
/// named `etcd`, else the first).
pub fn pod_seen(pod: &Pod, container: Option<&str>) -> PodSeen {
    let meta = &pod.metadata;
    let spec_names: Vec<&str> = pod.spec.iter().flat_map(|s| s.containers.iter().map(|c| c.name.as_str())).collect();
    let wanted = container.or_else(|| spec_names.iter().copied().find(|n| *n == "etcd")).or_else(|| spec_names.first().copied());
    let status = pod.status.as_ref();
    let cs = status.and_then(|s| s.container_statuses.as_ref()).and_then(|all| all.iter().find(|c| Some(c.name.as_str()) == wanted));
    let state = cs.and_then(|c| c.state.as_ref());
    let last = cs.and_then(|c| c.last_state.as_ref()).and_then(|s| s.terminated.as_ref());
    let now_terminated = state.and_then(|s| s.terminated.as_ref());
    let ready = status.and_then(|s| s.conditions.as_ref()).and_then(|c| c.iter().find(|c| c.type_ == "Ready"));
    let not_ready_since = match ready {
        Some(c) if c.status == "True" => None,
        Some(c) => c.last_transition_time.as_ref().map(|t| t.0).or(meta.creation_timestamp.as_ref().map(|t| t.0)),
        None => meta.creation_timestamp.as_ref().map(|t| t.0),
    };
    let message = last.or(now_terminated).and_then(|t| t.message.as_deref()).unwrap_or_default();
    PodSeen {
        namespace: meta.namespace.clone().unwrap_or_default(),
        name: meta.name.clone().unwrap_or_default(),
        uid: meta.uid.clone().unwrap_or_default(),
        node: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
        cluster: meta
            .owner_references
            .iter()
            .flatten()
            .find(|o| o.kind == "StatefulSet" && o.controller == Some(true))
            .map(|o| o.name.clone()),
        paused: is_paused(meta.annotations.as_ref()),
        crash_loop: state.and_then(|s| s.waiting.as_ref()).and_then(|w| w.reason.as_deref()) == Some("CrashLoopBackOff"),
        exited_with_error: [last, now_terminated].iter().flatten().any(|t| t.exit_code != 0),
        running: state.is_some_and(|s| s.running.is_some()),
        terminated_now: now_terminated.is_some(),
        restarts: cs.map_or(0, |c| c.restart_count.max(0) as u32),
        not_ready_since,
        message: tail(message, MAX_MESSAGE),
        deleting: meta.deletion_timestamp.is_some(),
    }
}

fn tail(s: &str, max: usize) -> String {
    let mut start = s.len().saturating_sub(max);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    s[start..].to_string()
}

pub use etcd_medic_core::signature::of_text as signature_of;

#[cfg(test)]
mod tests {
    use super::*;
    use etcd_medic_core::signature::Signature;

    fn pod(v: serde_json::Value) -> Pod {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn a_crash_looping_member_is_read_from_its_etcd_container() {
        let p = pod(serde_json::json!({
            "metadata": {"name": "apisix-etcd-1", "namespace": "apisix", "uid": "u1",
                         "annotations": {"etcd-medic.io/paused": "True"},
                         "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "apisix-etcd", "uid": "s", "controller": true}]},
            "spec": {"nodeName": "node-b", "containers": [{"name": "sidecar"}, {"name": "etcd"}]},
            "status": {
                "conditions": [{"type": "Ready", "status": "False", "lastTransitionTime": "2026-12-04T10:00:00Z"}],
                "containerStatuses": [
                    {"name": "sidecar", "ready": true, "restartCount": 0, "image": "x", "imageID": "", "state": {"running": {}}},
                    {"name": "etcd", "ready": false, "restartCount": 5, "image": "x", "imageID": "",
                     "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                     "lastState": {"terminated": {"exitCode": 1, "message": "Updating member in existing cluster\nError: etcdserver: member not found"}}}]}
        }));
        let s = pod_seen(&p, None);
        assert_eq!((s.cluster.as_deref(), s.node.as_deref(), s.uid.as_str()), (Some("apisix-etcd"), Some("node-b"), "u1"));
        assert!(s.paused && s.crash_loop && s.exited_with_error && !s.running && !s.deleting);
        assert_eq!(s.restarts, 5);
        let now: Timestamp = "2026-12-04T10:01:30Z".parse().unwrap();
        assert_eq!(s.container(now).not_ready_for_secs, Some(90));
        assert_eq!(signature_of(&s.message), (Signature::MemberNotFound, Some("Error: etcdserver: member not found".into())));
        let running = pod_seen(&p, Some("sidecar"));
        assert!(running.running && !running.crash_loop);
    }

    #[test]
    fn a_ready_pod_is_not_failing_and_an_unknown_crash_has_no_evidence() {
        let p = pod(serde_json::json!({
            "metadata": {"name": "e-0", "namespace": "n", "creationTimestamp": "2026-12-04T10:00:00Z"},
            "spec": {"containers": [{"name": "main"}]},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]}
        }));
        let s = pod_seen(&p, None);
        assert_eq!(s.not_ready_since, None);
        assert!(!is_paused(None));
        assert_eq!(signature_of("panic: something else"), (Signature::Unknown, None));
        assert_eq!(tail("ééé", 3), "é", "cut on a character boundary");
    }
}
