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
        Metrics { registry, remediations, refusals, steps, in_flight, last_success, http }
    }
}

impl Metrics {
    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
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
            r#"etcd_medic_refusals_total{code="QuorumAtRisk"} 1"#,
            r#"etcd_medic_step_duration_seconds_count{step="Check",outcome="Done"} 1"#,
            "etcd_medic_remediations_in_flight 0",
            "etcd_medic_last_success_timestamp_seconds",
            r#"etcd_medic_http_requests_total{route="/healthz",status="200"} 1"#,
        ] {
            assert!(text.contains(needle), "{needle} missing from\n{text}");
        }
    }
}
