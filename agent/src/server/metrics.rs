//! What `/metrics` shows: remediations by outcome and code, refusals by code, step
//! durations, what is in flight, the last success, and the API's own requests.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: String,
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabels {
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StepLabels {
    pub step: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub route: String,
    pub status: u16,
}

pub struct Metrics {
    registry: Registry,
    pub remediations: Family<OutcomeLabels, Counter>,
    pub refusals: Family<CodeLabels, Counter>,
    pub steps: Family<StepLabels, Histogram>,
    pub in_flight: Gauge,
    pub last_success: Gauge<f64, AtomicU64>,
    pub http: Family<HttpLabels, Counter>,
    /// 1 while the agent is ready (set as it is scraped).
    pub ready: Gauge,
    journal_write_errors: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("etcd_medic");
        let remediations = Family::<OutcomeLabels, Counter>::default();
        registry.register("remediations", "Remediations finished, by outcome (phase) and error code", remediations.clone());
        let refusals = Family::<CodeLabels, Counter>::default();
        registry.register("refusals", "Remediations refused by a gate, by code", refusals.clone());
        // 10 ms to ~10 min: a check is fast, a verification waits for etcd to catch up.
        let steps = Family::<StepLabels, Histogram>::new_with_constructor(|| Histogram::new(exponential_buckets(0.01, 3.0, 12)));
        registry.register_with_unit(
            "step_duration",
            "Duration of each remediation step",
            prometheus_client::registry::Unit::Seconds,
            steps.clone(),
        );
        let in_flight = Gauge::default();
        registry.register("remediations_in_flight", "Remediations running now", in_flight.clone());
        let last_success = Gauge::<f64, AtomicU64>::default();
        registry.register("last_success_timestamp_seconds", "Unix time of the last Succeeded remediation", last_success.clone());
        let http = Family::<HttpLabels, Counter>::default();
        registry.register("http_requests", "HTTP requests answered, by route and status", http.clone());
        let ready = Gauge::default();
        registry.register("ready", "1 while the agent is ready: the API server answers and the state dir is writable", ready.clone());
        let journal_write_errors = Counter::default();
        registry.register(
            "journal_write_errors",
            "Journal writes that failed (the state dir full, read-only or gone)",
            journal_write_errors.clone(),
        );
        // Every outcome and code there can be, at 0 from the start: a counter that comes into
        // being at 1 shows no increase to `increase()` and `rate()`, and its first refusal
        // would never alert.
        for outcome in ["Succeeded", "Planned"] {
            let _ = remediations.get_or_create(&OutcomeLabels { outcome: outcome.into(), code: String::new() });
        }
        for code in etcd_medic_core::Code::ALL {
            for outcome in ["Refused", "Failed"] {
                let _ = remediations.get_or_create(&OutcomeLabels { outcome: outcome.into(), code: code.as_str().into() });
            }
            let _ = refusals.get_or_create(&CodeLabels { code: code.as_str().into() });
        }
        Metrics { registry, remediations, refusals, steps, in_flight, last_success, http, ready, journal_write_errors }
    }
}

impl Metrics {
    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        // The journal counts its own failures (it knows nothing of the server).
        let failed = crate::journal::write_errors();
        self.journal_write_errors.inc_by(failed.saturating_sub(self.journal_write_errors.get()));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String does not fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_names_every_family() {
        let m = Metrics::default();
        m.remediations.get_or_create(&OutcomeLabels { outcome: "Refused".into(), code: "QuorumAtRisk".into() }).inc();
        m.refusals.get_or_create(&CodeLabels { code: "QuorumAtRisk".into() }).inc();
        m.steps.get_or_create(&StepLabels { step: "Check".into(), outcome: "Done".into() }).observe(0.2);
        m.http.get_or_create(&HttpLabels { route: "/healthz".into(), status: 200 }).inc();
        let text = m.encode();
        for needle in [
            r#"etcd_medic_remediations_total{outcome="Refused",code="QuorumAtRisk"} 1"#,
            r#"etcd_medic_remediations_total{outcome="Failed",code="ClusterLocked"} 0"#,
            r#"etcd_medic_remediations_total{outcome="Succeeded",code=""} 0"#,
            r#"etcd_medic_refusals_total{code="SplitBrain"} 0"#,
            r#"etcd_medic_refusals_total{code="QuorumAtRisk"} 1"#,
            r#"etcd_medic_step_duration_seconds_count{step="Check",outcome="Done"} 1"#,
            "etcd_medic_remediations_in_flight 0",
            "etcd_medic_ready 0",
            "etcd_medic_journal_write_errors_total",
            "etcd_medic_last_success_timestamp_seconds",
            r#"etcd_medic_http_requests_total{route="/healthz",status="200"} 1"#,
        ] {
            assert!(text.contains(needle), "{needle} missing from\n{text}");
        }
    }
}
