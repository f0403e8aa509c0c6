//! The whole lab in one value: a node tree, the stand-in API server and one etcd
//! StatefulSet run by the simulator, torn down (processes and mounts) when dropped.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::apiserver::ApiServer;
use crate::kubelet::NodeTree;
use crate::objects::SetShape;
use crate::statefulset::{SimOptions, StatefulSetSim};

/// The node the lab's pods run on.
pub const NODE_NAME: &str = "lab-node-a";

/// What users delete by hand today: `member/snap` and `member/wal`, and `member_id` too when
/// `and_member_id`.
pub fn delete_member_data(data: &std::path::Path, and_member_id: bool) -> Result<()> {
    std::fs::remove_dir_all(data.join("member/snap"))?;
    std::fs::remove_dir_all(data.join("member/wal"))?;
    if and_member_id {
        std::fs::remove_file(data.join("member_id"))?;
    }
    Ok(())
}

/// `pods/log` as the node's kubelet answers it: the container's CRI log file of this start
/// (or of the previous one), as plain lines.
fn kubelet_logs(node: Arc<NodeTree>) -> crate::apiserver::LogSource {
    Arc::new(move |pod: &serde_json::Value, container: &str, previous: bool| {
        let meta = &pod["metadata"];
        let (ns, name, uid) = (meta["namespace"].as_str()?, meta["name"].as_str()?, meta["uid"].as_str()?);
        let statuses = pod.pointer("/status/containerStatuses")?.as_array()?;
        let restarts = statuses.iter().find(|c| c["name"] == container)?["restartCount"].as_u64()? as u32;
        let attempt = if previous { restarts.checked_sub(1)? } else { restarts };
        let text = std::fs::read_to_string(node.container_log_file(ns, name, uid, container, attempt)).ok()?;
        Some(etcd_medic_core::signature::cri_lines(&text).join("\n"))
    })
}

/// The last line of the crash-looping member's termination message.
pub const MEMBER_NOT_FOUND: &str = "Error: etcdserver: member not found";
const BREAK_WAIT: Duration = Duration::from_secs(90);

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
        api.serve_logs(kubelet_logs(node.clone()));
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

    /// The set's cluster as the agent targets it for pod `ordinal`: its scope proven from the
    /// pods the stand-in holds now, the set's other pods as endpoints.
    pub fn target(&self, ordinal: usize) -> Result<etcd_medic::etcd::Target> {
        let ns = self.set.shape().namespace.clone();
        let pods: Vec<k8s_openapi::api::core::v1::Pod> = self.api.list(Some(&ns));
        let me = pods.iter().find(|p| p.metadata.name.as_deref() == Some(self.set.shape().pod_name(ordinal).as_str()));
        let scope = etcd_medic::scope::SetScope::of(me.context("no such pod")?, &pods, "etcd").map_err(|e| anyhow::anyhow!(e))?;
        let endpoints = scope.sibling_endpoints();
        etcd_medic::etcd::Etcd::default().target(scope, endpoints, None).map_err(|e| anyhow::anyhow!(e))
    }

    /// Writes `n` keys `/apisix/routes/<i>` through the cluster, as APISIX stores its config.
    pub async fn write_keys(&self, n: usize) -> Result<()> {
        let mut c = crate::etcd::live_client(&self.set.endpoints()).await?;
        for i in 0..n {
            c.put(format!("/apisix/routes/{i:05}"), format!("{{\"id\":\"{i}\",\"uri\":\"/r/{i}\"}}"), None).await?;
        }
        Ok(())
    }

    /// Drains member `ordinal` as users see it fail: the pod is deleted, the preStop hook
    /// removes the member, the removal log is lost, and the replacement crash-loops on
    /// `member not found`. Returns the removed member's id.
    pub async fn break_member(&self, ordinal: usize) -> Result<u64> {
        let old_id = self.drain_member(ordinal).await?;
        let message = self.set.wait_crash_loop(ordinal, BREAK_WAIT, MEMBER_NOT_FOUND).await?;
        anyhow::ensure!(message.contains("Updating member in existing cluster"), "termination message: {message}");
        Ok(old_id)
    }

    /// [`Lab::break_member`] up to the member's removal: the replacement pod is starting and
    /// is about to crash on `member not found` (a controller that runs may heal it before
    /// anyone sees it loop). Returns the removed member's id.
    pub async fn drain_member(&self, ordinal: usize) -> Result<u64> {
        use crate::etcd::{self, format_id};
        let id_file = self.set.data_dir(ordinal)?.join("member_id");
        let old_id = etcd::parse_id(&std::fs::read_to_string(&id_file)?).context("member_id holds a hex id")?;
        self.set.switches().lose_removal_log.store(true, std::sync::atomic::Ordering::SeqCst);
        self.set.delete_pod(ordinal)?;
        // The preStop hook removed the member before the container stopped.
        let deadline = tokio::time::Instant::now() + BREAK_WAIT;
        while etcd::member_list(&self.set.other_endpoints(ordinal)).await?.iter().any(|m| m.id == old_id) {
            anyhow::ensure!(tokio::time::Instant::now() < deadline, "the preStop hook did not remove {}", format_id(old_id));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(old_id)
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
