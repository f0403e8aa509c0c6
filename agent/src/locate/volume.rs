//! Which volume holds the data dir, and where the kubelet puts that volume on the host, by
//! volume type. Pure: the caller fetches the objects and checks the disk.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use k8s_openapi::api::core::v1::{Container, PersistentVolume, Pod, Volume};

use super::container::expand;
use crate::error::{Code, Error, Result};

/// The volumeMount that holds the data dir.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountMatch {
    pub volume: String,
    pub mount_path: String,
    /// `subPath`, or `subPathExpr` expanded; relative, without `..`.
    pub sub_path: Option<String>,
    /// The data dir relative to the mount path.
    pub rel: PathBuf,
}

fn components(p: &str) -> Vec<&str> {
    p.split('/').filter(|c| !c.is_empty() && *c != ".").collect()
}

/// The mount whose path is the longest component-wise prefix of `data_dir`.
pub fn mount_for(c: &Container, data_dir: &str, env: &BTreeMap<String, String>) -> Result<MountMatch> {
    let dd = components(data_dir);
    if dd.contains(&"..") {
        return Err(Error::new(Code::UnsafePath, format!("data dir {data_dir:?} contains '..'")));
    }
    let best = c
        .volume_mounts
        .iter()
        .flatten()
        .filter(|m| {
            let mp = components(&m.mount_path);
            mp.len() <= dd.len() && mp == dd[..mp.len()]
        })
        .max_by_key(|m| components(&m.mount_path).len())
        .ok_or_else(|| {
            Error::new(
                Code::DataDirNotFound,
                format!("data dir {data_dir:?} is on no volume of container {:?}: etcd writes to the container's own filesystem", c.name),
            )
        })?;
    let sub_path = match (&best.sub_path, &best.sub_path_expr) {
        (Some(s), _) if !s.is_empty() => Some(s.clone()),
        (_, Some(e)) if !e.is_empty() => {
            let s = expand(e, env);
            if s.contains("$(") {
                return Err(Error::new(Code::DataDirNotFound, format!("subPathExpr {e:?} refers to a variable the agent cannot resolve")));
            }
            Some(s)
        }
        _ => None,
    };
    if let Some(s) = &sub_path
        && (s.starts_with('/') || Path::new(s).components().any(|c| !matches!(c, Component::Normal(_) | Component::CurDir)))
    {
        return Err(Error::new(Code::UnsafePath, format!("subPath {s:?} of volume {:?} is absolute or has '..'", best.name)));
    }
    let rel: PathBuf = dd[components(&best.mount_path).len()..].iter().collect();
    Ok(MountMatch { volume: best.name.clone(), mount_path: best.mount_path.clone(), sub_path, rel })
}

/// The claim and the volume must name each other, as the kubelet requires: the PV's
/// `claimRef` is this PVC (and its uid, when set), and the PV is bound.
pub fn check_binding(pvc: &k8s_openapi::api::core::v1::PersistentVolumeClaim, pv: &PersistentVolume) -> Result<()> {
    let pv_name = pv.metadata.name.as_deref().unwrap_or_default();
    let claim_ref = pv.spec.as_ref().and_then(|s| s.claim_ref.as_ref());
    let names_it = claim_ref.is_some_and(|r| {
        r.namespace == pvc.metadata.namespace
            && r.name == pvc.metadata.name
            && (r.uid.is_none() || pvc.metadata.uid.is_none() || r.uid == pvc.metadata.uid)
    });
    if !names_it {
        return Err(Error::new(
            Code::PVNotFound,
            format!(
                "PersistentVolume {pv_name} is not bound to claim {}/{}: its claimRef names {:?}",
                pvc.metadata.namespace.as_deref().unwrap_or_default(),
                pvc.metadata.name.as_deref().unwrap_or_default(),
                claim_ref.map(|r| format!("{}/{}", r.namespace.as_deref().unwrap_or_default(), r.name.as_deref().unwrap_or_default()))
            ),
        ));
    }
    if pv.status.as_ref().and_then(|s| s.phase.as_deref()).is_some_and(|p| p != "Bound") {
        return Err(Error::new(Code::PVNotFound, format!("PersistentVolume {pv_name} is not Bound")));
    }
    Ok(())
}

pub use etcd_medic_core::contract::VolumeKind;

