//! The controller with the real agent and real etcd: nobody calls the agent; the controller
//! notices, decides, records and dispatches.

use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Result;
use serde_json::json;

use etcd_medic_client::crd::EtcdRemediation;
use etcd_medic_lab::agent::ServedAgent;
use etcd_medic_lab::apiserver::{Fault, FaultKind};
use etcd_medic_lab::controller::{
    ControllerProcess, agent_for_controller, register_agent, remediations, republish_agent, wait_record, wait_remediation,
};
use etcd_medic_lab::{Lab, NODE_NAME};
use kube::ResourceExt;

use crate::reference_failure::{KEYS, assert_every_key, broken_lab_with_mounts};

const HEAL: Duration = Duration::from_secs(240);

/// The chart's defaults: every test here runs the controller as the chart installs it (the
/// lab's helper would otherwise shorten the lease to 3 s), but the one whose name says why it
/// lowers the thresholds.
const DEFAULTS: &[&str] = &["--lease-duration", "15s"];

/// Thresholds lowered to the one crash the lab holds a killed container after (the kubelet's
/// back-off would take about 30 s to three restarts, and the default asks 60 s not Ready).
const ONE_HELD_CRASH: &[&str] = &["--min-restarts", "1", "--failing-for", "1s"];

fn phase(r: &etcd_medic_client::crd::EtcdRemediation) -> &str {
    r.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or("")
}

/// The agent's remediations of `pod`, as its API lists them to the controller.
async fn agent_remediations(
    agent: &etcd_medic_lab::agent::ServedAgent,
    token: &std::path::Path,
    pod: &str,
) -> Result<Vec<serde_json::Value>> {
    let r = agent.get("/v1/remediations?namespace=apisix", Some(&std::fs::read_to_string(token)?)).await?;
    anyhow::ensure!(r.status == 200, "the agent answered {}: {}", r.status, String::from_utf8_lossy(&r.body));
    Ok(r.json()["items"].as_array().cloned().unwrap_or_default().into_iter().filter(|i| i["pod"] == pod).collect())
}

