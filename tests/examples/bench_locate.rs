//! Benchmark: `locate` on a node with 10 and with 1,000 pod directories. Resolution goes
//! straight to the pod's path, so the two should take the same time (target ratio < 1.5).
//!
//! cargo run --release -p etcd-medic-lab --example bench_locate

use std::time::{Duration, Instant};

use anyhow::Result;
use etcd_medic::locate::Locator;
use etcd_medic_lab::kubelet::VolumeSource;
use etcd_medic_lab::objects::{SetShape, StorageKind};
use etcd_medic_lab::{Lab, NODE_NAME};

const RUNS: usize = 300;

fn stats(mut v: Vec<Duration>) -> (Duration, Duration, Duration) {
    v.sort();
    (v[0], v[v.len() / 2], v[v.len() - 1])
}

/// A stopped single-member lab whose node holds `pods` pod directories, and its locator.
async fn node_with(pods: usize) -> Result<(Lab, Locator, tempfile::TempDir)> {
    let mut shape = SetShape::apisix(1, NODE_NAME);
    shape.storage = StorageKind::Csi;
    let lab = Lab::start(shape).await?;
    lab.set.shutdown().await;
    // Other pods on the node, each with a CSI volume laid out as the kubelet does.
    for i in 1..pods {
        let source = VolumeSource::Csi { driver: "ebs.csi.aws.com".into(), volume_handle: format!("vol-{i}") };
        let uid = format!("00000000-0000-4000-8000-{i:012}");
        let dir = lab.node.volume_path(&uid, &format!("pv-{i}"), &source);
        std::fs::create_dir_all(dir.join("data/member/snap"))?;
    }
    let (locator, proc) = etcd_medic_lab::agent::locator(&lab, None, Duration::from_secs(5)).await?;
    Ok((lab, locator, proc))
}

async fn once(l: &Locator) -> Result<Duration> {
    let t = Instant::now();
    l.locate("apisix", "apisix-etcd-0", None).await?;
    Ok(t.elapsed())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let (lab_s, small_l, _ps) = node_with(10).await?;
    let (lab_l, large_l, _pl) = node_with(1000).await?;
    // Alternate the two so that both see the same machine noise.
    let (mut small_t, mut large_t) = (Vec::new(), Vec::new());
    for i in 0..RUNS + 20 {
        let (s, l) = (once(&small_l).await?, once(&large_l).await?);
        if i >= 20 {
            small_t.push(s);
            large_t.push(l);
        }
    }
    lab_s.shutdown().await;
    lab_l.shutdown().await;
    let (small, large) = (stats(small_t), stats(large_t));
    println!("| pod dirs on the node | min | median | max |");
    println!("|---|---|---|---|");
    for (n, (min, med, max)) in [(10, small), (1000, large)] {
        println!("| {n} | {min:.2?} | {med:.2?} | {max:.2?} |");
    }
    println!("\nratio of medians (1,000 / 10): {:.2}", large.1.as_secs_f64() / small.1.as_secs_f64());
    Ok(())
}
