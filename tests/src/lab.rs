//! The whole lab in one value: a node tree, the stand-in API server and one etcd
//! StatefulSet run by the simulator, torn down (processes and mounts) when dropped.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;

use crate::apiserver::ApiServer;
use crate::kubelet::NodeTree;
use crate::objects::SetShape;
use crate::statefulset::{SimOptions, StatefulSetSim};

/// The node the lab's pods run on.
pub const NODE_NAME: &str = "lab-node-a";

/// etcd's `HealthInterval` plus a margin.
const SETTLE: Duration = Duration::from_millis(5500);

/// How the lab's node and kubelet behave.
#[derive(Clone, Debug)]
pub struct LabOptions {
    pub sim: SimOptions,
    /// The kubelet root relative to the node's `/` (`var/lib/kubelet`, or a distribution's).
    pub kubelet_root: String,
}

impl Default for LabOptions {
    fn default() -> Self {
        LabOptions { sim: SimOptions::default(), kubelet_root: "var/lib/kubelet".into() }
    }
}

pub struct Lab {
    // Field order is drop order: containers first, then mounts, then the server, then files.
    pub set: StatefulSetSim,
    pub node: Arc<NodeTree>,
    pub api: Arc<ApiServer>,
    pub dir: tempfile::TempDir,
}

impl Lab {
    /// Starts the lab with `shape` and waits until every member is Ready.
    pub async fn start(shape: SetShape) -> Result<Self> {
        Self::start_with(shape, LabOptions::default()).await
    }

    pub async fn start_with(shape: SetShape, opts: LabOptions) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("etcd-medic-lab-").tempdir()?;
        let node = Arc::new(NodeTree::new(&dir.path().join("node"), &opts.kubelet_root)?);
        let api = Arc::new(ApiServer::start(dir.path()).await?);
        let set = StatefulSetSim::start(api.clone(), node.clone(), shape, dir.path().join("logs"), opts.sim).await?;
        set.wait_all_ready(Duration::from_secs(60)).await?;
        // etcd refuses membership changes (`etcdserver: unhealthy cluster`) until its leader
        // has been connected to every voting member for 5 s. A production cluster is long
        // past that when a drain removes a member; the lab waits so the preStop hook's
        // single `member remove` meets the same cluster.
        if set.members().len() > 1 {
            tokio::time::sleep(SETTLE).await;
        }
        Ok(Lab { set, node, api, dir })
    }

    /// Writes `n` keys `/apisix/routes/<i>` through the cluster, as APISIX stores its config.
    pub async fn write_keys(&self, n: usize) -> Result<()> {
        let mut c = crate::etcd::live_client(&self.set.endpoints()).await?;
        for i in 0..n {
            c.put(format!("/apisix/routes/{i:05}"), format!("{{\"id\":\"{i}\",\"uri\":\"/r/{i}\"}}"), None).await?;
        }
        Ok(())
    }

    /// Stops every container and unmounts everything, before the directory goes.
    pub async fn shutdown(self) {
        self.set.shutdown().await;
        self.node.teardown();
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.node.teardown();
    }
}
