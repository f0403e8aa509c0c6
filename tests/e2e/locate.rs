//! `locate` against the lab: real pods in the stand-in API server, the kubelet tree with
//! real mounts (as root), and every refusal a hostile or broken node can provoke.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use etcd_medic::locate::Plan;
use etcd_medic::locate::volume::VolumeKind;
use etcd_medic::profile::Profile;
use etcd_medic::{Code, Error};
use etcd_medic_lab::apiserver::{Fault, FaultKind};
use etcd_medic_lab::objects::{SetShape, StartProfile, StorageKind};
use etcd_medic_lab::{Lab, LabOptions, NODE_NAME};
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};

fn shape(replicas: usize, storage: StorageKind) -> SetShape {
    let mut s = SetShape::apisix(replicas, NODE_NAME);
    s.storage = storage;
    s
}

use etcd_medic_lab::agent::locator;

async fn locate(lab: &Lab, ordinal: usize) -> Result<Plan, Error> {
    let (l, _proc) = locator(lab, None, Duration::from_secs(5)).await.expect("locator");
    l.locate("apisix", &lab.set.shape().pod_name(ordinal), None).await
}

fn assert_code(r: Result<Plan, Error>, code: Code) -> Error {
    match r {
        Ok(p) => panic!("expected {code}, got a plan: {p:?}"),
        Err(e) => {
            assert_eq!(e.code, code, "{e}");
            e
        }
    }
}

