//! `scripts/bench`: measures etcd-medic in the lab and writes `BENCHMARKS.md`.
//!
//! - heal time with 10 MB and 1 GB in the failing member's dir: the agent (POST to
//!   Succeeded), the manual fix at machine speed, and the floor (an empty member catching up);
//!   the quarantine's time next to `rm -rf` of the same tree;
//! - `locate` on 10 vs 1,000 pod directories;
//! - the footprint of `etcd-medic serve`: idle, during remediations, the binary's size;
//! - HTTP: `/healthz` and a dry-run POST under `wrk`.
//!
//! Flags: `--runs N` (heal runs per row, default 3), `--idle SECS` (default 60), `--out FILE`
//! (default BENCHMARKS.md), `--quick` (10 MB only, 1 run, 10 s idle: a smoke run).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use etcd_medic_lab::agent::{Serve, ServedAgent, agent_binary};
use etcd_medic_lab::apiserver::TokenIdentity;
use etcd_medic_lab::bench::{self, Load, human, summary, triple, usage};
use etcd_medic_lab::objects::SetShape;
use etcd_medic_lab::{Lab, NODE_NAME};
use serde_json::json;

const TOKEN: &str = "bench-token";
const MIB: u64 = 1 << 20;
/// etcd takes the next membership change only once its leader has been connected to every
/// voting member for a few seconds.
const SETTLE: Duration = Duration::from_secs(6);

struct Args {
    runs: usize,
    idle: u64,
    out: PathBuf,
    sizes: Vec<u64>,
}

fn args() -> Result<Args> {
    let mut a = Args { runs: 3, idle: 60, out: "BENCHMARKS.md".into(), sizes: vec![10 * MIB, 1024 * MIB] };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--runs" => a.runs = it.next().context("--runs N")?.parse()?,
            "--idle" => a.idle = it.next().context("--idle SECS")?.parse()?,
            "--out" => a.out = it.next().context("--out FILE")?.into(),
            "--quick" => {
                a.runs = 1;
                a.idle = 10;
                a.sizes = vec![10 * MIB];
            }
            other => anyhow::bail!("unknown flag {other}; see the source's header"),
        }
    }
    Ok(a)
}

fn grant(lab: &Lab) {
    lab.api.add_identity(TOKEN, TokenIdentity { username: "bench".into(), ..Default::default() });
    lab.api.allow_remediations("bench", None);
}

#[derive(Default)]
struct Heal {
    agent: Vec<f64>,
    manual: Vec<f64>,
    floor: Vec<f64>,
    quarantine: Vec<f64>,
    /// Each step's own time, and the rest of the wall time (admission, journal writes
    /// between steps, the harness's poll), per run.
    steps: std::collections::BTreeMap<&'static str, Vec<f64>>,
    rm: Vec<f64>,
    cpu_pct: Vec<f64>,
    peak_rss: u64,
}

/// One agent heal: POST, then GET every `POLL_MS` until it ended. Returns the remediation.
async fn agent_heal(agent: &ServedAgent, uid: &str, h: &mut Heal) -> Result<serde_json::Value> {
    let u0 = usage(agent.pid())?;
    let t = Instant::now();
    let r = agent.post(Some(TOKEN), &json!({"namespace": "apisix", "pod": "apisix-etcd-1", "podUID": uid})).await?;
    ensure!(r.status == 202, "POST answered {}: {}", r.status, r.text());
    let id = r.json()["id"].as_str().context("id")?.to_string();
    let done = loop {
        h.peak_rss = h.peak_rss.max(usage(agent.pid())?.rss_bytes);
        let r = agent.get(&format!("/v1/remediations/{id}"), Some(TOKEN)).await?.json();
        if !r["finishedAt"].is_null() {
            break r;
        }
        ensure!(t.elapsed() < Duration::from_secs(300), "no end: {r}");
        tokio::time::sleep(Duration::from_millis(bench::POLL_MS)).await;
    };
    let wall = t.elapsed().as_secs_f64();
    ensure!(done["phase"] == "Succeeded", "{done}");
    h.agent.push(wall);
    h.cpu_pct.push((usage(agent.pid())?.cpu_secs - u0.cpu_secs) / wall * 100.0);
    let step_secs = |name: &str| -> Option<f64> {
        let s = done["steps"].as_array()?.iter().find(|s| s["name"] == name)?;
        let at = |k: &str| s[k].as_str()?.parse::<jiff::Timestamp>().ok();
        Some(at("end")?.duration_since(at("start")?).as_secs_f64())
    };
    h.quarantine.push(step_secs("Quarantine").context("a Quarantine step")?);
    let mut in_steps = 0.0;
    for name in STEPS {
        let secs = step_secs(name).with_context(|| format!("a {name} step"))?;
        in_steps += secs;
        h.steps.entry(name).or_default().push(secs);
    }
    h.steps.entry(OUTSIDE).or_default().push(wall - in_steps);
    Ok(done)
}

