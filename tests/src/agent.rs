//! The agent on the lab's node: its locator and engine built as `etcd-medic` builds them,
//! for the end-to-end suites, the benchmarks and the demo.

use std::path::PathBuf;
use std::time::Duration;

use crate::{Lab, NODE_NAME};
use etcd_medic::kubeapi::KubeApi;
use etcd_medic::locate::{Locator, NodeLayout};

/// No kubelet process runs here, so an empty `/proc` (kept alive by the returned dir) makes
/// discovery fall back to the distribution defaults.
pub async fn locator(lab: &Lab, kubelet_root: Option<PathBuf>, timeout: Duration) -> anyhow::Result<(Locator, tempfile::TempDir)> {
    let proc = tempfile::tempdir()?;
    let layout = NodeLayout {
        node_name: NODE_NAME.into(),
        host_root: lab.node.root.clone(),
        kubelet_root,
        proc_root: proc.path().to_path_buf(),
        container: None,
    };
    Ok((Locator { api: KubeApi::new(lab.api.client().await?, timeout), layout }, proc))
}

/// Runs the agent's engine as `etcd-medic remediate` does, on the lab's node.
pub async fn remediate(lab: &Lab, pod: &str, force: bool) -> anyhow::Result<etcd_medic::remediation::Remediation> {
    remediate_with(lab, pod, force, &|_| {}).await
}

/// [`remediate`], reporting every step to `progress`.
pub async fn remediate_with(
    lab: &Lab,
    pod: &str,
    force: bool,
    progress: &(dyn Fn(&etcd_medic::remediation::Remediation) + Send + Sync),
) -> anyhow::Result<etcd_medic::remediation::Remediation> {
    use etcd_medic::remediation::{Engine, Options};
    let (l, proc) = locator(lab, None, Duration::from_secs(5)).await?;
    // The real /proc: the holder check must see the lab's etcd processes.
    let l = Locator { layout: NodeLayout { proc_root: "/proc".into(), ..l.layout }, api: l.api };
    drop(proc);
    let opts = Options {
        dry_run: false,
        force,
        etcd_endpoints: vec![],
        state_dir: lab.dir.path().join("agent-state"),
        verify_timeout: Duration::from_secs(120),
        keep_quarantines: 3,
    };
    Ok(Engine { locator: &l, opts, progress }.run("apisix", pod, None).await)
}

/// Every path under `dir` with its size: what "nothing changed on disk" compares.
pub fn tree(dir: &std::path::Path) -> Vec<(PathBuf, u64)> {
    let mut v: Vec<(PathBuf, u64)> = walk(dir);
    v.sort();
    v
}

fn walk(dir: &std::path::Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let m = e.path().symlink_metadata().map(|m| if m.is_file() { m.len() } else { 0 }).unwrap_or(0);
            out.push((e.path(), m));
            if e.path().is_dir() && !e.path().is_symlink() {
                out.extend(walk(&e.path()));
            }
        }
    }
    out
}
