//! The demo: a real 3-member etcd cluster deployed like the APISIX chart's Bitnami etcd,
//! broken the way users see it (`etcdserver: member not found`), then healed.
//!
//! Until the agent's remediation engine lands (issue #4), the heal shown is the procedure
//! the agent automates, done as the lab's operator: the stale `member/snap`, `member/wal`
//! and `member_id` are moved (renamed, never deleted) into a quarantine on the same volume,
//! and the image re-adds the member by itself.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
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

    let data = lab.set.data_dir(1)?;
    let old_id = etcd::parse_id(&std::fs::read_to_string(data.join("member_id"))?).context("member_id")?;
    p.step(&format!("draining apisix-etcd-1 (member {}): the preStop hook removes it; its removal log is lost", format_id(old_id)));
    lab.set.switches().lose_removal_log.store(true, std::sync::atomic::Ordering::SeqCst);
    lab.set.delete_pod(1)?;
    let message = lab.set.wait_crash_loop(1, Duration::from_secs(90), "Error: etcdserver: member not found").await?;
    let pod = lab.set.pod(1)?;
    p.step(&format!("apisix-etcd-1 is {}; last termination message:", container_state(&pod)));
    for line in message.lines() {
        println!("           | {line}");
    }

    // The replacement pod has a new UID, so its volume has a new host path.
    let volume = lab.set.volume_path(1)?;
    let data = lab.set.data_dir(1)?;
    println!("           host path of its volume: {}", volume.display());
    let quarantine = volume.join(".etcd-medic/quarantine").join(format!("demo-{}", format_id(old_id)));
    std::fs::create_dir_all(&quarantine)?;
    let heal = Instant::now();
    p.step("healing: moving member/snap, member/wal and member_id into the quarantine (rename, same filesystem)");
    for rel in ["member/snap", "member/wal", "member_id"] {
        let to = quarantine.join(rel.replace('/', "_"));
        std::fs::rename(data.join(rel), &to).with_context(|| format!("move {rel}"))?;
    }
    lab.set.wait_ready(1, Duration::from_secs(120)).await?;
    let members = etcd::member_list(&lab.set.endpoints()).await?;
    let new = members.iter().find(|m| m.name == "apisix-etcd-1").context("member rejoined")?;
    p.step(&format!(
        "apisix-etcd-1 rejoined as member {} after {:.2}s; the image re-added it",
        format_id(new.id),
        heal.elapsed().as_secs_f64()
    ));

    let c = etcd::check_consistency(&lab.set.endpoints()).await?;
    for (endpoint, keys, hash) in &c.members {
        println!("           {endpoint}: {keys} keys, hashkv {hash:#010x} at revision {}", c.revision);
    }
    ensure!(c.consistent && c.members.len() == 3 && c.members.iter().all(|(_, n, _)| *n == KEYS), "members disagree: {c:?}");
    p.step(&format!(
        "healed: {} started voting members, {KEYS} keys equal on all members",
        members.iter().filter(|m| m.started() && !m.is_learner).count()
    ));
    println!("note: this build shows the heal as the procedure etcd-medic automates; the agent's own remediation lands with issue #4.");
    lab.shutdown().await;
    Ok(())
}
