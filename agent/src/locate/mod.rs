//! From a pod name to the host path of its etcd data, proven before it is trusted: the pod
//! is on this node, the path is reached without links from the kubelet root (or is the PV's
//! own host path), it is a mount where the kubelet mounts, and it holds etcd member data.
//! The plan says which files a remediation would move. Nothing is changed.

pub mod container;
pub mod kubelet_root;
pub mod volume;

use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Pod;
use serde::{Deserialize, Serialize};

use crate::error::{Code, Error, Result};
use crate::kubeapi::KubeApi;
use crate::pathsafe::{check_dir_beneath, entry_beneath, is_mount_point};
use crate::profile::{self, Profile};
use volume::{Expected, VolumeKind};

/// Where this node's things are.
#[derive(Clone, Debug)]
pub struct NodeLayout {
    pub node_name: String,
    /// The host's `/` as the agent reaches it.
    pub host_root: PathBuf,
    /// The kubelet root on the host, when given; discovered otherwise.
    pub kubelet_root: Option<PathBuf>,
    /// The host's `/proc` (the agent runs with `hostPID`), to read the kubelet's flags.
    pub proc_root: PathBuf,
    /// The etcd container's name, when it is neither `etcd` nor recognisable.
    pub container: Option<String>,
}

/// The volume that holds the data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct VolumeInfo {
    /// The pod's volume name.
    pub name: String,
    pub claim: Option<String>,
    pub persistent_volume: Option<String>,
    pub kind: VolumeKind,
    pub mount_path: String,
    pub sub_path: Option<String>,
    /// The volume's root on the host, as the agent reaches it.
    #[schema(value_type = String)]
    pub root: PathBuf,
}

/// One entry a remediation would move.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MoveItem {
    /// Relative to the data dir.
    pub path: String,
    pub bytes: u64,
    pub files: u64,
}

/// The resolved plan: where the data is and what would move.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Plan {
    pub namespace: String,
    pub pod: String,
    #[serde(rename = "podUID")]
    pub pod_uid: String,
    pub node: String,
    pub container: String,
    pub profile: Profile,
    /// The data dir as the container sees it.
    pub data_dir: String,
    /// The data dir on the host, as the agent reaches it.
    #[schema(value_type = String)]
    pub host_path: PathBuf,
    pub volume: VolumeInfo,
    #[schema(value_type = Option<String>)]
    pub kubelet_root: Option<PathBuf>,
    pub r#move: Vec<MoveItem>,
    pub bytes: u64,
}

pub struct Locator {
    pub api: KubeApi,
    pub layout: NodeLayout,
}

impl Locator {
    /// Resolves and proves the plan for `namespace/name`; `expected_uid` guards against
    /// acting on a replacement pod.
    pub async fn locate(&self, namespace: &str, name: &str, expected_uid: Option<&str>) -> Result<Plan> {
        self.resolve(namespace, name, expected_uid, true).await
    }

    /// The same resolution without requiring etcd data in the data dir (for `restore`, when
    /// the data is in quarantine and the member has not rejoined).
    pub async fn locate_volume(&self, namespace: &str, name: &str) -> Result<Plan> {
        self.resolve(namespace, name, None, false).await
    }

    /// The pod is the one asked for (`expected_uid`) and runs on this node; returns its UID.
    pub fn admit(&self, pod: &Pod, expected_uid: Option<&str>) -> Result<String> {
        let (namespace, name) = (pod.metadata.namespace.as_deref().unwrap_or_default(), pod.metadata.name.as_deref().unwrap_or_default());
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        if let Some(want) = expected_uid
            && want != uid
        {
            return Err(Error::new(Code::PodUIDMismatch, format!("pod {namespace}/{name} has UID {uid}, not {want}: it was replaced")));
        }
        let node = pod.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default();
        if node != self.layout.node_name {
            let detail = if node.is_empty() {
                format!("pod {namespace}/{name} is not scheduled to any node yet")
            } else {
                format!("pod {namespace}/{name} runs on node {node}, not on {}; ask the agent on {node}", self.layout.node_name)
            };
            return Err(Error::new(Code::WrongNode, detail));
        }
        Ok(uid)
    }

