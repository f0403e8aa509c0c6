//! The cluster's lock (a coordination.k8s.io Lease per etcd cluster): when it is free, when
//! another holder keeps it, when a silent holder may be taken over, and how long a renewal
//! may keep failing. Pure: the agent reads and writes the Lease, these decide.

use std::time::{Duration, Instant};

use jiff::Timestamp;

/// Long enough for the longest step between renewals (membership retries and settling).
pub const DURATION: Duration = Duration::from_secs(120);
/// How often a held lease is renewed: a dozen chances before it would expire.
pub const RENEW_EVERY: Duration = Duration::from_secs(10);
/// A renewal that keeps failing gives up this long before the lease would expire.
pub const RENEW_MARGIN: Duration = Duration::from_secs(15);

/// The lock of the etcd StatefulSet `namespace`/UID `set_uid`: named by what Kubernetes
/// proves (never by the cluster id an endpoint reports, which a relay to another tenant's
/// cluster would make that tenant's). A UID has a fixed form, so the name is unambiguous.
pub fn lease_name(namespace: &str, set_uid: &str) -> String {
    format!("etcd-medic-{namespace}-{set_uid}")
}

/// A Lease as these decisions need it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Holding {
    pub holder: Option<String>,
    /// `renewTime`, else `acquireTime`, by the holder's clock.
    pub renewed: Option<Timestamp>,
    pub duration_seconds: Option<i32>,
    pub resource_version: String,
}

impl Holding {
    /// Its duration (the default when unset, at least a second).
    pub fn duration(&self) -> Duration {
        Duration::from_secs(self.duration_seconds.unwrap_or(DURATION.as_secs() as i32).max(1) as u64)
    }

    fn holder(&self) -> Option<&str> {
        self.holder.as_deref().filter(|h| !h.is_empty())
    }
}

/// Is the lease held by someone other than `me` and, by its holder's own `renewTime`, not
/// expired at `now`? (A lease that looks expired this way is only a candidate: see
/// [`decide`], which takes it over only after watching it unchanged.)
pub fn held_by_other(h: &Holding, me: &str, now: Timestamp) -> Option<String> {
    let holder = h.holder().filter(|x| *x != me)?;
    let ttl = h.duration_seconds.unwrap_or(DURATION.as_secs() as i32) as i64;
    let expires = h.renewed?.checked_add(jiff::SignedDuration::from_secs(ttl)).ok()?;
    (now < expires).then(|| holder.to_string())
}

/// Whether a lease that another holder has not renewed (by its own clock) has also stayed
/// unchanged here for its whole duration, measured on this node's monotonic clock, as
/// client-go's leader election decides. Clocks of other nodes are never compared with ours.
pub fn expired_locally(first_seen: Instant, now: Instant, duration: Duration) -> bool {
    now.saturating_duration_since(first_seen) >= duration
}

/// What to do with the lease as it is now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Acquire {
    /// Free, released, ours already, or its holder is known dead: write it as ours.
    Take,
    /// Another holder left it unchanged for its whole duration as watched here: take it over.
    TakeOver { holder: String },
    /// Another holder keeps it: `ClusterLocked`.
    Busy { holder: String },
    /// Looks expired by its holder's clock: start watching this resourceVersion.
    Watch,
    /// Watched, unchanged, not yet for its whole duration: look again shortly.
    Wait,
}

/// Decides, for the lease as read now (`None`: there is none), given the resourceVersion
/// first seen unchanged and when (`watched`), and whether its holder is known to be gone
/// (a remediation of this node no process runs any more).
pub fn decide(
    lease: Option<&Holding>,
    me: &str,
    gone: impl Fn(&str) -> bool,
    watched: Option<(&str, Instant)>,
    now: Timestamp,
    mono: Instant,
) -> Acquire {
    let Some(l) = lease else { return Acquire::Take };
    let Some(holder) = l.holder().filter(|h| *h != me && !gone(h)) else { return Acquire::Take };
    if held_by_other(l, me, now).is_some() {
        return Acquire::Busy { holder: holder.into() };
    }
    match watched {
        None => Acquire::Watch,
        // Renewed while watched: the holder lives (its clock is skewed).
        Some((rv, _)) if rv != l.resource_version => Acquire::Busy { holder: holder.into() },
        Some((_, since)) if expired_locally(since, mono, l.duration()) => Acquire::TakeOver { holder: holder.into() },
        Some(_) => Acquire::Wait,
    }
}

