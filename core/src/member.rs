//! The etcd members as the engine decides about them: which entry is the stale one, which
//! one left by an interrupted start may go, which counts as healthy, and what membership
//! change a plain deployment needs. Pure: the agent asks etcd, these decide.

use crate::error::{Code, Error, Result};
use crate::profile::Profile;
use crate::quorum::MemberView;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub id: u64,
    pub name: String,
    pub peer_urls: Vec<String>,
    pub client_urls: Vec<String>,
    pub is_learner: bool,
    pub healthy: bool,
}

impl Member {
    /// What the quorum check needs of it.
    pub fn view(&self) -> MemberView {
        MemberView { id: self.id, is_learner: self.is_learner, healthy: self.healthy }
    }
}

/// What a member's status said: the leader it follows, and whether it raised no alarm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seen {
    pub leader: u64,
    pub clean: bool,
}

/// The members that count as healthy: they answered, raised no alarm, and follow the one
/// leader most answering members name, itself a listed voting member. No single such leader
/// (none, or a tie: members that disagree) means none is healthy. Pure.
pub fn agreed_healthy(members: &[(u64, bool, Option<Seen>)]) -> std::collections::HashSet<u64> {
    let voters: std::collections::HashSet<u64> = members.iter().filter(|(_, learner, _)| !learner).map(|(id, _, _)| *id).collect();
    let mut votes: std::collections::BTreeMap<u64, usize> = Default::default();
    for (_, _, s) in members {
        if let Some(s) = s.filter(|s| s.leader != 0 && voters.contains(&s.leader)) {
            *votes.entry(s.leader).or_default() += 1;
        }
    }
    let most = votes.values().copied().max().unwrap_or(0);
    let top: Vec<u64> = votes.iter().filter(|(_, n)| **n == most).map(|(l, _)| *l).collect();
    let [leader] = top.as_slice() else { return Default::default() };
    members.iter().filter(|(_, _, s)| s.is_some_and(|s| s.clean && s.leader == *leader)).map(|(id, _, _)| *id).collect()
}

/// `3.4.0` and later have learners; anything unparsable is treated as older (a voter).
pub fn learners_in(version: &str) -> bool {
    let mut parts = version.trim_start_matches('v').split('.').map(|p| p.parse::<u32>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(major), Some(minor)) => (major, minor) >= (3, 4),
        _ => false,
    }
}

/// A stored member id is 1–16 hex digits (trailing whitespace allowed); anything else is
/// ignored with the reason, never copied anywhere.
pub fn parse_member_id(bytes: &[u8]) -> std::result::Result<u64, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "not text".to_string())?.trim();
    if text.is_empty() || text.len() > 16 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("not 1-16 hex digits ({} bytes)", bytes.len()));
    }
    u64::from_str_radix(text, 16).map_err(|e| e.to_string())
}

/// Where the stale entry comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Basis {
    /// The first check: the entry that carries the pod's peer URL is the member's old self.
    FirstCheck,
    /// A resume: only the entry the journal recorded (`None`: it recorded none) may go; the
    /// member may have rejoined by itself meanwhile under a new id with the same peer URL,
    /// and that one stays.
    Journal(Option<u64>),
}

/// The stale member entry a remediation removes, by one rule for the check and the resume.
pub fn stale_member(members: &[Member], peer_url: &str, basis: Basis) -> Option<u64> {
    let with_url = |m: &&Member| m.peer_urls.iter().any(|u| u == peer_url);
    match basis {
        Basis::FirstCheck => members.iter().find(with_url).map(|m| m.id),
        Basis::Journal(recorded) => members.iter().filter(with_url).find(|m| Some(m.id) == recorded).map(|m| m.id),
    }
}

/// Every entry that carries the pod's peer URL: its stale self and any the image added.
pub fn own_entries(members: &[Member], peer_url: &str) -> Vec<u64> {
    members.iter().filter(|m| m.peer_urls.iter().any(|u| u == peer_url)).map(|m| m.id).collect()
}

/// The quorum check of replacing the member of the pod whose peer URL is `peer_url`, every
/// entry it has now counted as its own (see [`crate::quorum::check_quorum`]).
pub fn check_replacing(members: &[Member], peer_url: &str) -> Result<()> {
    let views: Vec<MemberView> = members.iter().map(Member::view).collect();
    crate::quorum::check_quorum(&views, &own_entries(members, peer_url), crate::quorum::Change::ReplaceMember)
}

