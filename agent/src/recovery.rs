//! A quorum recovery's steps on one member's volume, on this node (`POST /v1/recovery-steps`):
//! the member's data moved into the recovery's quarantine (it rejoins on empty data), or,
//! for the survivor, moved there, copied back and rebuilt into a one-member cluster.
//!
//! The caller names a set and a holder pod; nothing else is taken from it. Every fact acted
//! on is read here: the set's `EtcdRecovery` approved, its plan the facts approved, fenced
//! by the controller (a status the admission policy keeps the controller's); the set still
//! the one planned (UID), at 0 replicas, no pod of it left; the holder labelled for the
//! member, owned by the record, on this node, mounting the member's own claim; and no
//! process using the data (the process guard). The quarantine is named after the record
//! and its fence, so a step asked again finds what an interrupted one moved; the survivor's
//! original is never written: the rebuild works on a copy, and a copy an interruption left
//! is moved aside, not removed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;

use etcd_medic_client::recovery::{EtcdRecovery, FENCED, REBUILDING};
use etcd_medic_core::step::{HOLDS_LABEL, Rebuilt, StepAction, StepDone, StepRequest, quarantine_id};

use crate::error::{Code, Error, Result};
use crate::host::volume::{Limits, Volume};
use crate::locate::{Located, Locator, blocking};
use crate::quarantine;

/// What the rebuild runs with on this node.
#[derive(Clone, Debug)]
pub struct Rebuilder {
    /// The etcd binary (the image's).
    pub etcd: PathBuf,
    /// The agent's state dir: the survivor's copy is rebuilt under `rebuild/` there.
    pub state_dir: PathBuf,
    /// Each start of etcd may take this long to serve.
    pub timeout: Duration,
}

/// Runs `req` (see the module's docs).
pub async fn step(locator: &Locator, rebuilder: &Rebuilder, req: &StepRequest) -> Result<StepDone> {
    let (ns, set, member) = (req.namespace.as_str(), req.stateful_set.as_str(), req.member());
    let record = locator
        .api
        .recovery(ns, set)
        .await?
        .ok_or_else(|| Error::new(Code::NotFound, format!("no EtcdRecovery {ns}/{set}: nothing to recover")))?;
    let fenced = fenced_plan(&record)?;
    let sts = set_fenced(locator, ns, set, &fenced.plan.stateful_set_uid).await?;
    let ordinal: i32 = member.rsplit('-').next().and_then(|o| o.parse().ok()).unwrap_or(i32::MAX);
    if ordinal >= fenced.replicas {
        return Err(Error::invalid(format!("{member} is no member of the {} the set had", fenced.replicas)));
    }
    let survivor = fenced.plan.choice.survivor.as_str();
    match req.action {
        StepAction::Rebuild if member != survivor => {
            return Err(Error::invalid(format!("{member} is not the survivor the plan rebuilds from ({survivor})")));
        }
        StepAction::Quarantine if member == survivor => {
            return Err(Error::invalid(format!("{member} is the survivor: it is rebuilt, never emptied")));
        }
        _ => {}
    }
    let holder = locator.api.pod(ns, &req.holder).await?;
    check_holder(&holder, member, &record)?;
    let located = locator.open(ns, &req.holder, holder.metadata.uid.as_deref(), false).await?;
    let claims: Vec<String> =
        sts.spec.iter().flat_map(|s| s.volume_claim_templates.iter().flatten()).map(|t| format!("{}-{member}", t.name_any())).collect();
    if !located.plan.volume.claim.as_ref().is_some_and(|c| claims.contains(c)) {
        return Err(Error::new(
            Code::UnsafePath,
            format!("holder {} mounts {:?} as the data volume, not {member}'s claim", req.holder, located.plan.volume.claim),
        ));
    }
    let fence_at: jiff::Timestamp =
        fenced.at.parse().map_err(|e| Error::new(Code::Internal, format!("the fence's time {:?}: {e}", fenced.at)))?;
    let name = quarantine::dir_name(&fence_at, &quarantine_id(&record.uid().unwrap_or_default()));
    let host_path = located.plan.host_path.display().to_string();
    let mut done = StepDone {
        namespace: ns.into(),
        stateful_set: set.into(),
        member: member.into(),
        quarantine: name.clone(),
        host_path: host_path.clone(),
        ..Default::default()
    };
    match req.action {
        StepAction::Quarantine => {
            let (vol, data, profile) = (located.volume.clone(), located.data.clone(), located.plan.profile);
            let (target, proc_root) = (Target::of(&record, &name, &located), locator.layout.proc_root.clone());
            let moved = blocking(move || {
                guard(&proc_root, &vol, &data)?;
                // Every file the profile names, whether still here or moved by an earlier try.
                let items: Vec<(String, u64)> = profile.files_to_move().iter().map(|p| (p.to_string(), 0)).collect();
                let m = target.quarantine(&vol, &data, &items)?;
                Ok(m.items.into_iter().filter(|i| i.present).map(|i| i.path).collect())
            })
            .await?;
            done.quarantined = moved;
        }
        StepAction::Rebuild => {
            done.rebuilt = Some(rebuild(locator, rebuilder, &located, &fenced, Target::of(&record, &name, &located)).await?);
            done.quarantined = vec!["member".into()];
        }
    }
    tracing::warn!(namespace = ns, statefulset = set, member, action = ?req.action, quarantine = %done.quarantine, "recovery step done on {host_path}");
    Ok(done)
}