    async fn resolve(&self, namespace: &str, name: &str, expected_uid: Option<&str>, require_data: bool) -> Result<Plan> {
        let pod = self.api.pod(namespace, name).await?;
        let uid = self.admit(&pod, expected_uid)?;
        let c = container::etcd_container(&pod, self.layout.container.as_deref())?;
        let env = container::environment(&pod, c);
        let bitnami = profile::is_bitnami(c, &env);
        let default_dir = if bitnami { Profile::Bitnami.default_data_dir() } else { None };
        let (data_dir, _) = container::data_dir(&pod, c, default_dir)?;
        container::no_separate_wal(c, &env, &data_dir)?;
        let mm = volume::mount_for(c, &data_dir, &env)?;
        let (volume_name, claim, pv_name, kind) = self.volume_of(&pod, &mm.volume, namespace).await?;

        let expected = volume::expected_path(&uid, &volume_name, &kind);
        let kubelet_root = match expected {
            Expected::Host(_) => None,
            _ => Some(
                kubelet_root::discover(self.layout.kubelet_root.as_deref(), &self.layout.host_root, &self.layout.proc_root, &uid)
                    .ok_or_else(|| {
                        Error::new(
                            Code::DataDirNotFound,
                            format!("no kubelet root on this node holds pods/{uid}; pass --kubelet-root (KUBELET_ROOT_DIR)"),
                        )
                    })?
                    .path,
            ),
        };
        let root = self.volume_root(&expected, kubelet_root.as_deref(), &kind, &uid)?;
        let rel = mm.sub_path.as_deref().map(PathBuf::from).unwrap_or_default().join(&mm.rel);
        let host_path = check_dir_beneath(&root, &rel)?;
        if require_data {
            check_etcd_data(&host_path)?;
        }
        let profile = if bitnami { profile::detect(c, &env, pod.metadata.labels.as_ref(), Some(&host_path)) } else { Profile::Plain };
        let moves = planned_moves(&host_path, profile)?;
        Ok(Plan {
            namespace: namespace.to_string(),
            pod: name.to_string(),
            pod_uid: uid,
            node: self.layout.node_name.clone(),
            container: c.name.clone(),
            profile,
            data_dir,
            host_path,
            volume: VolumeInfo {
                name: mm.volume,
                claim,
                persistent_volume: pv_name,
                kind,
                mount_path: mm.mount_path,
                sub_path: mm.sub_path,
                root,
            },
            kubelet_root,
            bytes: moves.iter().map(|m| m.bytes).sum(),
            r#move: moves,
        })
    }

    /// (name under the kubelet's volumes dir, claim, PV, kind) of the pod volume `vol`.
    async fn volume_of(&self, pod: &Pod, vol: &str, namespace: &str) -> Result<(String, Option<String>, Option<String>, VolumeKind)> {
        let v = pod
            .spec
            .as_ref()
            .and_then(|s| s.volumes.as_ref())
            .and_then(|vs| vs.iter().find(|v| v.name == vol))
            .ok_or_else(|| Error::new(Code::DataDirNotFound, format!("the pod mounts volume {vol:?} but defines no such volume")))?;
        if let Some(claim) = volume::claim_name(pod, v) {
            let pvc = self.api.pvc(namespace, &claim).await?;
            let bound = pvc.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound");
            let pv_name = pvc.spec.as_ref().and_then(|s| s.volume_name.clone()).filter(|n| !n.is_empty() && bound).ok_or_else(|| {
                Error::new(Code::PVNotFound, format!("PersistentVolumeClaim {namespace}/{claim} is not bound to a PersistentVolume"))
            })?;
            let pv = self.api.pv(&pv_name).await?;
            volume::check_binding(&pvc, &pv)?;
            return Ok((pv_name.clone(), Some(claim), Some(pv_name), volume::pv_kind(&pv)));
        }
        if v.host_path.is_some() {
            // An inline hostPath (a kubeadm static etcd, say) is the node's own data, not a
            // claim the agent may move: only volumes bound through a PVC are acted on.
            return Err(Error::new(
                Code::UnsafePath,
                format!("volume {vol:?} is an inline hostPath; the agent acts only on PersistentVolumeClaims (and emptyDir)"),
            ));
        }
        let kind = volume::inline_kind(v).unwrap_or_else(|| {
            let plugin = serde_json::to_value(v).ok().and_then(|j| j.as_object().and_then(|o| o.keys().find(|k| *k != "name").cloned()));
            VolumeKind::Other { plugin: plugin.unwrap_or_default() }
        });
        Ok((v.name.clone(), None, None, kind))
    }

