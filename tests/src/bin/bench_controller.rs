//! `scripts/bench-controller`: the controller at scale and its latency, printed as the
//! Markdown section of `BENCHMARKS.md`.
//!
//! - scale: `etcd-medic controller` (the release binary) against the stand-in API server
//!   holding `--pods` pods (default 10,000) of which `--etcd` (default 3,000) are Bitnami etcd
//!   members in StatefulSets of 3, all Ready: time to its first lists, memory (RSS, peak),
//!   CPU and API requests while idle for `--idle` seconds (default 60);
//! - latency, with real etcd and the real agent and the controller on the chart's defaults:
//!   a member drained as users see it; from its replacement's first crash (the status change
//!   as the stand-in stores it) to the agent holding the remediation (the POST answered, as
//!   stored in the record's status), and to the record's `Succeeded`; `--runs` times
//!   (default 3).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use etcd_medic_lab::apiserver::ApiServer;
use etcd_medic_lab::apiserver::store::find_resource;
use etcd_medic_lab::bench::{summary, usage};
use etcd_medic_lab::controller::{ControllerProcess, agent_for_controller, register_agent, remediations};
use etcd_medic_lab::etcd::MemberSpec;
use etcd_medic_lab::objects::{self, SetShape};
use etcd_medic_lab::{Lab, NODE_NAME};
use serde_json::{Value, json};

struct Args {
    pods: usize,
    etcd: usize,
    idle: u64,
    runs: usize,
    scale_only: bool,
}

fn args() -> Result<Args> {
    let mut a = Args { pods: 10_000, etcd: 3_000, idle: 60, runs: 3, scale_only: false };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut num = || -> Result<usize> { Ok(it.next().context("a number")?.parse()?) };
        match flag.as_str() {
            "--pods" => a.pods = num()?,
            "--etcd" => a.etcd = num()?,
            "--idle" => a.idle = num()? as u64,
            "--runs" => a.runs = num()?,
            "--scale-only" => a.scale_only = true,
            other => anyhow::bail!("unknown flag {other}; see the source's header"),
        }
    }
    ensure!(a.etcd <= a.pods && a.etcd.is_multiple_of(3), "--etcd must be a multiple of 3, at most --pods");
    Ok(a)
}

/// A pod as the kubelet reports a healthy one.
/// Fills the stand-in: `etcd` members in sets of 3 (one namespace each), the rest other pods.
fn populate(api: &ApiServer, pods: usize, etcd: usize) -> Result<()> {
    let store = api.store();
    let (pod_res, set_res) =
        (find_resource("", "v1", "pods").context("pods")?, find_resource("apps", "v1", "statefulsets").context("sets")?);
    for set in 0..etcd / 3 {
        let mut shape = SetShape::apisix(3, &format!("node-{}", set % 100));
        shape.namespace = format!("tenant-{set}");
        let members: Vec<MemberSpec> = (0..3).map(|i| MemberSpec { name: shape.pod_name(i), client_port: 2379, peer_port: 2380 }).collect();
        store.create(set_res, &shape.namespace, objects::statefulset(&shape)).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        for i in 0..3 {
            store
                .create(pod_res, &shape.namespace, objects::running(objects::pod(&shape, "bench-set-uid", i, &members)))
                .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        }
    }
    let shape = SetShape::apisix(3, "node-0");
    let members: Vec<MemberSpec> = (0..3).map(|i| MemberSpec { name: shape.pod_name(i), client_port: 2379, peer_port: 2380 }).collect();
    for n in 0..pods - etcd {
        let mut p = objects::running(objects::pod(&shape, "bench-set-uid", 0, &members));
        let ns = format!("tenant-{}", n % 1000);
        p["metadata"]["name"] = json!(format!("web-{n}"));
        p["metadata"]["namespace"] = json!(ns);
        p["metadata"]["labels"] = json!({"app.kubernetes.io/name": "web", "app.kubernetes.io/instance": format!("web-{}", n / 10)});
        p["metadata"]["ownerReferences"] = json!([]);
        p["spec"]["nodeName"] = json!(format!("node-{}", n % 100));
        store.create(pod_res, &ns, p).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    }
    Ok(())
}

