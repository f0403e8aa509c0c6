//! Verification's verdicts: from what etcd and the API server show, round after round,
//! whether the member rejoined, needs promoting, left an entry behind that must go, or is
//! still on its way. Pure: the agent observes and acts, [`Verifier::observe`] decides.

use std::time::{Duration, Instant};

use crate::member::{Member, orphaned_entry, rejoined};
use crate::profile::Profile;

/// An unstarted entry left by an interrupted `member add` goes once it stayed so this long
/// with the pod's etcd container not running.
pub const ORPHAN_GRACE: Duration = Duration::from_secs(3);

/// The pod as verification needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodSeen {
    /// Another instance (UID) than the one the remediation restarted.
    pub replaced: bool,
    pub ready: bool,
    /// Its etcd container runs now.
    pub running: bool,
}

/// What to do after one observation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The goal: the pod was replaced, is Ready, and its member started and votes, healthy.
    Rejoined { id: u64, message: String },
    /// The member runs as a learner: promote it (it is refused until it caught up).
    Promote(u64),
    /// Remove this entry: the image added it and was stopped before etcd started, and its
    /// next `member add` would fail on the taken peer URL for ever.
    RemoveOrphan(u64),
    /// Not yet; what was seen.
    Wait(String),
}

/// Follows one remediation's verification.
#[derive(Clone, Debug)]
pub struct Verifier {
    pub profile: Profile,
    pub peer_url: String,
    pub stale: Option<u64>,
    orphan: Option<(u64, Instant)>,
    promoted: Option<u64>,
}

impl Verifier {
    pub fn new(profile: Profile, peer_url: &str, stale: Option<u64>) -> Self {
        Verifier { profile, peer_url: peer_url.into(), stale, orphan: None, promoted: None }
    }

    /// The promotion of `id` went through.
    pub fn promoted(&mut self, id: u64) {
        self.promoted = Some(id);
    }

    /// The orphaned entry was removed (or the attempt is over): it is watched afresh.
    pub fn orphan_handled(&mut self) {
        self.orphan = None;
    }

    /// Decides from the member list and the pod (`None`: it could not be read) seen at `now`.
    pub fn observe(&mut self, members: &[Member], pod: Option<PodSeen>, now: Instant) -> Verdict {
        let mine = rejoined(members, &self.peer_url, self.stale);
        if let Some(m) = mine.filter(|m| m.is_learner) {
            return Verdict::Promote(m.id);
        }
        let Some(pod) = pod else { return Verdict::Wait("the pod could not be read".into()) };
        match orphaned_entry(self.profile, members, &self.peer_url, self.stale, pod.running) {
            Some(id) => match self.orphan {
                Some((o, since)) if o == id && now.saturating_duration_since(since) >= ORPHAN_GRACE => {
                    return Verdict::RemoveOrphan(id);
                }
                Some((o, _)) if o == id => {}
                _ => self.orphan = Some((id, now)),
            },
            None => self.orphan = None,
        }
        if pod.replaced && pod.ready {
            if let Some(m) = mine.filter(|m| !m.is_learner && m.healthy) {
                let how = if self.promoted == Some(m.id) { "promoted from learner, " } else { "" };
                return Verdict::Rejoined {
                    id: m.id,
                    message: format!("pod Ready and member {:x} started and voting ({how}healthy)", m.id),
                };
            }
            return Verdict::Wait("pod Ready, member not yet started and voting".into());
        }
        Verdict::Wait(format!(
            "pod {}, {}",
            if pod.replaced { "replaced" } else { "not yet replaced" },
            if pod.ready { "Ready" } else { "not Ready" }
        ))
    }
}

