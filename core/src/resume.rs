//! How a remediation ends, and what a journal left unfinished still needs: whether it
//! changed something (and so must be resumed, never forgotten), which steps remain, how
//! often it may be resumed, and which journals are closed as they are. Pure.

use crate::contract::{ErrorRecord, Phase, Remediation, Step, StepRecord, now};
use crate::error::{Code, Error};

/// How often a remediation is resumed before it is closed as Failed: a step that cannot
/// finish must not be retried on every start for ever.
pub const MAX_RESUMES: usize = 3;

/// Why a step sequence stopped: the error, and whether anything had been changed by then
/// (`Failed`) or not (`Refused`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Halt {
    pub error: Error,
    pub changed: bool,
}

impl Halt {
    pub fn refused(error: Error) -> Self {
        Halt { error, changed: false }
    }

    pub fn failed(error: Error) -> Self {
        Halt { error, changed: true }
    }
}

/// Still Running after something was changed: the agent stopped mid-way and must resume it.
pub fn needs_resume(r: &Remediation) -> bool {
    r.phase == Phase::Running && !r.dry_run && r.steps.iter().any(|s| s.name.changes_data())
}

/// The steps a remediation still takes after its checks, in order: those that change
/// something run once (a resume skips the ones done); verification and retention always.
pub fn remaining(r: &Remediation) -> Vec<Step> {
    [Step::Quarantine, Step::Membership, Step::Restart]
        .into_iter()
        .filter(|s| !r.step_done(*s))
        .chain([Step::Verify, Step::Retention])
        .collect()
}

/// A remediation resumed this often already is closed as Failed, for a person to look at.
pub fn too_many_resumes(r: &Remediation) -> Option<Error> {
    let n = r.resumes();
    (n >= MAX_RESUMES).then(|| {
        Error::new(
            Code::NotReady,
            format!("resumed {n} times without finishing; a person must look (restore with `etcd-medic restore {}`)", r.id),
        )
    })
}

/// Ends `r` with `outcome`. Stopped at a safe point after changing something, it stays
/// Running (its journal is resumed by the next start): `false`. Otherwise it is final.
pub fn finish(r: &mut Remediation, outcome: Result<(), Halt>, dry_run: bool, stopping: bool) -> bool {
    r.step = None;
    if let Err(h) = &outcome
        && h.changed
        && stopping
    {
        return false;
    }
    r.finished_at = Some(now());
    match outcome {
        Ok(()) => r.phase = if dry_run { Phase::Planned } else { Phase::Succeeded },
        Err(h) => {
            r.phase = if h.changed { Phase::Failed } else { Phase::Refused };
            r.error = Some(ErrorRecord { code: h.error.code, message: h.error.message });
        }
    }
    true
}

/// A journal left Running before anything was changed (the agent stopped during its
/// checks) is closed as Refused: nothing happened, and it says so.
pub fn close_abandoned(r: &mut Remediation) {
    r.phase = Phase::Refused;
    r.step = None;
    r.finished_at = Some(now());
    r.error = Some(ErrorRecord { code: Code::NotReady, message: "the agent stopped before acting; nothing was changed".into() });
}

/// Closes an unfinished remediation that reached its goal, saying how the agent knows.
pub fn close_from_evidence(r: &mut Remediation, evidence: &str) {
    r.phase = Phase::Succeeded;
    r.step = None;
    r.steps.push(StepRecord {
        name: Step::Verify,
        start: now(),
        end: Some(now()),
        outcome: Some(crate::contract::Outcome::Done),
        message: format!("closed from evidence after the agent stopped: {evidence}"),
    });
    r.finished_at = Some(now());
}

/// Records a remediation whose task died (a bug): `Failed` if it had changed something
/// (its journal says so), else `Refused`, with `Internal` and what happened.
pub fn died(r: &mut Remediation, why: &str) {
    let changed = needs_resume(r);
    r.phase = if changed { Phase::Failed } else { Phase::Refused };
    r.step = None;
    r.finished_at = Some(now());
    r.error = Some(ErrorRecord {
        code: Code::Internal,
        message: format!("the agent's task for this remediation died ({why}); a bug: please report it with the agent's log"),
    });
}

/// Whether `r` keeps a new request for `namespace/pod` (instance `pod_uid`) from starting
/// another remediation: one of this pod running (or left unfinished after acting: it is
/// being resumed), whatever the pod's UID is now, or one of this instance that ended after
/// acting. Dry runs never count, nor do refusals (they changed nothing; asking again is safe).
pub fn blocks_new(r: &Remediation, namespace: &str, pod: &str, pod_uid: &str, running_now: bool) -> bool {
    if r.dry_run || r.namespace != namespace || r.pod != pod {
        return false;
    }
    match r.phase {
        Phase::Pending => true,
        Phase::Running => running_now || needs_resume(r),
        Phase::Succeeded | Phase::Failed => r.pod_uid.as_deref() == Some(pod_uid),
        Phase::Planned | Phase::Refused => false,
    }
}

