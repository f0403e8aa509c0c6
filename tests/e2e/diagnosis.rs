//! The agent acts only on a failure it has diagnosed as healable (DESIGN.md, invariant 9).
//! Each failure is produced for real with etcd and the Bitnami start-up rules; the agent reads
//! the crashed container's log on the node (the pods' `terminationMessagePolicy` is `File`,
//! as in the Bitnami chart: no termination message) and heals or refuses as the table in
//! `etcd_medic_core::signature` says: every key present after a heal, nothing changed after
//! a refusal.

use std::time::Duration;

use anyhow::{Context, Result};
use etcd_medic::Code;
use etcd_medic::engine::Phase;
use etcd_medic_core::signature::{Action, Diagnosis, Signature, Source};
use etcd_medic_lab::objects::{SetShape, StartProfile};
use etcd_medic_lab::{Lab, NODE_NAME, etcd};
use serde_json::Value;
use std::sync::atomic::Ordering;

use crate::reference_failure::{KEYS, assert_every_key};

const WAIT: Duration = Duration::from_secs(90);

/// Three Bitnami members (chart 9.7.3) with keys, whose crashes leave no termination message.
async fn lab() -> Result<Option<Lab>> {
    lab_of(SetShape::apisix(3, NODE_NAME)).await
}

/// Three members of `shape` with keys, whose crashes leave no termination message.
async fn lab_of(shape: SetShape) -> Result<Option<Lab>> {
    crate::init_tracing();
    let lab = Lab::start(shape).await?;
    if !lab.node.real_mounts {
        etcd_medic_lab::skip("needs root: the agent refuses unmounted CSI paths");
        lab.shutdown().await;
        return Ok(None);
    }
    lab.set.switches().no_termination_message.store(true, Ordering::SeqCst);
    lab.write_keys(KEYS).await?;
    Ok(Some(lab))
}

fn restarts(p: &Value) -> u64 {
    p.pointer("/status/containerStatuses/0/restartCount").and_then(Value::as_u64).unwrap_or(0)
}

