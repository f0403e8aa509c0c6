//! A node's filesystem laid out as the kubelet lays it out, with real mounts when the lab
//! runs as root (CSI: a tmpfs staged under `plugins/` and bind-mounted into the pod; local
//! PV: a bind of the PV's path; subPath: a bind into `volume-subpaths/`), plain directories
//! otherwise. The volume follows the PVC from one pod UID to the next, as on a real node.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context, Result, bail};
use nix::mount::{MntFlags, MsFlags, mount, umount2};

/// Env var that turns real mounts off even as root (to run the non-root layout as root).
pub const NO_MOUNTS_ENV: &str = "ETCD_MEDIC_LAB_NO_MOUNTS";

/// Env var that makes a lab without real mounts an error (CI sets it: it runs as root, and
/// the mount checks must not silently turn into skips there).
pub const REQUIRE_MOUNTS_ENV: &str = "ETCD_MEDIC_LAB_REQUIRE_MOUNTS";

/// How a PersistentVolume reaches the node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VolumeSource {
    /// A CSI filesystem volume: `…/kubernetes.io~csi/<pv>/mount` with `vol_data.json`.
    Csi { driver: String, volume_handle: String },
    /// A local PV: `…/kubernetes.io~local-volume/<pv>`, a bind of `path` (a host path).
    Local { path: String },
    /// A hostPath PV (kind, k3d, local-path provisioner): nothing under `pods/`, the data is
    /// at `path` on the host.
    HostPath { path: String },
}

pub struct NodeTree {
    /// The host's `/` as the agent reaches it (its `--host-root`).
    pub root: PathBuf,
    /// `<root>/var/lib/kubelet` unless the distribution puts it elsewhere.
    pub kubelet_root: PathBuf,
    pub real_mounts: bool,
    mounts: Mutex<Vec<PathBuf>>,
}

pub fn running_as_root() -> bool {
    nix::unistd::geteuid().is_root()
}

impl NodeTree {
    /// A node rooted at `root` with the kubelet at `<root>/<kubelet_rel>`
    /// (`var/lib/kubelet`, `var/snap/microk8s/common/var/lib/kubelet`, …).
    pub fn new(root: &Path, kubelet_rel: &str) -> Result<Self> {
        let kubelet_root = root.join(kubelet_rel);
        std::fs::create_dir_all(kubelet_root.join("pods"))?;
        let real_mounts = running_as_root() && std::env::var_os(NO_MOUNTS_ENV).is_none();
        if !real_mounts && std::env::var_os(REQUIRE_MOUNTS_ENV).is_some() {
            bail!("{REQUIRE_MOUNTS_ENV} is set but the lab cannot mount (not root, or {NO_MOUNTS_ENV} set)");
        }
        Ok(NodeTree { root: root.to_path_buf(), kubelet_root, real_mounts, mounts: Mutex::new(Vec::new()) })
    }

    pub fn host(&self, host_path: &str) -> PathBuf {
        self.root.join(host_path.trim_start_matches('/'))
    }

    /// Where the kubelet writes containers' logs (`/var/log/pods`).
    pub fn pod_log_root(&self) -> PathBuf {
        self.host("/var/log/pods")
    }

    /// The log file of one start of a container, as the kubelet names it:
    /// `<namespace>_<pod>_<uid>/<container>/<restart count>.log`.
    pub fn container_log_file(&self, namespace: &str, pod: &str, uid: &str, container: &str, restarts: u32) -> PathBuf {
        self.pod_log_root().join(format!("{namespace}_{pod}_{uid}")).join(container).join(format!("{restarts}.log"))
    }

    pub fn pod_dir(&self, uid: &str) -> PathBuf {
        self.kubelet_root.join("pods").join(uid)
    }

    /// Where the kubelet exposes `pv` to pod `uid`: the path the agent must find.
    pub fn volume_path(&self, uid: &str, pv: &str, source: &VolumeSource) -> PathBuf {
        let vols = self.pod_dir(uid).join("volumes");
        match source {
            VolumeSource::Csi { .. } => vols.join("kubernetes.io~csi").join(pv).join("mount"),
            VolumeSource::Local { .. } => vols.join("kubernetes.io~local-volume").join(pv),
            VolumeSource::HostPath { path } => self.host(path),
        }
    }

    /// Where the data lives between pods: the CSI staging mount, the local PV's path, or the
    /// hostPath itself.
    pub fn backing_path(&self, pv: &str, source: &VolumeSource) -> PathBuf {
        match source {
            VolumeSource::Csi { driver, volume_handle } => {
                self.kubelet_root.join("plugins/kubernetes.io/csi").join(driver).join(volume_handle.replace('/', "~")).join("globalmount")
            }
            VolumeSource::Local { path } | VolumeSource::HostPath { path } => {
                let _ = pv;
                self.host(path)
            }
        }
    }

    fn do_mount(&self, src: Option<&Path>, target: &Path, fstype: Option<&str>, flags: MsFlags) -> Result<()> {
        mount(src, target, fstype, flags, None::<&str>).with_context(|| format!("mount {:?} on {}", src, target.display()))?;
        self.mounts.lock().unwrap().push(target.to_path_buf());
        Ok(())
    }

