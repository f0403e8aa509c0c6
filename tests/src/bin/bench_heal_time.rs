//! `scripts/bench-heal-time`: time to heal as users live it, from the first crash, printed
//! as the Markdown section of `BENCHMARKS.md`.
//!
//! Each run is a fresh lab: three Bitnami members with `--keys` keys (default 1,000), the
//! simulated kubelet on its real schedule (`SimOptions::kubelet`: the first crash restarted
//! at once, then 10 s doubling to 5 min), the real agent and the real controller on the
//! chart's defaults, started before anything fails. The clock starts when the pod's status
//! first shows the failing start (the crash a user's `kubectl get pods` would show first)
//! and stops when the member is started, voting and healthy and every member holds every
//! key with one `HashKV`. Failures (`--runs` of each, default 3):
//!
//! - `reference`: a member drained as users see it, its replacement crashing on
//!   `member not found`;
//! - `corrupt-wal`: a member whose WAL has a flipped byte, crashing on `crc mismatch`;
//! - `unknown`: a member killed at every start (an OOM loop): never healed; the clock stops at
//!   the controller's `Refused` record;
//! - `manual`: the reference failure healed by a person following the known fix, no
//!   controller: as soon as `kubectl get pods` shows `CrashLoopBackOff`, the stale
//!   `member_id`, `member/snap` and `member/wal` are deleted on the node and the pod deleted
//!   (a person who is already watching and types instantly: a lower bound).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

use etcd_medic_lab::bench::summary;
use etcd_medic_lab::controller::{ControllerProcess, agent_for_controller, register_agent, remediations};
use etcd_medic_lab::objects::SetShape;
use etcd_medic_lab::statefulset::{SimOptions, termination_message};
use etcd_medic_lab::{Lab, LabOptions, NODE_NAME, etcd};

const LIMIT: Duration = Duration::from_secs(600);

struct Args {
    runs: usize,
    keys: usize,
    only: Vec<String>,
}

fn args() -> Result<Args> {
    let mut a = Args { runs: 3, keys: 1000, only: vec![] };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--runs" => a.runs = it.next().context("a number")?.parse()?,
            "--keys" => a.keys = it.next().context("a number")?.parse()?,
            "--only" => a.only.push(it.next().context("a failure")?),
            other => bail!("unknown flag {other}; see the source's header"),
        }
    }
    Ok(a)
}

/// A fresh lab on the kubelet's schedule, with keys.
async fn lab(keys: usize) -> Result<Lab> {
    let lab = Lab::start_with(SetShape::apisix(3, NODE_NAME), LabOptions { sim: SimOptions::kubelet(), ..Default::default() }).await?;
    ensure!(lab.node.real_mounts, "the benchmark needs root: real mounts");
    lab.write_keys(keys).await?;
    Ok(lab)
}

