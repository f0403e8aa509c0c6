//! A fenced quorum recovery carried on: the rebuild, and the survivor serving again.
//!
//! A holder pod per member (`<member>-hold`: the etcd container's spec with the agent's
//! image and `etcd-medic hold` as its command, owned by the record, on the member's node,
//! mounting the member's claim and nothing else) gives the agent on that node the member's
//! volume while the set is at 0. The agent moves every member's data into the recovery's
//! quarantine, and the survivor's back as a copy it rebuilds into a one-member cluster
//! (`crate::recovery`: it reads every fact it acts on itself). The holders are deleted and
//! waited out, and the set is scaled to 1: ordinal 0, the survivor, serves every key it held,
//! at a revision past any member's. A survivor of another ordinal leaves the record Fenced
//! with the manual steps (a StatefulSet starts ordinal 0 first).
//!
//! The others rejoin by a person's steps, which the record's message gives: the Bitnami
//! start-up scripts add a member on empty data only while the cluster they were configured
//! with looks healthy to them (chart 12), or only on a release upgraded once (chart 9.7.3:
//! `ETCD_INITIAL_CLUSTER_STATE=existing`), and a plain set's fixed `--initial-cluster` must
//! match the member count: rejoining them for every deployment needs each member's data
//! made from the survivor's (etcd's multi-member restore), which is not built yet.
//!
//! Every phase is written before its work starts, and every step may be taken again: a
//! controller restarted at any point goes on from the record.

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Container, Pod};
use kube::ResourceExt;
use serde_json::json;

use etcd_medic_client::recovery::{EtcdRecovery, FENCED, Plan, REBUILDING, REBUILT, REFUSED, RebuiltState};
use etcd_medic_core::step::{HOLDS_LABEL, StepAction, StepRequest, holder_name};

use super::Ctx;
use crate::error::{Code, Error, Result};

/// How long a holder may take to run or go, a step to end, the survivor to be Ready.
const HOLDER_WITHIN: Duration = Duration::from_secs(180);
const STEP_WITHIN: Duration = Duration::from_secs(600);
const READY_WITHIN: Duration = Duration::from_secs(300);

/// Whether the controller carries a fenced record on (else it stays Fenced, a person's).
pub fn automated(ctx: &Ctx, r: &EtcdRecovery) -> bool {
    let survivor = r.status.as_ref().and_then(|s| s.plan.as_ref()).map(|p| p.choice.survivor.as_str());
    ctx.cfg.holder_image.is_some() && survivor == Some(format!("{}-0", r.name_any()).as_str())
}

