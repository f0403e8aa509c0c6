//! The controller's two questions about a watched etcd pod, as pure functions: has it failed
//! long enough to be a candidate (detection), and may a remediation be dispatched for it now
//! (decision)? Every "no" carries its reason, for the record and the metrics.

use serde::{Deserialize, Serialize};

use crate::signature::Signature;

/// When a failing pod becomes a candidate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Thresholds {
    /// Restarts of the etcd container at least (`--min-restarts`, default 3).
    pub min_restarts: u32,
    /// Seconds the pod has not been Ready at least (`--failing-for`, default 60).
    pub failing_for_secs: i64,
    /// A failure that can only repeat is a candidate from its first crash
    /// ([`first_crash`]; `--first-crash`, default on).
    pub first_crash: bool,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds { min_restarts: 3, failing_for_secs: 60, first_crash: true }
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

impl NotFailing {
    /// The pod failed, but not yet long or often enough: the thresholds may still be met
    /// (or the first-crash rule apply).
    pub fn below_thresholds(&self) -> bool {
        matches!(self, NotFailing::FewRestarts { .. } | NotFailing::TooRecent { .. })
    }
}

/// The pod's etcd container is not running and crash-loops or exited with an error.
pub fn failed(c: &ContainerSeen) -> Result<(), NotFailing> {
    if c.running {
        return Err(NotFailing::Running);
    }
    if !c.crash_loop && !c.exited_with_error {
        return Err(NotFailing::NoFailure);
    }
    Ok(())
}

/// A pod is a candidate when its etcd container is not running, crash-loops or exited with
/// an error, restarted at least `min_restarts` times, and has not been Ready for at least
/// `failing_for_secs`.
pub fn detect(c: &ContainerSeen, t: &Thresholds) -> Result<(), NotFailing> {
    failed(c)?;
    if c.restarts < t.min_restarts {
        return Err(NotFailing::FewRestarts { restarts: c.restarts, needed: t.min_restarts });
    }
    let secs = c.not_ready_for_secs.unwrap_or(0);
    if secs < t.failing_for_secs {
        return Err(NotFailing::TooRecent { secs, needed: t.failing_for_secs });
    }
    Ok(())
}

/// The members of a failing pod's cluster (its StatefulSet's pods), as the watch sees them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClusterSeen {
    /// Pods of the cluster, the failing one included.
    pub members: usize,
    /// Of the others, those Ready now.
    pub ready_others: usize,
}

impl ClusterSeen {
    /// The cluster keeps a majority of its members without the failing one.
    pub fn keeps_quorum_without_it(&self) -> bool {
        self.members > 1 && self.ready_others * 2 > self.members
    }
}

/// Why the first-crash rule does not make a pod a candidate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all_fields = "camelCase")]
pub enum NotFirstCrash {
    /// The rule is off (`--first-crash=false`).
    Off,
    /// The container has not failed (or runs).
    NotFailed(NotFailing),
    /// The signature may not repeat: the thresholds decide.
    MayNotRepeat { signature: Signature },
}

/// The first-crash rule: a failure that can only repeat ([`Signature::repeats`]) makes a
/// candidate after one failed start; waiting for more restarts would only leave the cluster
/// a member short for longer. Every other failure waits for the thresholds of [`detect`].
/// Whether the others keep quorum without it is [`decide`]'s question, as for every
/// candidate.
pub fn first_crash(c: &ContainerSeen, t: &Thresholds, signature: Signature) -> Result<(), NotFirstCrash> {
    if !t.first_crash {
        return Err(NotFirstCrash::Off);
    }
    failed(c).map_err(NotFirstCrash::NotFailed)?;
    if !signature.repeats() {
        return Err(NotFirstCrash::MayNotRepeat { signature });
    }
    Ok(())
}

/// How a pod became a candidate, for the record's labels and the metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Candidacy {
    /// Restarts and time not Ready reached the thresholds.
    Thresholds,
    /// A failure that can only repeat, at its first crash.
    FirstCrash,
}

impl Candidacy {
    pub fn as_str(self) -> &'static str {
        match self {
            Candidacy::Thresholds => "thresholds",
            Candidacy::FirstCrash => "firstCrash",
        }
    }
}

