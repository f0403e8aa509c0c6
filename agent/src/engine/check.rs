//! Step Check (every gate, before anything changes) and its counterpart for a resume.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use super::{Engine, Remediation, Step};
use crate::error::{Code, Error, Result};
use crate::etcd::Target;
use crate::host::processes as guard;
use crate::host::volume::Volume;
use crate::locate::{Located, Plan, blocking, container};
use crate::profile::Profile;
use crate::scope::SetScope;
use etcd_medic_core::contract::PlanMember;
use etcd_medic_core::data;
use etcd_medic_core::member::{Basis, check_replacing, stale_member};
use etcd_medic_core::signature::Diagnosis;

/// What the first gates found, kept for the record even when a later gate refuses.
#[derive(Default)]
pub struct Found {
    pub diagnosis: Option<Diagnosis>,
    pub plan: Option<Plan>,
}

fn lock(found: &Mutex<Found>) -> std::sync::MutexGuard<'_, Found> {
    found.lock().unwrap_or_else(|e| e.into_inner())
}

/// The diagnosis as the plan's and the record's, kept as soon as it is known.
fn keep(found: &Mutex<Found>, plan: &mut Plan, diagnosis: &Diagnosis) {
    plan.diagnosis = Some(diagnosis.clone());
    let mut f = lock(found);
    (f.diagnosis, f.plan) = (Some(diagnosis.clone()), Some(plan.clone()));
}

/// What the checks found, for the steps that act.
pub struct Checked {
    pub plan: Plan,
    /// The volume root proven by the check: every action on the volume goes through it.
    pub vol: Arc<Volume>,
    /// The data dir, relative to the volume root.
    pub data: PathBuf,
    /// The set's cluster, proven, with the id it answered with at the check.
    pub target: Target,
    pub peer_url: String,
    pub member_name: String,
    pub stale: Option<u64>,
}