/// The member the pod runs as now: the pod's peer URL, started (it has a name), not the
/// stale entry. It may still be a learner.
pub fn rejoined<'m>(members: &'m [Member], peer_url: &str, stale: Option<u64>) -> Option<&'m Member> {
    members.iter().find(|m| m.peer_urls.iter().any(|u| u == peer_url) && Some(m.id) != stale && !m.name.is_empty())
}

/// An entry with the pod's peer URL that never started (no name) while the pod's etcd
/// container is not running: the image added it and was stopped before etcd started. Only
/// for Bitnami profiles, whose image adds the member itself (a plain set's entry is the
/// agent's own, added before the restart, and stays).
pub fn orphaned_entry(profile: Profile, members: &[Member], peer_url: &str, stale: Option<u64>, running: bool) -> Option<u64> {
    if running || profile == Profile::Plain {
        return None;
    }
    members.iter().find(|m| m.name.is_empty() && Some(m.id) != stale && m.peer_urls.iter().any(|u| u == peer_url)).map(|m| m.id)
}

/// What membership needs for a plain deployment, whose pods start etcd with fixed flags: the
/// agent adds the member back itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Add {
    /// Added before an interruption (not started yet): not added twice.
    Already(u64),
    /// Add it: as a learner where the cluster has learners (it does not count for quorum
    /// until it caught up, and is promoted during verification).
    Add,
}