/// Goes on from the record's phase (Fenced or Rebuilding) to Rebuilt.
pub async fn carry_on(ctx: &Ctx, mut r: EtcdRecovery) -> Result<()> {
    if !automated(ctx, &r) {
        return Ok(());
    }
    let (ns, name) = (r.namespace().unwrap_or_default(), r.name_any());
    // The status is the controller's where the chart's policies run; where they do not, a
    // tenant could write it for its own set only. Either way the controller keeps to what it
    // watches, and a person's pause holds it.
    if !ctx.cfg.namespaces.is_empty() && !ctx.cfg.namespaces.contains(&ns) {
        return Ok(());
    }
    if let Some(on) = super::pause::set_paused(ctx, &ns, &name).await {
        tracing::info!(namespace = %ns, statefulset = %name, "the recovery waits: paused by the annotation etcd-medic.io/paused on {on}");
        return Ok(());
    }
    let status = r.status.clone().unwrap_or_default();
    let (plan, fence) = status.plan.clone().zip(status.fence.clone()).ok_or_else(|| Error::new(Code::Internal, "fenced without a plan"))?;
    let sts = ctx.api.statefulset(&ns, &name).await?;
    let uid = sts.uid().unwrap_or_default();
    if uid != plan.stateful_set_uid {
        let message = format!("StatefulSet {name} was replaced during the recovery: nothing more is done");
        write(ctx, &r, json!({"phase": REFUSED, "code": Code::PlanChanged.as_str(), "message": message})).await?;
        return Ok(());
    }
    let rebuilt = match status.rebuilt.clone() {
        Some(done) => done,
        None => {
            if replicas(&sts) != 0 {
                let message = format!(
                    "StatefulSet {name} was scaled up before the rebuild (the fence undone): nothing more is done; every member's data is as it was"
                );
                write(ctx, &r, json!({"phase": REFUSED, "code": Code::NotFenced.as_str(), "message": message})).await?;
                return Ok(());
            }
            let message = format!(
                "rebuilding: every member's data moved into a quarantine on its volume, {}'s copied back and rebuilt into a one-member cluster",
                plan.choice.survivor
            );
            if status.phase.as_deref() == Some(FENCED) {
                r = write(ctx, &r, json!({"phase": REBUILDING, "message": message})).await?;
            }
            tracing::warn!(namespace = %ns, statefulset = %name, "{message}");
            let done = match rebuild(ctx, &r, &sts, &plan, fence.replicas).await {
                Ok(done) => done,
                Err(e) if refuses(e.code) => {
                    let message = format!("the rebuild was refused: {}; every member's data is kept (README: \"Quorum lost\")", e.message);
                    write(ctx, &r, json!({"phase": REFUSED, "code": e.code.as_str(), "message": message})).await?;
                    return Ok(());
                }
                Err(e) => return Err(e),
            };
            let message = format!(
                "rebuilt from {} at revision {} (it held {}); every member's old data is in quarantine {} on its volume; starting {}",
                plan.choice.survivor, done.revision, done.revision_before, done.quarantine, plan.choice.survivor
            );
            r = write(ctx, &r, json!({"phase": REBUILDING, "rebuilt": done, "message": message})).await?;
            tracing::warn!(namespace = %ns, statefulset = %name, "{message}");
            done
        }
    };
    if let Some(on) = super::pause::set_paused(ctx, &ns, &name).await {
        tracing::info!(namespace = %ns, statefulset = %name, "the recovery waits before the survivor starts: paused by the annotation etcd-medic.io/paused on {on}");
        return Ok(());
    }
    serve_survivor(ctx, &r, &uid).await?;
    let others = (1..fence.replicas).map(|i| format!("{name}-{i}")).collect::<Vec<_>>().join(", ");
    let message = format!(
        "rebuilt: {} serves alone (a one-member cluster at revision {}, every key it held); {others} are emptied, their data in quarantine {}. Next, a person's: add them back one at a time (README: \"Quorum lost\")",
        plan.choice.survivor, rebuilt.revision, rebuilt.quarantine
    );
    write(ctx, &r, json!({"phase": REBUILT, "message": message})).await?;
    tracing::warn!(namespace = %ns, statefulset = %name, "{message}");
    Ok(())
}

/// Refusals that no later try changes: the record says so and the controller stops.
fn refuses(code: Code) -> bool {
    matches!(
        code,
        Code::InvalidRequest
            | Code::PlanChanged
            | Code::NotFenced
            | Code::UnsafePath
            | Code::NotEtcdData
            | Code::CorruptData
            | Code::UnsupportedProfile
            | Code::DataDirNotFound
            | Code::PVCNotFound
            | Code::PVNotFound
            | Code::InsufficientSpace
    )
}

fn replicas(sts: &StatefulSet) -> i32 {
    sts.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1)
}

