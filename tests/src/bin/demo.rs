//! The demo: a real 3-member etcd cluster deployed like the APISIX chart's Bitnami etcd,
//! broken the way users see it (`etcdserver: member not found`), then healed.
//!
//! The heal is etcd-medic's own engine, as `etcd-medic remediate` runs it on the node: it
//! locates the pod's volume, checks every gate, takes the cluster's lease, moves the stale
//! `member/snap`, `member/wal` and `member_id` into a quarantine on the volume, restarts the
//! pod with a UID precondition, and verifies that the member rejoined. (Over HTTP, as a
//! controller calls it, once `serve` lands.)

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use etcd_medic::remediation::{Phase, Remediation};
use etcd_medic_lab::etcd::{self, format_id};
use etcd_medic_lab::objects::SetShape;
use etcd_medic_lab::statefulset::container_state;
use etcd_medic_lab::{Lab, NODE_NAME};

const KEYS: usize = 1000;

struct Progress(Instant);

impl Progress {
    fn step(&self, what: &str) {
        println!("[{:>6.2}s] {what}", self.0.elapsed().as_secs_f64());
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let p = Progress(Instant::now());
    println!("etcd-medic demo — {}", etcd::etcd_version()?);
    p.step("starting 3 etcd members as the APISIX chart's Bitnami StatefulSet (namespace apisix)");
    let lab = Lab::start(SetShape::apisix(3, NODE_NAME)).await?;
    if lab.node.real_mounts {
        p.step("volumes are real mounts under the lab's kubelet root (running as root)");
    } else {
        p.step("volumes are plain directories (not root: no mounts)");
    }
    lab.write_keys(KEYS).await?;
    p.step(&format!("wrote {KEYS} keys under /apisix/routes/"));

    let old_id = etcd::parse_id(&std::fs::read_to_string(lab.set.data_dir(1)?.join("member_id"))?).context("member_id")?;
    p.step(&format!("draining apisix-etcd-1 (member {}): the preStop hook removes it; its removal log is lost", format_id(old_id)));
    lab.set.switches().lose_removal_log.store(true, std::sync::atomic::Ordering::SeqCst);
    lab.set.delete_pod(1)?;
    let message = lab.set.wait_crash_loop(1, Duration::from_secs(90), "Error: etcdserver: member not found").await?;
    let pod = lab.set.pod(1)?;
    p.step(&format!("apisix-etcd-1 is {}; last termination message:", container_state(&pod)));
    for line in message.lines() {
        println!("           | {line}");
    }

    p.step("asking the etcd-medic agent on the node to remediate apisix/apisix-etcd-1");
    let heal = Instant::now();
    let shown = std::sync::Mutex::new(0usize);
    let progress = |r: &Remediation| {
        let mut n = shown.lock().unwrap();
        let done: Vec<String> =
            r.steps.iter().filter_map(|s| s.outcome.as_ref().map(|o| format!("{:<10} {o}: {}", s.name, s.message))).collect();
        for line in &done[(*n).min(done.len())..] {
            p.step(&format!("  agent: {line}"));
        }
        *n = done.len();
    };
    let r = etcd_medic_lab::agent::remediate_with(&lab, "apisix-etcd-1", false, &progress).await?;
    ensure!(r.phase == Phase::Succeeded, "the remediation ended {:?}: {:?}", r.phase, r.error);
    let members = etcd::member_list(&lab.set.endpoints()).await?;
    let new = members.iter().find(|m| m.name == "apisix-etcd-1").context("member rejoined")?;
    p.step(&format!(
        "apisix-etcd-1 rejoined as member {} — remediation {} Succeeded in {:.2}s",
        format_id(new.id),
        r.id,
        heal.elapsed().as_secs_f64()
    ));
    if let Some(q) = r.quarantine_path.as_ref().and_then(|q| q.file_name()) {
        println!("           old data kept on the PVC at .etcd-medic/quarantine/{} (etcd-medic restore {})", q.to_string_lossy(), r.id);
    }

    let c = etcd::check_consistency(&lab.set.endpoints()).await?;
    for (endpoint, keys, hash) in &c.members {
        println!("           {endpoint}: {keys} keys, hashkv {hash:#010x} at revision {}", c.revision);
    }
    ensure!(c.consistent && c.members.len() == 3 && c.members.iter().all(|(_, n, _)| *n == KEYS), "members disagree: {c:?}");
    p.step(&format!(
        "healed: {} started voting members, {KEYS} keys equal on all members",
        members.iter().filter(|m| m.started() && !m.is_learner).count()
    ));
    lab.shutdown().await;
    Ok(())
}