pub fn plain_add(members: &[Member], peer_url: &str, stale: Option<u64>) -> Result<Add> {
    match members.iter().find(|m| m.peer_urls.iter().any(|u| u == peer_url) && Some(m.id) != stale) {
        Some(m) if m.name.is_empty() => Ok(Add::Already(m.id)),
        Some(m) => Err(Error::new(
            Code::UnsafePath,
            format!("a started member {:x} already has peer URL {peer_url}; not guessing which one to keep", m.id),
        )),
        None => Ok(Add::Add),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: u64, name: &str, peer: &str) -> Member {
        Member { id, name: name.into(), peer_urls: vec![peer.into()], client_urls: vec![], is_learner: false, healthy: true }
    }

    #[test]
    fn replacing_counts_every_entry_of_the_pods_peer_url_as_its_own() {
        let me = "http://10.0.0.2:2380";
        let added = Member { healthy: false, ..member(4, "", me) };
        let members = [member(1, "e-0", "http://10.0.0.1:2380"), member(3, "e-2", "http://10.0.0.3:2380"), added];
        // The image's own unstarted entry is the pod's, not a fourth voter beside two.
        check_replacing(&members, me).unwrap();
        // Under another URL it would be a voter that does not answer: 2 of 3 left, 3 of 4 asked.
        assert_eq!(check_replacing(&members, "http://10.0.0.9:2380").unwrap_err().code, Code::QuorumAtRisk);
    }

    const PEER: &str = "http://apisix-etcd-1.apisix-etcd-headless.apisix.svc.cluster.local:2380";

    #[test]
    fn the_check_and_the_resume_find_the_stale_member_by_one_rule() {
        let old = [member(1, "apisix-etcd-0", "http://other:2380"), member(7, "apisix-etcd-1", PEER)];
        assert_eq!(stale_member(&old, PEER, Basis::FirstCheck), Some(7));
        assert_eq!(stale_member(&old[..1], PEER, Basis::FirstCheck), None, "removed already");
        assert_eq!(stale_member(&old, PEER, Basis::Journal(Some(7))), Some(7), "still listed at the resume");
        // Rejoined by itself under a new id meanwhile: that one stays.
        let rejoined = [member(1, "apisix-etcd-0", "http://other:2380"), member(9, "apisix-etcd-1", PEER)];
        assert_eq!(stale_member(&rejoined, PEER, Basis::Journal(Some(7))), None);
        assert_eq!(stale_member(&rejoined, PEER, Basis::Journal(None)), None, "nothing recorded, nothing removed");
        // The recorded id now carries another peer URL: not the member's any more.
        let moved = [member(7, "x", "http://elsewhere:2380")];
        assert_eq!(stale_member(&moved, PEER, Basis::Journal(Some(7))), None);
    }

    #[test]
    fn only_an_unstarted_entry_of_a_stopped_bitnami_member_is_an_orphan() {
        let members = [member(1, "apisix-etcd-0", "http://other:2380"), member(7, "", PEER)];
        assert_eq!(orphaned_entry(Profile::BitnamiMemberId, &members, PEER, None, false), Some(7));
        assert_eq!(orphaned_entry(Profile::BitnamiMemberId, &members, PEER, None, true), None, "the image is starting it");
        assert_eq!(orphaned_entry(Profile::Plain, &members, PEER, None, false), None, "the agent's own learner stays");
        assert_eq!(orphaned_entry(Profile::Bitnami, &members, PEER, Some(7), false), None, "the stale entry is Membership's");
        let started = [member(7, "apisix-etcd-1", PEER)];
        assert_eq!(orphaned_entry(Profile::Bitnami, &started, PEER, None, false), None, "a started member is never an orphan");
    }

    #[test]
    fn a_plain_member_is_added_once_and_never_beside_a_started_one() {
        assert_eq!(plain_add(&[member(1, "a", "http://other:2380")], PEER, None), Ok(Add::Add));
        assert_eq!(plain_add(&[member(7, "apisix-etcd-1", PEER)], PEER, Some(7)), Ok(Add::Add), "the stale entry goes first");
        assert_eq!(plain_add(&[member(8, "", PEER)], PEER, Some(7)), Ok(Add::Already(8)), "added before an interruption");
        assert_eq!(plain_add(&[member(8, "apisix-etcd-1", PEER)], PEER, Some(7)).unwrap_err().code, Code::UnsafePath);
    }

    #[test]
    fn the_rejoined_member_is_started_with_the_peer_url_and_not_the_stale_entry() {
        let m = [member(7, "apisix-etcd-1", PEER), member(8, "", PEER), member(9, "apisix-etcd-1", PEER)];
        assert_eq!(rejoined(&m, PEER, Some(7)).map(|m| m.id), Some(9));
        assert_eq!(rejoined(&m[..2], PEER, Some(7)), None, "added, not started");
    }

    #[test]
    fn member_ids_are_short_hex_text_only() {
        assert_eq!(parse_member_id(b"8e9e05c52164694d\n"), Ok(0x8e9e05c52164694d));
        for bad in [&b""[..], b"xyz", b"8e9e05c52164694d0", b"\xff\xfe", b"../etc"] {
            assert!(parse_member_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn healthy_members_follow_the_leader_the_others_agree_on() {
        let seen = |leader: u64| Some(Seen { leader, clean: true });
        let ids = |v: &[(u64, bool, Option<Seen>)]| {
            let mut h: Vec<u64> = agreed_healthy(v).into_iter().collect();
            h.sort();
            h
        };
        assert_eq!(ids(&[(1, false, seen(1)), (2, false, seen(1)), (3, false, seen(1))]), vec![1, 2, 3]);
        // Cut off from the leader: it answers, but follows nobody (or an old leader).
        assert_eq!(ids(&[(1, false, seen(1)), (2, false, seen(1)), (3, false, seen(0))]), vec![1, 2]);
        assert_eq!(ids(&[(1, false, seen(1)), (2, false, seen(1)), (3, false, seen(3))]), vec![1, 2]);
        // Stopped: no answer. An alarm (NOSPACE): not healthy.
        let alarm = Some(Seen { leader: 1, clean: false });
        assert_eq!(ids(&[(1, false, seen(1)), (2, false, None), (3, false, alarm)]), vec![1]);
        // No agreement, or a leader that is no listed voter: nobody counts.
        assert!(ids(&[(1, false, seen(1)), (2, false, seen(2))]).is_empty());
        assert!(ids(&[(1, false, seen(9)), (2, false, seen(9))]).is_empty());
        assert!(ids(&[(1, true, seen(1)), (2, false, seen(1))]).is_empty(), "a learner cannot lead");
        assert_eq!(ids(&[(1, false, seen(1)), (4, true, seen(1))]), vec![1, 4], "a learner in sync is healthy");
    }

    #[test]
    fn learners_arrived_in_3_4() {
        for (v, yes) in [
            ("3.5.34", true),
            ("3.6.15", true),
            ("3.4.0", true),
            ("v3.4.27", true),
            ("3.3.27", false),
            ("4.0.0", true),
            ("", false),
            ("x.y", false),
        ] {
            assert_eq!(learners_in(v), yes, "{v}");
        }
    }
}