/// The lease holder: this node and this remediation, so that two remediations on one node
/// exclude each other too, and a resumed one is recognised as the same holder.
pub fn holder(node: &str, id: &str) -> String {
    format!("{node}/{id}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::Outcome;

    fn with_steps(done: &[Step]) -> Remediation {
        let mut r = Remediation::new("node-a", "apisix", "apisix-etcd-1", Some("u1"));
        r.phase = Phase::Running;
        r.steps = done
            .iter()
            .map(|s| StepRecord { name: *s, start: now(), end: Some(now()), outcome: Some(Outcome::Done), message: String::new() })
            .collect();
        r
    }

    #[test]
    fn a_resume_continues_after_the_last_step_done_from_each_step() {
        use Step::*;
        let all = [Verify, Retention];
        assert_eq!(remaining(&with_steps(&[Check, Lock])), [Quarantine, Membership, Restart, Verify, Retention]);
        assert_eq!(remaining(&with_steps(&[Check, Lock, Quarantine])), [Membership, Restart, Verify, Retention]);
        assert_eq!(remaining(&with_steps(&[Check, Lock, Quarantine, Membership])), [Restart, Verify, Retention]);
        assert_eq!(remaining(&with_steps(&[Check, Lock, Quarantine, Membership, Restart])), all);
        // A step started but not finished is taken again (each is idempotent).
        let mut r = with_steps(&[Check, Lock, Quarantine]);
        r.steps.push(StepRecord { name: Membership, start: now(), end: None, outcome: None, message: String::new() });
        assert_eq!(remaining(&r), [Membership, Restart, Verify, Retention]);
    }

    #[test]
    fn only_a_journal_that_changed_something_is_resumed() {
        use Step::*;
        assert!(!needs_resume(&with_steps(&[Check, Lock])), "checks change nothing");
        let mut started = with_steps(&[Check, Lock]);
        started.steps.push(StepRecord { name: Quarantine, start: now(), end: None, outcome: None, message: String::new() });
        assert!(needs_resume(&started), "a quarantine begun may have moved something");
        let mut dry = with_steps(&[Check, Lock, Quarantine]);
        dry.dry_run = true;
        assert!(!needs_resume(&dry));
        let mut done = with_steps(&[Check, Lock, Quarantine]);
        done.phase = Phase::Succeeded;
        assert!(!needs_resume(&done));
    }

    #[test]
    fn resumes_are_bounded() {
        let mut r = with_steps(&[Step::Check, Step::Quarantine, Step::Resume, Step::Resume]);
        assert!(too_many_resumes(&r).is_none());
        r.steps.push(StepRecord { name: Step::Resume, start: now(), end: None, outcome: None, message: String::new() });
        let e = too_many_resumes(&r).unwrap();
        assert!(e.message.contains(&format!("etcd-medic restore {}", r.id)), "{}", e.message);
    }

    #[test]
    fn a_stop_after_acting_stays_running_anything_else_is_final() {
        let stop = || Halt::failed(Error::new(Code::NotReady, "stopping"));
        let mut r = with_steps(&[Step::Check, Step::Quarantine]);
        assert!(!finish(&mut r, Err(stop()), false, true));
        assert_eq!((r.phase, r.finished_at.as_deref(), r.step), (Phase::Running, None, None));
        assert!(finish(&mut r, Err(stop()), false, false));
        assert_eq!(r.phase, Phase::Failed);
        let mut r = with_steps(&[Step::Check]);
        assert!(finish(&mut r, Err(Halt::refused(Error::new(Code::QuorumAtRisk, "2 of 3 down"))), false, true));
        assert_eq!((r.phase, r.error.as_ref().map(|e| e.code)), (Phase::Refused, Some(Code::QuorumAtRisk)));
        let mut r = with_steps(&[Step::Check]);
        assert!(finish(&mut r, Ok(()), true, false));
        assert_eq!(r.phase, Phase::Planned);
        let mut r = with_steps(&[Step::Check]);
        finish(&mut r, Ok(()), false, false);
        assert_eq!(r.phase, Phase::Succeeded);
    }

    #[test]
    fn a_dead_task_is_failed_after_acting_and_refused_before() {
        let mut r = with_steps(&[Step::Check, Step::Quarantine]);
        died(&mut r, "panic");
        assert_eq!((r.phase, r.error.as_ref().map(|e| e.code)), (Phase::Failed, Some(Code::Internal)));
        let mut r = with_steps(&[Step::Check]);
        died(&mut r, "panic");
        assert_eq!(r.phase, Phase::Refused);
    }

    #[test]
    fn what_keeps_a_second_remediation_of_a_pod_from_starting() {
        let mut r = with_steps(&[Step::Check]);
        assert!(blocks_new(&r, "apisix", "apisix-etcd-1", "u2", true), "running now, whatever the UID");
        assert!(!blocks_new(&r, "apisix", "apisix-etcd-1", "u2", false), "abandoned during its checks");
        assert!(!blocks_new(&r, "apisix", "apisix-etcd-2", "u1", true), "another pod");
        r.phase = Phase::Succeeded;
        assert!(blocks_new(&r, "apisix", "apisix-etcd-1", "u1", false), "this instance was healed");
        assert!(!blocks_new(&r, "apisix", "apisix-etcd-1", "u2", false), "a new instance fails anew");
        r.phase = Phase::Refused;
        assert!(!blocks_new(&r, "apisix", "apisix-etcd-1", "u1", false), "a refusal changed nothing");
        r.phase = Phase::Planned;
        r.dry_run = true;
        assert!(!blocks_new(&r, "apisix", "apisix-etcd-1", "u1", true), "a dry run never stands in");
    }
}
