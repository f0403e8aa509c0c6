//! The pod's own gate: is its etcd container failing (and not running)?

use k8s_openapi::api::core::v1::Pod;

use crate::error::{Code, Error, Result};

/// What the pod's status says about its etcd container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// `CrashLoopBackOff`, `Error`, …
    pub reason: String,
    /// The last termination message, as a person would want to read it.
    pub message: String,
}

/// The pod is failing: its etcd container waits in `CrashLoopBackOff` or its last run ended
/// in an error, and it is not running now. A running container is `PodRunning` even with
/// `force`; a container that is neither failing nor running is `PodHealthy` unless `force`.
pub fn pod_failure(pod: &Pod, container: &str, force: bool) -> Result<Option<Failure>> {
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    let status = pod.status.as_ref().and_then(|s| s.container_statuses.as_ref()).and_then(|cs| cs.iter().find(|c| c.name == container));
    let Some(cs) = status else {
        return if force {
            Ok(None)
        } else {
            Err(Error::new(Code::PodHealthy, format!("pod {name} reports no status for container {container:?} yet")))
        };
    };
    let state = cs.state.as_ref();
    if state.and_then(|s| s.running.as_ref()).is_some() {
        let what = if cs.ready { "running and ready" } else { "running" };
        return Err(Error::new(
            Code::PodRunning,
            format!("container {container:?} of pod {name} is {what}; the agent acts only while etcd is stopped"),
        ));
    }
    let last = cs.last_state.as_ref().and_then(|s| s.terminated.as_ref()).or(state.and_then(|s| s.terminated.as_ref()));
    let waiting = state.and_then(|s| s.waiting.as_ref()).and_then(|w| w.reason.clone());
    let failed_last = last.is_some_and(|t| t.exit_code != 0);
    let message = last.and_then(|t| t.message.clone()).unwrap_or_default();
    match waiting.as_deref() {
        Some("CrashLoopBackOff") => Ok(Some(Failure { reason: "CrashLoopBackOff".into(), message })),
        _ if failed_last => Ok(Some(Failure { reason: last.and_then(|t| t.reason.clone()).unwrap_or_else(|| "Error".into()), message })),
        _ if force => Ok(None),
        other => Err(Error::new(
            Code::PodHealthy,
            format!("pod {name} is not failing (container {container:?}: {}); pass force to act anyway", other.unwrap_or("no error")),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(status: serde_json::Value) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": "apisix-etcd-1"}, "spec": {"containers": [{"name": "etcd"}]},
                                      "status": {"containerStatuses": [status]}}))
        .unwrap()
    }

    #[test]
    fn crash_loop_is_failing_running_is_refused() {
        let crash = pod(json!({"name": "etcd", "ready": false, "restartCount": 5, "image": "", "imageID": "",
            "state": {"waiting": {"reason": "CrashLoopBackOff"}},
            "lastState": {"terminated": {"exitCode": 1, "message": "Error: etcdserver: member not found"}}}));
        let f = pod_failure(&crash, "etcd", false).unwrap().unwrap();
        assert_eq!(f.reason, "CrashLoopBackOff");
        assert!(f.message.contains("member not found"));
        let running = pod(json!({"name": "etcd", "ready": true, "restartCount": 0, "image": "", "imageID": "", "state": {"running": {}}}));
        assert_eq!(pod_failure(&running, "etcd", false).unwrap_err().code, Code::PodRunning);
        assert_eq!(pod_failure(&running, "etcd", true).unwrap_err().code, Code::PodRunning, "force never overrides a running etcd");
        let idle = pod(
            json!({"name": "etcd", "ready": false, "restartCount": 0, "image": "", "imageID": "", "state": {"waiting": {"reason": "ContainerCreating"}}}),
        );
        assert_eq!(pod_failure(&idle, "etcd", false).unwrap_err().code, Code::PodHealthy);
        assert_eq!(pod_failure(&idle, "etcd", true).unwrap(), None);
        let errored = pod(json!({"name": "etcd", "ready": false, "restartCount": 1, "image": "", "imageID": "",
            "state": {"waiting": {"reason": "ContainerCreating"}}, "lastState": {"terminated": {"exitCode": 2, "reason": "Error"}}}));
        assert_eq!(pod_failure(&errored, "etcd", false).unwrap().unwrap().reason, "Error");
    }
}
