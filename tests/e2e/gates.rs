//! The gates that are decided from facts, against real etcd: a running member holds its
//! volume (by open files, found by device and inode), a crash-looping one does not; the
//! pod's status says which is which.

use std::path::Path;

use anyhow::Result;
use etcd_medic::Code;
use etcd_medic::engine::gates;
use etcd_medic::host::processes as guard;
use etcd_medic_lab::objects::SetShape;
use etcd_medic_lab::{Lab, NODE_NAME};
use k8s_openapi::api::core::v1::Pod;

async fn plan(lab: &Lab) -> Result<etcd_medic::locate::Located> {
    let (l, _proc) = etcd_medic_lab::agent::locator(lab, None, std::time::Duration::from_secs(5)).await?;
    Ok(l.open("apisix", "apisix-etcd-1", None, true).await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_member_holds_its_volume_and_a_crash_looping_one_does_not() -> Result<()> {
    let lab = Lab::start(SetShape::apisix(3, NODE_NAME)).await?;
    if !lab.node.real_mounts {
        etcd_medic_lab::skip("needs root: locate refuses unmounted CSI paths");
        return Ok(());
    }
    let p = plan(&lab).await?;
    let e = guard::no_holders(Path::new("/proc"), &p.volume, &p.data).unwrap_err();
    assert_eq!(e.code, Code::PodRunning);
    assert!(e.message.contains("etcd"), "{e}");
    // etcd's own locks on its WAL and db (fcntl and flock) are seen too: the agent cannot
    // take them while the member runs, whatever the process scan says.
    let files = p.volume.etcd_lock_files(&p.data)?;
    assert!(files.len() >= 2, "the db and at least one WAL: {files:?}");
    let e = p.volume.lock(&files).err().expect("a running etcd holds its locks");
    assert_eq!(e.code, Code::PodRunning, "{e}");
    let pod: Pod = lab.api.get("apisix", "apisix-etcd-1").unwrap();
    assert_eq!(gates::pod_failure(&pod, "etcd", true).unwrap_err().code, Code::PodRunning);
    lab.shutdown().await;

    let (lab, _) = crate::reference_failure::broken_lab().await?;
    let p = plan(&lab).await?;
    // Between restarts nothing holds it. (A restart that finds the cluster busy may start
    // etcd briefly on the old data; then the gate rightly refuses, and a retry passes.)
    let mut free = guard::no_holders(Path::new("/proc"), &p.volume, &p.data);
    for _ in 0..20 {
        if free.is_ok() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        free = guard::no_holders(Path::new("/proc"), &p.volume, &p.data);
    }
    free?;
    let pod: Pod = lab.api.get("apisix", "apisix-etcd-1").unwrap();
    let failure = gates::pod_failure(&pod, "etcd", false)?.expect("the pod is failing");
    assert_eq!(failure.reason, "CrashLoopBackOff");
    assert!(failure.message.ends_with("Error: etcdserver: member not found"), "{}", failure.message);
    lab.shutdown().await;
    Ok(())
}
