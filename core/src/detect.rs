//! The controller's two questions about a watched etcd pod, as pure functions: has it failed
//! long enough to be a candidate (detection), and may a remediation be dispatched for it now
//! (decision)? Every "no" carries its reason, for the record and the metrics.

use serde::{Deserialize, Serialize};

/// When a failing pod becomes a candidate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Thresholds {
    /// Restarts of the etcd container at least (`--min-restarts`, default 3).
    pub min_restarts: u32,
    /// Seconds the pod has not been Ready at least (`--failing-for`, default 60).
    pub failing_for_secs: i64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds { min_restarts: 3, failing_for_secs: 60 }
    }
}

/// What the pod's status says of its etcd container, read by the controller.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ContainerSeen {
    /// `state.waiting.reason == CrashLoopBackOff`.
    pub crash_loop: bool,
    /// `lastState.terminated` (or `state.terminated`) with a non-zero exit code.
    pub exited_with_error: bool,
    /// `state.running` is set.
    pub running: bool,
    pub restarts: u32,
    /// Seconds since the pod's Ready condition turned False (`None`: it is Ready, or has no
    /// condition yet).
    pub not_ready_for_secs: Option<i64>,
}

/// Why a pod is not a candidate (yet).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all_fields = "camelCase")]
pub enum NotFailing {
    /// Its etcd container runs (ready or not): nothing to remediate while etcd holds its data.
    Running,
    /// Neither in CrashLoopBackOff nor exited with an error.
    NoFailure,
    /// Fewer restarts than the threshold.
    FewRestarts { restarts: u32, needed: u32 },
    /// Not failing long enough yet.
    TooRecent { secs: i64, needed: i64 },
}

/// A pod is a candidate when its etcd container is not running, crash-loops or exited with
/// an error, restarted at least `min_restarts` times, and has not been Ready for at least
/// `failing_for_secs`.
pub fn detect(c: &ContainerSeen, t: &Thresholds) -> Result<(), NotFailing> {
    if c.running {
        return Err(NotFailing::Running);
    }
    if !c.crash_loop && !c.exited_with_error {
        return Err(NotFailing::NoFailure);
    }
    if c.restarts < t.min_restarts {
        return Err(NotFailing::FewRestarts { restarts: c.restarts, needed: t.min_restarts });
    }
    let secs = c.not_ready_for_secs.unwrap_or(0);
    if secs < t.failing_for_secs {
        return Err(NotFailing::TooRecent { secs, needed: t.failing_for_secs });
    }
    Ok(())
}

/// The limits of dispatching.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Candidates among the watched pods above this percentage hold everything
    /// (`--max-failing-percent`, default 20).
    pub max_failing_percent: u32,
    /// Remediations per pod in 24 hours at most (`--max-attempts`, default 3).
    pub max_attempts: u32,
    /// The wait after a first attempt; doubled after each further one in the window.
    pub cooldown_secs: i64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_failing_percent: 20, max_attempts: 3, cooldown_secs: 300 }
    }
}

/// The world around one candidate, as the controller sees it now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Around {
    /// Where the annotation `etcd-medic.io/paused: "true"` was found: the pod, its
    /// StatefulSet or its namespace.
    pub paused_on: Option<String>,
    /// Failing members of the candidate's cluster (its StatefulSet), the candidate included.
    pub failing_in_cluster: usize,
    /// Candidates among all watched pods, and how many pods are watched.
    pub failing_watched: usize,
    pub watched: usize,
    /// A remediation of this cluster not yet ended (its pod's name).
    pub in_flight: Option<String>,
    /// Seconds ago of this pod's earlier remediations, within the last 24 hours.
    pub attempts_secs_ago: Vec<i64>,
}

