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
    let sts = locator.api.statefulset(ns, set).await?;
    if sts.uid().as_deref() != Some(fenced.plan.stateful_set_uid.as_str()) {
        return Err(Error::new(Code::PlanChanged, format!("StatefulSet {ns}/{set} is not the one planned (its UID changed)")));
    }
    if sts.spec.as_ref().and_then(|s| s.replicas) != Some(0) {
        return Err(Error::new(Code::NotFenced, format!("StatefulSet {ns}/{set} has replicas: the fence is not in place")));
    }
    let owned: Vec<String> = locator
        .api
        .pods(ns)
        .await?
        .iter()
        .filter(|p| p.owner_references().iter().any(|o| Some(&o.uid) == sts.metadata.uid.as_ref()))
        .map(|p| p.name_any())
        .collect();
    if !owned.is_empty() {
        return Err(Error::new(Code::NotFenced, format!("pods of StatefulSet {ns}/{set} are still there: {}", owned.join(", "))));
    }
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
            let (id, proc_root) = (quarantine_id(&record.uid().unwrap_or_default()), locator.layout.proc_root.clone());
            let (ns, pod, uid) = (ns.to_string(), req.holder.clone(), located.plan.pod_uid.clone());
            let moved = blocking(move || {
                guard(&proc_root, &vol, &data)?;
                // Every file the profile names, whether still here or moved by an earlier try.
                let items: Vec<(String, u64)> = profile.files_to_move().iter().map(|p| (p.to_string(), 0)).collect();
                let req = quarantine::Request {
                    id: &id,
                    name: &name,
                    namespace: &ns,
                    pod: &pod,
                    pod_uid: &uid,
                    member_id: None,
                    profile: profile.as_str(),
                    data: &data,
                    items: &items,
                    failpoint: &crate::failpoint::Failpoint::default(),
                };
                let m = quarantine::quarantine(&vol, &req, jiff::Timestamp::now())?;
                Ok(m.items.into_iter().filter(|i| i.present).map(|i| i.path).collect())
            })
            .await?;
            done.quarantined = moved;
        }
        StepAction::Rebuild => {
            done.rebuilt = Some(rebuild(locator, rebuilder, &located, &fenced, &name, &req.holder).await?);
            done.quarantined = vec!["member".into()];
        }
    }
    tracing::warn!(namespace = ns, statefulset = set, member, action = ?req.action, quarantine = %done.quarantine, "recovery step done on {host_path}");
    Ok(done)
}

/// What a fenced record holds.
struct Fenced {
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
    Ok(Fenced { plan, replicas: fence.replicas, at: fence.at })
}