/// A member broken as users see it is healed with no call from the test; its record ends
/// Succeeded. The leader is killed while the remediation runs (the agent holds it after the
/// quarantine): the standby takes the lead and follows the same remediation,
/// through the agent's own restart on a new address, to its end; nothing is done twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_member_is_healed_by_the_controller_alone_even_when_its_leader_dies() -> Result<()> {
    let Some((lab, _)) = broken_lab_with_mounts().await? else { return Ok(()) };
    // The kubelet holds the crashed container in back-off: the image does not run on the
    // volume while the agent is away mid-remediation (the lab's back-off is seconds, a real
    // one minutes).
    lab.set.switches().hold_restarts.store(true, Ordering::SeqCst);
    let mut agent = agent_for_controller(&lab, &[("ETCD_MEDIC_FAILPOINT", "after:Quarantine")]).await?;
    let token = register_agent(&lab, &agent)?;
    let broken_uid = lab.set.pod_uid(1)?;
    let mut a = ControllerProcess::start(&lab, &token, "replica-a", DEFAULTS).await?;
    let mut b = ControllerProcess::start(&lab, &token, "replica-b", DEFAULTS).await?;

    let running = wait_remediation(&lab, "apisix-etcd-1", HEAL, |p| p == "Running", &[&a, &b]).await?;
    let status = running.status.clone().unwrap_or_default();
    assert_eq!(status.node.as_deref(), Some(NODE_NAME));
    let id = status.remediation_id.clone().expect("the agent's id is recorded as soon as it answers");
    assert_eq!(running.spec.pod_uid.as_deref(), Some(broken_uid.as_str()), "the record names the pod instance");
    assert!(running.spec.reason.as_deref().is_some_and(|r| r.starts_with("MemberNotFound")), "{:?}", running.spec.reason);
    // With the defaults (3 restarts, 60 s not Ready) a held pod would never be a candidate:
    // `member not found` can only repeat, so its first crashes are enough.
    assert_eq!(running.labels().get("etcd-medic.io/candidacy").map(String::as_str), Some("firstCrash"), "{:?}", running.metadata);
    assert!(running.annotations().contains_key("etcd-medic.io/detected-at"), "{:?}", running.metadata);
    // Kill whichever replica leads, without releasing its lease.
    let (leader, standby) = if a.leads().await { (&mut a, &mut b) } else { (&mut b, &mut a) };
    leader.kill().await;
    let deadline = tokio::time::Instant::now() + HEAL;
    while !standby.leads().await {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "the standby never took the lead:\n{}", standby.log_text());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The agent is let go at its safe point and comes back elsewhere; it resumes the
    // remediation from its journal.
    let state_dir = agent.state_dir.clone();
    agent.terminate(Duration::from_secs(30)).await;
    let mut how = etcd_medic_lab::agent::Serve::new(&lab);
    how.state_dir = state_dir;
    how.args = vec!["--audience".into(), etcd_medic_lab::controller::AUDIENCE.into()];
    let agent = etcd_medic_lab::agent::ServedAgent::start(&lab, how).await?;
    lab.set.release_restarts();
    republish_agent(&lab, &agent)?;

    let done = wait_remediation(&lab, "apisix-etcd-1", HEAL, |p| p != "Pending" && p != "Running", &[standby]).await?;
    assert_eq!(
        phase(&done),
        "Succeeded",
        "{done:?}\n{}\netcd-1:\n{}\nagent:\n{}",
        standby.log_text(),
        lab.set.container_log(1),
        agent.log_text()
    );
    let s = done.status.clone().unwrap_or_default();
    assert_eq!(s.remediation_id.as_deref(), Some(id.as_str()), "the standby followed the same remediation");
    assert!(s.conditions.iter().any(|c| c.r#type == "Succeeded" && c.status == "True"), "{s:?}");
    assert!(s.conditions.iter().any(|c| c.r#type == "Processing" && c.status == "False"), "{s:?}");
    assert_eq!(s.diagnosis.as_ref().map(|d| d.signature.as_str()), Some("MemberNotFound"));
    assert!(standby.leads().await, "the standby leads");
    // One record and one remediation on the node: nothing was done twice.
    let records: Vec<_> = remediations(&lab, "apisix").into_iter().filter(|r| r.spec.pod == "apisix-etcd-1").collect();
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(agent_remediations(&agent, &token, "apisix-etcd-1").await?.len(), 1);
    lab.set.wait_ready(1, HEAL).await?;
    assert_every_key(&lab, 3, KEYS).await?;
    assert_eq!(standby.metric("etcd_medic_controller_remediations_total{phase=\"Succeeded\"}").await, Some(1.0));
    // The Events say what happened, on the record.
    let reasons: Vec<String> = lab
        .api
        .list::<k8s_openapi::api::events::v1::Event>(Some("apisix"))
        .into_iter()
        .filter(|e| e.reporting_controller.as_deref() == Some("etcd-medic.io/controller"))
        .map(|e| e.reason.unwrap_or_default())
        .collect();
    assert!(reasons.iter().any(|r| r == "Detected") && reasons.iter().any(|r| r == "RemediationSucceeded"), "{reasons:?}");
    standby.terminate().await;
    lab.shutdown().await;
    Ok(())
}

/// A paused StatefulSet holds the controller; two failing members of one cluster (no quorum
/// left) are a storm it does not touch. Each hold is told on the pod, nothing is recorded
/// or dispatched, and the volume stays as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_and_a_storm_hold_every_action() -> Result<()> {
    let Some((lab, _)) = broken_lab_with_mounts().await? else { return Ok(()) };
    let agent = agent_for_controller(&lab, &[]).await?;
    let token = register_agent(&lab, &agent)?;
    let set = lab.set.shape().set_name();
    lab.api.modify::<k8s_openapi::api::apps::v1::StatefulSet>("apisix", &set, |s| {
        s.metadata.annotations.get_or_insert_default().insert("etcd-medic.io/paused".into(), "true".into());
    })?;
    let volume = lab.set.volume_path(1)?;
    let before = etcd_medic_lab::agent::tree(&volume);
    let c = ControllerProcess::start(&lab, &token, "replica-a", DEFAULTS).await?;
    wait_held(&lab, &c, "apisix-etcd-1", "Paused").await?;
    // A record that claims to be the controller's own (its label is the maker's to write)
    // waits for the pause like any other.
    let api: kube::Api<etcd_medic_client::crd::EtcdRemediation> = kube::Api::namespaced(lab.api.client().await?, "apisix");
    let forged: etcd_medic_client::crd::EtcdRemediation = serde_json::from_value(json!({
        "apiVersion": "etcd-medic.io/v1alpha1", "kind": "EtcdRemediation",
        "metadata": {"name": "forged", "labels": {"etcd-medic.io/decision": "dispatch"}},
        "spec": {"pod": "apisix-etcd-1", "force": true},
    }))?;
    api.create(&Default::default(), &forged).await?;
    let paused = |r: &EtcdRemediation| {
        r.status.as_ref().is_some_and(|s| s.conditions.iter().any(|c| c.r#type == "Processing" && c.reason == "Paused"))
    };
    let s = wait_record(&lab, "apisix", "forged", HEAL, "waiting for the pause", paused, &[&c]).await?.status.unwrap_or_default();
    assert_eq!((s.phase.as_deref(), s.remediation_id.as_deref()), (Some("Pending"), None), "{s:?}");
    assert!(agent_remediations(&agent, &token, "apisix-etcd-1").await?.is_empty(), "nothing was dispatched");
    api.delete("forged", &Default::default()).await?;

    // A second member fails (killed and held in back-off): the cluster has no quorum left.
    lab.set.switches().hold_restarts.store(true, Ordering::SeqCst);
    lab.set.crash_container(2)?;
    lab.set.hold_restarts(2, HEAL).await?;
    lab.api.modify::<k8s_openapi::api::apps::v1::StatefulSet>("apisix", &set, |s| {
        s.metadata.annotations.get_or_insert_default().remove("etcd-medic.io/paused");
    })?;
    wait_held(&lab, &c, "apisix-etcd-1", "ClusterStorm").await?;
    // A few more looks change nothing.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(remediations(&lab, "apisix").is_empty(), "{:?}", remediations(&lab, "apisix"));
    assert!(agent_remediations(&agent, &token, "apisix-etcd-1").await?.is_empty());
    assert_eq!(etcd_medic_lab::agent::tree(&volume), before, "a hold changed the volume");
    assert!(c.metric("etcd_medic_controller_holds{reason=\"ClusterStorm\"}").await.is_some_and(|n| n >= 1.0));
    lab.set.release_restarts();
    lab.shutdown().await;
    Ok(())
}

/// Until the pod carries a `Held<reason>` Event.
async fn wait_held(lab: &Lab, c: &ControllerProcess, pod: &str, reason: &str) -> Result<()> {
    let deadline = tokio::time::Instant::now() + HEAL;
    loop {
        let held = lab.api.list::<k8s_openapi::api::events::v1::Event>(Some("apisix")).into_iter().any(|e| {
            e.reason.as_deref() == Some(format!("Held{reason}").as_str())
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(pod)
                && e.note.as_deref().is_some_and(|n| n.contains(reason))
        });
        if held {
            return Ok(());
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "no {reason} hold of {pod}:\n{}", c.log_text());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A crash the agent does not know (a member killed) may not repeat: with the defaults it is
/// not acted on at its first crash, and no record is made. Once the thresholds are met (here
/// lowered to the one crash the lab holds it after) it is recorded Refused with its evidence
/// by the controller itself; a hand-made EtcdRemediation is carried out as the controller's
/// own (a dry run here: the agent's plan and diagnosis, nothing changed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_crash_waits_for_the_thresholds_lowered_to_one_held_crash_then_is_refused_and_a_hand_made_request_is_carried_out()
-> Result<()> {
    crate::init_tracing();
    let lab = Lab::start(etcd_medic_lab::objects::SetShape::apisix(3, NODE_NAME)).await?;
    let agent = agent_for_controller(&lab, &[]).await?;
    let token = register_agent(&lab, &agent)?;
    lab.set.switches().hold_restarts.store(true, Ordering::SeqCst);
    lab.set.crash_container(1)?;
    lab.set.hold_restarts(1, HEAL).await?;
    let mut d = ControllerProcess::start(&lab, &token, "replica-d", DEFAULTS).await?;
    // The controller has read the crash and said why it is no candidate yet.
    let deadline = tokio::time::Instant::now() + HEAL;
    while !d
        .log_text()
        .lines()
        .any(|l| l.contains("not a candidate at its first crash") && l.contains("MayNotRepeat") && l.contains("apisix-etcd-1"))
    {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "no first-crash verdict:\n{}", d.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(remediations(&lab, "apisix").is_empty(), "an unknown crash is not acted on at its first crash");
    assert_eq!(d.metric("etcd_medic_controller_detections_total{signature=\"Unknown\"}").await, Some(1.0), "detected, not recorded");
    d.terminate().await;

    let c = ControllerProcess::start(&lab, &token, "replica-a", ONE_HELD_CRASH).await?;
    let refused = wait_remediation(&lab, "apisix-etcd-1", HEAL, |p| !p.is_empty() && p != "Pending", &[&c]).await?;
    let s = refused.status.clone().unwrap_or_default();
    assert_eq!((phase(&refused), s.error.as_ref().map(|e| e.code.as_str())), ("Refused", Some("UnknownFailure")), "{s:?}");
    assert_eq!(refused.labels().get("etcd-medic.io/candidacy").map(String::as_str), Some("thresholds"));
    assert_eq!(s.remediation_id, None, "nothing was dispatched");
    assert!(s.diagnosis.as_ref().is_some_and(|d| d.signature == "Unknown"), "{s:?}");
    assert!(agent_remediations(&agent, &token, "apisix-etcd-1").await?.is_empty());
    assert_eq!(c.metric("etcd_medic_controller_decisions_total{outcome=\"refuse\",reason=\"UnknownFailure\"}").await, Some(1.0));

    // A person asks for a dry run of the same pod.
    let api: kube::Api<etcd_medic_client::crd::EtcdRemediation> = kube::Api::namespaced(lab.api.client().await?, "apisix");
    let mine: etcd_medic_client::crd::EtcdRemediation = serde_json::from_value(json!({
        "apiVersion": "etcd-medic.io/v1alpha1", "kind": "EtcdRemediation",
        "metadata": {"name": "by-hand"}, "spec": {"pod": "apisix-etcd-1", "dryRun": true, "force": true, "reason": "a person asked"},
    }))?;
    api.create(&Default::default(), &mine).await?;
    let ended = |r: &EtcdRemediation| etcd_medic_client::crd::is_final(r.status.as_ref());
    let done = wait_record(&lab, "apisix", "by-hand", HEAL, "ended", ended, &[&c]).await?;
    let s = done.status.clone().unwrap_or_default();
    assert!(s.remediation_id.is_some() && s.node.as_deref() == Some(NODE_NAME), "{s:?}");
    let asked = agent_remediations(&agent, &token, "apisix-etcd-1").await?;
    assert_eq!(asked.len(), 1, "the agent was asked once: {asked:?}");
    // A forced dry run of a killed member plans the heal; nothing moved.
    assert_eq!(phase(&done), "Planned", "{s:?}");
    assert_eq!(etcd_medic_lab::etcd::member_list(&lab.set.other_endpoints(1)).await?.len(), 3);
    lab.set.release_restarts();
    lab.shutdown().await;
    Ok(())
}

/// The API server fails the controller on the way: the record's create is carried out but
/// its answer lost, every other status write answers 500 (four times), and a renewal of the
/// leader's lease answers 500. The member is still healed once: one record, one
/// remediation, the lead kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flaky_api_server_costs_nothing_twice() -> Result<()> {
    let Some((lab, _)) = broken_lab_with_mounts().await? else { return Ok(()) };
    let agent = agent_for_controller(&lab, &[]).await?;
    let token = register_agent(&lab, &agent)?;
    let records = "/apis/etcd-medic.io/v1alpha1/namespaces/apisix/etcdremediations";
    lab.api.inject(Fault::new(records, FaultKind::LoseAnswer(500)).method("POST").times(1));
    lab.api.inject(Fault::new(records, FaultKind::Status(500)).method("PATCH").every(2).times(4));
    let c = ControllerProcess::start(&lab, &token, "replica-a", DEFAULTS).await?;
    // The controller's own Lease: the agent's cluster leases live in the same namespace.
    let lead = "/apis/coordination.k8s.io/v1/namespaces/etcd-medic/leases/etcd-medic-controller";
    lab.api.inject(Fault::new(lead, FaultKind::Status(500)).method("PUT").times(1));
    let done = wait_remediation(&lab, "apisix-etcd-1", HEAL, |p| matches!(p, "Succeeded" | "Failed" | "Refused"), &[&c]).await?;
    assert_eq!(phase(&done), "Succeeded", "{done:?}\n{}", c.log_text());
    let records: Vec<_> = remediations(&lab, "apisix").into_iter().filter(|r| r.spec.pod == "apisix-etcd-1").collect();
    assert_eq!(records.len(), 1, "a lost create answer made no second record: {records:?}");
    assert_eq!(agent_remediations(&agent, &token, "apisix-etcd-1").await?.len(), 1);
    // The heal may end before the leader's next renewal: that renewal meets the 500.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !c.log_text().contains("could not renew the lead") {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "the renewal's 500 struck:\n{}", c.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // And the renewal after it holds the lead.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(c.leads().await, "one failed renewal did not cost the lead:\n{}", c.log_text());
    lab.set.wait_ready(1, HEAL).await?;
    assert_every_key(&lab, 3, KEYS).await?;
    lab.shutdown().await;
    Ok(())
}

/// As a new user meets it: one APISIX release (three etcd pods, nothing else watched), the
/// controller on the chart's defaults and already running when a member is drained and its
/// replacement crashes on `member not found`. The crash's status change is looked at as the
/// watch brings it, the pod is a candidate at that first crash (it can only repeat), and the
/// member is healed with every key: no storm hold, no wait for three restarts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_crash_is_healed_from_its_watch_event_with_the_charts_defaults() -> Result<()> {
    let Some((lab, agent, c)) = watched_on_defaults().await? else { return Ok(()) };
    lab.drain_member(1).await?;
    let done = wait_remediation(&lab, "apisix-etcd-1", HEAL, |p| matches!(p, "Succeeded" | "Failed" | "Refused"), &[&c]).await?;
    assert_eq!(phase(&done), "Succeeded", "{done:?}\n{}\nagent:\n{}", c.log_text(), agent.log_text());
    assert_eq!(done.labels().get("etcd-medic.io/candidacy").map(String::as_str), Some("firstCrash"));
    // The record was made in a look that a watch event caused, before a third restart.
    let log = c.log_text();
    let dispatched: serde_json::Value = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| l["message"] == "dispatching")
        .unwrap_or_else(|| panic!("no dispatch in the controller's log:\n{log}"));
    assert_eq!(dispatched["look"], "event", "{dispatched}");
    assert!(dispatched["restarts"].as_u64().is_some_and(|r| r < 3), "{dispatched}");
    assert!(c.metric("etcd_medic_controller_looks_total{cause=\"event\"}").await.is_some_and(|n| n >= 1.0));
    assert_eq!(c.metric("etcd_medic_controller_holds{reason=\"Storm\"}").await, None, "one member of the only cluster is no storm");
    lab.set.wait_ready(1, HEAL).await?;
    assert_every_key(&lab, 3, KEYS).await?;
    lab.shutdown().await;
    Ok(())
}

/// `cluster ID mismatch` lines beside `member not found` (a tenant's image may print them,
/// anyone who reaches the peer port can make etcd print them) no longer hold a heal off at
/// the controller: with the chart's defaults the pod waits for the thresholds (the line may
/// not repeat), is dispatched, and the agent's check asks the member's WAL, which is the live
/// cluster's: healed with every key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_id_mismatch_lines_go_to_the_agent_whose_data_answers_them_with_the_charts_defaults() -> Result<()> {
    let Some((lab, agent, c)) = watched_on_defaults().await? else { return Ok(()) };
    lab.set.switches().printed_first.lock().unwrap().insert(1, vec![crate::diagnosis::MISMATCH.into()]);
    lab.drain_member(1).await?;
    let done = wait_remediation(&lab, "apisix-etcd-1", HEAL, |p| matches!(p, "Succeeded" | "Failed" | "Refused"), &[&c]).await?;
    assert_eq!(phase(&done), "Succeeded", "{done:?}\n{}\nagent:\n{}", c.log_text(), agent.log_text());
    assert_eq!(done.labels().get("etcd-medic.io/candidacy").map(String::as_str), Some("thresholds"));
    let s = done.status.clone().unwrap_or_default();
    assert_eq!(s.diagnosis.as_ref().map(|d| d.signature.as_str()), Some("MemberNotFound"), "{s:?}");
    assert_eq!(s.data.as_ref().map(|d| d.wal.as_str()), Some("whole"), "{s:?}");
    assert_eq!(s.data.as_ref().and_then(|d| d.cluster_id.clone()), s.cluster_id.clone(), "the live cluster's WAL: {s:?}");
    lab.set.wait_ready(1, HEAL).await?;
    assert_every_key(&lab, 3, KEYS).await?;
    lab.shutdown().await;
    Ok(())
}

/// Three healthy members with keys, the agent, and the controller on the chart's defaults
/// watching them; `None` (said skipped) without real mounts.
pub(crate) async fn watched_on_defaults() -> Result<Option<(Lab, ServedAgent, ControllerProcess)>> {
    crate::init_tracing();
    let lab = Lab::start(etcd_medic_lab::objects::SetShape::apisix(3, NODE_NAME)).await?;
    if !lab.node.real_mounts {
        etcd_medic_lab::skip("needs root: real mounts");
        lab.shutdown().await;
        return Ok(None);
    }
    lab.write_keys(KEYS).await?;
    let agent = agent_for_controller(&lab, &[]).await?;
    let token = register_agent(&lab, &agent)?;
    let c = ControllerProcess::start(&lab, &token, "replica-a", DEFAULTS).await?;
    Ok(Some((lab, agent, c)))
}

/// The same on the kubelet's own schedule (`SimOptions::kubelet`): the first crash is
/// restarted at once. Whether the controller's look meets that crash's status before the
/// restart is the watch's timing, as on a node: when it does, the agent finds the container
/// running again and refuses (`PodRunning`, which changed nothing), and that refusal holds
/// nothing once the pod crashed again (`detect::refusal_holds`, unit-tested): the next
/// crash, a second later, is acted on as its watch event comes, not after a back-off. Either
/// way the member is healed with every key and every dispatch came from an event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_the_kubelets_schedule_the_first_crashes_are_healed_and_a_passing_refusal_holds_nothing() -> Result<()> {
    crate::init_tracing();
    let opts = etcd_medic_lab::LabOptions { sim: etcd_medic_lab::statefulset::SimOptions::kubelet(), ..Default::default() };
    let lab = Lab::start_with(etcd_medic_lab::objects::SetShape::apisix(3, NODE_NAME), opts).await?;
    if !lab.node.real_mounts {
        etcd_medic_lab::skip("needs root: real mounts");
        lab.shutdown().await;
        return Ok(());
    }
    lab.write_keys(KEYS).await?;
    let agent = agent_for_controller(&lab, &[]).await?;
    let token = register_agent(&lab, &agent)?;
    let c = ControllerProcess::start(&lab, &token, "replica-a", DEFAULTS).await?;
    lab.drain_member(1).await?;
    let done = wait_remediation(&lab, "apisix-etcd-1", HEAL, |p| p == "Succeeded" || p == "Failed", &[&c]).await?;
    assert_eq!(phase(&done), "Succeeded", "{done:?}\n{}\nagent:\n{}", c.log_text(), agent.log_text());
    let records: Vec<_> = remediations(&lab, "apisix").into_iter().filter(|r| r.spec.pod == "apisix-etcd-1").collect();
    let refused: Vec<_> = records.iter().filter(|r| phase(r) == "Refused").collect();
    for r in &refused {
        let s = r.status.clone().unwrap_or_default();
        assert_eq!(s.error.map(|e| e.code), Some("PodRunning".into()), "only a passing refusal before the heal: {records:?}");
    }
    assert_eq!(records.len(), refused.len() + 1, "one heal: {records:?}");
    assert!(refused.len() <= 1, "a refusal at the first crash holds the second back not at all, and that one heals: {records:?}");
    // Every dispatch came from a watch event: none waited out a refusal's back-off.
    let log = c.log_text();
    let looks: Vec<String> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["message"] == "dispatching")
        .map(|l| l["look"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(looks.len(), records.len(), "{log}");
    assert!(looks.iter().all(|l| l == "event"), "{looks:?}\n{log}");
    lab.set.wait_ready(1, HEAL).await?;
    assert_every_key(&lab, 3, KEYS).await?;
    lab.shutdown().await;
    Ok(())
}

/// A tenant's ten crash-looping etcd StatefulSets (labelled as the Bitnami chart labels them,
/// three pods each, one failing in each) are a storm of that namespace alone: its own pods
/// are held `NamespaceStorm`, and the victim's member, failing in its own namespace at the
/// same time, is healed by the controller run as the chart installs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tenants_ten_crash_loops_hold_only_its_own_heals() -> Result<()> {
    let lab = etcd_medic_lab::Lab::start(etcd_medic_lab::objects::SetShape::apisix(3, NODE_NAME)).await?;
    if !lab.node.real_mounts {
        etcd_medic_lab::skip("needs root: real mounts");
        lab.shutdown().await;
        return Ok(());
    }
    lab.write_keys(KEYS).await?;
    let store = lab.api.store();
    let res = |group: &str, plural: &str| etcd_medic_lab::apiserver::store::find_resource(group, "v1", plural).expect("a known resource");
    let _ = store.create(res("", "namespaces"), "", json!({"metadata": {"name": "tenant"}}));
    for set in 0..10 {
        let mut shape = etcd_medic_lab::objects::SetShape::apisix(3, NODE_NAME);
        (shape.namespace, shape.release) = ("tenant".into(), format!("t{set}"));
        let made = store
            .create(res("apps", "statefulsets"), "tenant", etcd_medic_lab::objects::statefulset(&shape))
            .map_err(|e| anyhow::anyhow!(e.message))?;
        let uid = made["metadata"]["uid"].as_str().unwrap_or_default().to_string();
        let members: Vec<_> = (0..3).map(|i| etcd_medic_lab::etcd::MemberSpec::new(shape.pod_name(i))).collect();
        for i in 0..3 {
            let pod = etcd_medic_lab::objects::pod(&shape, &uid, i, &members);
            let pod = if i == 1 { etcd_medic_lab::objects::crash_looping(pod) } else { etcd_medic_lab::objects::running(pod) };
            store.create(res("", "pods"), "tenant", pod).map_err(|e| anyhow::anyhow!(e.message))?;
        }
    }
    let agent = agent_for_controller(&lab, &[]).await?;
    let token = register_agent(&lab, &agent)?;
    let c = ControllerProcess::start(&lab, &token, "replica-a", DEFAULTS).await?;
    let deadline = tokio::time::Instant::now() + HEAL;
    while c.metric("etcd_medic_controller_holds{reason=\"NamespaceStorm\"}").await.is_none_or(|n| n < 10.0) {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "the tenant's pods were never held:\n{}", c.log_text());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    lab.drain_member(1).await?;
    let done = wait_remediation(&lab, "apisix-etcd-1", HEAL, |p| matches!(p, "Succeeded" | "Failed" | "Refused"), &[&c]).await?;
    assert_eq!(phase(&done), "Succeeded", "{done:?}\n{}", c.log_text());
    assert!(remediations(&lab, "tenant").is_empty(), "nothing was recorded for the tenant's held pods");
    assert_eq!(c.metric("etcd_medic_controller_holds{reason=\"Storm\"}").await, None, "two namespaces failing are no storm");
    lab.set.wait_ready(1, HEAL).await?;
    assert_every_key(&lab, 3, KEYS).await?;
    lab.shutdown().await;
    Ok(())
}
