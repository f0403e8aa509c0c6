//! Measurements for `BENCHMARKS.md` (`scripts/bench`): statistics, a process's footprint
//! from `/proc`, and the pieces of each heal the benchmark times.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::Lab;
use crate::etcd;

/// min, median, max.
pub fn summary(v: &[f64]) -> (f64, f64, f64) {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => (f64::NAN, f64::NAN, f64::NAN),
        n if n % 2 == 0 => (v[0], (v[n / 2 - 1] + v[n / 2]) / 2.0, v[n - 1]),
        n => (v[0], v[n / 2], v[n - 1]),
    }
}

/// Seconds as a person reads them: `812 µs`, `43.2 ms`, `1.84 s`.
pub fn human(secs: f64) -> String {
    if !secs.is_finite() {
        "–".into()
    } else if secs < 1e-3 {
        format!("{:.0} µs", secs * 1e6)
    } else if secs < 1.0 {
        format!("{:.1} ms", secs * 1e3)
    } else {
        format!("{secs:.2} s")
    }
}

/// `min / median / max` of seconds.
pub fn triple(v: &[f64]) -> String {
    let (a, b, c) = summary(v);
    format!("{} / {} / {}", human(a), human(b), human(c))
}

/// CPU time (user + system) and resident memory of a process, from `/proc/<pid>`.
#[derive(Clone, Copy, Debug)]
pub struct Usage {
    pub cpu_secs: f64,
    pub rss_bytes: u64,
}

pub fn usage(pid: u32) -> Result<Usage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')').context("/proc/pid/stat")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?.unwrap_or(100) as f64;
    let cpu_secs = (f[11].parse::<u64>()? + f[12].parse::<u64>()?) as f64 / ticks;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .context("VmRSS")?;
    Ok(Usage { cpu_secs, rss_bytes: rss_kb * 1024 })
}

/// Fills `dir` with `bytes` of data in 1 MiB files: what a member's dir holds after months.
pub fn pad(dir: &Path, bytes: u64) -> Result<()> {
    use std::io::Write;
    let chunk = vec![0x5au8; 1 << 20];
    let mut left = bytes;
    let mut i = 0;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        let mut f = std::fs::File::create(dir.join(format!("pad-{i:05}.bin")))?;
        f.write_all(&chunk[..n])?;
        // On disk before any clock starts: no row pays for another's writeback.
        f.sync_all()?;
        left -= n as u64;
        i += 1;
    }
    Ok(())
}

/// How often the benchmarks' harness looks (the pod, the agent's remediation): small
/// against the few milliseconds the agent's own steps take, so that its lag does not
/// hide them.
pub const POLL_MS: u64 = 2;