/// Without root the lab cannot mount, and the agent rightly refuses a CSI path that is no mount.
fn mounts_or_skip(lab: &Lab, r: &Result<Plan, Error>) -> bool {
    if lab.node.real_mounts {
        return true;
    }
    etcd_medic_lab::skip("partly: needs root (CSI and local volumes are plain directories here, so locate answers NotAMount)");
    assert_eq!(r.as_ref().unwrap_err().code, Code::NotAMount);
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bitnami_member_on_a_csi_volume() -> Result<()> {
    crate::init_tracing();
    let lab = Lab::start(shape(3, StorageKind::Csi)).await?;
    let r = locate(&lab, 1).await;
    if !mounts_or_skip(&lab, &r) {
        return Ok(());
    }
    let plan = r?;
    assert_eq!(plan.host_path, lab.set.data_dir(1)?);
    assert_eq!(plan.volume.root, lab.set.volume_path(1)?);
    assert_eq!(plan.data_dir, "/bitnami/etcd/data");
    assert_eq!(plan.profile, Profile::BitnamiMemberId);
    assert_eq!(plan.volume.claim.as_deref(), Some("data-apisix-etcd-1"));
    assert_eq!(plan.volume.persistent_volume.as_deref(), Some(lab.set.shape().pv_name(1).as_str()));
    assert!(matches!(plan.volume.kind, VolumeKind::Csi { ref driver, .. } if driver == "disk.csi.azure.com"));
    assert_eq!(plan.kubelet_root.as_deref(), Some(lab.node.kubelet_root.as_path()));
    let moved: Vec<&str> = plan.r#move.iter().map(|m| m.path.as_str()).collect();
    assert_eq!(moved, ["member/snap", "member/wal", "member_id"]);
    assert!(plan.r#move[0].bytes > 0 && plan.r#move[1].bytes > 0);
    assert_eq!(plan.bytes, plan.r#move.iter().map(|m| m.bytes).sum::<u64>());
    let json = serde_json::to_value(&plan)?;
    for field in ["hostPath", "dataDir", "profile", "move", "bytes", "podUID"] {
        assert!(json.get(field).is_some(), "plan JSON lacks {field}: {json}");
    }
    assert_eq!(json["profile"], "bitnami-member-id");
    // The replacement pod after a delete has a new UID and a new path: a caller that names
    // the old UID is refused, and the plan follows the new pod.
    let old_uid = plan.pod_uid.clone();
    let (l, _p) = locator(&lab, None, Duration::from_secs(5)).await?;
    lab.set.delete_pod(1)?;
    lab.set.wait_pod(1, Duration::from_secs(60), "replaced", |p| p["metadata"]["uid"] != old_uid.as_str()).await?;
    lab.set.wait_ready(1, Duration::from_secs(90)).await?;
    let e = l.locate("apisix", "apisix-etcd-1", Some(&old_uid)).await.unwrap_err();
    assert_eq!(e.code, Code::PodUIDMismatch, "{e}");
    let new = l.locate("apisix", "apisix-etcd-1", None).await?;
    assert_ne!(new.pod_uid, old_uid);
    assert_ne!(new.host_path, plan.host_path);
    assert_eq!(new.host_path, lab.set.data_dir(1)?);
    lab.shutdown().await;
    Ok(())
}

/// microk8s and k0s keep the kubelet elsewhere; with no --kubelet-root the agent finds the
/// root that holds the pod.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelet_roots_of_other_distributions_are_discovered() -> Result<()> {
    for root in ["var/snap/microk8s/common/var/lib/kubelet", "var/lib/k0s/kubelet"] {
        let opts = LabOptions { kubelet_root: root.into(), ..Default::default() };
        let lab = Lab::start_with(shape(1, StorageKind::Csi), opts).await?;
        let r = locate(&lab, 0).await;
        if mounts_or_skip(&lab, &r) {
            let plan = r?;
            assert_eq!(plan.kubelet_root, Some(lab.node.root.join(root)));
            assert_eq!(plan.host_path, lab.set.data_dir(0)?);
        }
        lab.shutdown().await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_and_host_path_volumes_and_a_plain_set() -> Result<()> {
    let local = Lab::start(shape(1, StorageKind::Local)).await?;
    let r = locate(&local, 0).await;
    if mounts_or_skip(&local, &r) {
        let plan = r?;
        assert!(matches!(plan.volume.kind, VolumeKind::Local { .. }));
        assert!(plan.volume.root.ends_with(format!("volumes/kubernetes.io~local-volume/{}", local.set.shape().pv_name(0))));
        assert_eq!(plan.host_path, local.set.data_dir(0)?);
    }
    local.shutdown().await;

    let hp = Lab::start(shape(1, StorageKind::HostPath)).await?;
    let plan = locate(&hp, 0).await?;
    assert!(matches!(plan.volume.kind, VolumeKind::HostPath { .. }));
    assert!(plan.volume.root.starts_with(hp.node.root.join("var/local-path-provisioner")));
    assert_eq!(plan.kubelet_root, None);
    assert_eq!(plan.host_path, hp.set.data_dir(0)?);
    hp.shutdown().await;

    let mut s = shape(1, StorageKind::HostPath);
    s.profile = StartProfile::Plain { state: etcd_medic_lab::etcd::ClusterState::Existing };
    let plain = Lab::start(s).await?;
    let plan = locate(&plain, 0).await?;
    assert_eq!(plan.profile, Profile::Plain);
    assert_eq!(plan.data_dir, "/var/run/etcd/default.etcd");
    assert_eq!(plan.r#move.iter().map(|m| m.path.as_str()).collect::<Vec<_>>(), ["member/snap", "member/wal"]);
    plain.shutdown().await;
    Ok(())
}

/// One stopped single-member lab on a hostPath PV, broken in every way a node can be; each
/// case is undone before the next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_and_broken_nodes_are_refused_with_their_codes() -> Result<()> {
    let lab = Lab::start(shape(1, StorageKind::HostPath)).await?;
    lab.set.shutdown().await;
    let data = lab.set.data_dir(0)?;
    let volume = lab.set.volume_path(0)?;
    assert!(locate(&lab, 0).await.is_ok());

    // member/wal a symlink to a directory outside the volume.
    let outside = tempfile::tempdir()?;
    std::fs::rename(data.join("member/wal"), outside.path().join("wal"))?;
    std::os::unix::fs::symlink(outside.path().join("wal"), data.join("member/wal"))?;
    let e = assert_code(locate(&lab, 0).await, Code::UnsafePath);
    assert!(e.message.contains("member/wal"), "{e}");
    std::fs::remove_file(data.join("member/wal"))?;
    std::fs::rename(outside.path().join("wal"), data.join("member/wal"))?;

    // The PV's directory replaced by a symlink to a look-alike.
    let moved = volume.with_extension("real");
    std::fs::rename(&volume, &moved)?;
    std::os::unix::fs::symlink(&moved, &volume)?;
    let e = assert_code(locate(&lab, 0).await, Code::UnsafePath);
    assert!(e.message.contains("symlink"), "{e}");
    std::fs::remove_file(&volume)?;
    std::fs::rename(&moved, &volume)?;

    // `data/member` a symlink to another volume's member dir: the link is not followed.
    let elsewhere = tempfile::tempdir()?;
    std::fs::rename(data.join("member"), elsewhere.path().join("member"))?;
    std::os::unix::fs::symlink(elsewhere.path().join("member"), data.join("member"))?;
    let e = assert_code(locate(&lab, 0).await, Code::UnsafePath);
    assert!(e.message.contains("member"), "{e}");
    std::fs::remove_file(data.join("member"))?;
    std::fs::rename(elsewhere.path().join("member"), data.join("member"))?;

    // Not etcd data; then no data dir at all.
    std::fs::rename(data.join("member"), volume.join("member.aside"))?;
    assert_code(locate(&lab, 0).await, Code::NotEtcdData);
    std::fs::rename(volume.join("member.aside"), data.join("member"))?;
    std::fs::rename(&data, volume.join("data.aside"))?;
    assert_code(locate(&lab, 0).await, Code::DataDirNotFound);
    std::fs::rename(volume.join("data.aside"), &data)?;

    // A subPath: the data sits below it in the volume.
    std::fs::create_dir_all(volume.join("etcd-0"))?;
    std::fs::rename(&data, volume.join("etcd-0/data"))?;
    lab.api.modify::<Pod>("apisix", "apisix-etcd-0", |p| {
        p.spec.as_mut().unwrap().containers[0].volume_mounts.as_mut().unwrap()[0].sub_path_expr = Some("$(MY_POD_NAME)".into());
    })?;
    let e = assert_code(locate(&lab, 0).await, Code::DataDirNotFound);
    assert!(e.message.contains("apisix-etcd-0") && e.message.contains("does not exist"), "{e}");
    std::fs::rename(volume.join("etcd-0"), volume.join("apisix-etcd-0"))?;
    let plan = locate(&lab, 0).await?;
    assert_eq!(plan.host_path, volume.join("apisix-etcd-0/data"));
    assert_eq!(plan.volume.sub_path.as_deref(), Some("apisix-etcd-0"));
    lab.api.modify::<Pod>("apisix", "apisix-etcd-0", |p| {
        p.spec.as_mut().unwrap().containers[0].volume_mounts.as_mut().unwrap()[0].sub_path_expr = None
    })?;
    std::fs::rename(volume.join("apisix-etcd-0/data"), &data)?;

    // `..` in a subPath.
    lab.api.modify::<Pod>("apisix", "apisix-etcd-0", |p| {
        p.spec.as_mut().unwrap().containers[0].volume_mounts.as_mut().unwrap()[0].sub_path = Some("../../etc".into());
    })?;
    assert_code(locate(&lab, 0).await, Code::UnsafePath);
    lab.api.modify::<Pod>("apisix", "apisix-etcd-0", |p| {
        p.spec.as_mut().unwrap().containers[0].volume_mounts.as_mut().unwrap()[0].sub_path = None
    })?;

    // An inline hostPath volume (a static etcd's own data) is never a target.
    let claim_volume = lab.api.get::<Pod>("apisix", "apisix-etcd-0").unwrap().spec.unwrap().volumes.unwrap()[0].clone();
    lab.api.modify::<Pod>("apisix", "apisix-etcd-0", |p| {
        let v = &mut p.spec.as_mut().unwrap().volumes.as_mut().unwrap()[0];
        v.persistent_volume_claim = None;
        v.host_path = Some(serde_json::from_value(serde_json::json!({"path": "/var/lib/etcd"})).unwrap());
    })?;
    let e = assert_code(locate(&lab, 0).await, Code::UnsafePath);
    assert!(e.message.contains("inline hostPath"), "{e}");
    lab.api.modify::<Pod>("apisix", "apisix-etcd-0", |p| p.spec.as_mut().unwrap().volumes.as_mut().unwrap()[0] = claim_volume.clone())?;

    // A PV that points at a system directory.
    let pv_name = lab.set.shape().pv_name(0);
    let pv_before = lab.api.get::<PersistentVolume>("", &pv_name).unwrap();
    lab.api
        .modify::<PersistentVolume>("", &pv_name, |p| p.spec.as_mut().unwrap().host_path.as_mut().unwrap().path = "/var/lib/etcd".into())?;
    assert_code(locate(&lab, 0).await, Code::UnsafePath);
    // A PV whose claimRef names another claim.
    lab.api.modify::<PersistentVolume>("", &pv_name, |p| *p = pv_before.clone())?;
    lab.api.modify::<PersistentVolume>("", &pv_name, |p| {
        p.spec.as_mut().unwrap().claim_ref.as_mut().unwrap().name = Some("someone-else".into())
    })?;
    let e = assert_code(locate(&lab, 0).await, Code::PVNotFound);
    assert!(e.message.contains("someone-else"), "{e}");
    lab.api.modify::<PersistentVolume>("", &pv_name, |p| *p = pv_before.clone())?;

    // The pod on another node: the detail names it.
    lab.api.modify::<Pod>("apisix", "apisix-etcd-0", |p| p.spec.as_mut().unwrap().node_name = Some("lab-node-b".into()))?;
    let e = assert_code(locate(&lab, 0).await, Code::WrongNode);
    assert!(e.message.contains("lab-node-b"), "{e}");
    lab.api.modify::<Pod>("apisix", "apisix-etcd-0", |p| p.spec.as_mut().unwrap().node_name = Some(NODE_NAME.into()))?;

    // An unbound claim, a claim that is gone, a volume that is gone, a pod that is gone.
    let pvc = lab.set.shape().pvc_name(0);
    lab.api.modify::<PersistentVolumeClaim>("apisix", &pvc, |c| c.status.as_mut().unwrap().phase = Some("Pending".into()))?;
    assert_code(locate(&lab, 0).await, Code::PVNotFound);
    lab.api.modify::<PersistentVolumeClaim>("apisix", &pvc, |c| c.status.as_mut().unwrap().phase = Some("Bound".into()))?;
    lab.api.modify::<Pod>("apisix", "apisix-etcd-0", |p| {
        p.spec.as_mut().unwrap().volumes.as_mut().unwrap()[0].persistent_volume_claim.as_mut().unwrap().claim_name = "data-missing".into();
    })?;
    assert_code(locate(&lab, 0).await, Code::PVCNotFound);
    lab.api.modify::<Pod>("apisix", "apisix-etcd-0", |p| {
        p.spec.as_mut().unwrap().volumes.as_mut().unwrap()[0].persistent_volume_claim.as_mut().unwrap().claim_name = pvc.clone();
    })?;
    lab.api.modify::<PersistentVolumeClaim>("apisix", &pvc, |c| c.spec.as_mut().unwrap().volume_name = Some("pv-missing".into()))?;
    assert_code(locate(&lab, 0).await, Code::PVNotFound);
    lab.api.modify::<PersistentVolumeClaim>("apisix", &pvc, |c| c.spec.as_mut().unwrap().volume_name = Some(lab.set.shape().pv_name(0)))?;
    let (l, _p) = locator(&lab, None, Duration::from_secs(5)).await?;
    assert_code(l.locate("apisix", "apisix-etcd-9", None).await, Code::PodNotFound);
    assert!(locate(&lab, 0).await.is_ok());
    lab.shutdown().await;
    Ok(())
}

/// Kubelet-side failures on a CSI volume: the pod's directory gone (being deleted), two
/// candidate directories for a volume found by search, a directory where a mount should be.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelet_side_failures_on_a_csi_volume() -> Result<()> {
    let lab = Lab::start(shape(1, StorageKind::Csi)).await?;
    lab.set.shutdown().await;
    let pv = lab.set.shape().pv_name(0);
    let uid = lab.set.pod_uid(0)?;
    let pod_dir = lab.node.pod_dir(&uid);

    // The pod's volume dir is gone (the pod was deleted, the kubelet cleaned up).
    let (l, _p) = locator(&lab, Some(PathBuf::from("/var/lib/kubelet")), Duration::from_secs(5)).await?;
    let source = lab.set.shape().volume_source(0);
    lab.node.detach(&uid, &pv, &source)?;
    lab.node.remove_pod(&uid)?;
    let e = assert_code(l.locate("apisix", "apisix-etcd-0", None).await, Code::DataDirNotFound);
    assert!(e.message.contains("is the pod being deleted?"), "{e}");
    // Without --kubelet-root, no distribution root holds the pod any more.
    let e = assert_code(locate(&lab, 0).await, Code::DataDirNotFound);
    assert!(e.message.contains("--kubelet-root"), "{e}");
    lab.node.attach(&uid, &pv, NODE_NAME, &source)?;

    // An NFS PV: refused before any I/O on it (a network filesystem can hang every call, and
    // its server may be a tenant's to stop).
    let original = lab.api.get::<PersistentVolume>("", &pv).unwrap();
    lab.api.modify::<PersistentVolume>("", &pv, |p| {
        let spec = p.spec.as_mut().unwrap();
        spec.csi = None;
        spec.nfs = Some(serde_json::from_value(serde_json::json!({"server": "nfs.lab", "path": "/exports/etcd"})).unwrap());
    })?;
    let e = assert_code(locate(&lab, 0).await, Code::UnsupportedProfile);
    assert!(e.message.contains("\"nfs\""), "{e}");

    // A local PV whose kubelet directory is a plain directory, not a mount.
    lab.api.modify::<PersistentVolume>("", &pv, |p| {
        let spec = p.spec.as_mut().unwrap();
        spec.nfs = None;
        spec.local = Some(serde_json::from_value(serde_json::json!({"path": "/mnt/disks/x"})).unwrap());
    })?;
    let fake = pod_dir.join("volumes/kubernetes.io~local-volume").join(&pv);
    std::fs::create_dir_all(fake.join("data/member/snap"))?;
    std::fs::write(fake.join("data/member/snap/db"), "")?;
    assert_code(locate(&lab, 0).await, Code::NotAMount);
    std::fs::remove_dir_all(pod_dir.join("volumes/kubernetes.io~local-volume"))?;

    // vol_data.json naming another volume than the PV.
    lab.api.modify::<PersistentVolume>("", &pv, |p| *p = original.clone())?;
    if lab.node.real_mounts {
        let vd = lab.set.volume_path(0)?.parent().unwrap().join("vol_data.json");
        let text = std::fs::read_to_string(&vd)?;
        std::fs::write(&vd, text.replace("disk.csi.azure.com", "other.csi.example"))?;
        assert_code(locate(&lab, 0).await, Code::UnsafePath);
        std::fs::remove_file(&vd)?;
        let e = assert_code(locate(&lab, 0).await, Code::UnsafePath);
        assert!(e.message.contains("vol_data.json"), "{e}");
        std::fs::write(&vd, text)?;
        assert!(locate(&lab, 0).await.is_ok());
    } else {
        etcd_medic_lab::skip("partly: the vol_data.json cross-check needs the CSI mount (root)");
    }
    lab.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_server_that_fails_or_hangs_is_a_clear_error() -> Result<()> {
    let lab = Lab::start(shape(1, StorageKind::HostPath)).await?;
    lab.api.inject(Fault::new("/api/v1/namespaces/apisix/pods/", FaultKind::Status(500)));
    let e = assert_code(locate(&lab, 0).await, Code::NotReady);
    assert!(e.message.contains("500"), "{e}");
    lab.api.clear_faults();
    lab.api.inject(Fault::new("/api/v1/persistentvolumes/", FaultKind::Delay(Duration::from_secs(5))));
    let (l, _p) = locator(&lab, None, Duration::from_millis(500)).await?;
    let e = assert_code(l.locate("apisix", "apisix-etcd-0", None).await, Code::NotReady);
    assert!(e.message.contains("did not answer"), "{e}");
    lab.api.clear_faults();
    assert!(locate(&lab, 0).await.is_ok());
    lab.shutdown().await;
    Ok(())
}

/// The `etcd-medic` binary next to this test binary (the test command builds it).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_prints_the_plan_and_exits_with_the_refusal_class() -> Result<()> {
    let lab = Lab::start(shape(1, StorageKind::HostPath)).await?;
    let proc = tempfile::tempdir()?;
    let run = |node: &str, output: &str| {
        std::process::Command::new(etcd_medic_lab::agent::agent_binary())
            .args(["locate", "apisix/apisix-etcd-0", "-o", output, "--node-name", node])
            .arg("--host-root")
            .arg(&lab.node.root)
            .arg("--proc-root")
            .arg(proc.path())
            .env("KUBECONFIG", &lab.api.kubeconfig)
            .output()
    };
    let out = tokio::task::block_in_place(|| run(NODE_NAME, "json"))?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(plan["hostPath"], serde_json::json!(lab.set.data_dir(0)?));
    let table = tokio::task::block_in_place(|| run(NODE_NAME, "table"))?;
    assert!(String::from_utf8_lossy(&table.stdout).contains("would move:"));
    let wrong = tokio::task::block_in_place(|| run("lab-node-b", "json"))?;
    assert_eq!(wrong.status.code(), Some(6));
    let stderr = String::from_utf8_lossy(&wrong.stderr);
    assert!(stderr.contains("(WrongNode)") && stderr.contains(NODE_NAME), "{stderr}");
    lab.shutdown().await;
    Ok(())
}
