//! The node tree: the kubelet's layout per volume type, real mounts as root, and the volume
//! following its PVC to the next pod UID.

use anyhow::Result;
use etcd_medic_lab::kubelet::{NodeTree, VolumeSource, is_mount_point};

fn csi() -> VolumeSource {
    VolumeSource::Csi { driver: "ebs.csi.aws.com".into(), volume_handle: "vol-0abc".into() }
}

#[test]
fn csi_volume_is_laid_out_like_the_kubelet_and_survives_a_new_pod_uid() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let node = NodeTree::new(dir.path(), "var/lib/kubelet")?;
    let path = node.attach("uid-1", "pvc-1", "node-a", &csi())?;
    assert_eq!(path, dir.path().join("var/lib/kubelet/pods/uid-1/volumes/kubernetes.io~csi/pvc-1/mount"));
    let vol_data: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path.parent().unwrap().join("vol_data.json"))?)?;
    assert_eq!(vol_data["driverName"], "ebs.csi.aws.com");
    assert_eq!(vol_data["specVolID"], "pvc-1");
    assert_eq!(vol_data["volumeHandle"], "vol-0abc");
    if node.real_mounts {
        assert!(is_mount_point(&path), "a CSI volume is a mount point when the lab runs as root");
    } else {
        etcd_medic_lab::skip("partly: needs root to check the CSI volume as a mount");
    }
    std::fs::write(path.join("marker"), "kept")?;
    node.detach("uid-1", "pvc-1", &csi())?;
    node.remove_pod("uid-1")?;
    assert!(!dir.path().join("var/lib/kubelet/pods/uid-1").exists());
    let again = node.attach("uid-2", "pvc-1", "node-a", &csi())?;
    assert_eq!(std::fs::read_to_string(again.join("marker"))?, "kept");
    node.teardown();
    assert!(node.active_mounts().is_empty());
    assert!(!is_mount_point(&again));
    Ok(())
}

#[test]
fn local_and_host_path_volumes_and_sub_paths() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let node = NodeTree::new(dir.path(), "var/snap/microk8s/common/var/lib/kubelet")?;
    let local = VolumeSource::Local { path: "/mnt/disks/ssd1".into() };
    let p = node.attach("u", "local-pv", "node-a", &local)?;
    assert!(p.ends_with("var/snap/microk8s/common/var/lib/kubelet/pods/u/volumes/kubernetes.io~local-volume/local-pv"));
    std::fs::write(p.join("f"), "x")?;
    if node.real_mounts {
        // A bind on the same filesystem: only the mount table tells.
        assert!(is_mount_point(&p));
        assert_eq!(std::fs::read_to_string(dir.path().join("mnt/disks/ssd1/f"))?, "x");
    } else {
        etcd_medic_lab::skip("partly: needs root for real mounts");
    }
    let host = VolumeSource::HostPath { path: "/var/local-path-provisioner/pvc-9_ns_data".into() };
    let h = node.attach("u", "hp-pv", "node-a", &host)?;
    assert_eq!(h, dir.path().join("var/local-path-provisioner/pvc-9_ns_data"));
    assert!(!dir.path().join("var/snap/microk8s/common/var/lib/kubelet/pods/u/volumes/kubernetes.io~host-path").exists());
    let sub = node.subpath("u", "local-pv", &local, "etcd", 0, "data")?;
    assert!(sub.ends_with("pods/u/volume-subpaths/local-pv/etcd/0"));
    if node.real_mounts {
        std::fs::write(sub.join("through-subpath"), "y")?;
        assert!(p.join("data/through-subpath").exists());
    } else {
        etcd_medic_lab::skip("partly: needs root for a real subPath bind");
    }
    assert!(node.subpath("u", "local-pv", &local, "etcd", 1, "../escape").is_err());
    node.teardown();
    Ok(())
}