/// Why nothing is dispatched now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all_fields = "camelCase")]
pub enum Hold {
    Paused {
        on: String,
    },
    /// More than one member of the cluster fails: replacing one could cost the quorum, and
    /// the cause is likely shared. A person looks first.
    ClusterStorm {
        failing: usize,
    },
    /// Too many of the watched pods fail at once: something larger is wrong.
    Storm {
        failing: usize,
        watched: usize,
        max_percent: u32,
    },
    /// One remediation per cluster at a time.
    ClusterBusy {
        pod: String,
    },
    MaxAttempts {
        attempts: usize,
        max: u32,
    },
    Cooldown {
        retry_in_secs: i64,
    },
}

impl Hold {
    /// The short name metrics and Events use.
    pub fn as_str(&self) -> &'static str {
        match self {
            Hold::Paused { .. } => "Paused",
            Hold::ClusterStorm { .. } => "ClusterStorm",
            Hold::Storm { .. } => "Storm",
            Hold::ClusterBusy { .. } => "ClusterBusy",
            Hold::MaxAttempts { .. } => "MaxAttempts",
            Hold::Cooldown { .. } => "Cooldown",
        }
    }
}

/// May a remediation be dispatched for the candidate now? The holds in order: a person's
/// pause, the storms, the cluster's one-at-a-time, then this pod's attempts and back-off.
pub fn decide(a: &Around, l: &Limits) -> Result<(), Hold> {
    if let Some(on) = &a.paused_on {
        return Err(Hold::Paused { on: on.clone() });
    }
    if a.failing_in_cluster > 1 {
        return Err(Hold::ClusterStorm { failing: a.failing_in_cluster });
    }
    if a.watched > 0 && a.failing_watched * 100 > a.watched * l.max_failing_percent as usize {
        return Err(Hold::Storm { failing: a.failing_watched, watched: a.watched, max_percent: l.max_failing_percent });
    }
    if let Some(pod) = &a.in_flight {
        return Err(Hold::ClusterBusy { pod: pod.clone() });
    }
    let recent: Vec<i64> = a.attempts_secs_ago.iter().copied().filter(|s| (0..24 * 3600).contains(s)).collect();
    if recent.len() >= l.max_attempts as usize {
        return Err(Hold::MaxAttempts { attempts: recent.len(), max: l.max_attempts });
    }
    if let Some(last) = recent.iter().min() {
        // 1st retry after `cooldown`, then 2×, 4×, … of it.
        let wait = l.cooldown_secs.saturating_mul(1 << (recent.len() - 1).min(16));
        if *last < wait {
            return Err(Hold::Cooldown { retry_in_secs: wait - last });
        }
    }
    Ok(())
}

