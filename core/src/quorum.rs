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
/// a sole member. `target` is the failing member's id when it is still listed.
pub fn check_quorum(members: &[MemberView], target: Option<u64>, change: Change) -> Result<()> {
    let voters: Vec<&MemberView> = members.iter().filter(|m| !m.is_learner).collect();
    let others: Vec<&&MemberView> = voters.iter().filter(|m| Some(m.id) != target).collect();
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
        assert!(check_quorum(&[m(1, true), m(2, true)], None, Change::ReplaceMember).is_ok());
        // Target still listed (crash-looping, unhealthy) in a 3-member cluster.
        assert!(check_quorum(&[m(1, true), m(2, true), m(3, false)], Some(3), Change::ReplaceMember).is_ok());
        // Two of three down.
        assert_eq!(
            check_quorum(&[m(1, true), m(2, false), m(3, false)], Some(3), Change::ReplaceMember).unwrap_err().code,
            Code::QuorumAtRisk
        );
        // Removed already and one of the two remaining down: adding back would need 2 of 3.
        assert_eq!(check_quorum(&[m(1, true), m(2, false)], None, Change::ReplaceMember).unwrap_err().code, Code::QuorumAtRisk);
        // Five members, target and one other down: 3 healthy of 4 others, after: need 3 of 5.
        assert!(check_quorum(&[m(1, true), m(2, true), m(3, true), m(4, false), m(5, false)], Some(5), Change::ReplaceMember).is_ok());
        // Learners do not vote, so a healthy learner does not make up for a voter.
        let learner = MemberView { id: 9, is_learner: true, healthy: true };
        assert_eq!(
            check_quorum(&[m(1, true), learner.clone(), m(3, false)], Some(3), Change::ReplaceMember).unwrap_err().code,
            Code::QuorumAtRisk
        );
        assert!(check_quorum(&[m(1, true), m(2, true), learner.clone(), m(3, false)], Some(3), Change::ReplaceMember).is_ok());
        assert_eq!(check_quorum(&[learner, m(3, false)], Some(3), Change::ReplaceMember).unwrap_err().code, Code::SoleMember);
    }

    #[test]
    fn sole_member_is_refused() {
        assert_eq!(check_quorum(&[m(1, false)], Some(1), Change::ReplaceMember).unwrap_err().code, Code::SoleMember);
        assert_eq!(check_quorum(&[], None, Change::ReplaceMember).unwrap_err().code, Code::SoleMember);
    }
}
