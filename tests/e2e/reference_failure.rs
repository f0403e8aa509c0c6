//! The failure our users see, reproduced with the Bitnami start-up rules and real etcd:
//! a member removed by the preStop hook, its removal log lost, comes back with its old data
//! and `member_id` and crash-loops on `etcdserver: member not found`.

use std::time::Duration;

use anyhow::Result;
use etcd_medic_lab::etcd::{self, format_id};
use etcd_medic_lab::objects::SetShape;
use etcd_medic_lab::statefulset::termination_message;
use etcd_medic_lab::{Lab, NODE_NAME};
use k8s_openapi::api::core::v1::Pod;
use serde_json::Value;

pub(crate) const KEYS: usize = 300;
const WAIT: Duration = Duration::from_secs(90);
use etcd_medic_lab::lab::MEMBER_NOT_FOUND;

fn restarts(p: &Value) -> u64 {
    p.pointer("/status/containerStatuses/0/restartCount").and_then(Value::as_u64).unwrap_or(0)
}

/// Starts 3 Bitnami members, writes keys, then drains member 1 as users see it: the pod is
/// deleted, the preStop hook removes the member, the removal log is lost, and the
/// replacement pod crash-loops. Returns the lab and the removed member id.
pub(crate) async fn broken_lab() -> Result<(Lab, u64)> {
    crate::init_tracing();
    let lab = Lab::start(SetShape::apisix(3, NODE_NAME)).await?;
    lab.write_keys(KEYS).await?;
    let old_id = lab.break_member(1).await?;
    Ok((lab, old_id))
}

/// [`broken_lab`] where the lab has real mounts (root), else `None` after saying it is
/// skipped (CI runs as root and requires them: there the lab itself fails instead).
pub(crate) async fn broken_lab_with_mounts() -> Result<Option<(Lab, u64)>> {
    let (lab, id) = broken_lab().await?;
    if !lab.node.real_mounts {
        etcd_medic_lab::skip("needs root: real mounts");
        lab.shutdown().await;
        return Ok(None);
    }
    Ok(Some((lab, id)))
}