/// Whether an earlier record of this pod instance settles it, so that no new remediation is
/// recorded for it: one not ended yet; one that succeeded or failed (the agent answers a
/// failed instance with that failure: a person looks); one the controller refused itself.
/// A refusal by the agent for a passing reason (it was shutting down, another remediation
/// held the cluster, quorum or a running container stood in the way, the image was about
/// to heal itself) does not: the pod is tried again, within the attempts and back-off of
/// [`decide`].
///
/// `decision` is the controller's label on its own records (`refused` when it refused the
/// pod itself, `dispatch` otherwise); a person's record has none. The controller's own dry
/// run (`--dry-run`) settles the instance too; a person's does not.
pub fn settles(phase: Option<&str>, error_code: Option<&str>, decision: Option<&str>) -> bool {
    match (phase, decision) {
        (_, Some("refused")) => true,
        (Some("Refused"), _) => {
            !matches!(error_code, Some("NotReady" | "ClusterLocked" | "TooManyRequests" | "QuorumAtRisk" | "PodRunning" | "SelfHealing"))
        }
        (Some("Planned"), None) => false,
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crash(restarts: u32, secs: i64) -> ContainerSeen {
        ContainerSeen { crash_loop: true, exited_with_error: true, running: false, restarts, not_ready_for_secs: Some(secs) }
    }

    #[test]
    fn detection_needs_a_stopped_failing_container_restarts_and_time() {
        let t = Thresholds::default();
        assert_eq!(detect(&crash(3, 60), &t), Ok(()));
        assert_eq!(detect(&crash(2, 600), &t), Err(NotFailing::FewRestarts { restarts: 2, needed: 3 }));
        assert_eq!(detect(&crash(9, 59), &t), Err(NotFailing::TooRecent { secs: 59, needed: 60 }));
        assert_eq!(detect(&ContainerSeen { running: true, ..crash(9, 600) }, &t), Err(NotFailing::Running));
        let healthy = ContainerSeen { restarts: 9, ..Default::default() };
        assert_eq!(detect(&healthy, &t), Err(NotFailing::NoFailure));
        let errored = ContainerSeen { crash_loop: false, ..crash(3, 61) };
        assert_eq!(detect(&errored, &t), Ok(()), "an error exit counts without CrashLoopBackOff");
    }

    fn alone() -> Around {
        Around { failing_in_cluster: 1, failing_watched: 1, watched: 30, ..Default::default() }
    }

    #[test]
    fn holds_in_order() {
        let l = Limits::default();
        assert_eq!(decide(&alone(), &l), Ok(()));
        let paused = Around { paused_on: Some("statefulset apisix/apisix-etcd".into()), failing_in_cluster: 2, ..alone() };
        assert_eq!(decide(&paused, &l).unwrap_err().as_str(), "Paused", "a person's pause wins");
        assert_eq!(decide(&Around { failing_in_cluster: 2, ..alone() }, &l), Err(Hold::ClusterStorm { failing: 2 }));
        assert_eq!(decide(&Around { failing_watched: 7, watched: 30, ..alone() }, &l).unwrap_err().as_str(), "Storm");
        assert_eq!(decide(&Around { failing_watched: 6, watched: 30, ..alone() }, &l), Ok(()), "20% of 30 is allowed");
        assert_eq!(decide(&Around { in_flight: Some("apisix-etcd-0".into()), ..alone() }, &l).unwrap_err().as_str(), "ClusterBusy");
    }

    #[test]
    fn only_a_passing_refusal_by_the_agent_or_a_plan_lets_an_instance_be_tried_again() {
        let mine = Some("dispatch");
        assert!(settles(None, None, mine), "not ended yet (no status)");
        assert!(settles(None, None, Some("refused")), "refused, its status not written yet");
        assert!(settles(Some("Running"), None, None));
        assert!(settles(Some("Succeeded"), None, mine));
        assert!(settles(Some("Failed"), Some("NotReady"), mine), "the agent answers a failed instance with its failure");
        assert!(settles(Some("Refused"), Some("SplitBrain"), mine));
        assert!(settles(Some("Refused"), Some("NotReady"), Some("refused")), "the controller's own refusal stands");
        assert!(!settles(Some("Refused"), Some("NotReady"), mine));
        assert!(!settles(Some("Refused"), Some("SelfHealing"), None), "tried again, up to the attempts");
        assert!(!settles(Some("Planned"), None, None), "a person's dry run changed nothing");
        assert!(settles(Some("Planned"), None, mine), "the controller's own dry run (--dry-run) is its answer");
    }

    #[test]
    fn attempts_back_off_and_stop_within_a_day() {
        let l = Limits::default();
        let after = |ago: Vec<i64>| decide(&Around { attempts_secs_ago: ago, ..alone() }, &l);
        assert_eq!(after(vec![100]), Err(Hold::Cooldown { retry_in_secs: 200 }));
        assert_eq!(after(vec![300]), Ok(()));
        assert_eq!(after(vec![400, 2000]), Err(Hold::Cooldown { retry_in_secs: 200 }), "twice the wait after two");
        assert_eq!(after(vec![600, 2000]), Ok(()));
        assert_eq!(after(vec![5000, 9000, 20000]), Err(Hold::MaxAttempts { attempts: 3, max: 3 }));
        assert_eq!(after(vec![5000, 9000, 90000]), Ok(()), "an attempt older than a day no longer counts");
        let v = serde_json::to_value(Hold::Cooldown { retry_in_secs: 5 }).unwrap();
        assert_eq!(v, serde_json::json!({"reason": "Cooldown", "retryInSecs": 5}));
    }
}
