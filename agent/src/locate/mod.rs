//! From a pod name to the host path of its etcd data, proven before it is trusted: the pod
//! is on this node, the path is reached without links from the kubelet root (or is the PV's
//! own host path), it is a mount where the kubelet mounts, and it holds etcd member data.
//! The plan says which files a remediation would move. Nothing is changed.

pub mod container;
pub mod kubelet_root;
pub mod volume;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;

use crate::error::{Code, Error, Result};
use crate::host::volume::{Kind, Limits, Volume};
use crate::kubeapi::KubeApi;
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
    /// Where the kubelet writes containers' logs (`/var/log/pods` on the host).
    pub pod_log_root: PathBuf,
}

pub use etcd_medic_core::contract::{MoveItem, Plan, VolumeInfo};

pub struct Locator {
    pub api: KubeApi,
    pub layout: NodeLayout,
}

/// A plan with the volume root it was proven on: the descriptor every later action on the
/// volume goes through (see `crate::host::volume`).
pub struct Located {
    pub plan: Plan,
    pub volume: Arc<Volume>,
    /// The data dir, relative to the volume root.
    pub data: PathBuf,
}

impl Located {
    /// What the member's files say (see `crate::data`), the WAL read to `depth`.
    pub async fn facts(&self, depth: crate::data::Depth) -> Result<etcd_medic_core::data::DataFacts> {
        let (vol, data) = (self.volume.clone(), self.data.clone());
        blocking(move || crate::data::facts(&vol, &data, depth)).await
    }

    /// Whether the data dir holds a `member_id` file (Bitnami's start-up script keeps one):
    /// it decides the generation of a pod without other signs.
    pub async fn has_member_id(&self) -> Result<Option<bool>> {
        let (vol, id) = (self.volume.clone(), self.data.join("member_id"));
        blocking(move || Ok(vol.entry(&id)?.map(|e| e.kind == crate::host::volume::Kind::File))).await
    }
}

/// What `inspect` tells: the member's files and the diagnosis they confirm or correct.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Inspection {
    pub namespace: String,
    pub pod: String,
    pub host_path: PathBuf,
    pub data: etcd_medic_core::data::DataFacts,
    pub diagnosis: etcd_medic_core::signature::Diagnosis,
}

impl Inspection {
    pub fn render_table(&self) -> String {
        let mut s = format!("{:<14} {}/{}\n{:<14} {}\n", "pod", self.namespace, self.pod, "host path", self.host_path.display());
        s.push_str(&self.data.render_table());
        s.push_str(&etcd_medic_core::signature::render_table(&self.diagnosis));
        s
    }
}

impl Locator {
    /// Resolves and proves the plan for `namespace/name`; `expected_uid` guards against
    /// acting on a replacement pod.
    pub async fn locate(&self, namespace: &str, name: &str, expected_uid: Option<&str>) -> Result<Plan> {
        let mut plan = self.open(namespace, name, expected_uid, true).await?.plan;
        plan.diagnosis = Some(self.diagnose(namespace, name).await?);
        Ok(plan)
    }