/// The limits of dispatching.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Clusters with a candidate among the watched clusters above this percentage hold
    /// everything (`--max-failing-percent`, default 20)...
    pub max_failing_percent: u32,
    /// ...once at least this many clusters fail (`--storm-min-clusters`, default 3): one
    /// member of the only cluster is not a storm.
    pub storm_min_clusters: u32,
    /// Remediations per pod in 24 hours at most (`--max-attempts`, default 3).
    pub max_attempts: u32,
    /// The wait after a first attempt; doubled after each further one in the window.
    pub cooldown_secs: i64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_failing_percent: 20, storm_min_clusters: 3, max_attempts: 3, cooldown_secs: 300 }
    }
}

/// The world around one candidate, as the controller sees it now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Around {
    /// Where the annotation `etcd-medic.io/paused: "true"` was found: the pod, its
    /// StatefulSet or its namespace.
    pub paused_on: Option<String>,
    /// Failing members of the candidate's cluster (its StatefulSet), the candidate included,
    /// candidates or not (yet).
    pub failing_in_cluster: usize,
    /// The candidate's cluster: its members and the others Ready now.
    pub cluster: ClusterSeen,
    /// Clusters (StatefulSets) of the candidate's namespace with a candidate, and how many
    /// clusters the namespace's watched pods make: one tenant's failures hold only its own.
    pub failing_clusters: usize,
    pub clusters: usize,
    /// Namespaces with a candidate, and how many namespaces the watched pods are in: many
    /// tenants failing at once hold every heal.
    pub failing_namespaces: usize,
    pub namespaces: usize,
    /// A remediation of this cluster not yet ended (its pod's name).
    pub in_flight: Option<String>,
    /// Seconds ago of this pod's earlier remediations, within the last 24 hours.
    pub attempts_secs_ago: Vec<i64>,
    /// Seconds ago of the agent's passing refusals of this pod (it was shutting down, the
    /// cluster was locked, the container ran again), within the last 24 hours: nothing was
    /// done, so they are no attempts, but each is asked again only after a back-off.
    pub refusals_secs_ago: Vec<i64>,
}

/// The first wait after a passing refusal by the agent; doubled after each further one, up
/// to the cooldown.
pub const REFUSAL_RETRY_SECS: i64 = 5;

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
    /// Without the candidate, its cluster's Ready members are no majority (a sole member,
    /// others starting or unready): any change could cost the quorum.
    NoQuorumWithout {
        members: usize,
        ready_others: usize,
    },
    /// Too many of the watched namespaces have failing clusters at once: something larger
    /// than one tenant is wrong.
    Storm {
        failing_namespaces: usize,
        namespaces: usize,
        max_percent: u32,
        min_clusters: u32,
    },
    /// Too many clusters of the candidate's namespace fail at once: that namespace's heals
    /// are held, and no other's.
    NamespaceStorm {
        failing_clusters: usize,
        clusters: usize,
        max_percent: u32,
        min_clusters: u32,
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
            Hold::NoQuorumWithout { .. } => "NoQuorumWithout",
            Hold::Storm { .. } => "Storm",
            Hold::NamespaceStorm { .. } => "NamespaceStorm",
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
    if !a.cluster.keeps_quorum_without_it() {
        return Err(Hold::NoQuorumWithout { members: a.cluster.members, ready_others: a.cluster.ready_others });
    }
    if is_storm(a.failing_namespaces, a.namespaces, l) {
        return Err(Hold::Storm {
            failing_namespaces: a.failing_namespaces,
            namespaces: a.namespaces,
            max_percent: l.max_failing_percent,
            min_clusters: l.storm_min_clusters,
        });
    }
    if is_storm(a.failing_clusters, a.clusters, l) {
        return Err(Hold::NamespaceStorm {
            failing_clusters: a.failing_clusters,
            clusters: a.clusters,
            max_percent: l.max_failing_percent,
            min_clusters: l.storm_min_clusters,
        });
    }
    if let Some(pod) = &a.in_flight {
        return Err(Hold::ClusterBusy { pod: pod.clone() });
    }
    let recent = within_a_day(&a.attempts_secs_ago);
    if recent.len() >= l.max_attempts as usize {
        return Err(Hold::MaxAttempts { attempts: recent.len(), max: l.max_attempts });
    }
    // 1st retry after `cooldown`, then 2×, 4×, … of it.
    if let Some(retry_in_secs) = back_off(&recent, l.cooldown_secs, i64::MAX) {
        return Err(Hold::Cooldown { retry_in_secs });
    }
    // After a passing refusal: 5 s, then 2×, 4×, …, never more than the cooldown.
    if let Some(retry_in_secs) = back_off(&within_a_day(&a.refusals_secs_ago), REFUSAL_RETRY_SECS, l.cooldown_secs.max(REFUSAL_RETRY_SECS))
    {
        return Err(Hold::Cooldown { retry_in_secs });
    }
    Ok(())
}