/// Waits (polling the stand-in's store every 5 ms) until member 1's pod satisfies `pred`.
async fn until_pod(lab: &Lab, what: &str, pred: impl Fn(&Value) -> bool) -> Result<Instant> {
    let deadline = Instant::now() + LIMIT;
    loop {
        if lab.set.pod(1).is_ok_and(|p| pred(&p)) {
            return Ok(Instant::now());
        }
        ensure!(Instant::now() < deadline, "member 1 never {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Member 1 is started, voting and healthy, and every member holds every key with one
/// `HashKV`.
async fn until_healed(lab: &Lab, keys: usize) -> Result<Instant> {
    let deadline = Instant::now() + LIMIT;
    let name = lab.set.shape().pod_name(1);
    let url = lab.set.members()[1].client_url();
    loop {
        let voting =
            etcd::member_list(&lab.set.other_endpoints(1)).await.is_ok_and(|ms| ms.iter().any(|m| m.name == name && !m.is_learner));
        if voting && etcd::endpoint_healthy(&url).await {
            let c = etcd::check_consistency(&lab.set.endpoints()).await;
            if c.is_ok_and(|c| c.consistent && c.members.len() == 3 && c.members.iter().all(|(_, n, _)| *n == keys)) {
                return Ok(Instant::now());
            }
        }
        ensure!(Instant::now() < deadline, "member 1 was not healed within {LIMIT:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The controller and the agent, as the chart installs them (the chart's lease too).
async fn medic(lab: &Lab) -> Result<(etcd_medic_lab::agent::ServedAgent, ControllerProcess)> {
    let agent = agent_for_controller(lab, &[]).await?;
    let token = register_agent(lab, &agent)?;
    let c = ControllerProcess::start(lab, &token, "bench", &["--lease-duration", "15s"]).await?;
    Ok((agent, c))
}

fn says(p: &Value, needle: &str) -> bool {
    termination_message(p).contains(needle)
}

/// The pod's etcd container has failed: its current or its last state is a non-zero exit
/// (the kubelet restarts a first crash at once, so the first may show as either).
fn crashed(p: &Value) -> bool {
    ["/status/containerStatuses/0/state/terminated/exitCode", "/status/containerStatuses/0/lastState/terminated/exitCode"]
        .iter()
        .any(|f| p.pointer(f).and_then(Value::as_i64).is_some_and(|c| c != 0))
}

/// One run of `failure`: seconds from the first crash to the end, and how it ended.
async fn run(failure: &str, keys: usize) -> Result<(f64, String)> {
    let lab = lab(keys).await?;
    let (secs, how) = match failure {
        "reference" => {
            let (_agent, c) = medic(&lab).await?;
            let old = lab.set.pod_uid(1)?;
            lab.drain_member(1).await?;
            let crash = until_pod(&lab, "crashed", |p| p["metadata"]["uid"] != old.as_str() && crashed(p)).await?;
            let healed = until_healed(&lab, keys).await?;
            (healed - crash, ended(&lab, &c).await?)
        }
        "corrupt-wal" => {
            let (_agent, c) = medic(&lab).await?;
            // Stopped while its WAL is damaged (the first crash, a kill, is not this failure's).
            lab.set.switches().hold_restarts.store(true, std::sync::atomic::Ordering::SeqCst);
            lab.set.crash_container(1)?;
            lab.set.hold_restarts(1, LIMIT).await?;
            etcd::flip_a_byte_in_the_wal(&lab.set.data_dir(1)?)?;
            lab.set.release_restarts();
            let crash = until_pod(&lab, "crashed on its WAL", |p| says(p, "crc mismatch")).await?;
            let healed = until_healed(&lab, keys).await?;
            (healed - crash, ended(&lab, &c).await?)
        }
        "unknown" => {
            let (agent, c) = medic(&lab).await?;
            let crash = Instant::now();
            lab.set.crash_container(1)?;
            // Killed at every start, until the controller has decided.
            let deadline = Instant::now() + LIMIT;
            let refused = loop {
                let _ = lab.set.crash_container(1);
                let r = remediations(&lab, "apisix").into_iter().find(|r| r.spec.pod == "apisix-etcd-1");
                let phase = r.as_ref().and_then(|r| r.status.as_ref()).and_then(|s| s.phase.clone());
                if let Some(p) = phase.filter(|p| p != "Pending") {
                    ensure!(p == "Refused", "an unknown crash ended {p}: {r:?}");
                    break Instant::now();
                }
                ensure!(Instant::now() < deadline, "no decision:\n{}", c.log_text());
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            let s = remediations(&lab, "apisix").into_iter().find_map(|r| r.status).unwrap_or_default();
            ensure!(s.remediation_id.is_none(), "an unknown crash was dispatched: {s:?}\n{}", agent.log_text());
            (refused - crash, format!("Refused {}", s.error.map(|e| e.code).unwrap_or_default()))
        }
        "manual" => {
            let old = lab.set.pod_uid(1)?;
            lab.drain_member(1).await?;
            let crash = until_pod(&lab, "crashed", |p| p["metadata"]["uid"] != old.as_str() && crashed(p)).await?;
            until_pod(&lab, "showed CrashLoopBackOff", |p| {
                p.pointer("/status/containerStatuses/0/state/waiting/reason").and_then(Value::as_str) == Some("CrashLoopBackOff")
            })
            .await?;
            // The known fix, on the node, then `kubectl delete pod`.
            let data = lab.set.data_dir(1)?;
            std::fs::remove_file(data.join("member_id"))?;
            std::fs::remove_dir_all(data.join("member/snap"))?;
            std::fs::remove_dir_all(data.join("member/wal"))?;
            lab.set.delete_pod(1)?;
            let healed = until_healed(&lab, keys).await?;
            (healed - crash, "healed by hand".to_string())
        }
        other => bail!("unknown failure {other}"),
    };
    lab.shutdown().await;
    Ok((secs.as_secs_f64(), how))
}

/// How the controller's records of member 1 ended: a heal that succeeded, after any passing
/// refusals (the container running again when a first crash's request came).
async fn ended(lab: &Lab, c: &ControllerProcess) -> Result<String> {
    let deadline = Instant::now() + LIMIT;
    loop {
        let records: Vec<_> = remediations(lab, "apisix").into_iter().filter(|r| r.spec.pod == "apisix-etcd-1").collect();
        let phase = |r: &etcd_medic_client::crd::EtcdRemediation| r.status.as_ref().and_then(|s| s.phase.clone()).unwrap_or_default();
        for r in &records {
            let s = r.status.clone().unwrap_or_default();
            let passing = phase(r) == "Refused" && s.error.as_ref().is_some_and(|e| e.code == "PodRunning");
            ensure!(
                !etcd_medic_client::crd::is_final(Some(&s)) || phase(r) == "Succeeded" || passing,
                "a record ended {}: {:?}\n{}",
                phase(r),
                s.error,
                c.log_text()
            );
        }
        if let Some(done) = records.iter().find(|r| phase(r) == "Succeeded") {
            let by = done.metadata.labels.as_ref().and_then(|l| l.get("etcd-medic.io/candidacy").cloned()).unwrap_or_default();
            let refused = records.iter().filter(|r| phase(r) == "Refused").count();
            return Ok(format!("Succeeded ({by}) after {refused} PodRunning refusal{}", if refused == 1 { "" } else { "s" }));
        }
        ensure!(Instant::now() < deadline, "the record never ended:\n{}", c.log_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let a = args()?;
    let all = [
        ("reference", "`member not found` (the reference failure), healed by the controller"),
        ("corrupt-wal", "a corrupt WAL (`crc mismatch`), the member replaced by the controller"),
        ("unknown", "an unknown crash (killed at every start): not healed, the controller's `Refused` record"),
        ("manual", "`member not found` healed by a person following the known fix (a lower bound)"),
    ];
    let mut md = "| from the first crash of | to | median | min | max | how each run ended |\n|---|---|---|---|---|---|\n".to_string();
    for (failure, what) in all.iter().filter(|(f, _)| a.only.is_empty() || a.only.iter().any(|o| o == f)) {
        let mut secs = vec![];
        let mut hows = vec![];
        for i in 0..a.runs {
            let (s, how) = run(failure, a.keys).await.with_context(|| format!("{failure}, run {i}"))?;
            eprintln!("{failure} run {i}: {s:.2} s, {how}");
            secs.push(s);
            hows.push(how);
        }
        let (min, med, max) = summary(&secs);
        hows.dedup();
        let to = if *failure == "unknown" { "the record `Refused`" } else { "healthy, voting, every key" };
        md.push_str(&format!("| {what} | {to} | {med:.2} s | {min:.2} s | {max:.2} s | {} |\n", hows.join("; ")));
    }
    print!("{md}");
    Ok(())
}