fn peak_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?.split_whitespace().next()?.parse::<u64>().ok().map(|kb| kb * 1024)
}

async fn scale(a: &Args, md: &mut String) -> Result<()> {
    let dir = tempfile::Builder::new().prefix("etcd-medic-bench-").tempdir()?;
    let api = ApiServer::start(dir.path()).await?;
    let t = Instant::now();
    populate(&api, a.pods, a.etcd)?;
    eprintln!("stand-in filled with {} pods in {:.1}s", a.pods, t.elapsed().as_secs_f64());
    let token = dir.path().join("token");
    std::fs::write(&token, "unused")?;
    let t = Instant::now();
    // The Deployment's settings: the default lease (15 s, renewed every 5 s).
    let c = ControllerProcess::start_with(&api, dir.path(), &token, "bench", &["--lease-duration", "15s"]).await?;
    let ready = t.elapsed().as_secs_f64();
    let pid = c.pid();
    let watched = c.metric("etcd_medic_controller_watched_pods").await.unwrap_or(0.0);
    ensure!(watched as usize == a.etcd, "the controller watches {watched} pods, not {}", a.etcd);
    let u0 = usage(pid)?;
    let seen0 = api.seen().len();
    tokio::time::sleep(Duration::from_secs(a.idle)).await;
    let u1 = usage(pid)?;
    let all = api.seen();
    let seen = all.len() - seen0;
    let mut by: std::collections::BTreeMap<String, usize> = Default::default();
    for r in &all[seen0..] {
        *by.entry(format!("{} {}", r.method, r.path)).or_default() += 1;
    }
    eprintln!("requests while idle: {by:?}");
    let per_min = seen as f64 * 60.0 / a.idle as f64;
    let cpu_pct = (u1.cpu_secs - u0.cpu_secs) * 100.0 / a.idle as f64;
    let peak = peak_rss(pid).unwrap_or(u1.rss_bytes);
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    md.push_str(&format!(
        "| {} pods, {} etcd members watched | {ready:.2} s | {:.1} MiB | {:.1} MiB | {cpu_pct:.2} % | {per_min:.1} |\n",
        a.pods,
        a.etcd,
        mib(u1.rss_bytes),
        mib(peak),
    ));
    Ok(())
}