    fn volume_root(&self, expected: &Expected, kubelet_root: Option<&Path>, kind: &VolumeKind, uid: &str) -> Result<PathBuf> {
        match expected {
            Expected::Host(p) => {
                // hostPath: the PV's own path on the host, reached from the host root without
                // links. It is not a mount point and need not be; but it must be a volume's
                // own directory, never a system one.
                volume::check_host_path_pv(p)?;
                check_dir_beneath(&self.layout.host_root, p.strip_prefix("/").unwrap_or(p))
            }
            Expected::Kubelet(rel) => {
                let kr = kubelet_root.expect("kubelet root resolved for kubelet paths");
                let path = check_dir_beneath(kr, rel)?;
                if let VolumeKind::Csi { driver, volume_handle, migrated_from } = kind {
                    let pv = rel.parent().and_then(Path::file_name).map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                    cross_check_vol_data(&path, &pv, driver, volume_handle, migrated_from.is_some())?;
                }
                if !matches!(kind, VolumeKind::EmptyDir) {
                    require_mount(&path)?;
                }
                Ok(path)
            }
            Expected::Search { name } => {
                let kr = kubelet_root.expect("kubelet root resolved for kubelet paths");
                let vols = Path::new("pods").join(uid).join("volumes");
                let base = check_dir_beneath(kr, &vols)?;
                let mut found = Vec::new();
                for plugin in
                    std::fs::read_dir(&base).map_err(|e| Error::new(Code::DataDirNotFound, format!("{}: {e}", base.display())))?.flatten()
                {
                    let candidate = plugin.path().join(name);
                    if candidate.symlink_metadata().is_ok() {
                        found.push(vols.join(plugin.file_name()).join(name));
                    }
                }
                match found.as_slice() {
                    [one] => {
                        let path = check_dir_beneath(kr, one)?;
                        require_mount(&path)?;
                        Ok(path)
                    }
                    [] => Err(Error::new(
                        Code::DataDirNotFound,
                        format!("no directory {name:?} under {} (is the pod being deleted?)", base.display()),
                    )),
                    many => Err(Error::new(
                        Code::UnsafePath,
                        format!(
                            "{} directories named {name:?} under {}: {}; the agent acts only on an exact match",
                            many.len(),
                            base.display(),
                            many.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
                        ),
                    )),
                }
            }
        }
    }
}

fn require_mount(path: &Path) -> Result<()> {
    if is_mount_point(path) {
        Ok(())
    } else {
        Err(Error::new(
            Code::NotAMount,
            format!(
                "{} is not a mount point in the agent's view: the volume is not mounted (or the kubelet dir is not shared with mountPropagation: HostToContainer)",
                path.display()
            ),
        ))
    }
}

/// `vol_data.json` beside a CSI `mount` names the driver and handle the kubelet mounted.
/// The kubelet writes it for every CSI volume; its absence means this is not the kubelet's
/// mount of that volume. Migrated in-tree volumes carry a translated handle, so only the
/// driver and the PV name are compared for them.
fn cross_check_vol_data(mount: &Path, pv: &str, driver: &str, handle: &str, migrated: bool) -> Result<()> {
    let dir = mount.parent().unwrap_or(mount);
    let file = dir.join("vol_data.json");
    let text = std::fs::read_to_string(&file).map_err(|e| {
        Error::new(Code::UnsafePath, format!("{} cannot be read ({e}): not the kubelet's CSI mount of {pv}", file.display()))
    })?;
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    let field = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or_default().to_string();
    if field("driverName") != driver || field("specVolID") != pv || (!migrated && field("volumeHandle") != handle) {
        return Err(Error::new(
            Code::UnsafePath,
            format!(
                "{} names volume {:?}, driver {:?} and handle {:?}, but the PersistentVolume is {pv:?} with {driver:?} and {handle:?}",
                file.display(),
                field("specVolID"),
                field("driverName"),
                field("volumeHandle")
            ),
        ));
    }
    Ok(())
}

