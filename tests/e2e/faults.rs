//! Faults of the API server and of the agent itself, against real etcd: transient errors
//! after acting are survived, a lost answer to the pod delete is settled by the pod, a stale
//! journal never hijacks a new failure, and the cluster's lease is taken over only from a
//! holder that left it unchanged, whatever the clocks say.

use std::time::Duration;

use anyhow::Result;
use etcd_medic::engine::{Phase, Remediation};
use etcd_medic_lab::apiserver::{Fault, FaultKind};
use etcd_medic_lab::etcd;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;

const PODS: &str = "/api/v1/namespaces/apisix/pods";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_api_errors_from_lock_on_and_a_lost_delete_answer_are_survived() -> Result<()> {
    let Some((lab, _)) = crate::reference_failure::broken_lab_with_mounts().await? else { return Ok(()) };
    // From the Lock step on: every third pod read fails with 500, every other lease write
    // with 503, every other claim read is throttled (429 with Retry-After), every other
    // Event is refused, and the first pod delete is carried out but its answer lost.
    let armed = std::sync::atomic::AtomicBool::new(false);
    let progress = |r: &Remediation| {
        if r.steps.last().is_some_and(|s| s.name == "Lock") && !armed.swap(true, std::sync::atomic::Ordering::SeqCst) {
            lab.api.inject(Fault::new(format!("{PODS}/apisix-etcd-1"), FaultKind::LoseAnswer(500)).method("DELETE").times(1));
            lab.api.inject(Fault::new(PODS, FaultKind::Status(500)).method("GET").every(3));
            lab.api
                .inject(Fault::new("/apis/coordination.k8s.io/v1/namespaces/apisix/leases", FaultKind::Status(503)).method("PUT").every(2));
            lab.api.inject(
                Fault::new("/api/v1/namespaces/apisix/persistentvolumeclaims", FaultKind::Throttle { retry_after_seconds: 1 }).every(2),
            );
            lab.api.inject(Fault::new("/apis/events.k8s.io", FaultKind::Status(503)).every(2));
        }
    };
    let r = etcd_medic_lab::agent::remediate_with(&lab, "apisix-etcd-1", false, &progress).await?;
    lab.api.clear_faults();
    assert_eq!(r.phase, Phase::Succeeded, "{r:?}");
    let restart = r.steps.iter().find(|s| s.name == "Restart").unwrap();
    assert!(restart.message.contains("went through"), "the lost answer was settled: {}", restart.message);
    // The old pod was deleted once: the retry met its precondition (gone or replaced).
    let deletes = lab.api.seen().iter().filter(|q| q.method == "DELETE" && q.path == format!("{PODS}/apisix-etcd-1")).count();
    assert_eq!(deletes, 2, "one delete carried out (answer lost) and one retry");
    crate::reference_failure::assert_every_key(&lab, 3, crate::reference_failure::KEYS).await?;
    lab.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_journal_never_hijacks_a_new_failure() -> Result<()> {
    let Some((lab, _)) = crate::reference_failure::broken_lab_with_mounts().await? else { return Ok(()) };
    let first = etcd_medic_lab::agent::remediate(&lab, "apisix-etcd-1", false).await?;
    assert_eq!(first.phase, Phase::Succeeded, "{first:?}");
    // As if the agent had been killed in Verify: the journal still says Running.
    let state = lab.dir.path().join("agent-state");
    let mut stale = etcd_medic::journal::read(&state, &first.id)?;
    stale.phase = Phase::Running;
    stale.finished_at = None;
    stale.steps.retain(|s| !matches!(s.name.as_str(), "Verify" | "Retention"));
    etcd_medic::journal::write(&state, &stale)?;
    // Long after it rejoined, a later instance of the pod fails anew.
    tokio::time::sleep(Duration::from_secs(6)).await;
    lab.break_member(1).await?;
    let second = etcd_medic_lab::agent::remediate(&lab, "apisix-etcd-1", false).await?;
    assert_ne!(second.id, first.id, "a new failure gets a new remediation");
    assert_eq!(second.phase, Phase::Succeeded, "{second:?}");
    let closed = etcd_medic::journal::read(&state, &first.id)?;
    assert_eq!(closed.phase, Phase::Succeeded, "{closed:?}");
    let last = closed.steps.last().unwrap();
    assert!(last.message.contains("closed from evidence"), "{}", last.message);
    crate::reference_failure::assert_every_key(&lab, 3, crate::reference_failure::KEYS).await?;
    lab.shutdown().await;
    Ok(())
}

/// A lease whose holder wrote `renew_time` by its own clock, 10 minutes behind ours.
fn planted(name: &str, holder: &str, skewed_by: i64) -> Lease {
    let then = jiff::Timestamp::now().checked_sub(jiff::SignedDuration::from_secs(skewed_by)).unwrap();
    Lease {
        metadata: kube::api::ObjectMeta { name: Some(name.into()), namespace: Some("apisix".into()), ..Default::default() },
        spec: Some(LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(3),
            acquire_time: Some(MicroTime(then)),
            renew_time: Some(MicroTime(then)),
            ..Default::default()
        }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_is_taken_over_only_when_unchanged_whatever_the_clocks_say() -> Result<()> {
    let Some((lab, _)) = crate::reference_failure::broken_lab_with_mounts().await? else { return Ok(()) };
    let name = lab.target(1)?.scope.lease_name();
    // A live holder on a node whose clock is 10 minutes behind: its renewTime looks long
    // expired to us, but it renews every 500 ms. Never taken over.
    lab.api.create(&planted(&name, "node-b/live", 600))?;
    let renewing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let renewer = {
        let (api, name, on) = (lab.api.clone(), name.clone(), renewing.clone());
        tokio::spawn(async move {
            while on.load(std::sync::atomic::Ordering::SeqCst) {
                let _ = api.modify::<Lease>("apisix", &name, |l| {
                    let t = jiff::Timestamp::now().checked_sub(jiff::SignedDuration::from_secs(600)).unwrap();
                    l.spec.as_mut().unwrap().renew_time = Some(MicroTime(t));
                });
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    let before = etcd::member_list(&lab.set.other_endpoints(1)).await?.len();
    let r = etcd_medic_lab::agent::remediate(&lab, "apisix-etcd-1", false).await?;
    assert_eq!(r.phase, Phase::Refused, "{r:?}");
    assert_eq!(r.error.as_ref().map(|e| e.code), Some(etcd_medic::Code::ClusterLocked), "{:?}", r.error);
    assert_eq!(etcd::member_list(&lab.set.other_endpoints(1)).await?.len(), before, "nothing changed");
    renewing.store(false, std::sync::atomic::Ordering::SeqCst);
    renewer.await?;

    // The holder died: its lease stays unchanged; after its duration (3 s) as this node
    // observes it, the agent takes it over and heals.
    let started = std::time::Instant::now();
    let r = etcd_medic_lab::agent::remediate(&lab, "apisix-etcd-1", false).await?;
    assert_eq!(r.phase, Phase::Succeeded, "{r:?}");
    assert!(started.elapsed() >= Duration::from_secs(3), "watched for the lease's duration first");
    lab.shutdown().await;
    Ok(())
}

/// A tenant's pod may only stand for its own member: one whose spec advertises another
/// member's peer URL (with that member's cluster right there), or one that no StatefulSet
/// controls, is refused before any etcd call, and no member is removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_that_names_another_members_peer_url_is_refused() -> Result<()> {
    let Some((lab, _)) = crate::reference_failure::broken_lab_with_mounts().await? else { return Ok(()) };
    lab.set.hold_restarts(1, Duration::from_secs(60)).await?;
    let victim = lab.set.members()[2].peer_url();
    let ids = |m: Vec<etcd::MemberInfo>| m.into_iter().map(|m| m.id).collect::<std::collections::BTreeSet<u64>>();
    let before = ids(etcd::member_list(&lab.set.other_endpoints(1)).await?);
    lab.api.modify::<k8s_openapi::api::core::v1::Pod>("apisix", "apisix-etcd-1", |p| {
        let c = &mut p.spec.as_mut().unwrap().containers[0];
        for e in c.env.iter_mut().flatten().filter(|e| e.name == "ETCD_INITIAL_ADVERTISE_PEER_URLS") {
            e.value = Some(victim.clone());
        }
    })?;
    let r = etcd_medic_lab::agent::remediate(&lab, "apisix-etcd-1", false).await?;
    assert_eq!(r.phase, Phase::Refused, "{r:?}");
    assert_eq!(r.error.as_ref().map(|e| e.code), Some(etcd_medic::Code::UnsupportedProfile), "{:?}", r.error);
    assert!(r.error.as_ref().unwrap().message.contains("does not name pod"), "{:?}", r.error);
    // No StatefulSet behind it: a bare pod stands for no member at all.
    lab.api.modify::<k8s_openapi::api::core::v1::Pod>("apisix", "apisix-etcd-1", |p| p.metadata.owner_references = None)?;
    let r = etcd_medic_lab::agent::remediate(&lab, "apisix-etcd-1", false).await?;
    assert_eq!(r.error.as_ref().map(|e| e.code), Some(etcd_medic::Code::UnsupportedProfile), "{:?}", r.error);
    assert_eq!(ids(etcd::member_list(&lab.set.other_endpoints(1)).await?), before, "no member was removed");
    lab.set.release_restarts();
    lab.shutdown().await;
    Ok(())
}

/// A member stopped (SIGSTOP: alive to the kernel, silent to its peers) is not healthy: with
/// member 1 broken and member 2 stopped, only one of three is left, and the agent refuses
/// rather than take the cluster below quorum. Once it runs again, the heal goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_cut_off_from_the_leader_does_not_count_for_quorum() -> Result<()> {
    let Some((lab, _)) = crate::reference_failure::broken_lab_with_mounts().await? else { return Ok(()) };
    let port = lab.set.members()[2].client_url().rsplit(':').next().unwrap().to_string();
    let out = std::process::Command::new("pgrep").args(["-f", "--", &format!("--listen-client-urls=http://127.0.0.1:{port}")]).output()?;
    let pid: i32 = String::from_utf8_lossy(&out.stdout).lines().next().expect("member 2's etcd").trim().parse()?;
    let pid = nix::unistd::Pid::from_raw(pid);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP)?;
    let r = etcd_medic_lab::agent::remediate(&lab, "apisix-etcd-1", false).await;
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT)?;
    let r = r?;
    assert_eq!(r.phase, Phase::Refused, "{r:?}");
    assert_eq!(r.error.as_ref().map(|e| e.code), Some(etcd_medic::Code::QuorumAtRisk), "{:?}", r.error);
    tokio::time::sleep(Duration::from_secs(6)).await;
    let mut r = etcd_medic_lab::agent::remediate(&lab, "apisix-etcd-1", false).await?;
    for _ in 0..10 {
        // Right after it resumes, etcd may refuse changes for a few seconds, or the member
        // briefly runs between back-offs: the gates say so, and a retry goes through.
        if r.phase == Phase::Succeeded
            || !matches!(r.error.as_ref().map(|e| e.code), Some(etcd_medic::Code::PodRunning | etcd_medic::Code::QuorumAtRisk))
        {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        r = etcd_medic_lab::agent::remediate(&lab, "apisix-etcd-1", false).await?;
    }
    assert_eq!(r.phase, Phase::Succeeded, "{r:?}");
    crate::reference_failure::assert_every_key(&lab, 3, crate::reference_failure::KEYS).await?;
    lab.shutdown().await;
    Ok(())
}

/// A client that writes an oversized body whole without waiting for an answer (no `Expect:
/// 100-continue`: Python's urllib, most scripts) still reads its 413: the agent hears the
/// body out, bounded, before it answers and closes, instead of resetting the connection
/// with unread data, which discards the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_body_sent_without_waiting_still_gets_its_answer() -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let lab = etcd_medic_lab::Lab::start(etcd_medic_lab::objects::SetShape::apisix(1, etcd_medic_lab::NODE_NAME)).await?;
    let how = etcd_medic_lab::agent::Serve {
        auth: "none",
        args: vec!["--rate-limit".into(), "1000".into()],
        ..etcd_medic_lab::agent::Serve::new(&lab)
    };
    let agent = etcd_medic_lab::agent::ServedAgent::start(&lab, how).await?;
    // Ready first: a request before is answered NotReady, whatever its size.
    agent.wait_ready(Duration::from_secs(30)).await?;
    let body = vec![b'x'; 80 * 1024];
    let mut answered = 0;
    for _ in 0..20 {
        let mut s = tokio::net::TcpStream::connect(agent.addr).await?;
        let head = format!(
            "POST /v1/remediations HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            agent.addr,
            body.len()
        );
        // The head, then the body in pieces, as a script's HTTP library writes it without
        // waiting for an answer; a write error is the reset this test is about.
        s.write_all(head.as_bytes()).await?;
        for chunk in body.chunks(8 * 1024) {
            tokio::time::sleep(Duration::from_millis(5)).await;
            s.write_all(chunk).await.map_err(|e| anyhow::anyhow!("the agent closed while the body was sent: {e}"))?;
        }
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await??;
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("HTTP/1.1 413"), "{text}");
        assert!(text.contains("PayloadTooLarge"), "{text}");
        answered += 1;
    }
    assert_eq!(answered, 20);
    drop(agent);
    lab.shutdown().await;
    Ok(())
}

/// A bug that kills a remediation's task (a panic, made to happen by a test hook) is
/// recorded as the end of that remediation with `Internal`; the pod is never wedged behind
/// it: the next request gets a remediation of its own, and the agent keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_engine_task_is_recorded_and_never_wedges_its_pod() -> Result<()> {
    let (lab, _) = crate::reference_failure::broken_lab().await?;
    let how = etcd_medic_lab::agent::Serve {
        auth: "none",
        env: vec![("ETCD_MEDIC_FAILPOINT".into(), "panic:Check".into())],
        ..etcd_medic_lab::agent::Serve::new(&lab)
    };
    let agent = etcd_medic_lab::agent::ServedAgent::start(&lab, how).await?;
    agent.wait_ready(Duration::from_secs(30)).await?;
    let mut ids = Vec::new();
    for _ in 0..2 {
        let created = agent.post(None, &serde_json::json!({"namespace": "apisix", "pod": "apisix-etcd-1"})).await?;
        assert_eq!(created.status, 202, "{}", created.text());
        let id = created.json()["id"].as_str().unwrap().to_string();
        let done = agent.wait_finished(&id, None, Duration::from_secs(30)).await?;
        assert_eq!(done["phase"], "Refused", "nothing was changed: {done}");
        assert_eq!(done["error"]["code"], "Internal", "{done}");
        ids.push(id);
    }
    assert_ne!(ids[0], ids[1], "the second request was not answered with the dead one");
    assert_eq!(agent.get("/healthz", None).await?.status, 200);
    drop(agent);
    lab.shutdown().await;
    Ok(())
}

/// The agent's Verify watches the pod to look again as soon as it changes; an API server (or
/// an older role without `watch`) that refuses that watch, or fails it, costs only the
/// watch: the member is still seen back by the poll, and the heal succeeds with every key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_falls_back_to_its_poll_when_the_pods_watch_is_refused_or_fails() -> Result<()> {
    for kind in [FaultKind::Status(403), FaultKind::Status(500)] {
        let Some((lab, _)) = crate::reference_failure::broken_lab_with_mounts().await? else { return Ok(()) };
        // Every request of Verify's watch (its list and its watch, by the pod's name): no other
        // read of the agent selects a pod by name.
        lab.api.inject(Fault::new(PODS, kind.clone()).method("GET").query("fieldSelector=metadata.name"));
        let r = etcd_medic_lab::agent::remediate(&lab, "apisix-etcd-1", false).await?;
        let struck = lab
            .api
            .seen()
            .iter()
            .filter(|q| q.method == "GET" && q.path == PODS && q.query.contains("fieldSelector=metadata.name"))
            .count();
        lab.api.clear_faults();
        assert_eq!(r.phase, Phase::Succeeded, "{kind:?}: {r:?}");
        assert!(struck >= 1, "{kind:?}: Verify asked for the watch");
        crate::reference_failure::assert_every_key(&lab, 3, crate::reference_failure::KEYS).await?;
        lab.shutdown().await;
    }
    Ok(())
}
