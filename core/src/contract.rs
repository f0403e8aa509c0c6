//! The types of the contract (DESIGN.md): what the agent answers, journals and reports, and
//! what a controller, the kubectl plugin or a person reads back. Their JSON is the API's.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::Code;
use crate::profile::Profile;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub enum Phase {
    Planned,
    Pending,
    Running,
    Succeeded,
    Failed,
    Refused,
}

impl Phase {
    /// A remediation in this phase will not change any more.
    pub fn is_final(self) -> bool {
        matches!(self, Phase::Planned | Phase::Succeeded | Phase::Failed | Phase::Refused)
    }
}

/// The engine's steps, in the order a remediation takes them (`Resume` stands for `Check`
/// when a remediation is finished from its journal).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema)]
pub enum Step {
    Check,
    Resume,
    Lock,
    Quarantine,
    Membership,
    Restart,
    Verify,
    Retention,
}

impl Step {
    pub const ALL: [Step; 8] =
        [Step::Check, Step::Resume, Step::Lock, Step::Quarantine, Step::Membership, Step::Restart, Step::Verify, Step::Retention];

    pub fn as_str(self) -> &'static str {
        match self {
            Step::Check => "Check",
            Step::Resume => "Resume",
            Step::Lock => "Lock",
            Step::Quarantine => "Quarantine",
            Step::Membership => "Membership",
            Step::Restart => "Restart",
            Step::Verify => "Verify",
            Step::Retention => "Retention",
        }
    }

    /// The first step that changes the member's data: from it on, a stop leaves a
    /// remediation to be resumed, never forgotten.
    pub fn changes_data(self) -> bool {
        matches!(self, Step::Quarantine | Step::Membership | Step::Restart)
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for Step {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// How a step ended: `Done`, or the code of the error that ended it. Written as one string.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum Outcome {
    Done,
    Failed(Code),
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Done => "Done",
            Outcome::Failed(c) => c.as_str(),
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<Outcome> for String {
    fn from(o: Outcome) -> String {
        o.as_str().to_string()
    }
}

impl TryFrom<String> for Outcome {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if s == "Done" {
            return Ok(Outcome::Done);
        }
        Code::ALL.iter().find(|c| c.as_str() == s).map(|c| Outcome::Failed(*c)).ok_or_else(|| format!("{s:?} is no step outcome"))
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StepRecord {
    pub name: Step,
    pub start: String,
    pub end: Option<String>,
    /// `Done`, or the code of the error that ended the step.
    #[schema(value_type = Option<String>, example = "Done")]
    pub outcome: Option<Outcome>,
    pub message: String,
}

impl StepRecord {
    pub fn done(&self) -> bool {
        self.outcome == Some(Outcome::Done)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorRecord {
    pub code: Code,
    pub message: String,
}

/// The Remediation object of the contract.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Remediation {
    pub id: String,
    pub namespace: String,
    pub pod: String,
    #[serde(rename = "podUID")]
    pub pod_uid: Option<String>,
    pub node: String,
    pub phase: Phase,
    pub step: Option<Step>,
    /// Why the member fails, as read before any other gate: present on a refusal too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diagnosis: Option<crate::signature::Diagnosis>,
    pub plan: Option<Plan>,
    #[schema(value_type = Option<String>)]
    pub quarantine_path: Option<PathBuf>,
    pub steps: Vec<StepRecord>,
    pub error: Option<ErrorRecord>,
    pub created_at: String,
    pub finished_at: Option<String>,
    /// Why the caller asked (free text from the request), for people reading it later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The etcd endpoints the caller gave instead of discovery (kept for a resume).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub etcd_endpoints: Vec<String>,
    /// A dry run: it checks, never acts, and never stands in for a real remediation.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
    /// The quarantine this remediation made on the pod's volume, as the agent named it
    /// before moving anything: resume, restore and retention act on this record, never on
    /// what they find on the volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quarantine: Option<QuarantineRecord>,
}

/// Where a remediation put the member's files, recorded in the node's journal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct QuarantineRecord {
    /// `<timestamp>-<id>` under `.etcd-medic/quarantine/` on the volume.
    pub name: String,
    /// What was moved, relative to the data dir.
    pub items: Vec<String>,
    /// The stale member id (hex) the member had: the entry a resume may still remove.
    pub member_id: Option<String>,
    pub state: QuarantineState,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub enum QuarantineState {
    /// Named in the journal; items are being moved.
    Moving,
    Quarantined,
    Restored,
    /// Removed by retention after a later remediation of the member succeeded.
    Pruned,
}

impl Remediation {
    /// A new remediation, `Pending` until the engine runs it.
    pub fn new(node: &str, namespace: &str, pod: &str, pod_uid: Option<&str>) -> Self {
        Remediation {
            id: uuid::Uuid::new_v4().simple().to_string()[..12].to_string(),
            namespace: namespace.into(),
            pod: pod.into(),
            pod_uid: pod_uid.map(String::from),
            node: node.into(),
            phase: Phase::Pending,
            step: None,
            diagnosis: None,
            plan: None,
            quarantine_path: None,
            steps: Vec::new(),
            error: None,
            created_at: now(),
            finished_at: None,
            reason: None,
            etcd_endpoints: Vec::new(),
            dry_run: false,
            quarantine: None,
        }
    }

    /// Whether `step` ran to its end ("Done") in this remediation.
    pub fn step_done(&self, step: Step) -> bool {
        self.steps.iter().any(|s| s.name == step && s.done())
    }

    /// How often this remediation was resumed.
    pub fn resumes(&self) -> usize {
        self.steps.iter().filter(|s| s.name == Step::Resume).count()
    }

    /// The stale member id its quarantine recorded (the one entry a resume may remove).
    pub fn recorded_member_id(&self) -> Option<u64> {
        self.quarantine.as_ref().and_then(|q| q.member_id.as_deref()).and_then(|id| u64::from_str_radix(id, 16).ok())
    }
}

/// Now, as the contract writes times (RFC 3339, UTC).
pub fn now() -> String {
    jiff::Timestamp::now().to_string()
}

/// `GET /v1/remediations`.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RemediationList {
    /// Newest first.
    pub items: Vec<Remediation>,
}

/// How the volume reaches the node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", tag = "type")]
pub enum VolumeKind {
    /// CSI filesystem volume (also in-tree plugins migrated to CSI).
    Csi { driver: String, volume_handle: String, migrated_from: Option<String> },
    /// Local PV: a bind of `path` at `…/kubernetes.io~local-volume/<pv>`.
    Local { path: String },
    /// hostPath (PV or inline): the data is at `path` on the host.
    HostPath { path: String },
    /// emptyDir: `…/kubernetes.io~empty-dir/<volume>`.
    EmptyDir,
    /// Anything else: found by a search under the pod's volumes dir.
    Other { plugin: String },
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
    /// Why the member fails, read before anything is done (absent for restore and retention).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diagnosis: Option<crate::signature::Diagnosis>,
    /// The etcd cluster's id (hex) as the pod's sibling members answered it, once the check
    /// got that far (a refusal before etcd is asked has none).
    #[serde(rename = "clusterID", default, skip_serializing_if = "Option::is_none")]
    pub cluster_id: Option<String>,
    /// The cluster's member list as the check saw it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<PlanMember>,
    /// What the member's own files say, read offline before anything moves (its WAL's ids,
    /// term, commit and index range, its db's revision and consistent index, and whether
    /// their checksums hold): what the check decided from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<crate::data::DataFacts>,
}

/// One etcd member as the check saw it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlanMember {
    /// The member id, in hex as etcdctl prints it.
    pub id: String,
    /// Empty for a member added but never started.
    pub name: String,
    #[serde(rename = "peerURLs")]
    pub peer_urls: Vec<String>,
    #[serde(rename = "clientURLs")]
    pub client_urls: Vec<String>,
    pub is_learner: bool,
    /// Answered, raised no alarm and follows the agreed leader.
    pub healthy: bool,
    /// The entry the failing pod stands for (its peer URL): the one a heal replaces.
    pub stale: bool,
}

impl PlanMember {
    pub fn of(m: &crate::member::Member, stale: Option<u64>) -> Self {
        PlanMember {
            id: format!("{:x}", m.id),
            name: m.name.clone(),
            peer_urls: m.peer_urls.clone(),
            client_urls: m.client_urls.clone(),
            is_learner: m.is_learner,
            healthy: m.healthy,
            stale: stale == Some(m.id),
        }
    }
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
        if let Some(d) = &self.diagnosis {
            s.push_str(&crate::signature::render_table(d));
        }
        if let Some(d) = &self.data {
            s.push_str(&d.render_table());
        }
        s
    }
}