/// Whose data a step moves, and into which quarantine: all of it from the record and the
/// volume as located.
#[derive(Clone)]
struct Target {
    id: String,
    name: String,
    namespace: String,
    holder: String,
    holder_uid: String,
    profile: crate::profile::Profile,
}

impl Target {
    fn of(record: &EtcdRecovery, name: &str, located: &Located) -> Target {
        Target {
            id: quarantine_id(&record.uid().unwrap_or_default()),
            name: name.to_string(),
            namespace: located.plan.namespace.clone(),
            holder: located.plan.pod.clone(),
            holder_uid: located.plan.pod_uid.clone(),
            profile: located.plan.profile,
        }
    }

    /// Moves `items` (relative to the data dir) into the recovery's quarantine; those moved by
    /// an earlier try stay there.
    fn quarantine(&self, vol: &Volume, data: &Path, items: &[(String, u64)]) -> Result<quarantine::Manifest> {
        let req = quarantine::Request {
            id: &self.id,
            name: &self.name,
            namespace: &self.namespace,
            pod: &self.holder,
            pod_uid: &self.holder_uid,
            member_id: None,
            profile: self.profile.as_str(),
            data,
            items,
            failpoint: &crate::failpoint::Failpoint::default(),
        };
        quarantine::quarantine(vol, &req, jiff::Timestamp::now())
    }
}

/// The set is the one planned (`uid`), at 0 replicas, and no pod it owns is left: read from
/// the API server before any step, and again before the survivor's rebuilt copy goes back.
async fn set_fenced(locator: &Locator, ns: &str, set: &str, uid: &str) -> Result<k8s_openapi::api::apps::v1::StatefulSet> {
    let sts = locator.api.statefulset(ns, set).await?;
    if sts.uid().as_deref() != Some(uid) {
        return Err(Error::new(Code::PlanChanged, format!("StatefulSet {ns}/{set} is not the one planned (its UID changed)")));
    }
    if sts.spec.as_ref().and_then(|s| s.replicas) != Some(0) {
        return Err(Error::new(Code::NotFenced, format!("StatefulSet {ns}/{set} has replicas: the fence is not in place")));
    }
    let owned: Vec<String> =
        locator.api.pods(ns).await?.iter().filter(|p| p.owner_references().iter().any(|o| o.uid == uid)).map(|p| p.name_any()).collect();
    if !owned.is_empty() {
        return Err(Error::new(Code::NotFenced, format!("pods of StatefulSet {ns}/{set} are still there: {}", owned.join(", "))));
    }
    Ok(sts)
}

/// What a fenced record holds.
struct Fenced {
    /// The StatefulSet's name (the record's).
    set: String,
    plan: etcd_medic_client::recovery::Plan,
    replicas: i32,
    at: String,
}

