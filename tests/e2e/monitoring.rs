//! A real Prometheus (Debian's `prometheus`) scrapes the served agent and the controller, run
//! as the chart installs them, and evaluates the chart's rule file, while the lab heals a
//! member, refuses a remediation, holds another member (a person's pause), and loses its
//! controller and its agent. Its HTTP API must show the counters moved, the recorded time to heal, the
//! alerts pending or firing as the rules say, and an answer to every query of the chart's
//! Grafana dashboard.

use std::time::Duration;

use anyhow::Result;
use k8s_openapi::api::apps::v1::StatefulSet;
use serde_json::json;

use etcd_medic_lab::controller::{ControllerProcess, agent_for_controller, register_agent, wait_remediation};
use etcd_medic_lab::prometheus::{self, Prometheus};
use etcd_medic_lab::{Lab, NODE_NAME};

use crate::reference_failure::{KEYS, assert_every_key};

const HEAL: Duration = Duration::from_secs(240);
const SEEN: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_sees_a_heal_a_hold_a_refusal_and_the_alerts_of_the_charts_rules() -> Result<()> {
    crate::init_tracing();
    let Some(bin) = prometheus::binary() else {
        assert!(std::env::var_os("CI").is_none(), "CI must set {} (scripts/test installs Debian's prometheus)", prometheus::BIN_ENV);
        etcd_medic_lab::skip("no prometheus binary ($ETCD_MEDIC_PROMETHEUS)");
        return Ok(());
    };
    let lab = Lab::start(etcd_medic_lab::objects::SetShape::apisix(3, NODE_NAME)).await?;
    if !lab.node.real_mounts {
        etcd_medic_lab::skip("needs root: real mounts");
        lab.shutdown().await;
        return Ok(());
    }
    lab.write_keys(KEYS).await?;
    let mut agent = agent_for_controller(&lab, &[]).await?;
    let token = register_agent(&lab, &agent)?;
    // As the chart installs it (the lab's helper would otherwise shorten the lease).
    let mut c = ControllerProcess::start(&lab, &token, "replica-a", &["--lease-duration", "15s"]).await?;
    let prom = Prometheus::start(&bin, lab.dir.path(), agent.addr, NODE_NAME, c.admin).await?;
    prom.wait_value(r#"max(etcd_medic_controller_leader{job="etcd-medic-controller"})"#, SEEN, |v| v == 1.0).await?;
    prom.wait_value(r#"sum(up{job="etcd-medic-agent"} * on (instance) etcd_medic_ready{job="etcd-medic-agent"})"#, SEEN, |v| v == 1.0)
        .await?;

    // A heal: the counters move on both, and the time to heal is recorded.
    lab.drain_member(1).await?;
    let done = wait_remediation(&lab, "apisix-etcd-1", HEAL, |p| matches!(p, "Succeeded" | "Failed" | "Refused"), &[&c]).await?;
    assert_eq!(done.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded"), "{done:?}");
    prom.wait_value(r#"sum(etcd_medic_remediations_total{job="etcd-medic-agent", outcome="Succeeded"})"#, SEEN, |v| v >= 1.0).await?;
    prom.wait_value(r#"sum(etcd_medic_controller_remediations_total{job="etcd-medic-controller", phase="Succeeded"})"#, SEEN, |v| v >= 1.0)
        .await?;
    let p50 = prom.wait_value("etcd_medic:time_to_heal_seconds:p50_1h", SEEN, |v| v > 0.0).await?;
    eprintln!("time to heal, median as recorded by Prometheus: {p50:.1} s");
    lab.set.wait_ready(1, HEAL).await?;
    assert_every_key(&lab, 3, KEYS).await?;

    // A refusal that needs a person: a member killed (nothing the agent knows how to heal),
    // asked for straight at the agent without force. It fires at once; the member, let out of
    // its back-off, restarts on its data.
    lab.set.switches().hold_restarts.store(true, std::sync::atomic::Ordering::SeqCst);
    lab.set.crash_container(0)?;
    lab.set.hold_restarts(0, SEEN).await?;
    let controller_token = std::fs::read_to_string(&token)?;
    let asked = agent.post(Some(controller_token.trim()), &json!({"namespace": "apisix", "pod": "apisix-etcd-0"})).await?;
    assert_eq!(asked.status, 202, "{}", asked.text());
    let id = asked.json()["id"].as_str().unwrap_or_default().to_string();
    let ended = agent.wait_finished(&id, Some(controller_token.trim()), SEEN).await?;
    assert_eq!((&ended["phase"], &ended["error"]["code"]), (&json!("Refused"), &json!("UnknownFailure")), "{ended:#}");
    let firing = prom.wait_alert("EtcdMedicRemediationRefused", "firing", &[("code", "UnknownFailure")], SEEN).await?;
    assert!(firing["annotations"]["description"].as_str().is_some_and(|d| d.contains("UnknownFailure")), "{firing}");
    lab.set.release_restarts();
    lab.set.wait_ready(0, HEAL).await?;

    // A person's pause on the StatefulSet, then another member fails: held, not healed.
    let pause = |on: bool| {
        lab.api.modify::<StatefulSet>("apisix", "apisix-etcd", |s| {
            let a = s.metadata.annotations.get_or_insert_with(Default::default);
            if on {
                a.insert("etcd-medic.io/paused".into(), "true".into());
            } else {
                a.remove("etcd-medic.io/paused");
            }
        })
    };
    pause(true)?;
    // The controller reads a StatefulSet's pause at most every 10 s; and etcd refuses a
    // membership change (the preStop hook's removal) until its leader has been connected to
    // every member for a few seconds after the last change (FIELD-NOTES).
    tokio::time::sleep(Duration::from_secs(11)).await;
    lab.drain_member(2).await?;
    let held = prom
        .wait_alert("EtcdMedicHeld", "pending", &[("reason", "Paused")], HEAL)
        .await
        .map_err(|e| anyhow::anyhow!("{e}\ncontroller:\n{}", c.log_text()))?;
    assert_eq!(held["labels"]["severity"], "warning", "{held}");
    prom.wait_alert("EtcdMedicFailingPodNotRemediated", "pending", &[], SEEN).await?;

    // Every query of the dashboard parses and answers.
    for (title, expr) in prometheus::dashboard_queries("5m")? {
        let result = prom.query(&expr).await.map_err(|e| anyhow::anyhow!("panel {title:?}: {expr}: {e}"))?;
        assert!(!result.is_empty(), "panel {title:?} has no data: {expr}");
    }

    // The pause lifted: the held member is healed, and the hold and the failing pod end.
    pause(false)?;
    let done = wait_remediation(&lab, "apisix-etcd-2", HEAL, |p| matches!(p, "Succeeded" | "Failed"), &[&c]).await?;
    assert_eq!(done.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded"), "{done:?}");
    prom.wait_value(r#"max(etcd_medic_controller_failing_pods{job="etcd-medic-controller"})"#, HEAL, |v| v == 0.0).await?;

    // No controller, then no agent: the alerts go pending (they fire after 5 minutes).
    c.terminate().await;
    prom.wait_alert("EtcdMedicControllerNoLeader", "pending", &[], SEEN).await?;
    agent.terminate(Duration::from_secs(20)).await;
    prom.wait_alert("EtcdMedicAgentDown", "pending", &[("node", NODE_NAME)], SEEN).await?;
    drop(prom);
    lab.shutdown().await;
    Ok(())
}