/// In-tree plugins that the kubelet migrates to CSI, with their CSI driver.
const MIGRATED: &[(&str, &str)] = &[
    ("awsElasticBlockStore", "ebs.csi.aws.com"),
    ("azureDisk", "disk.csi.azure.com"),
    ("azureFile", "file.csi.azure.com"),
    ("gcePersistentDisk", "pd.csi.storage.gke.io"),
    ("cinder", "cinder.csi.openstack.org"),
    ("vsphereVolume", "csi.vsphere.vmware.com"),
    ("portworxVolume", "pxd.portworx.com"),
];

pub fn pv_kind(pv: &PersistentVolume) -> VolumeKind {
    let Some(spec) = pv.spec.as_ref() else { return VolumeKind::Other { plugin: "unknown".into() } };
    if let Some(csi) = &spec.csi {
        return VolumeKind::Csi { driver: csi.driver.clone(), volume_handle: csi.volume_handle.clone(), migrated_from: None };
    }
    if let Some(l) = &spec.local {
        return VolumeKind::Local { path: l.path.clone() };
    }
    if let Some(h) = &spec.host_path {
        return VolumeKind::HostPath { path: h.path.clone() };
    }
    let v = serde_json::to_value(spec).unwrap_or_default();
    for (plugin, driver) in MIGRATED {
        if let Some(src) = v.get(*plugin) {
            let handle = ["volumeID", "diskURI", "pdName", "volumePath", "shareName"]
                .iter()
                .find_map(|k| src.get(*k).and_then(|x| x.as_str()))
                .unwrap_or_default()
                .to_string();
            return VolumeKind::Csi { driver: driver.to_string(), volume_handle: handle, migrated_from: Some(plugin.to_string()) };
        }
    }
    let plugin =
        v.as_object().and_then(|o| o.keys().find(|k| !COMMON_PV_FIELDS.contains(&k.as_str())).cloned()).unwrap_or_else(|| "unknown".into());
    VolumeKind::Other { plugin }
}

const COMMON_PV_FIELDS: &[&str] = &[
    "accessModes",
    "capacity",
    "claimRef",
    "mountOptions",
    "nodeAffinity",
    "persistentVolumeReclaimPolicy",
    "storageClassName",
    "volumeMode",
    "volumeAttributesClassName",
];

/// The kind of an inline pod volume that is not a PVC.
pub fn inline_kind(v: &Volume) -> Option<VolumeKind> {
    if let Some(h) = &v.host_path {
        return Some(VolumeKind::HostPath { path: h.path.clone() });
    }
    if v.empty_dir.is_some() {
        return Some(VolumeKind::EmptyDir);
    }
    None
}

/// The claim behind a pod volume: a PVC, or the PVC of a generic ephemeral volume
/// (`<pod>-<volume>`).
pub fn claim_name(pod: &Pod, v: &Volume) -> Option<String> {
    if let Some(pvc) = &v.persistent_volume_claim {
        return Some(pvc.claim_name.clone());
    }
    v.ephemeral.as_ref().map(|_| format!("{}-{}", pod.metadata.name.as_deref().unwrap_or_default(), v.name))
}

/// The kinds the agent acts on: CSI (and in-tree plugins migrated to it), local and hostPath
/// PVs, emptyDir; all on the node's own disks or attached to it. Anything else (NFS, CephFS,
/// iSCSI…) is `UnsupportedProfile` before any I/O: a network filesystem can hang every call
/// on it, and its server may be a tenant's to stop.
pub fn check_supported(kind: &VolumeKind, volume: &str) -> Result<()> {
    match kind {
        VolumeKind::Other { plugin } => Err(Error::new(
            Code::UnsupportedProfile,
            format!(
                "volume {volume:?} is of kind {plugin:?}: the agent acts only on CSI, local and hostPath PersistentVolumes (and emptyDir)"
            ),
        )),
        _ => Ok(()),
    }
}

/// Where to look for the volume root on the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expected {
    /// Under the kubelet root: this path, relative to it.
    Kubelet(PathBuf),
    /// On the host outside the kubelet root (hostPath PVs and volumes): this absolute path.
    Host(PathBuf),
}