/// The record is approved on its plan's facts and fenced by the controller.
fn fenced_plan(r: &EtcdRecovery) -> Result<Fenced> {
    let name = r.name_any();
    let approval = r.spec.approval.as_ref().ok_or_else(|| Error::invalid(format!("EtcdRecovery {name} is not approved")))?;
    if r.spec.stateful_set != name {
        return Err(Error::invalid(format!(
            "EtcdRecovery {name} names StatefulSet {}: a recovery is named after its set",
            r.spec.stateful_set
        )));
    }
    let status = r.status.clone().unwrap_or_default();
    let phase = status.phase.unwrap_or_default();
    if phase != FENCED && phase != REBUILDING {
        return Err(Error::new(Code::NotFenced, format!("EtcdRecovery {name} is {phase:?}: its steps run once it is Fenced")));
    }
    let (plan, fence) =
        status.plan.zip(status.fence).ok_or_else(|| Error::new(Code::NotFenced, format!("EtcdRecovery {name} has no fence")))?;
    if plan.choice.facts != approval.facts {
        return Err(Error::new(Code::PlanChanged, format!("EtcdRecovery {name}'s plan is not the one approved ({})", approval.facts)));
    }
    Ok(Fenced { set: name, plan, replicas: fence.replicas, at: fence.at })
}

/// The holder is the record's (its controller reference), labelled for `member`, and not
/// the set's (which would be a member's pod, with etcd running).
fn check_holder(holder: &Pod, member: &str, record: &EtcdRecovery) -> Result<()> {
    let name = holder.name_any();
    let owner = holder.owner_references().iter().find(|o| o.controller == Some(true));
    let labelled = holder.labels().get(HOLDS_LABEL).map(String::as_str) == Some(member);
    // It runs nothing but the wait: no process of its own on the member's data.
    let containers = holder.spec.iter().flat_map(|s| s.containers.iter()).collect::<Vec<_>>();
    let waits = holder.spec.as_ref().is_some_and(|s| s.init_containers.as_ref().is_none_or(Vec::is_empty))
        && containers.len() == 1
        && containers[0].command.as_deref() == Some(&["/etcd-medic".to_string(), "hold".to_string()][..]);
    if !waits {
        return Err(Error::invalid(format!("pod {name} runs more than `etcd-medic hold`: it is no holder the agent acts through")));
    }
    if !labelled || owner.map(|o| o.uid.as_str()) != record.metadata.uid.as_deref() || owner.is_some_and(|o| o.kind != "EtcdRecovery") {
        return Err(Error::invalid(format!(
            "pod {name} is not the holder of {member} made for EtcdRecovery {} (label {HOLDS_LABEL}, controller reference)",
            record.name_any()
        )));
    }
    Ok(())
}

/// No process on this node uses the member's data (`NotFenced` names them).
fn guard(proc_root: &Path, vol: &Volume, data: &Path) -> Result<()> {
    crate::host::processes::no_holders(proc_root, vol, data).map_err(|e| {
        if e.code == Code::PodRunning { Error::new(Code::NotFenced, format!("{}; every member is fenced first", e.message)) } else { e }
    })
}

/// The marker of a finished rebuild, in the agent's state dir: asked again, the answer is
/// read back.
const REBUILT: &str = "rebuilt.json";

/// Tries of a survivor's rebuild before a person looks (each one copies its data twice).
const TRIES: usize = 3;