    fn unmount(&self, target: &Path) -> Result<()> {
        let mut mounts = self.mounts.lock().unwrap();
        if let Some(i) = mounts.iter().rposition(|m| m == target) {
            umount2(target, MntFlags::MNT_DETACH).with_context(|| format!("umount {}", target.display()))?;
            mounts.remove(i);
        }
        Ok(())
    }

    /// Sets `pv` up for pod `uid` as the kubelet's MountVolume does; returns the volume path.
    pub fn attach(&self, uid: &str, pv: &str, node_name: &str, source: &VolumeSource) -> Result<PathBuf> {
        let backing = self.backing_path(pv, source);
        let target = self.volume_path(uid, pv, source);
        std::fs::create_dir_all(self.pod_dir(uid).join("volumes"))?;
        match source {
            VolumeSource::HostPath { .. } => {
                std::fs::create_dir_all(&target)?;
            }
            VolumeSource::Csi { driver, volume_handle } => {
                std::fs::create_dir_all(&target)?;
                let vol_data = serde_json::json!({
                    "attachmentID": format!("csi-{}", uuid::Uuid::new_v4().simple()),
                    "driverName": driver, "nodeName": node_name, "specVolID": pv,
                    "volumeHandle": volume_handle, "volumeLifecycleMode": "Persistent",
                });
                std::fs::write(target.parent().unwrap().join("vol_data.json"), vol_data.to_string())?;
                let staged = backing.exists();
                std::fs::create_dir_all(&backing)?;
                if self.real_mounts {
                    // The device stays staged across pods (NodeStageVolume), each pod gets a bind.
                    if !staged || !self.mounts.lock().unwrap().contains(&backing) {
                        self.do_mount(Some(Path::new("tmpfs")), &backing, Some("tmpfs"), MsFlags::empty())?;
                    }
                    self.do_mount(Some(&backing), &target, None, MsFlags::MS_BIND)?;
                } else {
                    move_contents(&backing, &target)?;
                }
            }
            VolumeSource::Local { .. } => {
                std::fs::create_dir_all(&backing)?;
                std::fs::create_dir_all(&target)?;
                if self.real_mounts {
                    self.do_mount(Some(&backing), &target, None, MsFlags::MS_BIND)?;
                } else {
                    move_contents(&backing, &target)?;
                }
            }
        }
        Ok(target)
    }

    /// Unsets `pv` for pod `uid` (UnmountVolume) and removes the pod's directory entries.
    pub fn detach(&self, uid: &str, pv: &str, source: &VolumeSource) -> Result<()> {
        let target = self.volume_path(uid, pv, source);
        match source {
            VolumeSource::HostPath { .. } => {}
            VolumeSource::Csi { .. } | VolumeSource::Local { .. } => {
                if self.real_mounts {
                    self.unmount(&target)?;
                } else if target.exists() {
                    move_contents(&target, &self.backing_path(pv, source))?;
                }
            }
        }
        Ok(())
    }

    /// A subPath mount as the kubelet makes it:
    /// `<pod>/volume-subpaths/<pv>/<container>/<index>` bound to `<volume>/<sub>`.
    pub fn subpath(&self, uid: &str, pv: &str, source: &VolumeSource, container: &str, index: usize, sub: &str) -> Result<PathBuf> {
        if Path::new(sub).components().any(|c| !matches!(c, std::path::Component::Normal(_))) {
            bail!("subPath {sub:?} must be a relative path without '..'");
        }
        let src = self.volume_path(uid, pv, source).join(sub);
        std::fs::create_dir_all(&src)?;
        let target = self.pod_dir(uid).join("volume-subpaths").join(pv).join(container).join(index.to_string());
        std::fs::create_dir_all(&target)?;
        if self.real_mounts {
            self.do_mount(Some(&src), &target, None, MsFlags::MS_BIND)?;
        }
        Ok(target)
    }

    /// Removes everything of pod `uid` (after its volumes were detached).
    pub fn remove_pod(&self, uid: &str) -> Result<()> {
        let dir = self.pod_dir(uid);
        let inside: Vec<PathBuf> = self.mounts.lock().unwrap().iter().filter(|m| m.starts_with(&dir)).cloned().collect();
        for m in inside.iter().rev() {
            self.unmount(m)?;
        }
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("remove {}", dir.display()))?;
        }
        Ok(())
    }

    /// Mounts the lab made that are still in place.
    pub fn active_mounts(&self) -> Vec<PathBuf> {
        self.mounts.lock().unwrap().clone()
    }
}

impl NodeTree {
    /// Unmounts everything the lab mounted, newest first. Idempotent.
    pub fn teardown(&self) {
        let mounts = std::mem::take(&mut *self.mounts.lock().unwrap());
        for m in mounts.iter().rev() {
            let _ = umount2(m, MntFlags::MNT_DETACH);
        }
    }
}

impl Drop for NodeTree {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Without mounts, a volume "moves" between pod UIDs by renaming its entries.
fn move_contents(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    if !from.exists() {
        return Ok(());
    }
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        std::fs::rename(entry.path(), to.join(entry.file_name()))?;
    }
    Ok(())
}

/// Is `path` a mount point per this process's mount table? The agent's own reading of the
/// table (a bind on the same filesystem cannot be told apart by `st_dev`), not a second one.
pub fn is_mount_point(path: &Path) -> bool {
    etcd_medic::host::mounts::is_mount_point(Path::new("/proc"), path)
}
