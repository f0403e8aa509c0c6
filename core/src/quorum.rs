//! Quorum: whether the cluster keeps a majority of voting members now and after the change
//! a remediation makes. Pure.

use crate::error::{Code, Error, Result};

/// One voting or learning member as the agent sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberView {
    pub id: u64,
    pub is_learner: bool,
    /// Answered a status request just now.
    pub healthy: bool,
}

/// What the remediation will do to membership.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// Remove the stale entry (if still listed), then one member is added back.
    ReplaceMember,
}

/// Majority of `n` voters.
pub fn quorum(n: usize) -> usize {
    n / 2 + 1
}

/// The remaining voting members must be a majority now and after the change; never act on
/// a sole member. `own` are the entries that carry the failing pod's peer URL: its stale
/// entry, and one its image added itself after the data went (a crash-looping Bitnami pod
/// re-adds itself while a resumed remediation waits). Whatever they are now, the pod ends
/// with one entry.
pub fn check_quorum(members: &[MemberView], own: &[u64], change: Change) -> Result<()> {
    let voters: Vec<&MemberView> = members.iter().filter(|m| !m.is_learner).collect();
    let others: Vec<&&MemberView> = voters.iter().filter(|m| !own.contains(&m.id)).collect();
    if others.is_empty() {
        return Err(Error::new(
            Code::SoleMember,
            "the member is the cluster's only voting member: there is nothing to rejoin; restore from a backup instead",
        ));
    }
    let healthy = others.iter().filter(|m| m.healthy).count();
    let now = quorum(voters.len());
    if healthy < now {
        return Err(Error::new(
            Code::QuorumAtRisk,
            format!("only {healthy} of {} voting members answer; the cluster needs {now} for quorum now", voters.len()),
        ));
    }
    let Change::ReplaceMember = change;
    // After the stale entry goes and the member is added back (not yet started), the
    // cluster has others + 1 voters, of which only the healthy others vote.
    let after = quorum(others.len() + 1);
    if healthy < after {
        return Err(Error::new(
            Code::QuorumAtRisk,
            format!(
                "after re-adding the member the cluster would have {} voters and need {after}, but only {healthy} answer",
                others.len() + 1
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(id: u64, healthy: bool) -> MemberView {
        MemberView { id, is_learner: false, healthy }
    }

    #[test]
    fn quorum_before_and_after() {
        // Target already removed: two healthy others.
        assert!(check_quorum(&[m(1, true), m(2, true)], &[], Change::ReplaceMember).is_ok());
        // Target still listed (crash-looping, unhealthy) in a 3-member cluster.
        assert!(check_quorum(&[m(1, true), m(2, true), m(3, false)], &[3], Change::ReplaceMember).is_ok());
        // Two of three down.
        assert_eq!(
            check_quorum(&[m(1, true), m(2, false), m(3, false)], &[3], Change::ReplaceMember).unwrap_err().code,
            Code::QuorumAtRisk
        );
        // Removed already and one of the two remaining down: adding back would need 2 of 3.
        assert_eq!(check_quorum(&[m(1, true), m(2, false)], &[], Change::ReplaceMember).unwrap_err().code, Code::QuorumAtRisk);
        // Five members, target and one other down: 3 healthy of 4 others, after: need 3 of 5.
        assert!(check_quorum(&[m(1, true), m(2, true), m(3, true), m(4, false), m(5, false)], &[5], Change::ReplaceMember).is_ok());
        // Learners do not vote, so a healthy learner does not make up for a voter.
        let learner = MemberView { id: 9, is_learner: true, healthy: true };
        assert_eq!(
            check_quorum(&[m(1, true), learner.clone(), m(3, false)], &[3], Change::ReplaceMember).unwrap_err().code,
            Code::QuorumAtRisk
        );
        assert!(check_quorum(&[m(1, true), m(2, true), learner.clone(), m(3, false)], &[3], Change::ReplaceMember).is_ok());
        assert_eq!(check_quorum(&[learner, m(3, false)], &[3], Change::ReplaceMember).unwrap_err().code, Code::SoleMember);
    }

    #[test]
    fn an_entry_the_image_added_itself_is_the_pods_own() {
        // Stale entry gone; the crash-looping image re-added itself (4, not started) while
        // a resumed remediation waited: still two healthy of the three the cluster will have.
        assert!(check_quorum(&[m(1, true), m(2, true), m(4, false)], &[4], Change::ReplaceMember).is_ok());
        // Counted as a third voter beside the others it would ask for 3 of 4.
        assert_eq!(check_quorum(&[m(1, true), m(2, true), m(4, false)], &[], Change::ReplaceMember).unwrap_err().code, Code::QuorumAtRisk);
        // Stale entry and an unstarted re-added one both listed: 2 of 4 voters is no quorum
        // now, whichever entries are the pod's (etcd's strict reconfiguration refuses that add).
        assert_eq!(
            check_quorum(&[m(1, true), m(2, true), m(3, false), m(4, false)], &[3, 4], Change::ReplaceMember).unwrap_err().code,
            Code::QuorumAtRisk
        );
    }

    #[test]
    fn sole_member_is_refused() {
        assert_eq!(check_quorum(&[m(1, false)], &[1], Change::ReplaceMember).unwrap_err().code, Code::SoleMember);
        assert_eq!(check_quorum(&[], &[], Change::ReplaceMember).unwrap_err().code, Code::SoleMember);
    }
}