/// The survivor, where no tenant reaches: the original moved into the quarantine on its
/// volume (once); a copy of it made in the agent's own state dir, where etcd runs on it (a
/// path the tenant cannot swap a link into, whatever pod it runs on the volume); the rebuilt
/// copy put back into the data dir, owned as the original was; the result recorded in the
/// state dir, read back when the step is asked again. A copy an interrupted try left in the
/// data dir is moved aside into the quarantine, never removed.
async fn rebuild(locator: &Locator, rebuilder: &Rebuilder, located: &Located, fenced: &Fenced, target: Target) -> Result<Rebuilt> {
    let (vol, data) = (located.volume.clone(), located.data.clone());
    let qdir = quarantine::rel_dir(&target.name);
    let state = rebuilder.state_dir.clone();
    let work = Path::new("rebuild").join(format!("{}-{}", target.name, located.plan.pod));
    let proc_root = locator.layout.proc_root.clone();
    let (quarantine_name, work_) = (target.name.clone(), work.clone());
    let prepared = blocking(move || {
        let own = Volume::open(&state, Path::new(""))?;
        own.mkdir_all(&work_)?;
        if let Some(bytes) = own.read_small(&work_.join(REBUILT), 64 << 10)? {
            let done = serde_json::from_slice::<Rebuilt>(&bytes).map_err(|e| Error::new(Code::Internal, format!("{}: {e}", own.shown(&work_).display())))?;
            return Ok(Err(done));
        }
        let tries = own.list(&work_, 100)?.iter().filter(|(n, _)| n.to_string_lossy().starts_with("try-")).count();
        if tries >= TRIES {
            return Err(Error::invalid(format!(
                "the survivor's rebuild failed {tries} times (its copies in {}); its data is kept in quarantine {quarantine_name} on its volume: a person looks (README: \"Quorum lost\")",
                own.shown(&work_).display()
            )));
        }
        guard(&proc_root, &vol, &data)?;
        let (member, kept) = (data.join("member"), qdir.join("data/member"));
        match (vol.entry(&member)?.is_some(), vol.entry(&kept)?.is_some()) {
            (_, false) => {
                let m = target.quarantine(&vol, &data, &[("member".to_string(), 0)])?;
                if !m.items.iter().any(|i| i.present) {
                    return Err(Error::new(Code::NotEtcdData, format!("{} holds no member dir to rebuild from", vol.shown(&data).display())));
                }
            }
            (true, true) => {
                // A copy an interrupted try put back: aside, never removed.
                let aside =
                    (1..).map(|n| qdir.join(format!("attempt-{n}"))).find(|p| !matches!(vol.entry(p), Ok(Some(_)))).expect("a free name");
                vol.mkdir_all(&aside)?;
                vol.rename(&member, &aside.join("member"))?;
                vol.sync_dir(&aside)?;
            }
            (false, true) => {}
        }
        let try_dir = work_.join(format!("try-{}", tries + 1));
        own.mkdir_all(&try_dir)?;
        vol.copy_tree_to(&kept, &own, &try_dir.join("member"), Limits::default(), (0, 0))?;
        let owner = vol.owner(&kept)?;
        let facts = crate::data::facts(&own, &try_dir, crate::data::Depth::Heads)?;
        Ok(Ok((try_dir, owner, facts.db.and_then(|d| d.revision).unwrap_or(0))))
    })
    .await?;
    let (try_dir, owner, own_revision) = match prepared {
        Err(done) => return Ok(done),
        Ok(p) => p,
    };
    let revision = etcd_medic_core::recover::bumped_revision(own_revision, [fenced.plan.held_revision], etcd_medic_core::recover::BUMP);
    let spec = crate::rebuild::Spec {
        etcd: rebuilder.etcd.clone(),
        data: rebuilder.state_dir.join(&try_dir),
        name: fenced.plan.choice.survivor.clone(),
        client_urls: fenced.plan.survivor_client_urls.clone(),
        revision,
        proc_root: locator.layout.proc_root.clone(),
        timeout: rebuilder.timeout,
    };
    let rebuilt = crate::rebuild::rebuild(&spec).await?;
    // The fence still in place before the copy goes back where the pod's etcd reads it.
    set_fenced(locator, &located.plan.namespace, &fenced.set, &fenced.plan.stateful_set_uid).await?;
    let (vol, data, state, text) = (
        located.volume.clone(),
        located.data.clone(),
        rebuilder.state_dir.clone(),
        serde_json::to_vec_pretty(&rebuilt).unwrap_or_default(),
    );
    blocking(move || {
        let own = Volume::open(&state, Path::new(""))?;
        own.copy_tree_to(&try_dir.join("member"), &vol, &data.join("member"), Limits::default(), owner)?;
        own.write_file(&work.join(REBUILT), &text)?;
        // The agent's own copy, its job done: the original stays in the quarantine.
        own.remove_tree(&try_dir, Limits::default())?;
        Ok(())
    })
    .await?;
    Ok(rebuilt)
}

