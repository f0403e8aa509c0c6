//! Quorum lost: a StatefulSet with fewer than a majority of its members Ready for
//! `--quorum-lost-for` gets its recovery proposed, an `EtcdRecovery` awaiting a person's
//! approval. Its plan comes from every member's files as the agent on its node reads them (a
//! forced dry run, which changes nothing) and from its pod's state and last crash. Nothing
//! acts on it without the approval (`kubectl etcd-medic recover STS --approve FACTS`).
//!
//! One proposal per loss: a set's record without an approval gets the new plan (a record of
//! an earlier loss, or a person's), an approved one is left as approved; once the set has
//! its majority Ready again, a later loss is a new one.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::ResourceExt;
use kube::runtime::events::{Event, EventType};
use serde_json::json;

use etcd_medic_client::recovery::{self, AWAITING_APPROVAL, EtcdRecovery, EtcdRecoverySpec, Member, REFUSED};
use etcd_medic_core::recover::Facts;
use etcd_medic_core::request::CreateRequest;

use super::Ctx;
use crate::error::{Code, Result};

/// The label on the records the controller proposes.
const PROPOSED_BY: &str = "etcd-medic.io/proposed-by";

/// What the controller knows of the sets that lost quorum.
#[derive(Default)]
pub struct Lost {
    /// Since when each set (namespace, name) has lacked a majority Ready.
    since: HashMap<(String, String), Instant>,
    /// The sets proposed (or being proposed) during this loss.
    proposed: HashSet<(String, String)>,
}

/// One look: `clusters` are every watched set with its members and Ready members counted.
/// Proposes the sets whose loss has lasted long enough; returns when the next one falls due.
pub fn look(ctx: &Arc<Ctx>, clusters: &[((String, String), usize, usize)]) -> Option<Duration> {
    let wait = ctx.cfg.quorum_lost_for;
    let mut due: Option<Duration> = None;
    let mut lost = ctx.quorum.lock().unwrap();
    let now_lost: Vec<&(String, String)> =
        clusters.iter().filter(|(_, members, ready)| recovery::quorum_lost(*members, *ready)).map(|(k, _, _)| k).collect();
    lost.since.retain(|k, _| now_lost.contains(&k));
    lost.proposed.retain(|k| now_lost.contains(&k));
    let mut long = 0;
    for key in now_lost {
        let since = *lost.since.entry(key.clone()).or_insert_with(Instant::now);
        let left = wait.saturating_sub(since.elapsed());
        if !left.is_zero() {
            due = Some(due.map_or(left, |d: Duration| d.min(left)));
            continue;
        }
        long += 1;
        if !lost.proposed.insert(key.clone()) {
            continue;
        }
        let (ctx, key) = (ctx.clone(), key.clone());
        tokio::spawn(async move {
            if let Err(e) = propose(&ctx, &key.0, &key.1).await {
                tracing::warn!(namespace = %key.0, statefulset = %key.1, code = %e.code, "could not propose the recovery: {}", e.message);
                // Asked again at a later look.
                ctx.quorum.lock().unwrap().proposed.remove(&key);
                ctx.changed.notify_one();
            }
        });
    }
    ctx.metrics.quorum_lost.set(long);
    due
}