/// The steps of a heal, in order.
const STEPS: [&str; 7] = ["Check", "Lock", "Quarantine", "Membership", "Restart", "Verify", "Retention"];
/// The wall time outside every step.
const OUTSIDE: &str = "outside the steps";

/// What each part of the agent's time pays for.
fn buys(part: &str) -> &'static str {
    match part {
        "Check" => {
            "the pod, claim and volume from the API server, the fd-proven walk and mount proof, etcd's member list and each member's status (quorum before and after), the crash log read and diagnosed, no process holding the data"
        }
        "Lock" => "the cluster's Lease created (one remediation per cluster, across nodes)",
        "Quarantine" => "etcd's locks held through the moves, `O_EXCL` manifest, per-name `renameat2`, fsyncs",
        "Membership" => "the stale entry cleared (none here: the preStop hook removed it) and `data/` kept non-empty",
        "Restart" => "the pod deleted with a UID precondition",
        "Verify" => {
            "the floor (c) itself: the replacement starting and catching up; plus the lag between the member being back and the agent's next look (woken by the pod's watch, else a 50 ms poll)"
        }
        "Retention" => "old quarantines pruned from the journal's record, never from the volume's word",
        _ => "admission (auth cached), the journal written and fsynced before and after each step, the harness's 2 ms poll",
    }
}

async fn heal(size: u64, runs: usize, idle: Option<u64>, md_idle: &mut String) -> Result<(Heal, Option<Load>, Option<Load>)> {
    let lab = Lab::start(SetShape::apisix(3, NODE_NAME)).await?;
    lab.write_keys(1000).await?;
    grant(&lab);
    let mut how = Serve::new(&lab);
    // Retention must not prune during a timed heal: keep every quarantine of the run.
    let keep = (runs + 1).to_string();
    how.args = vec!["--rate-limit".into(), "1000000".into(), "--max-in-flight".into(), "1024".into(), "--keep-quarantines".into(), keep];
    let agent = ServedAgent::start(&lab, how).await?;
    agent.wait_ready(Duration::from_secs(30)).await?;
    if let Some(secs) = idle {
        idle_footprint(&agent, secs, md_idle).await?;
    }
    let mut h = Heal::default();
    for run in 0..runs {
        // The three rows in turn, so that each sees the same machine.
        for row in ["agent", "manual", "floor"] {
            tokio::time::sleep(SETTLE).await;
            lab.break_member(1).await?;
            bench::pad(&lab.set.data_dir(1)?.join("member/snap"), size)?;
            let uid = lab.set.pod_uid(1)?;
            match row {
                "agent" => {
                    agent_heal(&agent, &uid, &mut h).await?;
                }
                "manual" => {
                    let t = Instant::now();
                    h.rm.push(bench::delete_by_hand(&lab, 1)?);
                    lab.set.delete_pod(1)?;
                    bench::wait_rejoined(&lab, 1, &uid, Duration::from_secs(180)).await?;
                    h.manual.push(t.elapsed().as_secs_f64());
                }
                _ => {
                    bench::delete_by_hand(&lab, 1)?;
                    let t = Instant::now();
                    lab.set.delete_pod(1)?;
                    bench::wait_rejoined(&lab, 1, &uid, Duration::from_secs(180)).await?;
                    h.floor.push(t.elapsed().as_secs_f64());
                }
            }
            eprintln!("heal {} MiB, run {}, {row}: done", size / MIB, run + 1);
        }
    }
    let loads = if idle.is_some() { http_load(&lab, &agent).await? } else { (None, None) };
    drop(agent);
    lab.shutdown().await;
    Ok((h, loads.0, loads.1))
}