/// Waits until `ordinal` crash-loops again with `phrase` in its last start's log.
async fn wait_crash_loop_saying(lab: &Lab, ordinal: usize, phrase: &str) -> Result<()> {
    let before = restarts(&lab.set.pod(ordinal)?);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let p = lab.set.pod(ordinal)?;
        let looping = p.pointer("/status/containerStatuses/0/state/waiting/reason").and_then(Value::as_str) == Some("CrashLoopBackOff");
        if looping && restarts(&p) > before && lab.set.container_log(ordinal).contains(phrase) {
            return Ok(());
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "no crash loop with {phrase:?}; log:\n{}", lab.set.container_log(ordinal));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The diagnosis a remediation recorded; where it got as far as a plan, the plan's is the same.
fn diagnosis(r: &etcd_medic::engine::Remediation) -> &Diagnosis {
    let d = r.diagnosis.as_ref().expect("the remediation records its diagnosis");
    if let Some(p) = r.plan.as_ref() {
        assert_eq!(p.diagnosis.as_ref(), Some(d));
    }
    d
}

/// Stops `ordinal`'s etcd (SIGKILL) and holds the container in back-off: nothing runs on
/// its volume until `release_restarts`. Returns once the others serve again (they elect a
/// leader when the killed member led).
async fn stop_and_hold(lab: &Lab, ordinal: usize) -> Result<()> {
    lab.set.switches().hold_restarts.store(true, Ordering::SeqCst);
    lab.set.crash_container(ordinal)?;
    lab.set.hold_restarts(ordinal, WAIT).await?;
    for e in lab.set.other_endpoints(ordinal) {
        etcd::wait_healthy(&e, WAIT).await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_wal_is_healed_by_replacing_the_member_with_every_key() -> Result<()> {
    let Some(lab) = lab().await? else { return Ok(()) };
    stop_and_hold(&lab, 1).await?;
    etcd::flip_a_byte_in_the_wal(&lab.set.data_dir(1)?)?;
    lab.set.release_restarts();
    wait_crash_loop_saying(&lab, 1, "crc mismatch").await?;
    // Still listed under its id: the agent must remove it before the image adds it back.
    assert_eq!(etcd::member_list(&lab.set.other_endpoints(1)).await?.len(), 3);

    let r = heals_as(&lab, Signature::CorruptData, Action::Replace).await?;
    assert!(diagnosis(&r).evidence.iter().any(|e| e.contains("crc mismatch")), "{:?}", diagnosis(&r).evidence);
    // The files confirm what the log said.
    let data = r.plan.as_ref().and_then(|p| p.data.as_ref()).expect("the plan shows the files' facts");
    assert!(data.corruption().is_some_and(|c| c.contains("the WAL is corrupt")), "{}", data.summary());
    assert!(r.steps[0].message.contains("diagnosis CorruptData"), "{}", r.steps[0].message);
    let membership = r.steps.iter().find(|s| s.name == etcd_medic::engine::Step::Membership).unwrap();
    assert!(membership.message.contains("removed stale member"), "{}", membership.message);
    lab.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_snapshot_db_is_healed_by_replacing_the_member_with_every_key() -> Result<()> {
    // Snapshots every 50 entries: the member's WAL starts after one, so its db is needed.
    let Some(lab) = lab_of(SetShape { snapshot_count: Some(50), ..SetShape::apisix(3, NODE_NAME) }).await? else { return Ok(()) };
    let snap = lab.set.data_dir(1)?.join("member/snap");
    let snaps = std::fs::read_dir(&snap)?.flatten().filter(|e| e.path().extension().is_some_and(|x| x == "snap")).count();
    assert!(snaps > 0, "no .snap file written");
    stop_and_hold(&lab, 1).await?;
    std::fs::remove_file(snap.join("db"))?;
    lab.set.release_restarts();
    wait_crash_loop_saying(&lab, 1, "failed to recover v3 backend from snapshot").await?;
    heals_as(&lab, Signature::CorruptData, Action::Replace).await?;
    lab.shutdown().await;
    Ok(())
}

/// The agent heals member 1 as `signature` calls for, and every key is on every member.
async fn heals_as(lab: &Lab, signature: Signature, action: Action) -> Result<etcd_medic::engine::Remediation> {
    let r = etcd_medic_lab::agent::remediate(lab, "apisix-etcd-1", false).await?;
    assert_eq!(r.phase, Phase::Succeeded, "{r:?}");
    assert_eq!((diagnosis(&r).signature, diagnosis(&r).action, diagnosis(&r).source), (signature, action, Source::ContainerLog));
    assert_every_key(lab, 3, KEYS).await?;
    Ok(r)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_member_id_is_healed() -> Result<()> {
    let Some(lab) = lab().await? else { return Ok(()) };
    // The image wrote an empty id: the preStop hook cannot remove the member, and the next
    // start runs `member update ""`.
    std::fs::write(lab.set.data_dir(1)?.join("member_id"), "")?;
    lab.set.delete_pod(1)?;
    wait_crash_loop_saying(&lab, 1, "bad member ID arg").await?;
    heals_as(&lab, Signature::BadMemberId, Action::Heal).await?;
    lab.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_clusters_data_is_a_split_brain_and_nothing_is_touched() -> Result<()> {
    let Some(lab) = lab().await? else { return Ok(()) };
    // A single-member cluster of its own, stopped: its data is what a wrong volume holds.
    let mut foreign = etcd::EtcdCluster::start(1).await?;
    let cluster_of = |endpoints: Vec<String>| async move {
        let list = etcd::live_client(&endpoints).await?.member_list().await?;
        anyhow::Ok(list.header().map(|h| h.cluster_id()).unwrap_or_default())
    };
    let foreign_id = cluster_of(vec![foreign.specs[0].client_url()]).await?;
    let live_id = cluster_of(lab.set.endpoints()).await?;
    foreign.stop(0).await;
    stop_and_hold(&lab, 1).await?;
    let data = lab.set.data_dir(1)?;
    std::fs::remove_dir_all(data.join("member"))?;
    let copied = std::process::Command::new("cp").arg("-a").arg(foreign.data_dir(0).join("member")).arg(&data).status()?;
    assert!(copied.success());
    // It starts on the other cluster's data and its peers refuse it; a liveness probe ends it.
    lab.set.release_restarts();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !lab.set.container_log(1).contains("cluster ID mismatch") {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "no mismatch seen:\n{}", lab.set.container_log(1));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop_and_hold(&lab, 1).await?;

    let volume = lab.set.volume_path(1)?;
    let before = etcd_medic_lab::agent::tree(&volume);
    for force in [false, true] {
        let r = etcd_medic_lab::agent::remediate(&lab, "apisix-etcd-1", force).await?;
        assert_eq!(r.phase, Phase::Refused, "{r:?}");
        assert_eq!(r.error.as_ref().map(|e| e.code), Some(Code::SplitBrain), "force never overrides a split brain: {:?}", r.error);
        // Decided by the data: the two cluster ids, as etcd answered them, are the evidence.
        let said = &r.error.as_ref().unwrap().message;
        assert!(said.contains(&format!("{foreign_id:016x}")) && said.contains(&format!("{live_id:016x}")), "{said}");
        let on_disk = r.plan.as_ref().and_then(|p| p.data.as_ref()).and_then(|d| d.wal.as_ref()).and_then(|w| w.cluster_id);
        assert_eq!(on_disk, Some(foreign_id), "the plan shows what the data says");
        let d = diagnosis(&r);
        assert_eq!(d.signature, Signature::ClusterIdMismatch);
        assert!(d.evidence.iter().any(|e| e.contains("cluster ID mismatch")), "{:?}", d.evidence);
    }
    assert_eq!(etcd_medic_lab::agent::tree(&volume), before, "a refusal changed the volume");
    assert_eq!(etcd::member_list(&lab.set.other_endpoints(1)).await?.len(), 3, "a refusal changed membership");
    lab.set.release_restarts();
    lab.shutdown().await;
    Ok(())
}

/// What etcd 3.5 logs when a peer of another cluster sends it raft messages.
pub(crate) const MISMATCH: &str = r#"{"level":"warn","ts":"2026-12-07T10:00:00.000Z","caller":"rafthttp/http.go:500","msg":"request cluster ID mismatch","local-member-id":"8e9e05c52164694d","local-member-cluster-id":"cdf818194e3a8c32","local-member-server-version":"3.5.17","remote-peer-server-name":"8211f1d0f64f3269","remote-peer-id":"8211f1d0f64f3269","remote-peer-cluster-id":"1c4bb73e7d4e0a5f"}"#;

/// Anyone who reaches a member's peer port can make it print `cluster ID mismatch`, and a
/// tenant's image prints what it likes: the lines raise the question, the member's WAL
/// answers it. Over the member's own data (the reference failure) they no longer block the
/// heal; the plan and the record say why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_id_mismatch_lines_over_the_members_own_data_do_not_block_the_heal() -> Result<()> {
    let Some((lab, old_id)) = crate::reference_failure::broken_lab_with_mounts().await? else { return Ok(()) };
    lab.set.switches().printed_first.lock().unwrap().insert(1, vec![MISMATCH.into()]);
    wait_crash_loop_saying(&lab, 1, "cluster ID mismatch").await?;
    let r = etcd_medic_lab::agent::remediate(&lab, "apisix-etcd-1", false).await?;
    assert_eq!(r.phase, Phase::Succeeded, "{r:?}");
    let d = diagnosis(&r);
    assert_eq!((d.signature, d.action, d.source), (Signature::MemberNotFound, Action::Heal, Source::ContainerLog));
    assert!(d.why.contains("not about its data"), "{}", d.why);
    let wal = r.plan.as_ref().and_then(|p| p.data.as_ref()).and_then(|d| d.wal.clone()).expect("the plan shows the WAL's facts");
    assert_eq!(wal.node_id, Some(old_id), "the removed member's own files");
    assert_every_key(&lab, 3, KEYS).await?;
    lab.shutdown().await;
    Ok(())
}

/// A Go runtime's goroutine dump after etcd's last words pushes them out of the log's tail:
/// the lines say nothing known, and the WAL's CRC says the data is corrupt. The member is
/// replaced as `CorruptData`, from the data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_goroutine_dump_over_a_corrupt_wal_is_corrupt_data_from_the_files() -> Result<()> {
    let Some(lab) = lab().await? else { return Ok(()) };
    stop_and_hold(&lab, 1).await?;
    etcd::flip_a_byte_in_the_wal(&lab.set.data_dir(1)?)?;
    let mut dump = vec!["panic: runtime error: invalid memory address or nil pointer dereference".to_string(), String::new()];
    for g in 0..60 {
        dump.push(format!("goroutine {g} [select]:"));
        dump.push(format!("\tgo.etcd.io/etcd/server/v3/etcdserver.(*EtcdServer).run(0xc000{g:03x})"));
        dump.push("\t\t/go/src/go.etcd.io/etcd/server/etcdserver/server.go:1100 +0x1a5".into());
        dump.push(String::new());
    }
    lab.set.switches().printed_last.lock().unwrap().insert(1, dump);
    lab.set.release_restarts();
    wait_crash_loop_saying(&lab, 1, "goroutine 59 [select]").await?;
    lab.set.switches().hold_restarts.store(true, Ordering::SeqCst);
    lab.set.hold_restarts(1, WAIT).await?;
    let tail: Vec<String> = lab.set.container_log(1).lines().rev().take(etcd_medic_core::signature::MAX_LINES).map(String::from).collect();
    assert!(!tail.iter().any(|l| l.contains("crc mismatch")), "etcd's own words are out of the tail");

    let r = remediate_held(&lab, false).await?;
    assert_eq!(r.phase, Phase::Succeeded, "{r:?}");
    let d = diagnosis(&r);
    assert_eq!((d.signature, d.action, d.source), (Signature::CorruptData, Action::Replace, Source::Data));
    assert!(d.evidence.iter().any(|e| e.contains("the WAL is corrupt in segment")), "{:?}", d.evidence);
    assert_every_key(&lab, 3, KEYS).await?;
    lab.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_failure_is_refused_with_its_evidence_unless_forced() -> Result<()> {
    let Some(lab) = lab().await? else { return Ok(()) };
    // A healthy member killed: its log shows nothing the agent knows how to heal.
    stop_and_hold(&lab, 1).await?;
    let volume = lab.set.volume_path(1)?;
    let before = etcd_medic_lab::agent::tree(&volume);
    let r = etcd_medic_lab::agent::remediate(&lab, "apisix-etcd-1", false).await?;
    assert_eq!(r.error.as_ref().map(|e| e.code), Some(Code::UnknownFailure), "{r:?}");
    let d = diagnosis(&r);
    assert_eq!((d.signature, d.source), (Signature::Unknown, Source::ContainerLog));
    assert!(!d.evidence.is_empty(), "the last lines are shown as evidence");
    assert_eq!(etcd_medic_lab::agent::tree(&volume), before);

    // Through the CLI: `diagnose` says the same and changes nothing.
    let out = tokio::task::block_in_place(|| {
        std::process::Command::new(etcd_medic_lab::agent::agent_binary())
            .args(["diagnose", "apisix/apisix-etcd-1", "-o", "json", "--node-name", NODE_NAME])
            .arg("--host-root")
            .arg(&lab.node.root)
            .env("KUBECONFIG", &lab.api.kubeconfig)
            .output()
    })?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let shown: Diagnosis = serde_json::from_slice(&out.stdout)?;
    assert_eq!((shown.signature, shown.code), (Signature::Unknown, Some(Code::UnknownFailure)));
    assert_eq!(shown.generation_by.as_deref(), Some("label helm.sh/chart=etcd-9.7.3"));

    // Forced, the same member is healed (it is still listed: it is replaced). The old
    // container stays held until the agent restarted the pod.
    let r = remediate_held(&lab, true).await?;
    assert_eq!(r.phase, Phase::Succeeded, "{r:?}");
    assert!(r.steps[0].message.contains("forced past UnknownFailure"), "{}", r.steps[0].message);
    assert_every_key(&lab, 3, KEYS).await?;
    lab.shutdown().await;
    Ok(())
}

/// Remediates member 1 while its old container is held in back-off: restarts are released
/// once the agent restarted the pod, so that only the replacement starts.
async fn remediate_held(lab: &Lab, force: bool) -> Result<etcd_medic::engine::Remediation> {
    let release = |r: &etcd_medic::engine::Remediation| {
        if r.step_done(etcd_medic::engine::Step::Restart) {
            lab.set.release_restarts();
        }
    };
    let r = etcd_medic_lab::agent::remediate_with(lab, "apisix-etcd-1", force, &release).await?;
    lab.set.release_restarts();
    Ok(r)
}

/// Chart 11/12: three members whose image follows the newer start-up rules.
fn chart_11() -> SetShape {
    SetShape { profile: StartProfile::Bitnami11, ..SetShape::apisix(3, NODE_NAME) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chart_11_heals_a_removed_member_itself_and_the_agent_stands_down() -> Result<()> {
    let Some(lab) = lab_of(chart_11()).await? else { return Ok(()) };
    stop_and_hold(&lab, 1).await?;
    let id = etcd::member_list(&lab.set.other_endpoints(1)).await?.into_iter().find(|m| m.name == "apisix-etcd-1").context("listed")?.id;
    etcd::member_remove(&lab.set.other_endpoints(1), id).await?;
    // The image sees "permanently removed", wipes its data dir and re-adds itself; that add
    // fails once (right after a membership change etcd refuses it), so the pod crash-loops
    // with the removal in its last log.
    lab.set.switches().fail_next_member_add.store(true, Ordering::SeqCst);
    lab.set.release_once(1, WAIT).await?;
    lab.set.hold_restarts(1, WAIT).await?;
    let log = lab.set.container_log(1);
    assert!(log.contains("permanently removed") && log.contains("unhealthy cluster"), "{log}");

    let volume = lab.set.volume_path(1)?;
    let before = etcd_medic_lab::agent::tree(&volume);
    let r = etcd_medic_lab::agent::remediate(&lab, "apisix-etcd-1", false).await?;
    assert_eq!(r.error.as_ref().map(|e| e.code), Some(Code::SelfHealing), "{r:?}");
    let d = diagnosis(&r);
    assert_eq!((d.signature, d.generation), (Signature::MemberRemoved, Some(etcd_medic_core::generation::Generation::Bitnami11)));
    assert_eq!(d.generation_by.as_deref(), Some("label helm.sh/chart=etcd-11.0.2"));
    assert_eq!(etcd_medic_lab::agent::tree(&volume), before, "standing down changes nothing");

    // As the agent said: the next start heals it, with every key.
    lab.set.release_restarts();
    lab.set.wait_ready(1, WAIT).await?;
    assert_every_key(&lab, 3, KEYS).await?;
    lab.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chart_11_corrupt_data_is_what_the_agent_heals() -> Result<()> {
    let Some(lab) = lab_of(chart_11()).await? else { return Ok(()) };
    stop_and_hold(&lab, 1).await?;
    etcd::flip_a_byte_in_the_wal(&lab.set.data_dir(1)?)?;
    lab.set.release_restarts();
    wait_crash_loop_saying(&lab, 1, "crc mismatch").await?;
    let r = heals_as(&lab, Signature::CorruptData, Action::Replace).await?;
    let plan = r.plan.as_ref().unwrap();
    assert_eq!(plan.profile, etcd_medic::profile::Profile::Bitnami);
    assert!(plan.r#move.iter().any(|m| m.path == "member"), "chart 11's whole member dir moves: {:?}", plan.r#move);
    assert!(!lab.set.data_dir(1)?.join(".etcd-medic-keep").exists(), "no dot-file: the image joins on an empty data dir");
    lab.shutdown().await;
    Ok(())
}
