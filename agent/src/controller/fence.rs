//! An approved quorum recovery, carried out as far as etcd-medic goes today: the fence. No
//! member of the old cluster may run while the new one is built, so the StatefulSet is
//! scaled to 0 and every pod it owns waited out.
//!
//! Nothing in a record's status decides: whoever may write the status (a tenant, a person's
//! plugin) could write any phase. Whenever the set still has replicas, every check runs
//! before it is scaled: the record names its own set, the set's pods are watched by this
//! controller and not paused, fewer than a majority of them are Ready, and the members'
//! files (read again through the agents) give the facts approved, for this set's UID. The
//! status only says where things stand. The fence itself (replicas 0) is the API server's,
//! and outlives any restart of the controller or the agents. The rebuild and the rejoin
//! follow (`super::rejoin`).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::ResourceExt;
use serde_json::json;

use etcd_medic_client::recovery::{self, EtcdRecovery, FENCED, FENCING, Plan, REBUILDING, REBUILT, REFUSED};

use super::Ctx;
use crate::error::{Code, Error, Result};

/// How long one attempt waits for the members' pods to be gone (the next look goes on).
const GONE_WITHIN: Duration = Duration::from_secs(300);

/// The recoveries this replica is carrying out.
#[derive(Default)]
pub struct Busy(HashSet<(String, String)>);

/// Carries out every approved recovery not fenced or refused yet (the ones a restart left
/// halfway too).
pub async fn look(ctx: &Arc<Ctx>) {
    let scopes: Vec<Option<String>> =
        if ctx.cfg.namespaces.is_empty() { vec![None] } else { ctx.cfg.namespaces.iter().cloned().map(Some).collect() };
    for scope in scopes {
        let records = match ctx.api.recoveries(scope.as_deref()).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(code = %e.code, "could not list the EtcdRecoveries: {}", e.message);
                continue;
            }
        };
        for r in records {
            let phase = r.status.as_ref().and_then(|s| s.phase.clone()).unwrap_or_default();
            let after_fence = phase == FENCED || phase == REBUILDING;
            if r.spec.approval.is_none() || phase == REFUSED || phase == REBUILT || (after_fence && !super::rejoin::automated(ctx, &r)) {
                continue;
            }
            let key = (r.namespace().unwrap_or_default(), r.name_any());
            if !ctx.fences.lock().unwrap().0.insert(key.clone()) {
                continue;
            }
            let ctx = ctx.clone();
            tokio::spawn(async move {
                let done = if after_fence { super::rejoin::carry_on(&ctx, r).await } else { carry_out(&ctx, r).await };
                if let Err(e) = done {
                    tracing::warn!(namespace = %key.0, statefulset = %key.1, code = %e.code, "the recovery goes on at a later look: {}", e.message);
                }
                ctx.fences.lock().unwrap().0.remove(&key);
            });
        }
    }
}