/// Every member's step through its holder; the holders gone after.
async fn rebuild(ctx: &Ctx, r: &EtcdRecovery, sts: &StatefulSet, plan: &Plan, members: i32) -> Result<RebuiltState> {
    let (ns, name) = (r.namespace().unwrap_or_default(), r.name_any());
    let image = ctx.cfg.holder_image.clone().unwrap_or_default();
    let mut held = Vec::new();
    for i in 0..members {
        let member = format!("{name}-{i}");
        let node = plan.members.iter().find(|m| m.pod == member).and_then(|m| m.node.clone());
        let Some(node) = node else {
            return Err(Error::new(
                Code::NotFenced,
                format!("{member} had no node when the plan was made: its volume cannot be reached; the rejoin stays a person's"),
            ));
        };
        let pod = holder(sts, r, &member, &node, &image, ctx.cfg.container.as_deref())?;
        if ctx.api.create_pod(&ns, &pod).await?.is_none() {
            // One of that name was there: the controller's own from an earlier try, or not
            // used at all.
            let there = ctx.api.pod(&ns, &holder_name(&member)).await?;
            let ours = there.owner_references().iter().any(|o| Some(&o.uid) == r.metadata.uid.as_ref())
                && there.spec.as_ref().map(|s| &s.containers).is_some_and(|c| {
                    c.len() == 1
                        && c[0].image.as_deref() == Some(image.as_str())
                        && c[0].command == pod.spec.as_ref().and_then(|s| s.containers[0].command.clone())
                });
            if !ours {
                return Err(Error::invalid(format!(
                    "a pod named {} is there that the controller did not make: it is never used",
                    holder_name(&member)
                )));
            }
        }
        held.push((member, node));
    }
    let mut done = RebuiltState { at: String::new(), ..Default::default() };
    for (member, node) in &held {
        let holder = holder_name(member);
        wait_running(ctx, &ns, &holder).await?;
        let action = if *member == plan.choice.survivor { StepAction::Rebuild } else { StepAction::Quarantine };
        let req = StepRequest { namespace: ns.clone(), stateful_set: name.clone(), holder: holder.clone(), action };
        let step = ask(ctx, node, &req).await?;
        tracing::info!(namespace = %ns, statefulset = %name, member, action = ?action, quarantine = %step.quarantine, "recovery step done");
        done.quarantine = step.quarantine;
        if let Some(b) = step.rebuilt {
            (done.member_id, done.cluster_id, done.revision_before, done.revision) =
                (b.member_id, b.cluster_id, b.revision_before, b.revision);
        } else if !step.quarantined.is_empty() {
            done.quarantined.push(member.clone());
        }
    }
    for (member, _) in &held {
        let holder = holder_name(member);
        if let Ok(p) = ctx.api.pod(&ns, &holder).await {
            ctx.api.delete_pod(&ns, &holder, &p.uid().unwrap_or_default()).await.ok();
        }
    }
    let start = Instant::now();
    for (member, _) in &held {
        while ctx.api.pod(&ns, &holder_name(member)).await.is_ok() {
            if start.elapsed() > HOLDER_WITHIN {
                return Err(Error::new(Code::NotReady, format!("holder {} still there after {HOLDER_WITHIN:?}", holder_name(member))));
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
    done.at = jiff::Timestamp::now().to_string();
    Ok(done)
}

/// The holder of `member`: the set's etcd container with the agent's image running `etcd-medic
/// hold` (its command and arguments kept as arguments, where the agent reads the data dir),
/// literal environment only, the member's claim only, on `node`, owned by the record.
fn holder(sts: &StatefulSet, r: &EtcdRecovery, member: &str, node: &str, image: &str, container: Option<&str>) -> Result<Pod> {
    let spec = sts.spec.as_ref().ok_or_else(|| Error::new(Code::Internal, "a StatefulSet without spec"))?;
    let template = spec.template.spec.as_ref().ok_or_else(|| Error::new(Code::UnsupportedProfile, "the set's pod template has no spec"))?;
    let c: &Container = match container {
        Some(n) => template.containers.iter().find(|c| c.name == n),
        None => template.containers.iter().find(|c| c.name == "etcd").or(template.containers.first()),
    }
    .ok_or_else(|| Error::new(Code::UnsupportedProfile, "the set's pod template has no etcd container"))?;
    let claims: Vec<String> = spec.volume_claim_templates.iter().flatten().map(|t| t.name_any()).collect();
    let env: Vec<_> = c.env.iter().flatten().filter(|e| e.value_from.is_none()).cloned().collect();
    let mounts: Vec<_> = c.volume_mounts.iter().flatten().filter(|m| claims.contains(&m.name)).cloned().collect();
    let args: Vec<String> = c.command.iter().flatten().chain(c.args.iter().flatten()).cloned().collect();
    let volumes: Vec<_> =
        claims.iter().map(|t| json!({"name": t, "persistentVolumeClaim": {"claimName": format!("{t}-{member}")}})).collect();
    let mut labels = serde_json::Map::new();
    labels.insert(HOLDS_LABEL.into(), json!(member));
    labels.insert("app.kubernetes.io/managed-by".into(), json!("etcd-medic"));
    if let Some(chart) = spec.template.metadata.as_ref().and_then(|m| m.labels.as_ref()).and_then(|l| l.get("helm.sh/chart")) {
        labels.insert("helm.sh/chart".into(), json!(chart));
    }
    let pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": holder_name(member),
            "labels": labels,
            "ownerReferences": [{"apiVersion": "etcd-medic.io/v1alpha1", "kind": "EtcdRecovery", "name": r.name_any(),
                                 "uid": r.uid().unwrap_or_default(), "controller": true}],
        },
        "spec": {
            "nodeName": node,
            "automountServiceAccountToken": false,
            "terminationGracePeriodSeconds": 5,
            "tolerations": template.tolerations,
            "securityContext": {"runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": c.name,
                "image": image,
                "command": ["/etcd-medic", "hold"],
                "args": args,
                "env": env,
                "volumeMounts": mounts,
                "resources": {"requests": {"cpu": "5m", "memory": "16Mi"}, "limits": {"memory": "32Mi"}},
                "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true, "capabilities": {"drop": ["ALL"]}},
            }],
            "volumes": volumes,
        },
    });
    serde_json::from_value(pod).map_err(|e| Error::new(Code::Internal, format!("the holder pod: {e}")))
}