/// An etcd member dir has `member/snap/db` or WAL files in `member/wal`.
/// Links are not followed anywhere below the data dir: a `member` that points at another
/// volume's member dir is `UnsafePath`, not a match.
fn check_etcd_data(data: &Path) -> Result<()> {
    let has_db = entry_beneath(data, Path::new("member/snap/db"))?.is_some_and(|m| m.file_type().is_file());
    let has_wal = entry_beneath(data, Path::new("member/wal"))?.is_some_and(|m| m.file_type().is_dir())
        && std::fs::read_dir(data.join("member/wal"))
            .map(|d| d.flatten().any(|e| e.file_name().to_string_lossy().ends_with(".wal")))
            .unwrap_or(false);
    if has_db || has_wal {
        Ok(())
    } else {
        Err(Error::new(
            Code::NotEtcdData,
            format!("{} has neither member/snap/db nor member/wal/*.wal: not an etcd member's data", data.display()),
        ))
    }
}

/// The profile's files that exist, with sizes. A link among them is refused: moving it
/// would leave the data it points to behind, outside the volume.
fn planned_moves(data: &Path, profile: Profile) -> Result<Vec<MoveItem>> {
    let mut out = Vec::new();
    for rel in profile.files_to_move() {
        let p = data.join(rel);
        let Some(meta) = entry_beneath(data, Path::new(rel))? else { continue };
        if meta.file_type().is_symlink() {
            return Err(Error::new(Code::UnsafePath, format!("{} is a symlink; the agent never moves links", p.display())));
        }
        let (mut bytes, mut files) = (0, 0);
        for e in walkdir::WalkDir::new(&p).follow_links(false) {
            let e = e.map_err(|e| Error::new(Code::UnsafePath, format!("cannot read {}: {e}", p.display())))?;
            if e.file_type().is_file() {
                bytes += e.metadata().map(|m| m.len()).unwrap_or(0);
                files += 1;
            }
        }
        out.push(MoveItem { path: rel.to_string(), bytes, files });
    }
    Ok(out)
}

impl Plan {
    /// A table for a person on the node.
    pub fn render_table(&self) -> String {
        let mut s = String::new();
        let mut row = |k: &str, v: String| s.push_str(&format!("{k:<14} {v}\n"));
        row("pod", format!("{}/{} (uid {})", self.namespace, self.pod, self.pod_uid));
        row("node", self.node.clone());
        row("container", self.container.clone());
        row("profile", self.profile.as_str().to_string());
        row("data dir", self.data_dir.clone());
        row("host path", self.host_path.display().to_string());
        let v = &self.volume;
        let kind = serde_json::to_value(&v.kind).ok().and_then(|k| k["type"].as_str().map(String::from)).unwrap_or_default();
        row(
            "volume",
            format!(
                "{} ({kind}) mounted at {}{}",
                v.name,
                v.mount_path,
                v.sub_path.as_deref().map(|s| format!(" subPath {s}")).unwrap_or_default()
            ),
        );
        if let (Some(c), Some(pv)) = (&v.claim, &v.persistent_volume) {
            row("claim", format!("{c} -> {pv}"));
        }
        row("volume root", v.root.display().to_string());
        if let Some(k) = &self.kubelet_root {
            row("kubelet root", k.display().to_string());
        }
        s.push_str("would move:\n");
        for m in &self.r#move {
            s.push_str(&format!("  {:<18} {:>12} bytes {:>6} files\n", m.path, m.bytes, m.files));
        }
        s.push_str(&format!("  {:<18} {:>12} bytes\n", "total", self.bytes));
        s
    }
}
