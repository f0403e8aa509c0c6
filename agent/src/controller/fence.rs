//! An approved quorum recovery, carried out as far as etcd-medic goes today: the members'
//! files read once more (refused `PlanChanged` when their facts moved since the approval),
//! then the fence: the StatefulSet's replicas recorded, the set scaled to 0, and every
//! member's pod waited out, so that no member of the old cluster runs while the new one is
//! built. Each step is written to the record's status before it is taken: a controller that
//! restarts resumes from there. The fence itself (replicas 0) is the API server's, and
//! outlives any restart of the controller or the agents. The rebuild stays a person's step.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::ResourceExt;
use serde_json::json;

use etcd_medic_client::recovery::{self, APPROVED, EtcdRecovery, FENCED, FENCING, REFUSED};

use super::Ctx;
use crate::error::{Code, Error, Result};

/// How long one attempt waits for the members' pods to be gone (the next look goes on).
const GONE_WITHIN: Duration = Duration::from_secs(300);

/// The recoveries this replica is carrying out.
#[derive(Default)]
pub struct Busy(HashSet<(String, String)>);

/// Carries out every approved recovery not yet fenced (the ones a restart left halfway too).
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
            let approved = r.spec.approval.is_some();
            if !approved || !(phase == APPROVED || phase == FENCING) {
                continue;
            }
            let key = (r.namespace().unwrap_or_default(), r.name_any());
            if !ctx.fences.lock().unwrap().0.insert(key.clone()) {
                continue;
            }
            let ctx = ctx.clone();
            tokio::spawn(async move {
                if let Err(e) = carry_out(&ctx, r).await {
                    tracing::warn!(namespace = %key.0, statefulset = %key.1, code = %e.code, "the recovery goes on at a later look: {}", e.message);
                }
                ctx.fences.lock().unwrap().0.remove(&key);
            });
        }
    }
}

async fn carry_out(ctx: &Ctx, mut r: EtcdRecovery) -> Result<()> {
    let (ns, name) = (r.namespace().unwrap_or_default(), r.name_any());
    let approval = r.spec.approval.clone().ok_or_else(|| Error::new(Code::Internal, "not approved"))?;
    let phase = r.status.as_ref().and_then(|s| s.phase.clone()).unwrap_or_default();
    if phase == APPROVED {
        // The facts once more, while every member's pod and volume are still there.
        let (_, replicas, members) = super::quorum::read_members(ctx, &ns, &name).await?;
        let ready = members.iter().filter(|m| m.state.ready).count();
        let refused = refusal(replicas, ready, recovery::plan(replicas, members, r.spec.survivor.as_deref()), &approval);
        if let Some((code, message)) = refused {
            tracing::warn!(namespace = %ns, statefulset = %name, code = %code, "the approved recovery is refused: {message}");
            write(ctx, &r, json!({"phase": REFUSED, "code": code.as_str(), "message": message})).await?;
            return Ok(());
        }
        let message = format!("the facts are as approved by {}; stopping every member: StatefulSet {name} scaled to 0", approval.by);
        let fence = json!({"replicas": replicas, "at": jiff::Timestamp::now().to_string()});
        r = write(ctx, &r, json!({"phase": FENCING, "fence": fence, "message": message})).await?;
        tracing::warn!(namespace = %ns, statefulset = %name, replicas, "fencing: every member stopped for the rebuild");
    }
    let fence = r.status.as_ref().and_then(|s| s.fence.clone()).ok_or_else(|| Error::new(Code::Internal, "fencing without its record"))?;
    if !ctx.leading() {
        return Ok(());
    }
    ctx.api.scale_statefulset(&ns, &name, 0).await?;
    let start = Instant::now();
    loop {
        let mut left = Vec::new();
        for i in 0..fence.replicas {
            let pod = format!("{name}-{i}");
            match ctx.api.pod(&ns, &pod).await {
                Ok(_) => left.push(pod),
                Err(e) if e.code == Code::PodNotFound => {}
                Err(e) => return Err(e),
            }
        }
        if left.is_empty() {
            break;
        }
        if start.elapsed() > GONE_WITHIN {
            return Err(Error::new(Code::NotReady, format!("still there after {GONE_WITHIN:?}: {}", left.join(", "))));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let plan = r.status.as_ref().and_then(|s| s.plan.clone()).unwrap_or_default();
    let urls = if plan.survivor_client_urls.is_empty() { "<its client URL>".into() } else { plan.survivor_client_urls.join(",") };
    let message = format!(
        "fenced: no member runs, StatefulSet {name} at 0 (was {}). Next, on node {}: etcd-medic rebuild --data-dir <its volume's data dir> --name {} --client-url {urls} --held-revision {}; then scale to 1, then back to {} one at a time (README: \"Quorum lost\")",
        fence.replicas,
        plan.survivor_node.as_deref().unwrap_or("<its node>"),
        plan.choice.survivor,
        plan.held_revision,
        fence.replicas,
    );
    write(ctx, &r, json!({"phase": FENCED, "message": message})).await?;
    tracing::warn!(namespace = %ns, statefulset = %name, "{message}");
    Ok(())
}

/// Why an approved recovery may not be fenced now, if it may not: a majority Ready (it has
/// quorum: stopping it would be the outage, and Bitnami's preStop hook removes a member
/// scaled away while the cluster can still commit), no plan, or facts other than approved.
fn refusal(replicas: i32, ready: usize, plan: Result<recovery::Plan>, approval: &recovery::Approval) -> Option<(Code, String)> {
    match plan {
        _ if !recovery::quorum_lost(replicas.max(0) as usize, ready) => {
            Some((Code::PodHealthy, format!("{ready} of {replicas} members are Ready: the cluster has its majority; nothing was stopped")))
        }
        Err(e) => Some((e.code, e.message)),
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
async fn write(ctx: &Ctx, r: &EtcdRecovery, status: serde_json::Value) -> Result<EtcdRecovery> {
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
        let plan = |facts: &str| Ok(recovery::Plan { choice: Choice { facts: facts.into(), ..Default::default() }, ..Default::default() });
        assert_eq!(refusal(3, 1, plan("ab92b1ea0ff43f8f"), &approval), None);
        assert_eq!(refusal(3, 0, plan("ab92b1ea0ff43f8f"), &approval), None);
        assert_eq!(refusal(3, 2, plan("ab92b1ea0ff43f8f"), &approval).map(|r| r.0), Some(Code::PodHealthy), "a majority Ready");
        let changed = refusal(3, 1, plan("0000000000000001"), &approval).unwrap();
        assert_eq!(changed.0, Code::PlanChanged);
        assert!(changed.1.contains("0000000000000001, not the ab92b1ea0ff43f8f approved by alice"), "{}", changed.1);
        let gone = refusal(3, 0, Err(Error::new(Code::NoSurvivor, "no data")), &approval);
        assert_eq!(gone.map(|r| r.0), Some(Code::NoSurvivor));
    }
}
