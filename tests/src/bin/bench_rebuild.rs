//! `scripts/bench-rebuild`: how long `etcd-medic rebuild` takes to make a fenced survivor's
//! data a one-member cluster (three starts of etcd, a compaction, the revision bump, the
//! checks), next to the one step the field's manual runbooks take on the same data: etcd
//! started once with `--force-new-cluster` until it serves, then stopped (no bump, no check,
//! no fence). Printed as the Markdown section of `BENCHMARKS.md`.
//!
//! A 3-member cluster of the vendored etcd takes `--keys` small keys (default 1,000), or
//! `--mib` puts of 1 MiB values, and is stopped: member 0's data dir is the survivor's. Each
//! run copies it afresh (not timed) and times the release agent's whole `rebuild` process,
//! then the bare start on another copy. Every rebuild's answer is checked: the two others
//! removed, the revision past the survivor's by the bump.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};

use etcd_medic_lab::bench::{human, summary};
use etcd_medic_lab::etcd::{EtcdCluster, etcd_binary, wait_healthy};

struct Args {
    keys: usize,
    mib: usize,
    runs: usize,
}

fn args() -> Result<Args> {
    let mut a = Args { keys: 1000, mib: 0, runs: 3 };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--keys" => a.keys = value.parse()?,
            "--mib" => a.mib = value.parse()?,
            "--runs" => a.runs = value.parse()?,
            _ => anyhow::bail!("unknown flag {flag} (--keys N, --mib N, --runs N)"),
        }
    }
    Ok(a)
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    let _ = std::fs::remove_dir_all(to);
    let st = Command::new("cp").arg("-a").arg(from).arg(to).status()?;
    ensure!(st.success(), "cp -a failed");
    Ok(())
}

/// The manual step: etcd once with `--force-new-cluster` on `data` until it serves, stopped.
async fn bare_start(data: &Path, name: &str) -> Result<f64> {
    let (client, peer) = (etcd_medic_lab::process::free_port(), etcd_medic_lab::process::free_port());
    let url = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let start = Instant::now();
    let mut child = tokio::process::Command::new(etcd_binary())
        .args(["--name", name, "--force-new-cluster", "--log-level", "error"])
        .arg("--data-dir")
        .arg(data)
        .args(["--listen-client-urls", &url, "--advertise-client-urls", &url, "--listen-peer-urls", &peer_url])
        .args(["--initial-advertise-peer-urls", &peer_url])
        .kill_on_drop(true)
        .spawn()?;
    wait_healthy(&url, Duration::from_secs(120)).await?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id().context("a pid")? as i32), nix::sys::signal::Signal::SIGTERM)?;
    child.wait().await?;
    Ok(start.elapsed().as_secs_f64())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let a = args()?;
    let tmp = tempfile::Builder::new().prefix("etcd-medic-lab-").tempdir()?;
    let mut c = EtcdCluster::start_in(&tmp.path().join("cluster"), 3).await?;
    let what = if a.mib > 0 {
        let value = "v".repeat(1 << 20);
        for i in 0..a.mib {
            c.put(&format!("/apisix/upstreams/{i:05}"), &value).await?;
        }
        format!("{} MiB (puts of 1 MiB values)", a.mib)
    } else {
        for i in 0..a.keys {
            c.put(&format!("/apisix/routes/{i:05}"), &format!("{{\"id\":\"{i}\",\"uri\":\"/r/{i}\"}}")).await?;
        }
        format!("{} keys", a.keys)
    };
    for i in 0..3 {
        c.stop(i).await;
    }
    let survivor = c.data_dir(0);
    let name = c.specs[0].name.clone();
    let url = c.specs[0].client_url();
    let (mut rebuilds, mut bare) = (Vec::new(), Vec::new());
    let work = tmp.path().join("work");
    for _ in 0..a.runs {
        copy(&survivor, &work)?;
        let start = Instant::now();
        let out = Command::new(etcd_medic_lab::agent::agent_binary())
            .arg("rebuild")
            .arg("--data-dir")
            .arg(&work)
            .args(["--name", &name, "--client-url", &url])
            .arg("--etcd")
            .arg(etcd_binary())
            .output()?;
        rebuilds.push(start.elapsed().as_secs_f64());
        ensure!(out.status.success(), "rebuild failed: {}", String::from_utf8_lossy(&out.stderr));
        let r: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        ensure!(r["removed"].as_array().map(Vec::len) == Some(2), "{r}");
        ensure!(r["revision"].as_u64() == r["revisionBefore"].as_u64().map(|b| b + etcd_medic_core::recover::BUMP), "{r}");
        copy(&survivor, &work)?;
        bare.push(bare_start(&work, &name).await?);
    }
    let size: u64 = walkdir::WalkDir::new(&survivor)
        .into_iter()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum();
    let (rl, rm, rh) = summary(&rebuilds);
    let (bl, bm, bh) = summary(&bare);
    println!(
        "| {what}, {} MiB on disk | {} / {} / {} | {} / {} / {} | {:.1} |",
        size >> 20,
        human(rl),
        human(rm),
        human(rh),
        human(bl),
        human(bm),
        human(bh),
        rm / bm
    );
    Ok(())
}