    /// The plan and its proven volume. Without `require_data`, etcd data need not be in the
    /// data dir (for `restore` and retention, when the data is in quarantine).
    pub async fn open(&self, namespace: &str, name: &str, expected_uid: Option<&str>, require_data: bool) -> Result<Located> {
        self.resolve(namespace, name, expected_uid, require_data).await
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

    /// Why the pod's etcd fails, from its spec, its status and its container's log on this
    /// node; without the volume (a wiped or missing data dir does not hide the diagnosis).
    pub async fn diagnose(&self, namespace: &str, name: &str) -> Result<etcd_medic_core::signature::Diagnosis> {
        let pod = self.api.pod(namespace, name).await?;
        self.admit(&pod, None)?;
        self.diagnose_pod(pod, None).await
    }

    /// What the pod's member files say (read offline through the proven volume) and the
    /// diagnosis they confirm or correct: what the check decides from, changing nothing.
    pub async fn inspect(&self, namespace: &str, name: &str, depth: crate::data::Depth) -> Result<Inspection> {
        let located = self.open(namespace, name, None, false).await?;
        let pod = self.api.pod(namespace, name).await?;
        self.admit(&pod, Some(&located.plan.pod_uid))?;
        let facts = located.facts(depth).await?;
        let diagnosis = etcd_medic_core::data::reconsider(self.diagnose_pod(pod, located.has_member_id().await?).await?, &facts);
        Ok(Inspection { namespace: namespace.into(), pod: name.into(), host_path: located.plan.host_path, data: facts, diagnosis })
    }

    /// The diagnosis of a pod already read (and admitted); `has_member_id`: what its volume
    /// shows, where it was opened (it decides the generation of a pod without other signs).
    pub async fn diagnose_pod(&self, pod: Pod, has_member_id: Option<bool>) -> Result<etcd_medic_core::signature::Diagnosis> {
        let c = container::etcd_container(&pod, self.layout.container.as_deref())?.clone();
        let env = container::environment(&pod, &c);
        let generation = profile::detect(&pod, &c, &env, has_member_id);
        let log_root = self.layout.pod_log_root.clone();
        blocking(move || Ok(crate::diagnose::diagnose(&log_root, &pod, &c.name, &generation))).await
    }

    async fn resolve(&self, namespace: &str, name: &str, expected_uid: Option<&str>, require_data: bool) -> Result<Located> {
        let pod = self.api.pod(namespace, name).await?;
        let uid = self.admit(&pod, expected_uid)?;
        let c = container::etcd_container(&pod, self.layout.container.as_deref())?.clone();
        let env = container::environment(&pod, &c);
        let bitnami = profile::is_bitnami(&c, &env);
        let default_dir = if bitnami { Profile::Bitnami.default_data_dir() } else { None };
        let (data_dir, _) = container::data_dir(&pod, &c, default_dir)?;
        container::no_separate_wal(&c, &env, &data_dir)?;
        let mm = volume::mount_for(&c, &data_dir, &env)?;
        let (volume_name, claim, pv_name, kind) = self.volume_of(&pod, &mm.volume, namespace).await?;
        let pod_seen = pod.clone();

        // Everything below touches the node's disk and the tenant's tree: off the async
        // workers, so that a slow or hostile volume cannot stall the agent.
        let layout = self.layout.clone();
        let (namespace, name) = (namespace.to_string(), name.to_string());
        blocking(move || {
            let expected = volume::expected_path(&uid, &volume_name, &kind).ok_or_else(|| {
                Error::new(Code::UnsupportedProfile, format!("volume {volume_name:?} is of a kind the agent does not act on"))
            })?;
            let kubelet_root = match expected {
                Expected::Host(_) => None,
                _ => Some(
                    kubelet_root::discover(layout.kubelet_root.as_deref(), &layout.host_root, &layout.proc_root, &uid)
                        .ok_or_else(|| {
                            Error::new(
                                Code::DataDirNotFound,
                                format!("no kubelet root on this node holds pods/{uid}; pass --kubelet-root (KUBELET_ROOT_DIR)"),
                            )
                        })?
                        .path,
                ),
            };
            let vol = open_volume(&layout, &expected, kubelet_root.as_deref(), &kind)?;
            let data: PathBuf = mm.sub_path.as_deref().map(PathBuf::from).unwrap_or_default().join(&mm.rel);
            match vol.entry(&data)? {
                Some(e) if e.kind == Kind::Dir => {}
                Some(e) => {
                    return Err(Error::new(Code::UnsafePath, format!("{} is not a directory ({:?})", vol.shown(&data).display(), e.kind)));
                }
                None => return Err(Error::new(Code::DataDirNotFound, format!("{} does not exist", vol.shown(&data).display()))),
            }
            if require_data {
                check_etcd_data(&vol, &data)?;
            }
            let has_member_id = vol.entry(&data.join("member_id"))?.map(|e| e.kind == Kind::File);
            let generation = profile::detect(&pod_seen, &c, &env, has_member_id);
            let profile = generation.generation.profile();
            let moves = planned_moves(&vol, &data, profile)?;
            let plan = Plan {
                namespace,
                pod: name,
                pod_uid: uid,
                node: layout.node_name.clone(),
                container: c.name.clone(),
                profile,
                data_dir,
                host_path: vol.shown(&data),
                volume: VolumeInfo {
                    name: mm.volume,
                    claim,
                    persistent_volume: pv_name,
                    kind,
                    mount_path: mm.mount_path,
                    sub_path: mm.sub_path,
                    root: vol.path().to_path_buf(),
                },
                kubelet_root,
                bytes: moves.iter().map(|m| m.bytes).sum(),
                r#move: moves,
                cluster_id: None,
                members: Vec::new(),
                data: None,
                diagnosis: None,
            };
            Ok(Located { plan, volume: Arc::new(vol), data })
        })
        .await
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
            let kind = volume::pv_kind(&pv);
            volume::check_supported(&kind, vol)?;
            return Ok((pv_name.clone(), Some(claim), Some(pv_name), kind));
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
        volume::check_supported(&kind, vol)?;
        Ok((v.name.clone(), None, None, kind))
    }
}

/// Runs blocking disk work on tokio's blocking pool; a panic there is `Internal`.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| Err(Error::new(Code::Internal, format!("disk work failed: {e}"))))
}