/// All `members` members hold all `keys` keys and the same `HashKV` at one revision.
pub(crate) async fn assert_every_key(lab: &Lab, members: usize, keys: usize) -> Result<()> {
    let c = etcd::check_consistency(&lab.set.endpoints()).await?;
    assert!(c.consistent && c.members.len() == members && c.members.iter().all(|(_, n, _)| *n == keys), "{c:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_member_with_stale_member_id_crash_loops_on_member_not_found() -> Result<()> {
    let (lab, old_id) = broken_lab().await?;
    // The member is gone from the cluster while its data and member_id stay on the volume.
    let members = etcd::member_list(&lab.set.other_endpoints(1)).await?;
    assert_eq!(members.len(), 2);
    assert!(members.iter().all(|m| m.id != old_id));
    let data = lab.set.data_dir(1)?;
    assert_eq!(std::fs::read_to_string(data.join("member_id"))?.trim(), format_id(old_id));
    assert!(data.join("member/snap/db").is_file());
    assert!(!lab.set.volume_path(1)?.join("member_removal.log").exists());

    // It keeps failing the same way on every restart, and the API shows it as a controller
    // would read it.
    let before = restarts(&lab.set.pod(1)?);
    let p = lab.set.wait_pod(1, WAIT, "restarted twice more", |p| restarts(p) >= before + 2).await?;
    assert_eq!(termination_message(&p).lines().last(), Some(MEMBER_NOT_FOUND));
    let pods: kube::Api<Pod> = kube::Api::namespaced(lab.api.client().await?, "apisix");
    let pod = pods.get("apisix-etcd-1").await?;
    let cs = &pod.status.unwrap().container_statuses.unwrap()[0];
    assert_eq!(cs.state.as_ref().unwrap().waiting.as_ref().unwrap().reason.as_deref(), Some("CrashLoopBackOff"));
    assert!(!cs.ready);
    assert!(lab.set.container_log(1).contains("Updating member in existing cluster"));
    lab.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_only_snap_and_wal_still_fails_while_member_id_stays() -> Result<()> {
    let (lab, _) = broken_lab().await?;
    etcd_medic_lab::lab::delete_member_data(&lab.set.data_dir(1)?, false)?;
    let before = restarts(&lab.set.pod(1)?);
    let p = lab.set.wait_pod(1, WAIT, "restarted twice more", |p| restarts(p) >= before + 2).await?;
    assert_eq!(termination_message(&p).lines().last(), Some(MEMBER_NOT_FOUND));
    assert_eq!(etcd::member_list(&lab.set.other_endpoints(1)).await?.len(), 2);
    lab.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_member_id_too_lets_the_member_rejoin_with_every_key() -> Result<()> {
    let (lab, old_id) = broken_lab().await?;
    let data = lab.set.data_dir(1)?;
    etcd_medic_lab::lab::delete_member_data(&data, true)?;
    lab.set.wait_ready(1, WAIT).await?;
    assert!(lab.set.container_log(1).contains("Adding new member to existing cluster"));

    let members = etcd::member_list(&lab.set.endpoints()).await?;
    assert_eq!(members.len(), 3);
    assert!(members.iter().all(|m| m.started() && !m.is_learner));
    let new_id = members.iter().find(|m| m.name == "apisix-etcd-1").unwrap().id;
    assert_ne!(new_id, old_id);
    // The image stored the new id for its next start.
    let stored = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Ok(t) = std::fs::read_to_string(data.join("member_id")) {
                return t;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await?;
    assert_eq!(stored.trim(), format_id(new_id));

    assert_every_key(&lab, 3, KEYS).await?;
    lab.shutdown().await;
    Ok(())
}

/// FIELD-NOTES.md's hazard: the image empties `data/` before its single `member add`. If that
/// add fails once, the next start finds `data/` empty and, on a release only ever installed,
/// bootstraps a new cluster instead of joining — for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_first_add_leaves_data_empty_and_the_member_bootstraps_apart_for_good() -> Result<()> {
    let (lab, _) = broken_lab().await?;
    let data = lab.set.data_dir(1)?;
    lab.set.switches().fail_next_member_add.store(true, std::sync::atomic::Ordering::SeqCst);
    etcd_medic_lab::lab::delete_member_data(&data, true)?;
    lab.set.wait_crash_loop(1, WAIT, "Error: etcdserver: unhealthy cluster").await?;
    lab.set.wait_pod(1, WAIT, "bootstrapping apart", |_| lab.set.container_log(1).contains("Bootstrapping a new cluster")).await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(!etcd_medic_lab::statefulset::pod_ready(&lab.set.pod(1)?));
    let members = etcd::member_list(&lab.set.other_endpoints(1)).await?;
    assert!(!members.iter().any(|m| m.name == "apisix-etcd-1"), "{members:?}");
    lab.shutdown().await;
    Ok(())
}

/// The same failed add with a dot-file left in `data/`: the image still counts `data/` as
/// not empty, stays on the "was removed" branch, and its next add succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dot_file_in_data_keeps_the_member_on_the_re_add_path_after_a_failed_add() -> Result<()> {
    let (lab, _) = broken_lab().await?;
    let data = lab.set.data_dir(1)?;
    std::fs::write(data.join(".etcd-medic-keep"), "")?;
    lab.set.switches().fail_next_member_add.store(true, std::sync::atomic::Ordering::SeqCst);
    etcd_medic_lab::lab::delete_member_data(&data, true)?;
    lab.set.wait_crash_loop(1, WAIT, "Error: etcdserver: unhealthy cluster").await?;
    lab.set.wait_ready(1, WAIT).await?;
    assert!(!lab.set.container_log(1).contains("Bootstrapping a new cluster"));
    assert_every_key(&lab, 3, KEYS).await?;
    lab.shutdown().await;
    Ok(())
}

/// A plain StatefulSet (etcd with fixed flags, `existing`): the removed member restarted on
/// its old data is refused by etcd itself and crash-loops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_set_member_removed_crash_loops_as_permanently_removed() -> Result<()> {
    crate::init_tracing();
    let mut shape = SetShape::apisix(3, NODE_NAME);
    shape.profile = etcd_medic_lab::objects::StartProfile::Plain { state: etcd::ClusterState::Existing };
    let lab = Lab::start(shape).await?;
    lab.write_keys(50).await?;
    let id = etcd::member_list(&lab.set.endpoints()).await?.into_iter().find(|m| m.name == "apisix-etcd-1").unwrap().id;
    etcd::member_remove(&lab.set.other_endpoints(1), id).await?;
    lab.set.delete_pod(1)?;
    lab.set
        .wait_pod(1, WAIT, "crash-looping as removed", |p| {
            restarts(p) >= 2 && lab.set.previous_container_log(1).contains("the member has been permanently removed from the cluster")
        })
        .await?;
    assert!(lab.set.data_dir(1)?.join("member/snap/db").is_file());
    lab.shutdown().await;
    Ok(())
}