/// The kubelet's own layout: `pods/<uid>/volumes/<plugin with / as ~>/<name>`, with the
/// PV's name (not the PVC's) for persistent volumes. `None` for a kind the agent does not
/// support (see [`check_supported`]).
pub fn expected_path(pod_uid: &str, name: &str, kind: &VolumeKind) -> Option<Expected> {
    let vols = Path::new("pods").join(pod_uid).join("volumes");
    Some(match kind {
        VolumeKind::Csi { .. } => Expected::Kubelet(vols.join("kubernetes.io~csi").join(name).join("mount")),
        VolumeKind::Local { .. } => Expected::Kubelet(vols.join("kubernetes.io~local-volume").join(name)),
        VolumeKind::EmptyDir => Expected::Kubelet(vols.join("kubernetes.io~empty-dir").join(name)),
        VolumeKind::HostPath { path } => Expected::Host(PathBuf::from(path)),
        VolumeKind::Other { .. } => return None,
    })
}

/// Host directories a hostPath PV must never be: the system's, the kubelet's and
/// kubeadm's etcd (a PV pointing there is a mistake or an attack, not a volume).
const SYSTEM_DIRS: &[&str] = &[
    "/",
    "/bin",
    "/boot",
    "/dev",
    "/etc",
    "/home",
    "/lib",
    "/opt",
    "/proc",
    "/root",
    "/run",
    "/sbin",
    "/srv",
    "/sys",
    "/tmp",
    "/usr",
    "/var",
    "/var/lib",
    "/var/lib/etcd",
    "/var/lib/kubelet",
    "/var/log",
];

pub fn check_host_path_pv(path: &Path) -> Result<()> {
    let normal: PathBuf = path.components().filter(|c| !matches!(c, Component::CurDir)).collect();
    if !normal.is_absolute() || normal.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(Error::new(Code::UnsafePath, format!("hostPath {} is not a clean absolute path", path.display())));
    }
    if SYSTEM_DIRS.iter().any(|d| Path::new(d) == normal) {
        return Err(Error::new(
            Code::UnsafePath,
            format!("hostPath {} is a system directory, not a volume's own directory", path.display()),
        ));
    }
    Ok(())
}

