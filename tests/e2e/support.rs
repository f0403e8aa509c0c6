//! What several suites (and the locate benchmark) share: the agent's locator as the agent on
//! the lab's node builds it.

use std::path::PathBuf;
use std::time::Duration;

use etcd_medic::kubeapi::KubeApi;
use etcd_medic::locate::{Locator, NodeLayout};
use etcd_medic_lab::{Lab, NODE_NAME};

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