async fn carry_out(ctx: &Ctx, r: EtcdRecovery) -> Result<()> {
    let (ns, name) = (r.namespace().unwrap_or_default(), r.name_any());
    let approval = r.spec.approval.clone().ok_or_else(|| Error::new(Code::Internal, "not approved"))?;
    if r.spec.stateful_set != name {
        let message =
            format!("the record is named {name} but names StatefulSet {}: a recovery is named after its set", r.spec.stateful_set);
        write(ctx, &r, json!({"phase": REFUSED, "code": Code::InvalidRequest.as_str(), "message": message})).await?;
        return Ok(());
    }
    let sts = match ctx.api.statefulset(&ns, &name).await {
        Ok(s) => s,
        Err(e) if e.code == Code::NotFound => {
            write(ctx, &r, json!({"phase": REFUSED, "code": Code::NotFound.as_str(), "message": e.message})).await?;
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    let uid = sts.uid().unwrap_or_default();
    let mut r = r;
    let mut verified: Option<Plan> = None;
    if sts.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1) > 0 {
        // Every check, whatever the status says.
        let seen = ctx.pods.lock().unwrap().values().find(|p| p.namespace == ns && p.cluster.as_deref() == Some(name.as_str())).cloned();
        let refused = match seen {
            None => Some((
                Code::InvalidRequest,
                format!(
                    "no pod of StatefulSet {name} is watched by this controller (--namespaces, --selector): it does not fence sets it does not watch"
                ),
            )),
            Some(pod) => match super::paused_on(ctx, &pod).await {
                Some(on) => {
                    Some((Code::InvalidRequest, format!("paused by the annotation etcd-medic.io/paused on {on}: nothing was stopped")))
                }
                None => {
                    let (_, replicas, members) = super::quorum::read_members(ctx, &ns, &name).await?;
                    let ready = members.iter().filter(|m| m.state.ready).count();
                    let plan = recovery::plan(replicas, &uid, members, r.spec.survivor.as_deref());
                    let refused = refusal(replicas, ready, plan.as_ref(), &approval);
                    verified = plan.ok();
                    refused
                }
            },
        };
        if let Some((code, message)) = refused {
            tracing::warn!(namespace = %ns, statefulset = %name, code = %code, "the approved recovery is refused: {message}");
            write(ctx, &r, json!({"phase": REFUSED, "code": code.as_str(), "message": message})).await?;
            return Ok(());
        }
        let replicas = sts.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
        let message = format!("the facts are as approved by {}; stopping every member: StatefulSet {name} scaled to 0", approval.by);
        let fence = json!({"replicas": replicas, "at": jiff::Timestamp::now().to_string()});
        r = write(ctx, &r, json!({"phase": FENCING, "plan": verified, "fence": fence, "rebuilt": null, "message": message})).await?;
        tracing::warn!(namespace = %ns, statefulset = %name, replicas, "fencing: every member stopped for the rebuild");
        if !ctx.leading() {
            return Ok(());
        }
        ctx.api.scale_statefulset(&ns, &name, &uid, 0).await?;
    }
    // At 0: every pod the set owns waited out, and the set still at 0, still the same set.
    let start = Instant::now();
    loop {
        let pods = ctx.api.pods(&ns).await?;
        let owned: Vec<String> = pods
            .iter()
            .filter(|p| p.metadata.owner_references.iter().flatten().any(|o| o.uid == uid && o.controller == Some(true)))
            .map(|p| p.name_any())
            .collect();
        if owned.is_empty() {
            break;
        }
        if start.elapsed() > GONE_WITHIN {
            return Err(Error::new(Code::NotReady, format!("still there after {GONE_WITHIN:?}: {}", owned.join(", "))));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let now = ctx.api.statefulset(&ns, &name).await?;
    if now.uid().as_deref() != Some(uid.as_str()) || now.spec.as_ref().and_then(|s| s.replicas) != Some(0) {
        return Err(Error::new(Code::NotReady, format!("StatefulSet {name} was scaled up or replaced during the fence")));
    }
    let status = r.status.clone().unwrap_or_default();
    let plan = verified.or(status.plan).unwrap_or_default();
    let was = status.fence.map_or(plan.replicas, |f| f.replicas);
    let urls = if plan.survivor_client_urls.is_empty() { "<its client URL>".into() } else { plan.survivor_client_urls.join(",") };
    let automated = super::rejoin::automated(ctx, &r);
    let message = if automated {
        format!("fenced: no member runs, StatefulSet {name} at 0 (was {was}); the rebuild from {} follows", plan.choice.survivor)
    } else {
        format!(
            "fenced: no member runs, StatefulSet {name} at 0 (was {was}). Next, on node {}: etcd-medic rebuild --data-dir <its volume's data dir> --name {} --client-url {urls} --held-revision {}; then scale to 1, then back to {was} one at a time (README: \"Quorum lost\")",
            plan.survivor_node.as_deref().unwrap_or("<its node>"),
            plan.choice.survivor,
            plan.held_revision,
        )
    };
    let r = write(ctx, &r, json!({"phase": FENCED, "fence": {"rebuild": automated}, "message": message})).await?;
    tracing::warn!(namespace = %ns, statefulset = %name, "{message}");
    super::rejoin::carry_on(ctx, r).await
}

/// Why an approved recovery may not be fenced now, if it may not: a majority Ready (it has
/// quorum: stopping it would be the outage, and Bitnami's preStop hook removes a member
/// scaled away while the cluster can still commit), no plan, or facts other than approved.
fn refusal(replicas: i32, ready: usize, plan: std::result::Result<&Plan, &Error>, approval: &recovery::Approval) -> Option<(Code, String)> {
    match plan {
        _ if !recovery::quorum_lost(replicas.max(0) as usize, ready) => {
            Some((Code::PodHealthy, format!("{ready} of {replicas} members are Ready: the cluster has its majority; nothing was stopped")))
        }
        Err(e) => Some((e.code, e.message.clone())),
        Ok(plan) if plan.choice.facts != approval.facts => Some((
            Code::PlanChanged,
            format!(
                "the members' facts read before the fence are {}, not the {} approved by {}: nothing was stopped; delete this record and approve the new plan if it is still wanted",
                plan.choice.facts, approval.facts, approval.by
            ),
        )),
        Ok(_) => None,
    }
}

/// Writes `status` over the record as read (a record changed since is a conflict, never
/// overwritten), if this replica still leads.
pub(super) async fn write(ctx: &Ctx, r: &EtcdRecovery, status: serde_json::Value) -> Result<EtcdRecovery> {
    if !ctx.leading() {
        return Err(Error::new(Code::NotReady, "this replica no longer leads"));
    }
    let version = r.resource_version().unwrap_or_default();
    ctx.api.recovery_status(&r.namespace().unwrap_or_default(), &r.name_any(), &version, &status).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use etcd_medic_core::recover::Choice;

    #[test]
    fn a_recovery_is_fenced_only_without_quorum_and_on_the_facts_approved() {
        let approval = recovery::Approval { by: "alice".into(), facts: "ab92b1ea0ff43f8f".into() };
        let plan = |facts: &str| Plan { choice: Choice { facts: facts.into(), ..Default::default() }, ..Default::default() };
        let (approved, other) = (plan("ab92b1ea0ff43f8f"), plan("0000000000000001"));
        assert_eq!(refusal(3, 1, Ok(&approved), &approval), None);
        assert_eq!(refusal(3, 0, Ok(&approved), &approval), None);
        assert_eq!(refusal(3, 2, Ok(&approved), &approval).map(|r| r.0), Some(Code::PodHealthy), "a majority Ready");
        let changed = refusal(3, 1, Ok(&other), &approval).unwrap();
        assert_eq!(changed.0, Code::PlanChanged);
        assert!(changed.1.contains("0000000000000001, not the ab92b1ea0ff43f8f approved by alice"), "{}", changed.1);
        let gone = refusal(3, 0, Err(&Error::new(Code::NoSurvivor, "no data")), &approval);
        assert_eq!(gone.map(|r| r.0), Some(Code::NoSurvivor));
    }
}