/// How long to wait before the next observation: every 50 ms for the first 10 s (a member
/// usually rejoins within a second, and is seen back within 50 ms), then once a second.
pub fn poll_interval(elapsed: Duration) -> Duration {
    if elapsed < Duration::from_secs(10) { Duration::from_millis(50) } else { Duration::from_secs(1) }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEER: &str = "http://apisix-etcd-1.apisix-etcd-headless.apisix.svc.cluster.local:2380";

    fn member(id: u64, name: &str, learner: bool, healthy: bool) -> Member {
        Member { id, name: name.into(), peer_urls: vec![PEER.into()], client_urls: vec![], is_learner: learner, healthy }
    }

    fn other() -> Member {
        Member {
            id: 1,
            name: "apisix-etcd-0".into(),
            peer_urls: vec!["http://other:2380".into()],
            client_urls: vec![],
            is_learner: false,
            healthy: true,
        }
    }

    const READY: PodSeen = PodSeen { replaced: true, ready: true, running: true };
    const CRASHING: PodSeen = PodSeen { replaced: true, ready: false, running: false };

    #[test]
    fn rejoined_only_when_replaced_ready_started_voting_and_healthy() {
        let t = Instant::now();
        let mut v = Verifier::new(Profile::BitnamiMemberId, PEER, Some(7));
        assert!(matches!(v.observe(&[other()], Some(READY), t), Verdict::Wait(s) if s.contains("not yet started")));
        // The stale entry itself never counts as the member back.
        assert!(matches!(v.observe(&[other(), member(7, "apisix-etcd-1", false, true)], Some(READY), t), Verdict::Wait(_)));
        assert!(matches!(v.observe(&[other(), member(9, "apisix-etcd-1", false, false)], Some(READY), t), Verdict::Wait(_)), "unhealthy");
        let old = PodSeen { replaced: false, ..READY };
        assert!(
            matches!(v.observe(&[other(), member(9, "apisix-etcd-1", false, true)], Some(old), t), Verdict::Wait(s) if s.contains("not yet replaced"))
        );
        assert!(matches!(v.observe(&[other(), member(9, "apisix-etcd-1", false, true)], None, t), Verdict::Wait(_)));
        assert_eq!(
            v.observe(&[other(), member(9, "apisix-etcd-1", false, true)], Some(READY), t),
            Verdict::Rejoined { id: 9, message: "pod Ready and member 9 started and voting (healthy)".into() }
        );
    }

    #[test]
    fn a_learner_is_promoted_first_and_said_so() {
        let t = Instant::now();
        let mut v = Verifier::new(Profile::Plain, PEER, Some(7));
        assert_eq!(v.observe(&[other(), member(9, "apisix-etcd-1", true, true)], Some(READY), t), Verdict::Promote(9));
        v.promoted(9);
        match v.observe(&[other(), member(9, "apisix-etcd-1", false, true)], Some(READY), t) {
            Verdict::Rejoined { message, .. } => assert!(message.contains("promoted from learner"), "{message}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_orphan_goes_only_after_its_grace_with_the_container_down() {
        let t = Instant::now();
        let orphan = [other(), member(8, "", false, false)];
        let mut v = Verifier::new(Profile::BitnamiMemberId, PEER, Some(7));
        assert!(matches!(v.observe(&orphan, Some(CRASHING), t), Verdict::Wait(_)), "first seen");
        assert!(matches!(v.observe(&orphan, Some(CRASHING), t + Duration::from_secs(2)), Verdict::Wait(_)));
        assert_eq!(v.observe(&orphan, Some(CRASHING), t + ORPHAN_GRACE), Verdict::RemoveOrphan(8));
        // The container started in between: the image is starting that member, it stays.
        let mut v = Verifier::new(Profile::BitnamiMemberId, PEER, Some(7));
        v.observe(&orphan, Some(CRASHING), t);
        let starting = PodSeen { running: true, ..CRASHING };
        assert!(matches!(v.observe(&orphan, Some(starting), t + Duration::from_secs(2)), Verdict::Wait(_)));
        assert!(matches!(v.observe(&orphan, Some(CRASHING), t + Duration::from_secs(4)), Verdict::Wait(_)), "its grace starts again");
        // A plain set's unstarted entry is the agent's own learner: never an orphan.
        let mut v = Verifier::new(Profile::Plain, PEER, Some(7));
        assert!(matches!(v.observe(&orphan, Some(CRASHING), t), Verdict::Wait(_)));
        assert!(matches!(v.observe(&orphan, Some(CRASHING), t + Duration::from_secs(60)), Verdict::Wait(_)));
    }

    #[test]
    fn polls_fast_first_then_once_a_second() {
        assert_eq!(poll_interval(Duration::from_secs(1)), Duration::from_millis(50));
        assert_eq!(poll_interval(Duration::from_secs(11)), Duration::from_secs(1));
    }
}