/// The holder is the record's (its controller reference), labelled for `member`, and not
/// the set's (which would be a member's pod, with etcd running).
fn check_holder(holder: &Pod, member: &str, record: &EtcdRecovery) -> Result<()> {
    let name = holder.name_any();
    let owner = holder.owner_references().iter().find(|o| o.controller == Some(true));
    let labelled = holder.labels().get(HOLDS_LABEL).map(String::as_str) == Some(member);
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

/// The marker of a finished rebuild, in its quarantine: asked again, the answer is read back.
const REBUILT: &str = "rebuilt.json";

/// The survivor: the original moved into the quarantine (once), a copy put back (an earlier
/// try's copy moved aside first), the copy rebuilt, the result recorded beside the original.
async fn rebuild(
    locator: &Locator,
    rebuilder: &Rebuilder,
    located: &Located,
    fenced: &Fenced,
    name: &str,
    holder: &str,
) -> Result<Rebuilt> {
    let (vol, data) = (located.volume.clone(), located.data.clone());
    let qdir = quarantine::rel_dir(name);
    let marker = qdir.join(REBUILT);
    let (proc_root, name_, holder_, uid, ns) = (
        locator.layout.proc_root.clone(),
        name.to_string(),
        holder.to_string(),
        located.plan.pod_uid.clone(),
        located.plan.namespace.clone(),
    );
    let id = name.rsplit('-').next().unwrap_or_default().to_string();
    let profile = located.plan.profile;
    let earlier = blocking(move || {
        guard(&proc_root, &vol, &data)?;
        if let Some(bytes) = vol.read_small(&marker, 64 << 10)? {
            return serde_json::from_slice::<Rebuilt>(&bytes)
                .map(Some)
                .map_err(|e| Error::new(Code::Internal, format!("{}: {e}", vol.shown(&marker).display())));
        }
        let (member, kept) = (data.join("member"), qdir.join("data/member"));
        match (vol.entry(&member)?.is_some(), vol.entry(&kept)?.is_some()) {
            (_, false) => {
                let items = [("member".to_string(), 0)];
                let req = quarantine::Request {
                    id: &id,
                    name: &name_,
                    namespace: &ns,
                    pod: &holder_,
                    pod_uid: &uid,
                    member_id: None,
                    profile: profile.as_str(),
                    data: &data,
                    items: &items,
                    failpoint: &crate::failpoint::Failpoint::default(),
                };
                let m = quarantine::quarantine(&vol, &req, jiff::Timestamp::now())?;
                if !m.items.iter().any(|i| i.present) {
                    return Err(Error::new(
                        Code::NotEtcdData,
                        format!("{} holds no member dir to rebuild from", vol.shown(&data).display()),
                    ));
                }
            }
            (true, true) => {
                // A copy an interrupted rebuild left: aside, never removed.
                let aside =
                    (1..).map(|n| qdir.join(format!("attempt-{n}"))).find(|p| !matches!(vol.entry(p), Ok(Some(_)))).expect("a free name");
                vol.mkdir_all(&aside)?;
                vol.rename(&member, &aside.join("member"))?;
                vol.sync_dir(&aside)?;
            }
            (false, true) => {}
        }
        vol.copy_tree(&kept, &member, Limits::default())?;
        Ok(None)
    })
    .await?;
    if let Some(r) = earlier {
        return Ok(r);
    }
    let data_dir = located.plan.host_path.clone();
    let own = {
        let (vol, data) = (located.volume.clone(), located.data.clone());
        blocking(move || crate::data::facts(&vol, &data, crate::data::Depth::Heads)).await?.db.and_then(|d| d.revision).unwrap_or(0)
    };
    let revision = etcd_medic_core::recover::bumped_revision(own, [fenced.plan.held_revision], etcd_medic_core::recover::BUMP);
    let spec = crate::rebuild::Spec {
        etcd: rebuilder.etcd.clone(),
        data: data_dir,
        name: fenced.plan.choice.survivor.clone(),
        client_urls: fenced.plan.survivor_client_urls.clone(),
        revision,
        proc_root: locator.layout.proc_root.clone(),
        timeout: rebuilder.timeout,
    };
    let rebuilt = crate::rebuild::rebuild(&spec).await?;
    let (vol, text) = (located.volume.clone(), serde_json::to_vec_pretty(&rebuilt).unwrap_or_default());
    let marker = quarantine::rel_dir(name).join(REBUILT);
    blocking(move || vol.write_file(&marker, &text)).await?;
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
                "ownerReferences": [{"apiVersion": "etcd-medic.io/v1alpha1", "kind": kind, "name": "apisix-etcd", "uid": uid, "controller": true}]}}))
            .unwrap()
        };
        assert!(check_holder(&pod("apisix-etcd-1", "EtcdRecovery", "rec-uid"), "apisix-etcd-1", &r).is_ok());
        assert!(check_holder(&pod("apisix-etcd-2", "EtcdRecovery", "rec-uid"), "apisix-etcd-1", &r).is_err(), "another member's label");
        assert!(check_holder(&pod("apisix-etcd-1", "EtcdRecovery", "other"), "apisix-etcd-1", &r).is_err(), "another record's");
        assert!(check_holder(&pod("apisix-etcd-1", "StatefulSet", "rec-uid"), "apisix-etcd-1", &r).is_err(), "a set's pod");
        let bare: Pod = serde_json::from_value(json!({"metadata": {"name": "apisix-etcd-1-hold"}})).unwrap();
        assert!(check_holder(&bare, "apisix-etcd-1", &r).is_err(), "no owner, no label");
    }
}