/// Waits until pod `ordinal` is a new instance (not `old_uid`), Ready, and its member is
/// started, voting and healthy: what the agent's verification waits for. Polls every
/// [`POLL_MS`].
pub async fn wait_rejoined(lab: &Lab, ordinal: usize, old_uid: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let name = lab.set.shape().pod_name(ordinal);
    loop {
        anyhow::ensure!(Instant::now() < deadline, "{name} did not rejoin within {timeout:?}");
        let pod = lab.set.pod(ordinal).unwrap_or_default();
        let ready = pod
            .pointer("/status/conditions")
            .and_then(|c| c.as_array())
            .is_some_and(|c| c.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"));
        if ready && pod["metadata"]["uid"] != old_uid {
            let members = etcd::member_list(&lab.set.other_endpoints(ordinal)).await.unwrap_or_default();
            if let Some(m) = members.iter().find(|m| m.name == name && !m.is_learner)
                && let Some(url) = m.client_urls.first()
                && etcd::endpoint_healthy(url).await
            {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(POLL_MS)).await;
    }
}

/// The manual fix as users do it, at machine speed: find the pod's data dir (its UID and
/// volume from the API), delete `member/snap`, `member/wal` and `member_id`. Returns the
/// time the deletion alone took.
pub fn delete_by_hand(lab: &Lab, ordinal: usize) -> Result<f64> {
    let data = lab.set.data_dir(ordinal)?;
    let t = Instant::now();
    crate::lab::delete_member_data(&data, true)?;
    Ok(t.elapsed().as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_and_units() {
        assert_eq!(summary(&[3.0, 1.0, 2.0]), (1.0, 2.0, 3.0));
        assert_eq!(summary(&[4.0, 1.0, 2.0, 3.0]), (1.0, 2.5, 4.0), "even: the mean of the middle two");
        assert_eq!(human(0.000_812), "812 µs");
        assert_eq!(human(0.0432), "43.2 ms");
        assert_eq!(human(1.844), "1.84 s");
        assert_eq!(triple(&[1.0]), "1.00 s / 1.00 s / 1.00 s");
    }

    #[test]
    fn usage_of_this_process() {
        let u = usage(std::process::id()).unwrap();
        assert!(u.rss_bytes > 1 << 20 && u.cpu_secs >= 0.0, "{u:?}");
    }

    #[test]
    fn pad_writes_the_bytes_in_mib_files() {
        let d = tempfile::tempdir().unwrap();
        pad(d.path(), (5 << 20) + 7).unwrap();
        let files: Vec<_> = std::fs::read_dir(d.path()).unwrap().flatten().collect();
        assert_eq!(files.len(), 6);
        assert_eq!(files.iter().map(|f| f.metadata().unwrap().len()).sum::<u64>(), (5 << 20) + 7);
    }
}

/// `locate` on a node with 10 and with 1,000 pod directories, `runs` calls each,
/// interleaved so both see the same noise. Returns the seconds of each call.
pub async fn locate_10_vs_1000(runs: usize) -> Result<(Vec<f64>, Vec<f64>)> {
    use crate::kubelet::VolumeSource;
    use crate::objects::{SetShape, StorageKind};
    async fn node_with(pods: usize) -> Result<(Lab, etcd_medic::locate::Locator, tempfile::TempDir)> {
        let mut shape = SetShape::apisix(1, crate::NODE_NAME);
        shape.storage = StorageKind::Csi;
        let lab = Lab::start(shape).await?;
        lab.set.shutdown().await;
        // Other pods on the node, each with a CSI volume laid out as the kubelet does.
        for i in 1..pods {
            let source = VolumeSource::Csi { driver: "ebs.csi.aws.com".into(), volume_handle: format!("vol-{i}") };
            let uid = format!("00000000-0000-4000-8000-{i:012}");
            std::fs::create_dir_all(lab.node.volume_path(&uid, &format!("pv-{i}"), &source).join("data/member/snap"))?;
        }
        let (locator, proc) = crate::agent::locator(&lab, None, Duration::from_secs(5)).await?;
        Ok((lab, locator, proc))
    }
    async fn once(l: &etcd_medic::locate::Locator) -> Result<f64> {
        let t = Instant::now();
        l.locate("apisix", "apisix-etcd-0", None).await?;
        Ok(t.elapsed().as_secs_f64())
    }
    let (lab_s, small_l, _ps) = node_with(10).await?;
    let (lab_l, large_l, _pl) = node_with(1000).await?;
    let (mut small, mut large) = (Vec::new(), Vec::new());
    for i in 0..runs + 20 {
        let (s, l) = (once(&small_l).await?, once(&large_l).await?);
        // The first 20 warm caches and connections up.
        if i >= 20 {
            small.push(s);
            large.push(l);
        }
    }
    lab_s.shutdown().await;
    lab_l.shutdown().await;
    Ok((small, large))
}

/// What `wrk --latency` reports: requests per second, p50 and p99 in seconds, non-2xx.
#[derive(Clone, Debug, PartialEq)]
pub struct Load {
    pub rps: f64,
    pub p50: f64,
    pub p99: f64,
    pub non_2xx: u64,
    pub requests: u64,
}

pub fn parse_wrk(out: &str) -> Result<Load> {
    let secs = |v: &str| -> Option<f64> {
        let (n, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic())?);
        let n: f64 = n.parse().ok()?;
        Some(match unit {
            "us" => n / 1e6,
            "ms" => n / 1e3,
            "s" => n,
            "m" => n * 60.0,
            _ => return None,
        })
    };
    let field = |prefix: &str| out.lines().map(str::trim).find_map(|l| l.strip_prefix(prefix)).map(|v| v.trim().to_string());
    let pct = |p: &str| field(p).and_then(|v| secs(&v)).with_context(|| format!("{p} in wrk's output:\n{out}"));
    let rps = field("Requests/sec:").and_then(|v| v.parse().ok()).context("Requests/sec")?;
    let requests = out.lines().find_map(|l| l.trim().split_once(" requests in ")).and_then(|(n, _)| n.trim().parse().ok()).unwrap_or(0);
    let non_2xx = field("Non-2xx or 3xx responses:").and_then(|v| v.parse().ok()).unwrap_or(0);
    Ok(Load { rps, p50: pct("50%")?, p99: pct("99%")?, non_2xx, requests })
}

#[cfg(test)]
mod wrk_tests {
    use super::*;

    #[test]
    fn reads_wrks_latency_report() {
        let out = "Running 10s test @ http://127.0.0.1:1/healthz\n  2 threads and 8 connections\n  Latency Distribution\n     50%  254.00us\n     75%  400.00us\n     90%  1.10ms\n     99%    4.52ms\n  183001 requests in 10.00s, 20.3MB read\n  Non-2xx or 3xx responses: 3\nRequests/sec:  18300.10\nTransfer/sec:      2.03MB\n";
        let l = parse_wrk(out).unwrap();
        assert_eq!((l.requests, l.non_2xx), (183001, 3));
        assert!((l.rps - 18300.1).abs() < 1e-6 && (l.p50 - 254e-6).abs() < 1e-12 && (l.p99 - 4.52e-3).abs() < 1e-12, "{l:?}");
    }
}