impl Engine<'_> {
    /// Every gate, in order: the pod's own state, why it fails, the volume, the member, the
    /// cluster. What is found is put in `found` as soon as it is known, so that a refusal
    /// records it (the diagnosis and its evidence, the plan).
    pub(super) async fn check(&self, ns: &str, name: &str, uid: Option<&str>, found: &Mutex<Found>) -> Result<(Checked, String)> {
        // Where the data is, the volume proven, before what it holds is looked into.
        let located = self.locator.open(ns, name, uid, false).await?;
        // What the files themselves say, read (only read) before any gate, so that every
        // answer shows it, a refusal of a running member's too (`inspect`, `recover`): lines
        // that say nothing known while the checksums fail are CorruptData, and `cluster ID
        // mismatch` lines (anyone reaching the peer port can make etcd print them) wait for
        // the WAL to answer them once the live cluster is known.
        let facts = located.facts(crate::data::Depth::Heads).await?;
        let has_member_id = located.has_member_id().await?;
        let Located { mut plan, volume: vol, data } = located;
        tracing::info!(namespace = %ns, pod = %name, "the member's files: {}", facts.summary());
        plan.data = Some(facts.clone());
        lock(found).plan = Some(plan.clone());
        // Read again, and only the instance that was located: a replacement is another pod.
        let pod = self.locator.api.pod(ns, name).await?;
        self.locator.admit(&pod, Some(&plan.pod_uid))?;
        let (c, flags) = container::start_flags(&pod, &plan.container, name)
            .ok_or_else(|| Error::new(Code::PodUIDMismatch, format!("pod {ns}/{name} changed while it was checked")))?;
        // What the deployment is decides first: it does not change while the pod crash-loops.
        let peer_url = flags.peer_url.ok_or_else(|| {
            Error::new(Code::UnsupportedProfile, "the pod names no --initial-advertise-peer-urls / ETCD_INITIAL_ADVERTISE_PEER_URLS")
        })?;
        if plan.profile == Profile::Plain && flags.cluster_state.as_deref() != Some("existing") {
            return Err(Error::new(
                Code::UnsupportedProfile,
                "the pod starts etcd with --initial-cluster-state=new: with an empty data dir it comes back under its old, removed id; start it with `existing` (or a start script that decides) first",
            ));
        }
        let failure = super::gates::pod_failure(&pod, &plan.container, self.opts.force)?;
        // Only a failure diagnosed as one the agent heals is acted on (or a forced one): the
        // rest is refused with its code and the evidence, before the data dir is judged or
        // etcd is asked anything (an image that wiped its data to heal itself is SelfHealing,
        // not NotEtcdData).
        let logged = self.locator.diagnose_pod(pod.clone(), has_member_id).await?;
        let mut diagnosis = data::reconsider(logged, &facts);
        keep(found, &mut plan, &diagnosis);
        let question = data::split_question(&diagnosis, &facts);
        let mut diagnosed = if question {
            "`cluster ID mismatch` in the log: the member's WAL answers it once the cluster is asked".to_string()
        } else {
            crate::diagnose::gate(&diagnosis, self.opts.force)?
        };
        {
            let (vol, data) = (vol.clone(), data.clone());
            blocking(move || crate::locate::check_etcd_data(&vol, &data)).await?;
        }
        {
            let (vol, data, proc_root) = (vol.clone(), data.clone(), self.locator.layout.proc_root.clone());
            blocking(move || guard::no_holders(&proc_root, &vol, &data)).await?;
        }
        // The member this pod may stand for is the one its peer URL names, and that must be
        // the pod itself: checked before any etcd call.
        crate::identity::check_member_identity(&pod, c, &peer_url)?;
        // The cluster is the StatefulSet: what etcd answers counts only as far as the set's
        // pods prove it (see `crate::scope`), and only the set's pods are asked.
        let scope = SetScope::of(&pod, &self.locator.api.pods(ns).await?, &plan.container)?;
        scope.check_given(&self.opts.etcd_endpoints)?;
        let endpoints = if self.opts.etcd_endpoints.is_empty() { scope.sibling_endpoints() } else { self.opts.etcd_endpoints.clone() };
        if endpoints.is_empty() {
            return Err(Error::new(
                Code::SoleMember,
                format!("pod {ns}/{name} has no sibling etcd members: a sole member has nothing to rejoin; restore it from a backup"),
            ));
        }
        let mut target = self.opts.etcd.target(scope, endpoints, None)?;
        let (cluster_id, members) = self.opts.etcd.members(&target).await?;
        target.cluster_id = Some(cluster_id);
        let stale = stale_member(&members, &peer_url, Basis::FirstCheck);
        // What etcd said is kept before it is judged: a quorum refusal shows the members.
        plan.cluster_id = Some(format!("{cluster_id:016x}"));
        plan.members = members.iter().map(|m| PlanMember::of(m, stale)).collect();
        lock(found).plan = Some(plan.clone());
        if question {
            diagnosis = data::answer_split(diagnosis, &facts, cluster_id)?;
            keep(found, &mut plan, &diagnosis);
            diagnosed = crate::diagnose::gate(&diagnosis, self.opts.force)?;
        }
        // Another cluster's data, or another listed member's, is not this pod's stale
        // member's to move, whatever the log said.
        let listed: Vec<u64> = members.iter().map(|m| m.id).collect();
        data::judge(&facts, cluster_id, &listed, stale)?;
        check_replacing(&members, &peer_url)?;
        check_space(&plan, &vol)?;
        let why = failure.map(|f| f.reason).unwrap_or_else(|| "forced".into());
        let msg = format!(
            "{} ({}), {} of {} members healthy, {why}; {diagnosed}; {}",
            plan.host_path.display(),
            plan.profile.as_str(),
            members.iter().filter(|m| m.healthy).count(),
            members.len(),
            facts.summary()
        );
        let member_name = flags.name;
        Ok((Checked { plan, vol, data, target, peer_url, member_name, stale }, msg))
    }

    /// What a resumed remediation needs, from its journal and the cluster as it is now. The
    /// gates that guard the first destructive step are not asked again: it is done.
    pub(super) async fn recheck(&self, r: Remediation) -> Result<(Checked, String)> {
        let plan = r.plan.clone().ok_or_else(|| Error::new(Code::NotReady, format!("journal {} has no plan to resume", r.id)))?;
        let pod = self.locator.api.pod(&plan.namespace, &plan.pod).await?;
        let (_, flags) = container::start_flags(&pod, &plan.container, &plan.pod)
            .ok_or_else(|| Error::new(Code::NotReady, "the pod lost its etcd container"))?;
        let peer_url = flags.peer_url.ok_or_else(|| Error::new(Code::UnsupportedProfile, "the pod names no peer URL"))?;
        let target = self.target_of(&r, &pod).await?;
        let (_, members) = self.opts.etcd.members(&target).await?;
        let located = self.locator.open(&plan.namespace, &plan.pod, None, false).await?;
        // Only the entry the first run found stale may go (the journal records it, never the
        // volume: the tenant writes there).
        let stale = stale_member(&members, &peer_url, Basis::Journal(r.recorded_member_id()));
        if !r.step_done(Step::Membership) {
            check_replacing(&members, &peer_url)?;
        }
        let done = r.steps.iter().filter(|s| s.done()).map(|s| s.name).next_back();
        let msg = format!("resuming remediation {} after {}", r.id, done.map_or("nothing", |s| s.as_str()));
        let (vol, data, member_name) = (located.volume, located.data, flags.name);
        Ok((Checked { plan, vol, data, target, peer_url, member_name, stale }, msg))
    }

    /// The cluster of a journaled remediation: the pod's set as it is now, the endpoints its
    /// caller gave (checked again), else the agent's own, else the set's other pods, and the
    /// cluster id journaled at the check (a cluster that answers with another is not asked).
    pub(super) async fn target_of(&self, r: &Remediation, pod: &k8s_openapi::api::core::v1::Pod) -> Result<Target> {
        let plan = r.plan.as_ref().ok_or_else(|| Error::new(Code::NotReady, format!("journal {} has no plan", r.id)))?;
        let scope = SetScope::of(pod, &self.locator.api.pods(&plan.namespace).await?, &plan.container)?;
        let given = if r.etcd_endpoints.is_empty() { &self.opts.etcd_endpoints } else { &r.etcd_endpoints };
        scope.check_given(given)?;
        let endpoints = if given.is_empty() { scope.sibling_endpoints() } else { given.clone() };
        let cluster_id = plan.cluster_id.as_deref().and_then(|id| u64::from_str_radix(id, 16).ok());
        self.opts.etcd.target(scope, endpoints, cluster_id)
    }
}

/// The new member fetches a full snapshot while the quarantine keeps the old one on the same
/// filesystem: room for the db again plus a WAL segment.
fn check_space(plan: &Plan, vol: &Volume) -> Result<()> {
    let db = plan.r#move.iter().find(|m| m.path == "member/snap" || m.path == "member").map(|m| m.bytes).unwrap_or(0);
    let need = db + 64 * 1024 * 1024;
    let free = vol.free_bytes().map_err(|e| Error::new(Code::InsufficientSpace, e.message))?;
    if free < need {
        return Err(Error::new(
            Code::InsufficientSpace,
            format!("{} has {free} bytes free; the rejoining member needs about {need}", plan.volume.root.display()),
        ));
    }
    Ok(())
}