#[cfg(test)]
mod tests {
    use super::*;
    use etcd_medic_client::recovery::{Approval, EtcdRecoverySpec, EtcdRecoveryStatus, Fence, Plan};
    use etcd_medic_core::recover::Choice;
    use serde_json::json;

    fn record(phase: &str, approved: &str, planned: &str) -> EtcdRecovery {
        let mut r = EtcdRecovery::new(
            "apisix-etcd",
            EtcdRecoverySpec {
                stateful_set: "apisix-etcd".into(),
                approval: Some(Approval { by: "alice".into(), facts: approved.into() }),
                ..Default::default()
            },
        );
        r.metadata.uid = Some("rec-uid".into());
        r.status = Some(EtcdRecoveryStatus {
            phase: Some(phase.into()),
            plan: Some(Plan {
                choice: Choice { facts: planned.into(), survivor: "apisix-etcd-0".into(), ..Default::default() },
                ..Default::default()
            }),
            fence: Some(Fence { replicas: 3, at: "2026-12-08T01:44:39Z".into(), rebuild: true }),
            ..Default::default()
        });
        r
    }

    #[test]
    fn a_step_runs_only_on_a_record_approved_on_its_plan_and_fenced() {
        assert!(fenced_plan(&record("Fenced", "ab", "ab")).is_ok());
        assert!(fenced_plan(&record("Rebuilding", "ab", "ab")).is_ok());
        for phase in ["Approved", "Fencing", "AwaitingApproval", "Refused", "Rebuilt", ""] {
            assert_eq!(fenced_plan(&record(phase, "ab", "ab")).err().map(|e| e.code), Some(Code::NotFenced), "{phase}");
        }
        assert_eq!(fenced_plan(&record("Fenced", "ab", "cd")).err().map(|e| e.code), Some(Code::PlanChanged));
        let mut unapproved = record("Fenced", "ab", "ab");
        unapproved.spec.approval = None;
        assert_eq!(fenced_plan(&unapproved).err().map(|e| e.code), Some(Code::InvalidRequest));
        let mut other_set = record("Fenced", "ab", "ab");
        other_set.spec.stateful_set = "other-etcd".into();
        assert_eq!(fenced_plan(&other_set).err().map(|e| e.code), Some(Code::InvalidRequest));
    }

    #[test]
    fn a_holder_is_the_records_labelled_for_its_member() {
        let r = record("Fenced", "ab", "ab");
        let pod = |label: &str, kind: &str, uid: &str| -> Pod {
            serde_json::from_value(json!({"metadata": {"name": "apisix-etcd-1-hold", "labels": {HOLDS_LABEL: label},
                "ownerReferences": [{"apiVersion": "etcd-medic.io/v1alpha1", "kind": kind, "name": "apisix-etcd", "uid": uid, "controller": true}]},
                "spec": {"containers": [{"name": "etcd", "command": ["/etcd-medic", "hold"]}]}}))
            .unwrap()
        };
        assert!(check_holder(&pod("apisix-etcd-1", "EtcdRecovery", "rec-uid"), "apisix-etcd-1", &r).is_ok());
        assert!(check_holder(&pod("apisix-etcd-2", "EtcdRecovery", "rec-uid"), "apisix-etcd-1", &r).is_err(), "another member's label");
        assert!(check_holder(&pod("apisix-etcd-1", "EtcdRecovery", "other"), "apisix-etcd-1", &r).is_err(), "another record's");
        assert!(check_holder(&pod("apisix-etcd-1", "StatefulSet", "rec-uid"), "apisix-etcd-1", &r).is_err(), "a set's pod");
        let bare: Pod = serde_json::from_value(json!({"metadata": {"name": "apisix-etcd-1-hold"}})).unwrap();
        assert!(check_holder(&bare, "apisix-etcd-1", &r).is_err(), "no owner, no label");
        let mut busy = pod("apisix-etcd-1", "EtcdRecovery", "rec-uid");
        busy.spec.as_mut().unwrap().containers[0].command = Some(vec!["/bin/sh".into(), "-c".into(), "swap links".into()]);
        assert!(check_holder(&busy, "apisix-etcd-1", &r).is_err(), "a holder that runs anything else");
    }
}
