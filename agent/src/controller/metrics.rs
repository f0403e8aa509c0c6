//! What the controller's `/metrics` shows: detections by signature, decisions by outcome and
//! reason, the holds now, remediations by phase, the time from detection to dispatch and to
//! success, whether this replica leads, and how many pods it watches.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SignatureLabels {
    pub signature: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    /// `dispatch`, `hold` or `refuse`.
    pub outcome: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CauseLabels {
    pub cause: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub phase: String,
}

pub struct Metrics {
    registry: Registry,
    pub detections: Family<SignatureLabels, Counter>,
    pub decisions: Family<DecisionLabels, Counter>,
    pub holds: Family<ReasonLabels, Gauge>,
    pub remediations: Family<PhaseLabels, Counter>,
    pub to_dispatch: Histogram,
    pub to_success: Histogram,
    pub leader: Gauge,
    pub watched: Gauge,
    /// Watched pods failing now (crash-looping or not Ready), acted on or not.
    pub failing: Gauge,
    pub looks: Family<CauseLabels, Counter>,
    /// Quorum recoveries proposed (EtcdRecoveries made), and sets without quorum for
    /// `--quorum-lost-for`.
    pub recoveries_proposed: Counter,
    pub quorum_lost: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("etcd_medic_controller");
        let detections = Family::<SignatureLabels, Counter>::default();
        registry.register("detections", "Failing etcd pods detected, by crash signature", detections.clone());
        let decisions = Family::<DecisionLabels, Counter>::default();
        registry.register("decisions", "Decisions on detected pods, by outcome (dispatch, hold, refuse) and reason", decisions.clone());
        let holds = Family::<ReasonLabels, Gauge>::default();
        registry.register("holds", "Detected pods held now, by reason", holds.clone());
        let remediations = Family::<PhaseLabels, Counter>::default();
        registry.register("remediations", "EtcdRemediations ended, by phase", remediations.clone());
        // 10 ms to ~20 min.
        let to_dispatch = Histogram::new(exponential_buckets(0.01, 3.0, 12));
        registry.register_with_unit(
            "detection_to_dispatch",
            "From a pod's detection to the agent's answer to the dispatch",
            Unit::Seconds,
            to_dispatch.clone(),
        );
        let to_success = Histogram::new(exponential_buckets(0.1, 2.5, 12));
        registry.register_with_unit(
            "detection_to_success",
            "From a pod's detection to its remediation's success",
            Unit::Seconds,
            to_success.clone(),
        );
        let leader = Gauge::default();
        registry.register("leader", "1 while this replica leads", leader.clone());
        let watched = Gauge::default();
        registry.register("watched_pods", "etcd pods watched", watched.clone());
        let failing = Gauge::default();
        registry.register("failing_pods", "Watched etcd pods failing now (crash-looping or not Ready), acted on or not", failing.clone());
        let looks = Family::<CauseLabels, Counter>::default();
        registry.register(
            "looks",
            "Looks at the watched pods, by cause: a watch event, a threshold or back-off falling due, the fallback",
            looks.clone(),
        );
        let recoveries_proposed = Counter::default();
        registry.register(
            "recoveries_proposed",
            "Quorum recoveries proposed (EtcdRecoveries awaiting a person's approval)",
            recoveries_proposed.clone(),
        );
        let quorum_lost = Gauge::default();
        registry.register(
            "quorum_lost_sets",
            "Watched StatefulSets with fewer than a majority of members Ready for --quorum-lost-for",
            quorum_lost.clone(),
        );
        // What can be counted, at 0 from the start: a counter that comes into being at 1 shows
        // no increase to `increase()` and `rate()` (an alert on the first refusal would miss it).
        use etcd_medic_core::signature::{Action, Signature, decide};
        for s in Signature::ALL {
            let _ = detections.get_or_create(&SignatureLabels { signature: s.as_str().into() });
            let (outcome, reason) = match decide(s, None) {
                (Action::Refuse, Some(code), _) => ("refuse", code.as_str()),
                _ => ("dispatch", s.as_str()),
            };
            let _ = decisions.get_or_create(&DecisionLabels { outcome: outcome.into(), reason: reason.into() });
        }
        for phase in ["Succeeded", "Failed", "Refused", "Planned"] {
            let _ = remediations.get_or_create(&PhaseLabels { phase: phase.into() });
        }
        Metrics {
            registry,
            detections,
            decisions,
            holds,
            remediations,
            to_dispatch,
            to_success,
            leader,
            watched,
            failing,
            looks,
            recoveries_proposed,
            quorum_lost,
        }
    }
}

impl Metrics {
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String does not fail");
        out
    }

    pub fn decision(&self, outcome: &str, reason: &str) {
        self.decisions.get_or_create(&DecisionLabels { outcome: outcome.into(), reason: reason.into() }).inc();
    }
}