/// `path` (absolute on the host) as the agent reaches it under `host_root`.
pub fn under_host_root(host_root: &Path, path: &Path) -> PathBuf {
    host_root.join(path.strip_prefix("/").unwrap_or(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn container(mounts: serde_json::Value) -> Container {
        serde_json::from_value(json!({"name": "etcd", "volumeMounts": mounts})).unwrap()
    }

    #[test]
    fn longest_mount_prefix_wins_by_component() {
        let c = container(json!([
            {"name": "root", "mountPath": "/bitnami"},
            {"name": "data", "mountPath": "/bitnami/etcd"},
            {"name": "other", "mountPath": "/bitnami/etcd-other"},
        ]));
        let m = mount_for(&c, "/bitnami/etcd/data", &BTreeMap::new()).unwrap();
        assert_eq!((m.volume.as_str(), m.rel.as_path()), ("data", Path::new("data")));
        let m = mount_for(&c, "/bitnami/etcd-other", &BTreeMap::new()).unwrap();
        assert_eq!(m.volume, "other");
        assert_eq!(mount_for(&c, "/var/etcd", &BTreeMap::new()).unwrap_err().code, Code::DataDirNotFound);
    }

    #[test]
    fn sub_paths_are_expanded_and_checked() {
        let c = container(json!([{"name": "data", "mountPath": "/var/run/etcd", "subPathExpr": "$(POD)/etcd"}]));
        let env: BTreeMap<String, String> = [("POD".to_string(), "etcd-0".to_string())].into();
        let m = mount_for(&c, "/var/run/etcd/default.etcd", &env).unwrap();
        assert_eq!(m.sub_path.as_deref(), Some("etcd-0/etcd"));
        assert_eq!(mount_for(&c, "/var/run/etcd", &BTreeMap::new()).unwrap_err().code, Code::DataDirNotFound);
        for bad in ["../escape", "/abs", "a/../../b"] {
            let c = container(json!([{"name": "data", "mountPath": "/d", "subPath": bad}]));
            assert_eq!(mount_for(&c, "/d/x", &BTreeMap::new()).unwrap_err().code, Code::UnsafePath, "{bad}");
        }
        assert_eq!(mount_for(&c, "/d/../x", &BTreeMap::new()).unwrap_err().code, Code::UnsafePath);
    }

    fn pv(spec: serde_json::Value) -> PersistentVolume {
        serde_json::from_value(json!({"metadata": {"name": "pv-1"}, "spec": spec})).unwrap()
    }

    #[test]
    fn kinds_and_paths_per_volume_type() {
        let csi = pv_kind(&pv(json!({"csi": {"driver": "ebs.csi.aws.com", "volumeHandle": "vol-1"}})));
        assert_eq!(expected_path("u", "pv-1", &csi), Some(Expected::Kubelet("pods/u/volumes/kubernetes.io~csi/pv-1/mount".into())));
        let migrated = pv_kind(&pv(json!({"awsElasticBlockStore": {"volumeID": "vol-2"}})));
        assert_eq!(
            migrated,
            VolumeKind::Csi {
                driver: "ebs.csi.aws.com".into(),
                volume_handle: "vol-2".into(),
                migrated_from: Some("awsElasticBlockStore".into())
            }
        );
        let gce = pv_kind(&pv(json!({"gcePersistentDisk": {"pdName": "disk-1"}})));
        assert!(matches!(gce, VolumeKind::Csi { ref driver, .. } if driver == "pd.csi.storage.gke.io"));
        let local = pv_kind(&pv(json!({"local": {"path": "/mnt/disks/ssd1"}})));
        assert_eq!(expected_path("u", "pv-1", &local), Some(Expected::Kubelet("pods/u/volumes/kubernetes.io~local-volume/pv-1".into())));
        let hp = pv_kind(&pv(json!({"hostPath": {"path": "/var/local-path-provisioner/pvc-1_ns_data"}})));
        assert_eq!(expected_path("u", "pv-1", &hp), Some(Expected::Host("/var/local-path-provisioner/pvc-1_ns_data".into())));
        let nfs = pv_kind(&pv(json!({"nfs": {"server": "s", "path": "/x"}, "accessModes": ["ReadWriteMany"]})));
        assert_eq!(nfs, VolumeKind::Other { plugin: "nfs".into() });
        assert_eq!(expected_path("u", "pv-1", &nfs), None);
        assert_eq!(check_supported(&nfs, "data").unwrap_err().code, Code::UnsupportedProfile);
        assert!(check_supported(&csi, "data").is_ok() && check_supported(&local, "data").is_ok() && check_supported(&hp, "data").is_ok());
        assert_eq!(
            expected_path("u", "data", &VolumeKind::EmptyDir),
            Some(Expected::Kubelet("pods/u/volumes/kubernetes.io~empty-dir/data".into()))
        );
    }

    #[test]
    fn host_path_pvs_must_be_their_own_directories() {
        assert!(check_host_path_pv(Path::new("/var/local-path-provisioner/pvc-1_ns_data")).is_ok());
        for bad in ["/", "/var/lib/etcd", "/var/lib/kubelet/", "/etc", "relative/x", "/var/x/../lib"] {
            assert_eq!(check_host_path_pv(Path::new(bad)).unwrap_err().code, Code::UnsafePath, "{bad}");
        }
    }

    #[test]
    fn binding_must_be_mutual() {
        let pvc: k8s_openapi::api::core::v1::PersistentVolumeClaim = serde_json::from_value(
            json!({"metadata": {"name": "data-0", "namespace": "apisix", "uid": "c-1"}, "spec": {"volumeName": "pv-1"}}),
        )
        .unwrap();
        let pv_for = |ns: &str, name: &str, uid: &str, phase: &str| -> PersistentVolume {
            serde_json::from_value(json!({"metadata": {"name": "pv-1"},
                "spec": {"claimRef": {"namespace": ns, "name": name, "uid": uid}}, "status": {"phase": phase}}))
            .unwrap()
        };
        assert!(check_binding(&pvc, &pv_for("apisix", "data-0", "c-1", "Bound")).is_ok());
        assert_eq!(check_binding(&pvc, &pv_for("other", "data-0", "c-1", "Bound")).unwrap_err().code, Code::PVNotFound);
        assert_eq!(check_binding(&pvc, &pv_for("apisix", "data-0", "c-2", "Bound")).unwrap_err().code, Code::PVNotFound);
        assert_eq!(check_binding(&pvc, &pv_for("apisix", "data-0", "c-1", "Released")).unwrap_err().code, Code::PVNotFound);
        assert_eq!(check_binding(&pvc, &pv(json!({"csi": {"driver": "d", "volumeHandle": "h"}}))).unwrap_err().code, Code::PVNotFound);
    }

    #[test]
    fn host_paths_sit_under_the_host_root() {
        assert_eq!(under_host_root(Path::new("/host"), Path::new("/var/lib/kubelet")), PathBuf::from("/host/var/lib/kubelet"));
        assert_eq!(under_host_root(Path::new("/"), Path::new("/var/lib/kubelet")), PathBuf::from("/var/lib/kubelet"));
    }
}