/// Opens and proves the volume root where the kubelet (or the PV) puts it.
fn open_volume(layout: &NodeLayout, expected: &Expected, kubelet_root: Option<&Path>, kind: &VolumeKind) -> Result<Volume> {
    let no_root = || Error::new(Code::Internal, "kubelet root not resolved for a kubelet path");
    match expected {
        Expected::Host(p) => {
            // hostPath: the PV's own path on the host, reached from the host root without
            // links. It is not a mount point and need not be; but it must be a volume's
            // own directory, never a system one.
            volume::check_host_path_pv(p)?;
            Volume::open(&layout.host_root, p.strip_prefix("/").unwrap_or(p))
        }
        Expected::Kubelet(rel) => {
            let kr = kubelet_root.ok_or_else(no_root)?;
            let vol = Volume::open(kr, rel)?;
            if let VolumeKind::Csi { driver, volume_handle, migrated_from } = kind {
                let pv = rel.parent().and_then(Path::file_name).map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                kubelet_root::cross_check_vol_data(vol.path(), &pv, driver, volume_handle, migrated_from.is_some())?;
            }
            if !matches!(kind, VolumeKind::EmptyDir) {
                require_mount(&vol, &layout.proc_root)?;
            }
            Ok(vol)
        }
    }
}

/// The descriptor is the root of a mount: asked of the descriptor itself where the kernel
/// can say, else of the mount table of the agent's mount namespace.
fn require_mount(vol: &Volume, proc_root: &Path) -> Result<()> {
    let mounted = vol.is_mount_root().unwrap_or_else(|| crate::host::mounts::is_mount_point(proc_root, vol.path()));
    if mounted {
        Ok(())
    } else {
        Err(Error::new(
            Code::NotAMount,
            format!(
                "{} is not a mount point in the agent's view: the volume is not mounted (or the kubelet dir is not shared with mountPropagation: HostToContainer)",
                vol.path().display()
            ),
        ))
    }
}

/// An etcd member dir has `member/snap/db` or WAL files in `member/wal`.
/// Links are not followed anywhere below the data dir: a `member` that points at another
/// volume's member dir is `UnsafePath`, not a match.
pub fn check_etcd_data(vol: &Volume, data: &Path) -> Result<()> {
    let has_db = vol.entry(&data.join("member/snap/db"))?.is_some_and(|e| e.kind == Kind::File);
    let wal = data.join("member/wal");
    let has_wal = vol.entry(&wal)?.is_some_and(|e| e.kind == Kind::Dir)
        && vol.list(&wal, 100_000)?.iter().any(|(n, k)| *k == Kind::File && n.to_string_lossy().ends_with(".wal"));
    if has_db || has_wal {
        Ok(())
    } else {
        Err(Error::new(
            Code::NotEtcdData,
            format!("{} has neither member/snap/db nor member/wal/*.wal: not an etcd member's data", vol.shown(data).display()),
        ))
    }
}

/// The profile's files that exist, with sizes. A link among them is refused: moving it
/// would leave the data it points to behind, outside the volume.
fn planned_moves(vol: &Volume, data: &Path, profile: Profile) -> Result<Vec<MoveItem>> {
    let mut out = Vec::new();
    for rel in profile.files_to_move() {
        let p = data.join(rel);
        let Some(e) = vol.entry(&p)? else { continue };
        if e.kind == Kind::Symlink {
            return Err(Error::new(Code::UnsafePath, format!("{} is a symlink; the agent never moves links", vol.shown(&p).display())));
        }
        let (bytes, files) = vol.tree_size(&p, Limits::default())?;
        out.push(MoveItem { path: rel.to_string(), bytes, files });
    }
    Ok(out)
}