async fn latency(a: &Args, md: &mut String) -> Result<()> {
    let lab = Lab::start(SetShape::apisix(3, NODE_NAME)).await?;
    lab.write_keys(300).await?;
    let agent = agent_for_controller(&lab, &[]).await?;
    let token = register_agent(&lab, &agent)?;
    // The chart's defaults (the chart's lease too): the first-crash rule makes the crash's
    // status change a candidate, and the watch brings it.
    let c = ControllerProcess::start(&lab, &token, "bench", &["--lease-duration", "15s"]).await?;
    let (mut to_post, mut to_success) = (Vec::new(), Vec::new());
    for run in 0..a.runs {
        if run > 0 {
            // etcd takes the next membership change only once its leader is settled.
            tokio::time::sleep(Duration::from_secs(6)).await;
        }
        let before: Vec<String> = remediations(&lab, "apisix").into_iter().filter_map(|r| r.metadata.name).collect();
        // A member each run: the controller's cooldown (5 min by default) rightly holds a pod
        // healed minutes ago.
        let ordinal = (run + 1) % 3;
        let pod = lab.set.shape().pod_name(ordinal);
        let old = lab.set.pod_uid(ordinal)?;
        // Every change the stand-in stores, as it stores it: the clock reads the moments
        // themselves, not a poll of them.
        let mut changes = lab.api.store().subscribe();
        lab.drain_member(ordinal).await?;
        let (mut crashed, mut posted, mut done) = (None, None, None);
        let deadline = Instant::now() + Duration::from_secs(300);
        while done.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            ensure!(!left.is_zero(), "run {run}: no end:\n{}", c.log_text());
            let change = match tokio::time::timeout(left, changes.recv()).await {
                Ok(Ok(change)) => change,
                Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(n))) => anyhow::bail!("run {run}: {n} changes missed"),
                Ok(Err(e)) => anyhow::bail!("run {run}: {e}"),
                Err(_) => continue,
            };
            let o = &change.object;
            match change.resource.plural {
                "pods" if crashed.is_none() && o["metadata"]["name"] == pod.as_str() && o["metadata"]["uid"] != old.as_str() => {
                    let failed = ["state", "lastState"].iter().any(|k| {
                        o.pointer(&format!("/status/containerStatuses/0/{k}/terminated/exitCode"))
                            .and_then(Value::as_i64)
                            .is_some_and(|c| c != 0)
                    });
                    if failed {
                        crashed = Some(Instant::now());
                    }
                }
                "etcdremediations" if o["metadata"]["name"].as_str().is_some_and(|n| !before.iter().any(|b| b == n)) => {
                    if posted.is_none() && o.pointer("/status/remediationID").is_some_and(|v| !v.is_null()) {
                        posted = Some(Instant::now());
                    }
                    match o.pointer("/status/phase").and_then(Value::as_str) {
                        Some("Succeeded") => done = Some(Instant::now()),
                        Some(p @ ("Failed" | "Refused")) => anyhow::bail!("run {run}: the remediation ended {p}: {o}\n{}", c.log_text()),
                        _ => {}
                    }
                }
                _ => {}
            }
        }
        let crashed = crashed.context("the crash was not seen")?;
        let (posted, done) = (posted.context("no remediation id")? - crashed, done.context("no end")? - crashed);
        to_post.push(posted.as_secs_f64());
        to_success.push(done.as_secs_f64());
        eprintln!("run {run}: crash → POST answered {:.1} ms, → Succeeded {:.2} s", posted.as_secs_f64() * 1e3, done.as_secs_f64());
    }
    let row = |v: &[f64]| {
        let (min, med, max) = summary(v);
        format!("{:.1} ms (min {:.1}, max {:.1})", med * 1e3, min * 1e3, max * 1e3)
    };
    md.push_str(&format!(
        "\n| from the pod's first crash (its status change, as stored), the controller on the chart's defaults | to |\n|---|---|\n\
         | the agent holding the remediation (POST answered, id in the record's status) | {} |\n\
         | the record's `Succeeded` (the member rejoined, verified by the agent) | {} |\n",
        row(&to_post),
        row(&to_success)
    ));
    md.push_str(&format!(
        "\n{} runs; the controller's own view of the same: `detection_to_dispatch_seconds` sum {:.3} s over {} dispatches; looks by cause: \
         event {}, due {}, fallback {}.\n",
        a.runs,
        c.metric("etcd_medic_controller_detection_to_dispatch_seconds_sum").await.unwrap_or(f64::NAN),
        c.metric("etcd_medic_controller_detection_to_dispatch_seconds_count").await.unwrap_or(0.0),
        c.metric("etcd_medic_controller_looks_total{cause=\"event\"}").await.unwrap_or(0.0),
        c.metric("etcd_medic_controller_looks_total{cause=\"due\"}").await.unwrap_or(0.0),
        c.metric("etcd_medic_controller_looks_total{cause=\"fallback\"}").await.unwrap_or(0.0),
    ));
    lab.shutdown().await;
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let a = args()?;
    let mut md = String::from(
        "## The controller\n\n`scripts/bench-controller` (the release binary against the stand-in API server; the latency \
         with real etcd and the real agent).\n\n\
         | watching | first lists in | RSS idle | peak RSS | CPU idle | API requests / min idle |\n|---|---|---|---|---|---|\n",
    );
    scale(&a, &mut md).await?;
    if !a.scale_only {
        latency(&a, &mut md).await?;
    }
    print!("{md}");
    Ok(())
}