async fn idle_footprint(agent: &ServedAgent, secs: u64, md: &mut String) -> Result<()> {
    tokio::time::sleep(Duration::from_secs(5)).await;
    let u0 = usage(agent.pid())?;
    let mut peak = u0.rss_bytes;
    for _ in 0..secs {
        tokio::time::sleep(Duration::from_secs(1)).await;
        peak = peak.max(usage(agent.pid())?.rss_bytes);
    }
    let u1 = usage(agent.pid())?;
    let cpu = (u1.cpu_secs - u0.cpu_secs) / secs as f64 * 100.0;
    let rss = u1.rss_bytes as f64 / MIB as f64;
    writeln!(
        md,
        "| idle, {secs} s after it became ready | {rss:.1} MiB (peak {:.1} MiB) | {cpu:.3} % | RSS < 20 MiB: {}; CPU < 0.5 %: {} |",
        peak as f64 / MIB as f64,
        met(rss < 20.0),
        met(cpu < 0.5)
    )?;
    Ok(())
}

fn met(ok: bool) -> &'static str {
    if ok { "met" } else { "**not met**" }
}

/// `/healthz` and a dry-run POST (every gate, against the live lab) under `wrk`.
async fn http_load(lab: &Lab, agent: &ServedAgent) -> Result<(Option<Load>, Option<Load>)> {
    if which("wrk").is_none() {
        eprintln!("wrk is not installed: the HTTP rows are skipped (scripts/bench installs it as root)");
        return Ok((None, None));
    }
    // A stopped, not failing member: with force, every gate passes and the dry run is Planned.
    lab.set.kill_container(2).await;
    lab.api.modify::<k8s_openapi::api::core::v1::Pod>("apisix", "apisix-etcd-2", |p| {
        p.status = Some(
            serde_json::from_value(json!({"phase": "Pending", "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}],
                "containerStatuses": [{"name": "etcd", "ready": false,
                "restartCount": 0, "image": "", "imageID": "", "state": {"waiting": {"reason": "PodInitializing"}}}]}))
            .unwrap(),
        );
    })?;
    let body = json!({"namespace": "apisix", "pod": "apisix-etcd-2", "dryRun": true, "force": true});
    let probe = agent.post(Some(TOKEN), &body).await?;
    ensure!(probe.status == 200, "the dry run answered {}: {}", probe.status, probe.text());
    let script = lab.dir.path().join("post.lua");
    std::fs::write(
        &script,
        format!(
            "wrk.method = \"POST\"\nwrk.body = '{body}'\nwrk.headers[\"Content-Type\"] = \"application/json\"\nwrk.headers[\"Authorization\"] = \"Bearer {TOKEN}\"\n"
        ),
    )?;
    let run = |args: Vec<String>| async move {
        let out = tokio::process::Command::new("wrk").args(&args).output().await?;
        ensure!(out.status.success(), "wrk {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        bench::parse_wrk(&String::from_utf8_lossy(&out.stdout))
    };
    let base = format!("http://{}", agent.addr);
    let healthz = run(vec!["-t2".into(), "-c8".into(), "-d10s".into(), "--latency".into(), format!("{base}/healthz")]).await?;
    let script = script.to_string_lossy().to_string();
    let post =
        run(vec!["-t1".into(), "-c2".into(), "-d10s".into(), "--latency".into(), "-s".into(), script, format!("{base}/v1/remediations")])
            .await?;
    Ok((Some(healthz), Some(post)))
}

fn which(cmd: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).map(|d| d.join(cmd)).find(|p| p.is_file()))
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| c.lines().find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())))
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines().find_map(|l| l.strip_prefix("MemTotal:").map(|v| v.trim().trim_end_matches(" kB").parse::<u64>().ok())).flatten()
        })
        .map(|kb| format!("{:.0} GiB", kb as f64 / (1 << 20) as f64))
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cores} cores ({cpu}), {mem}, Linux {}", kernel.trim())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let a = args()?;
    let started = Instant::now();
    let bin = agent_binary();
    let bin_size = std::fs::metadata(&bin)?.len();
    let mut md = String::new();
    writeln!(md, "# Benchmarks\n")?;
    writeln!(md, "Produced by `scripts/bench` (which builds the release binary with `scripts/build-release` and runs")?;
    writeln!(
        md,
        "`cargo run --release -p etcd-medic-lab --bin lab-bench -- --runs {}`), on {}.",
        a.runs,
        jiff::Timestamp::now().strftime("%Y-%m-%d")
    )?;
    writeln!(
        md,
        "Machine: {}; as {}; etcd {}.",
        machine(),
        if nix::unistd::geteuid().is_root() { "root (volumes are real mounts)" } else { "a normal user (no mounts)" },
        etcd_medic_lab::etcd::etcd_version()?.trim_start_matches("etcd Version: ")
    )?;
    writeln!(md, "The machine is shared and noisy: compare the ratios measured within one run, not absolute times across runs.")?;
    writeln!(md, "Every figure is min / median / max over the runs. Benchmarks measure; they never fail the tests on a number.\n")?;

    // Heal time.
    let mut heal_md = String::new();
    let mut idle_md = String::new();
    let mut during: Vec<(f64, u64)> = Vec::new();
    let (mut healthz, mut post) = (None, None);
    writeln!(
        heal_md,
        "| data in the member's dir | (a) agent: POST → Succeeded | (b) manual fix | (c) floor | (a)/(c) | (a)−(c) | (a)−(b) |"
    )?;
    writeln!(heal_md, "|---|---|---|---|---|---|---|")?;
    let mut parts_md = String::new();
    let mut q_md = String::from(
        "| data in the member's dir | agent's Quarantine step (holder check again, renames, fsyncs) | `rm -rf` of the same tree |\n|---|---|---|\n",
    );
    for (i, &size) in a.sizes.iter().enumerate() {
        let (h, hz, po) = heal(size, a.runs, (i == 0).then_some(a.idle), &mut idle_md).await?;
        if hz.is_some() {
            (healthz, post) = (hz, po);
        }
        // Each run's rows ran back to back: compare within a run, then take the median.
        let per_run = |f: &dyn Fn(usize) -> f64| summary(&(0..h.agent.len()).map(f).collect::<Vec<_>>()).1;
        let ratio = per_run(&|i| h.agent[i] / h.floor[i]);
        let (over_floor, over_manual) = (per_run(&|i| h.agent[i] - h.floor[i]), per_run(&|i| h.agent[i] - h.manual[i]));
        let label = if size >= 1024 * MIB { format!("{} GiB", size / (1024 * MIB)) } else { format!("{} MiB", size / MIB) };
        let rows = [triple(&h.agent), triple(&h.manual), triple(&h.floor)];
        writeln!(
            heal_md,
            "| {label} | {} | {} | {} | {ratio:.2} | {} | {} |",
            rows[0],
            rows[1],
            rows[2],
            signed(over_floor),
            signed(over_manual)
        )?;
        writeln!(q_md, "| {label} | {} | {} |", triple(&h.quarantine), triple(&h.rm))?;
        if i == 0 {
            writeln!(parts_md, "\nWhere the agent's time goes ({label}; each part's median over the runs; Verify holds the floor):\n")?;
            writeln!(parts_md, "| part | median | what it buys |\n|---|---|---|")?;
            for part in STEPS.iter().chain([&OUTSIDE]) {
                let v = h.steps.get(part).cloned().unwrap_or_default();
                writeln!(parts_md, "| {part} | {} | {} |", human(summary(&v).1), buys(part))?;
            }
            let verify_over_floor = per_run(&|i| h.steps["Verify"][i] - h.floor[i]);
            writeln!(
                parts_md,
                "| Verify − (c), same run | {} | the agent's look after the member is back, against the harness's |",
                signed(verify_over_floor)
            )?;
        }
        during.push((summary(&h.cpu_pct).1, h.peak_rss));
    }
    writeln!(md, "## Time to heal: the agent next to the manual fix\n")?;
    writeln!(md, "A 3-member Bitnami set (1,000 keys), member 1 drained with its removal log lost until it crash-loops on")?;
    writeln!(
        md,
        "`member not found`, its `member/snap` padded with 1 MiB files to the size shown. Then, in turn, {} time(s) each:\n",
        a.runs
    )?;
    writeln!(
        md,
        "- **(a)** the real agent (`etcd-medic serve`, the static release binary) asked over HTTP: from the POST to the GET that shows"
    )?;
    writeln!(md, "  `Succeeded` (polled every 2 ms) — gates, lease, quarantine, restart with a UID precondition, verification;")?;
    writeln!(md, "- **(b)** the manual fix users do today, scripted at machine speed: find the dir, delete `member/snap`, `member/wal`")?;
    writeln!(md, "  and `member_id`, delete the pod, until the member is back (pod Ready, member started, voting, healthy);")?;
    writeln!(md, "- **(c)** the floor: the same deletion done before the clock starts, so only the restart and an empty member")?;
    writeln!(md, "  catching up by itself are timed.\n")?;
    md.push_str(&heal_md);
    writeln!(md, "\nThe last three columns compare the rows within each run (they ran back to back), median over the runs.")?;
    writeln!(
        md,
        "The agent's verification looks again when the pod changes (a watch) and at least every 50 ms; the harness polls every 2 ms."
    )?;
    writeln!(md, "\nTarget: the agent adds less than 0.5 s over (c). Moving the data aside is a rename, so its time does not grow with")?;
    writeln!(md, "the data, unlike deleting it:\n")?;
    md.push_str(&q_md);
    md.push_str(&parts_md);

    // Locate.
    let (small, large) = bench::locate_10_vs_1000(300).await?;
    writeln!(md, "\n## Locate: 10 vs 1,000 pod directories on the node\n")?;
    writeln!(md, "`locate` in-process (release build): pod, PVC and PV from the stand-in API server over HTTP, kubelet root discovery,")?;
    writeln!(md, "the `O_NOFOLLOW` walk, the mount table, the etcd data check and the sizes of what would move; 300 calls each,")?;
    writeln!(md, "alternating between the two nodes after 20 of warm-up.\n")?;
    writeln!(
        md,
        "| pod dirs on the node | min / median / max |\n|---|---|\n| 10 | {} |\n| 1,000 | {} |\n",
        triple(&small),
        triple(&large)
    )?;
    let ratio = summary(&large).1 / summary(&small).1;
    writeln!(md, "Ratio of medians (1,000 / 10): **{ratio:.2}** — target under 1.5: {}.", met(ratio < 1.5))?;

    // Footprint.
    writeln!(md, "\n## Footprint of `etcd-medic serve`\n")?;
    writeln!(md, "Resident memory (VmRSS) and CPU time (user + system) from `/proc/<pid>`.\n")?;
    writeln!(md, "| when | RSS | CPU | targets |\n|---|---|---|---|")?;
    md.push_str(&idle_md);
    for (i, (cpu, rss)) in during.iter().enumerate() {
        let label = if a.sizes[i] >= 1024 * MIB { "1 GiB".to_string() } else { format!("{} MiB", a.sizes[i] / MIB) };
        writeln!(
            md,
            "| during remediations ({label}) | peak {:.1} MiB | median {cpu:.1} % of one core over each heal | – |",
            *rss as f64 / MIB as f64
        )?;
    }
    writeln!(
        md,
        "\nThe release binary (static, stripped): **{:.1} MiB** — target under 30 MiB: {}.",
        bin_size as f64 / MIB as f64,
        met(bin_size < 30 * MIB)
    )?;

    // HTTP.
    writeln!(md, "\n## HTTP\n")?;
    match (&healthz, &post) {
        (Some(hz), Some(po)) => {
            writeln!(
                md,
                "`wrk` (Debian's package) on loopback for 10 s each, against the agent of the 10 MiB lab (rate limit raised for the"
            )?;
            writeln!(
                md,
                "benchmark); the dry run is a real one: token and access reviews (cached), the pod, its claim and volume, the path"
            )?;
            writeln!(md, "walk, the etcd member list and each member's status, the lease, and the journal written and fsynced.\n")?;
            writeln!(md, "| request | connections | requests/s | p50 | p99 | non-2xx |\n|---|---|---|---|---|---|")?;
            writeln!(md, "| `GET /healthz` | 8 | {:.0} | {} | {} | {} |", hz.rps, human(hz.p50), human(hz.p99), hz.non_2xx)?;
            writeln!(
                md,
                "| `POST /v1/remediations` (dry run, Planned) | 2 | {:.0} | {} | {} | {} |",
                po.rps,
                human(po.p50),
                human(po.p99),
                po.non_2xx
            )?;
            writeln!(
                md,
                "\n`/healthz` p99 under 5 ms: {}. The load tool, the agent, the stand-in API server and three etcd members share the",
                met(hz.p99 < 0.005)
            )?;
            writeln!(md, "machine's cores.")?;
        }
        _ => writeln!(md, "Not measured: `wrk` was not installed.")?,
    }
    writeln!(md, "\nThe whole run took {:.0} s.", started.elapsed().as_secs_f64())?;
    std::fs::write(&a.out, &md)?;
    println!("{md}");
    Ok(())
}

fn signed(s: f64) -> String {
    if s < 0.0 { format!("−{}", human(-s)) } else { format!("+{}", human(s)) }
}
