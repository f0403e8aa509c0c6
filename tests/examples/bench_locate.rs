//! Benchmark: `locate` on a node with 10 and with 1,000 pod directories. Resolution goes
//! straight to the pod's path, so the two should take the same time (target ratio < 1.5).
//!
//! cargo run --release -p etcd-medic-lab --example bench_locate

use std::time::{Duration, Instant};

use anyhow::Result;
use etcd_medic::kubeapi::KubeApi;
use etcd_medic::locate::{Locator, NodeLayout};
use etcd_medic_lab::kubelet::VolumeSource;
use etcd_medic_lab::objects::{SetShape, StorageKind};
use etcd_medic_lab::{Lab, NODE_NAME};

const RUNS: usize = 300;

fn stats(mut v: Vec<Duration>) -> (Duration, Duration, Duration) {
    v.sort();
    (v[0], v[v.len() / 2], v[v.len() - 1])
}

async fn measure(pods: usize) -> Result<(Duration, Duration, Duration)> {
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
    let proc = tempfile::tempdir()?;
    let layout = NodeLayout { node_name: NODE_NAME.into(), host_root: lab.node.root.clone(), kubelet_root: None, proc_root: proc.path().into(), container: None };
    let locator = Locator { api: KubeApi::new(lab.api.client().await?, Duration::from_secs(5)), layout };
    let mut times = Vec::with_capacity(RUNS);
    for _ in 0..RUNS + 20 {
        let t = Instant::now();
        locator.locate("apisix", "apisix-etcd-0", None).await?;
        times.push(t.elapsed());
    }
    times.drain(..20); // warm-up
    lab.shutdown().await;
    Ok(stats(times))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let small = measure(10).await?;
    let large = measure(1000).await?;
    println!("| pod dirs on the node | min | median | max |");
    println!("|---|---|---|---|");
    for (n, (min, med, max)) in [(10, small), (1000, large)] {
        println!("| {n} | {min:.2?} | {med:.2?} | {max:.2?} |");
    }
    println!("\nratio of medians (1,000 / 10): {:.2}", large.1.as_secs_f64() / small.1.as_secs_f64());
    Ok(())
}