/// Until when a failing renewal of a lease last written at `renewed` is retried: it gives
/// up [`RENEW_MARGIN`] before the lease would expire, so that no other node takes it over
/// while this one still acts.
pub fn renew_until(renewed: Instant, duration: Duration) -> Instant {
    renewed + duration.saturating_sub(RENEW_MARGIN)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(holder: &str, renewed_secs_ago: i64, ttl: i32, rv: &str) -> Holding {
        let t = Timestamp::now().checked_sub(jiff::SignedDuration::from_secs(renewed_secs_ago)).unwrap();
        Holding { holder: Some(holder.into()), renewed: Some(t), duration_seconds: Some(ttl), resource_version: rv.into() }
    }

    #[test]
    fn expiry_is_measured_on_this_nodes_clock_only() {
        let seen = Instant::now();
        assert!(!expired_locally(seen, seen + Duration::from_secs(119), DURATION));
        assert!(expired_locally(seen, seen + Duration::from_secs(120), DURATION));
        // A clock that went backwards (or a first sight after now) never expires anything.
        assert!(!expired_locally(seen + Duration::from_secs(5), seen, DURATION));
    }

    #[test]
    fn a_live_lease_of_another_node_locks_an_expired_one_does_not() {
        let now = Timestamp::now();
        assert_eq!(held_by_other(&held("node-b", 5, 60, "1"), "node-a", now).as_deref(), Some("node-b"));
        assert_eq!(held_by_other(&held("node-b", 61, 60, "1"), "node-a", now), None, "expired: taken over");
        assert_eq!(held_by_other(&held("node-a", 5, 60, "1"), "node-a", now), None, "ours");
        assert_eq!(held_by_other(&held("", 5, 60, "1"), "node-a", now), None, "released");
        assert_eq!(held_by_other(&Holding::default(), "node-a", now), None);
    }

    #[test]
    fn a_silent_holder_is_taken_over_only_after_a_whole_duration_unchanged_here() {
        let (now, t0) = (Timestamp::now(), Instant::now());
        let never = |_: &str| false;
        assert_eq!(decide(None, "a/1", never, None, now, t0), Acquire::Take, "no lease yet");
        let live = held("b/2", 5, 60, "7");
        assert_eq!(decide(Some(&live), "a/1", never, None, now, t0), Acquire::Busy { holder: "b/2".into() });
        assert_eq!(decide(Some(&live), "a/1", |h| h == "b/2", None, now, t0), Acquire::Take, "a dead holder of this node");
        assert_eq!(decide(Some(&held("a/1", 5, 60, "7")), "a/1", never, None, now, t0), Acquire::Take, "ours (a resume)");
        // Expired by the holder's clock: watched, and taken only after 60 s unchanged here.
        let stale = held("b/2", 3600, 60, "7");
        assert_eq!(decide(Some(&stale), "a/1", never, None, now, t0), Acquire::Watch);
        assert_eq!(decide(Some(&stale), "a/1", never, Some(("7", t0)), now, t0 + Duration::from_secs(59)), Acquire::Wait);
        assert_eq!(
            decide(Some(&stale), "a/1", never, Some(("7", t0)), now, t0 + Duration::from_secs(60)),
            Acquire::TakeOver { holder: "b/2".into() }
        );
        // A holder whose clock is behind renews while watched: it lives, and keeps the lease.
        let renewed = held("b/2", 3600, 60, "8");
        assert_eq!(
            decide(Some(&renewed), "a/1", never, Some(("7", t0)), now, t0 + Duration::from_secs(60)),
            Acquire::Busy { holder: "b/2".into() }
        );
    }

    #[test]
    fn a_failing_renewal_gives_up_before_the_lease_expires() {
        let t0 = Instant::now();
        assert_eq!(renew_until(t0, DURATION), t0 + Duration::from_secs(105));
        assert_eq!(renew_until(t0, Duration::from_secs(10)), t0, "a lease shorter than the margin is not renewed late");
        assert!(RENEW_EVERY * 10 < DURATION - RENEW_MARGIN, "ten renewals fit before a failing one gives up");
    }
}