async fn wait_running(ctx: &Ctx, ns: &str, name: &str) -> Result<()> {
    let start = Instant::now();
    loop {
        let phase = ctx.api.pod(ns, name).await.ok().and_then(|p| p.status.and_then(|s| s.phase));
        if phase.as_deref() == Some("Running") {
            return Ok(());
        }
        if start.elapsed() > HOLDER_WITHIN {
            return Err(Error::new(Code::NotReady, format!("holder {ns}/{name} not running after {HOLDER_WITHIN:?} ({phase:?})")));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Asks the agent on `node` for the step until it answers what it did (a step that runs, or
/// outlasts a request, is asked again).
async fn ask(ctx: &Ctx, node: &str, req: &StepRequest) -> Result<etcd_medic_core::step::StepDone> {
    let start = Instant::now();
    loop {
        let answer = match super::dispatch::agent(ctx, node).await {
            Ok(agent) => agent.recovery_step(req).await,
            Err(e) => Err(e),
        };
        match answer {
            Ok(done) => return Ok(done),
            Err(e) if matches!(e.code, Code::NotReady | Code::ClusterLocked | Code::TooManyRequests) && start.elapsed() < STEP_WITHIN => {
                tracing::info!(holder = %req.holder, code = %e.code, "the recovery step goes on: {}", e.message);
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Scales the set to 1 (ordinal 0, the survivor) and waits until it is Ready.
async fn serve_survivor(ctx: &Ctx, r: &EtcdRecovery, uid: &str) -> Result<()> {
    let (ns, name) = (r.namespace().unwrap_or_default(), r.name_any());
    if replicas(&ctx.api.statefulset(&ns, &name).await?) < 1 {
        ctx.api.scale_statefulset(&ns, &name, uid, 1).await?;
        tracing::warn!(namespace = %ns, statefulset = %name, "the survivor starts: {name} scaled to 1");
    }
    let member = format!("{name}-0");
    let start = Instant::now();
    loop {
        let ready =
            ctx.api.pod(&ns, &member).await.ok().is_some_and(|p| {
                p.status.iter().flat_map(|s| s.conditions.iter().flatten()).any(|c| c.type_ == "Ready" && c.status == "True")
            });
        if ready {
            return Ok(());
        }
        if start.elapsed() > READY_WITHIN {
            return Err(Error::new(
                Code::NotReady,
                format!("{member} is not Ready after {READY_WITHIN:?}; the recovery goes on at a later look"),
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Writes `status` over the record as read, if this replica still leads.
async fn write(ctx: &Ctx, r: &EtcdRecovery, status: serde_json::Value) -> Result<EtcdRecovery> {
    super::fence::write(ctx, r, status).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_holder_is_the_agents_image_waiting_with_the_members_claim_and_nothing_else() {
        let sts: StatefulSet = serde_json::from_value(json!({
            "metadata": {"name": "apisix-etcd", "namespace": "apisix"},
            "spec": {
                "selector": {"matchLabels": {"app.kubernetes.io/name": "etcd"}},
                "serviceName": "apisix-etcd-headless",
                "template": {"metadata": {"labels": {"app.kubernetes.io/name": "etcd", "helm.sh/chart": "etcd-9.7.3"}},
                    "spec": {"serviceAccountName": "tenant", "tolerations": [{"operator": "Exists"}],
                    "containers": [{"name": "etcd", "image": "bitnami/etcd:3.5.10",
                        "env": [{"name": "ETCD_DATA_DIR", "value": "/bitnami/etcd/data"},
                                {"name": "MY_POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                                {"name": "ETCD_ROOT_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}],
                        "volumeMounts": [{"name": "data", "mountPath": "/bitnami/etcd"}, {"name": "certs", "mountPath": "/certs"}],
                        "lifecycle": {"preStop": {"exec": {"command": ["/opt/bitnami/scripts/etcd/prestop.sh"]}}},
                        "readinessProbe": {"exec": {"command": ["true"]}}}],
                    "volumes": [{"name": "certs", "secret": {"secretName": "tls"}}]}},
                "volumeClaimTemplates": [{"metadata": {"name": "data"}}]
            }
        }))
        .unwrap();
        let mut r = EtcdRecovery::new("apisix-etcd", Default::default());
        r.metadata.uid = Some("rec-uid".into());
        let pod = holder(&sts, &r, "apisix-etcd-1", "node-b", "etcd-medic/etcd-medic:0.1.0", None).unwrap();
        let v = serde_json::to_value(&pod).unwrap();
        assert_eq!(v["metadata"]["name"], "apisix-etcd-1-hold");
        assert_eq!(v["metadata"]["labels"][HOLDS_LABEL], "apisix-etcd-1");
        assert_eq!(v["metadata"]["labels"]["helm.sh/chart"], "etcd-9.7.3", "the generation's sign kept");
        assert!(v["metadata"]["labels"].get("app.kubernetes.io/name").is_none(), "never the set's selector: it would adopt it");
        assert_eq!(v["metadata"]["ownerReferences"][0]["uid"], "rec-uid");
        let spec = &v["spec"];
        assert_eq!((&spec["nodeName"], &spec["automountServiceAccountToken"]), (&json!("node-b"), &json!(false)));
        assert!(spec.get("serviceAccountName").is_none());
        assert_eq!(spec["volumes"], json!([{"name": "data", "persistentVolumeClaim": {"claimName": "data-apisix-etcd-1"}}]));
        let c = &spec["containers"][0];
        assert_eq!((&c["image"], &c["command"]), (&json!("etcd-medic/etcd-medic:0.1.0"), &json!(["/etcd-medic", "hold"])));
        assert_eq!(c["env"], json!([{"name": "ETCD_DATA_DIR", "value": "/bitnami/etcd/data"}]), "literal values only");
        assert_eq!(c["volumeMounts"], json!([{"name": "data", "mountPath": "/bitnami/etcd"}]));
        assert!(c.get("lifecycle").is_none() && c.get("readinessProbe").is_none(), "no preStop (member remove), no probe");
        assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
        assert_eq!(spec["containers"].as_array().map(Vec::len), Some(1));
    }
}