/// Makes the plan of set `ns`/`name` and records it, unless its record is approved.
async fn propose(ctx: &Ctx, ns: &str, name: &str) -> Result<()> {
    let existing = ctx.api.recovery(ns, name).await?;
    if let Some(a) = existing.as_ref().and_then(|r| r.spec.approval.as_ref()) {
        tracing::info!(namespace = ns, statefulset = name, by = %a.by, "quorum lost; its EtcdRecovery is approved already");
        return Ok(());
    }
    tracing::warn!(
        namespace = ns,
        statefulset = name,
        "quorum lost for {:?}: reading every member's files to propose a recovery",
        ctx.cfg.quorum_lost_for
    );
    let (sts, replicas, members) = read_members(ctx, ns, name).await?;
    let (status, note) = match recovery::plan(replicas, &sts.uid().unwrap_or_default(), members, None) {
        Ok(plan) => {
            let approve = format!("kubectl etcd-medic recover {name} -n {ns} --approve {}", plan.choice.facts);
            let note = format!("quorum lost: the recovery from {} is proposed; a person approves it with: {approve}", plan.choice.survivor);
            let status = json!({"phase": AWAITING_APPROVAL, "plan": plan, "code": null, "proposedAt": jiff::Timestamp::now().to_string(),
                                "message": format!("approve with: {approve}")});
            (status, note)
        }
        Err(e) => {
            let note = format!("quorum lost, and no recovery can be proposed: {}: {}", e.code, e.message);
            (
                json!({"phase": REFUSED, "code": e.code.as_str(), "message": e.message, "proposedAt": jiff::Timestamp::now().to_string()}),
                note,
            )
        }
    };
    if !ctx.leading() {
        return Ok(());
    }
    let record = match existing {
        Some(r) => r,
        None => {
            let mut r = EtcdRecovery::new(name, EtcdRecoverySpec { stateful_set: name.into(), ..Default::default() });
            r.metadata.labels = Some([(PROPOSED_BY.to_string(), "controller".to_string())].into());
            match ctx.api.create_recovery(ns, &r).await? {
                Some(r) => r,
                // Made meanwhile (a person's `recover`): theirs stands.
                None => return Ok(()),
            }
        }
    };
    // Written over the record as read: a person's approval or plan written meanwhile stands.
    let version = record.resource_version().unwrap_or_default();
    if let Err(e) = ctx.api.recovery_status(ns, name, &version, &status).await {
        if ctx.api.recovery(ns, name).await?.is_some_and(|r| r.resource_version() != record.resource_version()) {
            tracing::info!(namespace = ns, statefulset = name, "the EtcdRecovery changed while its plan was made; the change stands");
            return Ok(());
        }
        return Err(e);
    }
    ctx.metrics.recoveries_proposed.inc();
    tracing::warn!(namespace = ns, statefulset = name, "{note}");
    let regarding = ObjectReference {
        api_version: Some("apps/v1".into()),
        kind: Some("StatefulSet".into()),
        namespace: Some(ns.into()),
        name: Some(name.into()),
        uid: sts.uid(),
        ..Default::default()
    };
    let ev = Event {
        type_: EventType::Warning,
        reason: "QuorumLost".into(),
        note: Some(etcd_medic_core::signature::truncate(&note, 1000)),
        action: "ProposeRecovery".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &regarding).await {
        tracing::warn!("could not record the Event: {e}");
    }
    Ok(())
}

/// The set, its replicas, and each member's pod and files' facts, as a plan is made from.
pub(super) async fn read_members(ctx: &Ctx, ns: &str, name: &str) -> Result<(StatefulSet, i32, Vec<Member>)> {
    let sts = ctx.api.statefulset(ns, name).await?;
    let replicas = sts.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1).max(0);
    let mut members = Vec::new();
    for i in 0..replicas {
        let pod_name = format!("{name}-{i}");
        let pod = match ctx.api.pod(ns, &pod_name).await {
            Ok(p) => Some(p),
            Err(e) if e.code == Code::PodNotFound => None,
            Err(e) => return Err(e),
        };
        let mut m = Member::of(&pod_name, pod.as_ref());
        match &m.state.node {
            None => m.note = Some(if pod.is_none() { "no such pod".into() } else { "not scheduled to a node".into() }),
            Some(node) => match facts(ctx, ns, &pod_name, node).await {
                Ok(f) => m.facts = f,
                Err(e) => m.note = Some(format!("its files were not read ({}: {})", e.code, e.message)),
            },
        }
        members.push(m);
    }
    Ok((sts, replicas, members))
}

/// Member `pod`'s files as the agent on `node` reads them (a forced dry run: nothing changes).
async fn facts(ctx: &Ctx, ns: &str, pod: &str, node: &str) -> Result<Option<Facts>> {
    let req = CreateRequest {
        namespace: ns.into(),
        pod: pod.into(),
        pod_uid: None,
        dry_run: true,
        force: true,
        reason: Some("quorum lost: the recovery's plan reads the member's files".into()),
        etcd_endpoints: None,
    };
    let agent = super::dispatch::agent(ctx, node).await?;
    let created = agent.create_recorded(&req).await?;
    let r = agent.wait(&created.remediation.id, Duration::from_secs(60)).await?;
    Ok(r.plan.as_ref().and_then(|p| p.data.as_ref()).and_then(Facts::of))
}
