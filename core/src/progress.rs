//! Progress, as the engine reports it while it runs: typed events, each with the
//! remediation as it is right after. The CLI prints them, the server logs, counts and turns
//! some into Kubernetes Events; which ones, and what they say, is decided here.

use crate::contract::{ErrorRecord, Outcome, Phase, Remediation, Step};

#[derive(Clone, Debug, PartialEq)]
pub enum Progress {
    StepStarted {
        step: Step,
    },
    StepEnded {
        step: Step,
        outcome: Outcome,
        message: String,
        seconds: f64,
    },
    /// Stopped at a safe point after changing something: it stays Running, and the next
    /// start of the agent resumes it.
    Paused,
    Finished {
        phase: Phase,
        error: Option<ErrorRecord>,
    },
}

/// One progress event and the remediation right after it.
#[derive(Clone, Debug)]
pub struct Update {
    pub progress: Progress,
    pub remediation: Remediation,
}

/// A Kubernetes Event on the pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventNote {
    pub reason: &'static str,
    pub warning: bool,
    pub note: String,
}

/// The Event a progress event deserves, if any: the start, the moves, the restart, the
/// rejoin, and how it ended when it did not succeed.
pub fn event_for(p: &Progress, r: &Remediation) -> Option<EventNote> {
    let why = |r: &Remediation| r.reason.as_deref().map(|w| format!(" ({w})")).unwrap_or_default();
    let normal = |reason, note: &str| Some(EventNote { reason, warning: false, note: note.to_string() });
    match p {
        // Started once the checks passed, with what they found (the diagnosis and its
        // evidence among it); a refusal says so instead, at the end.
        Progress::StepEnded { step: Step::Check, outcome: Outcome::Done, message, .. } => {
            normal("RemediationStarted", &format!("etcd-medic remediation {} started on node {}{}: {message}", r.id, r.node, why(r)))
        }
        Progress::StepStarted { step: Step::Resume } if r.steps.len() == 1 => {
            normal("RemediationStarted", &format!("etcd-medic remediation {} resumed on node {}{}", r.id, r.node, why(r)))
        }
        Progress::StepEnded { step, outcome: Outcome::Done, message, .. } => match step {
            Step::Quarantine => normal("DataQuarantined", message),
            Step::Restart => normal("PodRestarted", message),
            Step::Verify => normal("MemberRejoined", message),
            _ => None,
        },
        Progress::Finished { phase: phase @ (Phase::Refused | Phase::Failed), error } => {
            let (code, message) = error.as_ref().map(|e| (e.code.as_str(), e.message.as_str())).unwrap_or(("Failed", ""));
            let reason = if *phase == Phase::Refused { "RemediationRefused" } else { "RemediationFailed" };
            Some(EventNote { reason, warning: true, note: format!("{code}: {message}") })
        }
        _ => None,
    }
}

/// The line a person following a remediation on a terminal reads for it.
pub fn line(p: &Progress) -> Option<String> {
    match p {
        Progress::StepStarted { step } => Some(format!("{:<11} ...", step.as_str())),
        Progress::StepEnded { step, outcome, message, .. } => Some(format!("{:<11} {outcome}: {message}", step.as_str())),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Code;

    #[test]
    fn events_mark_the_moments_that_matter() {
        let mut r = Remediation::new("node-a", "apisix", "apisix-etcd-1", None);
        r.reason = Some("alert EtcdMemberCrashLoop".into());
        r.steps.push(crate::contract::StepRecord {
            name: Step::Check,
            start: String::new(),
            end: None,
            outcome: None,
            message: String::new(),
        });
        assert_eq!(event_for(&Progress::StepStarted { step: Step::Check }, &r), None, "started once the checks passed");
        let checked = Progress::StepEnded {
            step: Step::Check,
            outcome: Outcome::Done,
            message: "diagnosis MemberNotFound → heal".into(),
            seconds: 0.1,
        };
        let started = event_for(&checked, &r).unwrap();
        assert_eq!(started.reason, "RemediationStarted");
        assert!(started.note.contains("(alert EtcdMemberCrashLoop)") && started.note.contains("node-a"), "{}", started.note);
        assert!(started.note.ends_with(": diagnosis MemberNotFound → heal"), "{}", started.note);
        let done = |step| Progress::StepEnded { step, outcome: Outcome::Done, message: "m".into(), seconds: 0.1 };
        let reasons: Vec<_> = Step::ALL.iter().filter_map(|s| event_for(&done(*s), &r)).map(|e| e.reason).collect();
        assert_eq!(reasons, ["RemediationStarted", "DataQuarantined", "PodRestarted", "MemberRejoined"]);
        let mut resumed = Remediation::new("node-a", "apisix", "apisix-etcd-1", None);
        resumed.steps.push(crate::contract::StepRecord {
            name: Step::Resume,
            start: String::new(),
            end: None,
            outcome: None,
            message: String::new(),
        });
        assert!(event_for(&Progress::StepStarted { step: Step::Resume }, &resumed).unwrap().note.contains("resumed"));
        let failed =
            Progress::StepEnded { step: Step::Quarantine, outcome: Outcome::Failed(Code::PodRunning), message: "m".into(), seconds: 0.1 };
        assert_eq!(event_for(&failed, &r), None, "the end says it, once");
        let refused =
            Progress::Finished { phase: Phase::Refused, error: Some(ErrorRecord { code: Code::QuorumAtRisk, message: "1 of 3".into() }) };
        assert_eq!(
            event_for(&refused, &r),
            Some(EventNote { reason: "RemediationRefused", warning: true, note: "QuorumAtRisk: 1 of 3".into() })
        );
        assert_eq!(event_for(&Progress::Finished { phase: Phase::Succeeded, error: None }, &r), None, "MemberRejoined said it");
        assert_eq!(event_for(&Progress::Paused, &r), None);
    }

    #[test]
    fn a_terminal_line_per_step_start_and_end() {
        assert_eq!(line(&Progress::StepStarted { step: Step::Lock }).unwrap(), "Lock        ...");
        let end =
            Progress::StepEnded { step: Step::Lock, outcome: Outcome::Failed(Code::ClusterLocked), message: "held".into(), seconds: 0.0 };
        assert_eq!(line(&end).unwrap(), "Lock        ClusterLocked: held");
    }
}