/// The times (seconds ago) that fall within the last 24 hours.
fn within_a_day(secs_ago: &[i64]) -> Vec<i64> {
    secs_ago.iter().copied().filter(|s| (0..24 * 3600).contains(s)).collect()
}

/// Seconds left to wait after the latest of `recent`: `first` after one, doubled for each
/// further one, at most `cap`. `None` once the wait is over (or nothing happened).
fn back_off(recent: &[i64], first: i64, cap: i64) -> Option<i64> {
    let last = *recent.iter().min()?;
    let wait = first.saturating_mul(1 << (recent.len() - 1).min(16)).min(cap);
    (last < wait).then_some(wait - last)
}

/// Whether the agent's passing refusal of an earlier record still holds this pod back: not
/// once the same pod instance has crashed again since (`recorded_at` is the restart count
/// the record was made at). A first crash the kubelet restarts at once can meet the agent
/// with its container running; the crash after it is new evidence, acted on as it comes.
pub fn refusal_holds(same_instance: bool, recorded_at: Option<u32>, restarts_now: u32) -> bool {
    !(same_instance && recorded_at.is_some_and(|n| n < restarts_now))
}

/// Many failing at once: more than `max_failing_percent` of those watched (clusters of one
/// namespace, or namespaces), and at least `storm_min_clusters` of them.
pub fn is_storm(failing_clusters: usize, clusters: usize, l: &Limits) -> bool {
    clusters > 0 && failing_clusters >= l.storm_min_clusters as usize && failing_clusters * 100 > clusters * l.max_failing_percent as usize
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
        Around {
            failing_in_cluster: 1,
            cluster: ClusterSeen { members: 3, ready_others: 2 },
            failing_clusters: 1,
            clusters: 10,
            failing_namespaces: 1,
            namespaces: 10,
            ..Default::default()
        }
    }

    #[test]
    fn holds_in_order() {
        let l = Limits::default();
        assert_eq!(decide(&alone(), &l), Ok(()));
        let paused = Around { paused_on: Some("statefulset apisix/apisix-etcd".into()), failing_in_cluster: 2, ..alone() };
        assert_eq!(decide(&paused, &l).unwrap_err().as_str(), "Paused", "a person's pause wins");
        assert_eq!(decide(&Around { failing_in_cluster: 2, ..alone() }, &l), Err(Hold::ClusterStorm { failing: 2 }));
        assert_eq!(decide(&Around { failing_clusters: 7, clusters: 30, ..alone() }, &l).unwrap_err().as_str(), "NamespaceStorm");
        assert_eq!(decide(&Around { failing_clusters: 6, clusters: 30, ..alone() }, &l), Ok(()), "20% of 30 is allowed");
        assert_eq!(decide(&Around { failing_namespaces: 7, namespaces: 30, ..alone() }, &l).unwrap_err().as_str(), "Storm");
        assert_eq!(decide(&Around { in_flight: Some("apisix-etcd-0".into()), ..alone() }, &l).unwrap_err().as_str(), "ClusterBusy");
    }

    #[test]
    fn one_tenants_failures_hold_only_that_tenants_heals() {
        let l = Limits::default();
        // A tenant's ten crash-looping clusters: its own namespace is a storm...
        let tenant = Around { failing_clusters: 10, clusters: 10, failing_namespaces: 2, namespaces: 2, ..alone() };
        assert_eq!(decide(&tenant, &l).unwrap_err().as_str(), "NamespaceStorm");
        // ...while the victim's one failing member, in its own namespace, is healed: two
        // namespaces failing are below the floor of three.
        let victim = Around { failing_clusters: 1, clusters: 1, failing_namespaces: 2, namespaces: 2, ..alone() };
        assert_eq!(decide(&victim, &l), Ok(()));
    }

    #[test]
    fn one_member_of_the_only_cluster_is_no_storm() {
        let l = Limits::default();
        // One APISIX release: three etcd pods, one of them failing (33 % of the pods, 100 % of
        // the clusters).
        assert_eq!(decide(&Around { failing_clusters: 1, clusters: 1, ..alone() }, &l), Ok(()));
        assert_eq!(decide(&Around { failing_clusters: 2, clusters: 2, ..alone() }, &l), Ok(()), "below the floor");
        let three = decide(&Around { failing_namespaces: 3, namespaces: 3, ..alone() }, &l);
        assert_eq!(three, Err(Hold::Storm { failing_namespaces: 3, namespaces: 3, max_percent: 20, min_clusters: 3 }));
        assert_eq!(decide(&Around { failing_namespaces: 3, namespaces: 100, ..alone() }, &l), Ok(()), "3 % of the namespaces");
        assert_eq!(decide(&Around { failing_namespaces: 21, namespaces: 100, ..alone() }, &l).unwrap_err().as_str(), "Storm");
        assert!(!is_storm(5, 0, &l), "nothing watched");
        // The cluster's own majority stays a ClusterStorm, whatever the floor.
        let two_of_three = Around { failing_in_cluster: 2, failing_clusters: 1, clusters: 1, ..alone() };
        assert_eq!(decide(&two_of_three, &l), Err(Hold::ClusterStorm { failing: 2 }));
    }

    #[test]
    fn a_failure_that_can_only_repeat_is_a_candidate_from_its_first_crash() {
        let t = Thresholds::default();
        let first = ContainerSeen { crash_loop: false, exited_with_error: true, restarts: 0, not_ready_for_secs: Some(0), ..crash(0, 0) };
        assert!(detect(&first, &t).unwrap_err().below_thresholds(), "the thresholds alone wait");
        assert_eq!(first_crash(&first, &t, Signature::MemberNotFound), Ok(()));
        assert_eq!(first_crash(&crash(1, 2), &t, Signature::BadMemberId), Ok(()));
        assert_eq!(first_crash(&crash(1, 2), &t, Signature::CorruptData), Ok(()));
        assert_eq!(
            first_crash(&first, &t, Signature::Unknown),
            Err(NotFirstCrash::MayNotRepeat { signature: Signature::Unknown }),
            "an unknown crash (a single OOM) waits for the thresholds"
        );
        assert_eq!(
            first_crash(&first, &t, Signature::MemberRemoved),
            Err(NotFirstCrash::MayNotRepeat { signature: Signature::MemberRemoved })
        );
        // Never while the container runs, and not when the rule is off.
        let running = ContainerSeen { running: true, ..first.clone() };
        assert_eq!(first_crash(&running, &t, Signature::MemberNotFound), Err(NotFirstCrash::NotFailed(NotFailing::Running)));
        let off = Thresholds { first_crash: false, ..t };
        assert_eq!(first_crash(&first, &off, Signature::MemberNotFound), Err(NotFirstCrash::Off));
    }

    #[test]
    fn nothing_is_dispatched_unless_the_others_keep_quorum_without_the_member() {
        let l = Limits::default();
        let with = |members, ready_others| decide(&Around { cluster: ClusterSeen { members, ready_others }, ..alone() }, &l);
        assert_eq!(with(3, 2), Ok(()));
        assert_eq!(with(3, 1), Err(Hold::NoQuorumWithout { members: 3, ready_others: 1 }));
        assert_eq!(with(1, 0).unwrap_err().as_str(), "NoQuorumWithout", "a sole member");
        assert_eq!(with(2, 1).unwrap_err().as_str(), "NoQuorumWithout", "1 of 2 is no majority");
        assert_eq!(with(5, 3), Ok(()));
        assert_eq!(with(5, 2).unwrap_err().as_str(), "NoQuorumWithout");
    }

    #[test]
    fn a_passing_refusal_is_asked_again_after_a_growing_wait() {
        let l = Limits::default();
        let after = |ago: Vec<i64>| decide(&Around { refusals_secs_ago: ago, ..alone() }, &l);
        assert_eq!(after(vec![2]), Err(Hold::Cooldown { retry_in_secs: 3 }));
        assert_eq!(after(vec![5]), Ok(()));
        assert_eq!(after(vec![6, 20]), Err(Hold::Cooldown { retry_in_secs: 4 }), "twice the wait after two");
        assert_eq!(after((0..20).map(|i| 100 + i).collect()), Err(Hold::Cooldown { retry_in_secs: 200 }), "never more than the cooldown");
        assert_eq!(after(vec![90000]), Ok(()), "older than a day");
    }

    #[test]
    fn a_refusal_at_an_earlier_crash_of_the_same_instance_holds_nothing() {
        assert!(!refusal_holds(true, Some(0), 1), "the pod crashed again since");
        assert!(refusal_holds(true, Some(1), 1), "the same crash: the back-off stands");
        assert!(refusal_holds(false, Some(0), 3), "another instance's refusal: its own back-off");
        assert!(refusal_holds(true, None, 3), "a record that does not say when: the back-off stands");
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
