//! `scripts/bench-inspect`: how long the agent takes to read what a member's files say
//! (`etcd-medic inspect --data-dir`), on a member of about 1 GiB written by real etcd,
//! printed as the Markdown section of `BENCHMARKS.md`.
//!
//! One etcd member (the vendored 3.5) takes `--mib` puts of 1 MiB values (default 512): its
//! WAL grows to about as many MiB in 64 MiB segments (no snapshot is taken that early, so no
//! segment is purged) and its db as much again. It is stopped, and the release agent's
//! `inspect --data-dir` is run `--runs` times (default 9) each way: reading the heads of the
//! older segments and the newest whole (the default, what the check reads), and `--full`
//! (the newest 8 segments whole). Each is timed with the page cache warm, and, as root, cold
//! (the kernel's caches dropped before every run: what a first look after a node restart
//! meets). Every run's answer is checked against what etcd said before it stopped.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, ensure};

use etcd_medic_lab::bench::{human, summary};
use etcd_medic_lab::etcd::EtcdCluster;

struct Args {
    mib: usize,
    runs: usize,
}

fn args() -> Result<Args> {
    let mut a = Args { mib: 512, runs: 9 };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--mib" => a.mib = value.parse()?,
            "--runs" => a.runs = value.parse()?,
            _ => anyhow::bail!("unknown flag {flag} (--mib N, --runs N)"),
        }
    }
    Ok(a)
}

fn size_of(dir: &Path) -> u64 {
    walkdir::WalkDir::new(dir).into_iter().flatten().filter_map(|e| e.metadata().ok()).filter(|m| m.is_file()).map(|m| m.len()).sum()
}

/// Drops the kernel's page cache (root only): `false` where it cannot.
fn drop_caches() -> bool {
    nix::unistd::sync();
    std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

/// Seconds of each run of `etcd-medic inspect --data-dir data [--full]`, and its last answer.
fn time_inspect(data: &Path, full: bool, cold: bool, runs: usize) -> Result<(Vec<f64>, serde_json::Value)> {
    let mut secs = Vec::new();
    let mut answer = serde_json::Value::Null;
    for _ in 0..runs {
        if cold {
            ensure!(drop_caches(), "cannot drop the page cache");
        }
        let mut cmd = Command::new(etcd_medic_lab::agent::agent_binary());
        cmd.arg("inspect").arg("--data-dir").arg(data).args(["-o", "json"]);
        if full {
            cmd.arg("--full");
        }
        let start = Instant::now();
        let out = cmd.output()?;
        secs.push(start.elapsed().as_secs_f64());
        ensure!(out.status.success(), "inspect failed: {}", String::from_utf8_lossy(&out.stderr));
        answer = serde_json::from_slice(&out.stdout)?;
    }
    Ok((secs, answer))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let a = args()?;
    let tmp = tempfile::Builder::new().prefix("etcd-medic-lab-").tempdir()?;
    let mut c = EtcdCluster::start_in(tmp.path(), 1).await?;
    let value = "v".repeat(1 << 20);
    for i in 0..a.mib {
        c.put(&format!("/apisix/upstreams/{i:05}"), &value).await?;
    }
    let mut client = etcd_client::Client::connect(c.endpoints(), None).await?;
    let status = client.status().await?;
    let header = status.header().context("a header")?;
    let (member, cluster, index) = (header.member_id(), header.cluster_id(), status.raft_index());
    let revision = client.get("/apisix/upstreams/", None).await?.header().context("a header")?.revision();
    c.stop(0).await;
    let data: PathBuf = c.data_dir(0);
    let (wal, db) = (size_of(&data.join("member/wal")), size_of(&data.join("member/snap")));
    let segments =
        std::fs::read_dir(data.join("member/wal"))?.flatten().filter(|e| e.path().extension().is_some_and(|x| x == "wal")).count();

    let can_drop = drop_caches();
    let mut rows = Vec::new();
    for (cold, full) in [(false, false), (false, true), (true, false), (true, true)] {
        if cold && !can_drop {
            continue;
        }
        let (secs, answer) = time_inspect(&data, full, cold, a.runs)?;
        // The answer is what etcd said before it stopped.
        let hex = |v: &serde_json::Value| v.as_str().and_then(|s| u64::from_str_radix(s, 16).ok());
        ensure!(hex(&answer["wal"]["nodeId"]) == Some(member) && hex(&answer["wal"]["clusterID"]) == Some(cluster), "ids: {answer}");
        ensure!(answer["wal"]["commit"].as_u64() >= Some(index) && answer["wal"]["verdict"]["verdict"] == "whole", "wal: {answer}");
        ensure!(answer["db"]["revision"].as_i64() == Some(revision) && answer["db"]["verdict"]["verdict"] == "sane", "db: {answer}");
        let (lo, med, hi) = summary(&secs);
        let read = if full { "the newest 8 segments whole (`--full`)" } else { "segment heads, the newest segment whole (default)" };
        let cache = if cold { "cold (dropped before each run)" } else { "warm" };
        rows.push(format!("| {read} | {cache} | {} | {} | {} |", human(med), human(lo), human(hi)));
    }
    println!(
        "Member: {wal} bytes of WAL in {segments} segments, {db} bytes of db ({} MiB in all), written by {}.",
        (wal + db) >> 20,
        etcd_medic_lab::etcd::etcd_version()?
    );
    println!("Whole `etcd-medic inspect --data-dir DIR -o json` processes, {} runs each:\n", a.runs);
    println!("| WAL read | page cache | median | min | max |\n|---|---|---|---|---|");
    for r in rows {
        println!("{r}");
    }
    if !can_drop {
        println!("\n(cold runs need root: the page cache could not be dropped)");
    }
    Ok(())
}
