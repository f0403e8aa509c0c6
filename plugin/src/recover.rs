//! `kubectl etcd-medic recover STS`: the plan of a quorum recovery, recorded as an
//! `EtcdRecovery`, and a person's approval of it. The plan is read from every member's files
//! by the agents on their nodes; an approval names the digest of the facts the person saw,
//! and is refused (`PlanChanged`) when the facts read again give another.

use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::authentication::v1::SelfSubjectReview;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

use etcd_medic_client::recovery::{
    self, APPROVED, AWAITING_APPROVAL, EtcdRecovery, EtcdRecoverySpec, FENCED, Member, Plan, REBUILT, REFUSED,
};
use etcd_medic_core::{Code, Error, Result};

use crate::cli::Output;
use crate::{Kube, forced_dry_run, print, show};

/// How long `--wait` follows an approved recovery.
const FOLLOW_FOR: Duration = Duration::from_secs(600);

/// What `recover` is asked.
pub struct Ask<'a> {
    pub name: &'a str,
    pub picked: Option<&'a str>,
    pub approve: Option<&'a str>,
    pub wait: bool,
    pub timeout: Duration,
}

/// Shows the plan (recorded in the `EtcdRecovery` named after the set, made if missing), or
/// approves it when `approve` names the facts the plan still rests on; with `wait`, follows
/// an approved one until the controller rebuilt, fenced (for a person's rebuild) or refused it.
pub async fn run(kube: &Kube, out: Output, ask: Ask<'_>) -> Result<u8> {
    let code = recover(kube, out, &ask).await?;
    let api: Api<EtcdRecovery> = Api::namespaced(kube.client.clone(), &kube.namespace);
    let approved = kube.call("EtcdRecovery", Code::NotFound, || api.get_opt(ask.name)).await?.is_some_and(|r| r.spec.approval.is_some());
    if code != 0 || !ask.wait || !approved {
        return Ok(code);
    }
    follow(kube, &api, ask.name, out).await
}

/// Follows an approved recovery until the controller refused it, rebuilt it (the survivor
/// serves), or fenced it for a person's rebuild, telling each phase on stderr; the exit
/// status says how it ended.
async fn follow(kube: &Kube, api: &Api<EtcdRecovery>, name: &str, out: Output) -> Result<u8> {
    let what = format!("EtcdRecovery {}/{name}", kube.namespace);
    let start = std::time::Instant::now();
    let mut told = String::new();
    loop {
        let r = kube.call(&what, Code::NotFound, || api.get(name)).await?;
        let s = r.status.clone().unwrap_or_default();
        let phase = s.phase.clone().unwrap_or_default();
        let line = format!("{phase}: {}", s.message.as_deref().unwrap_or_default());
        if line != told {
            eprintln!("[{:>6.1}s] {}", start.elapsed().as_secs_f64(), show::safe(&line));
            told = line;
        }
        // Fenced ends it when the rebuild is a person's; else the controller goes on.
        let person_next = phase == FENCED && s.fence.as_ref().is_some_and(|f| !f.rebuild);
        if person_next || phase == REBUILT || phase == REFUSED {
            let p = show::Proposal::of(name, &kube.namespace, &r);
            print(out, &p, || show::recovery(&p))?;
            let code = s.code.as_deref().and_then(show::code_of).unwrap_or(Code::Internal);
            return Ok(if phase == REFUSED { Error::new(code, "").exit_code() } else { 0 });
        }
        if start.elapsed() > FOLLOW_FOR {
            return Err(Error::new(Code::NotReady, format!("{what} is still {phase} after {FOLLOW_FOR:?} (is the controller running?)")));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn recover(kube: &Kube, out: Output, ask: &Ask<'_>) -> Result<u8> {
    let Ask { name, picked, approve, timeout, .. } = *ask;
    let api: Api<EtcdRecovery> = Api::namespaced(kube.client.clone(), &kube.namespace);
    let what = format!("EtcdRecovery {}/{name}", kube.namespace);
    let existing = kube.call(&what, Code::NotFound, || api.get_opt(name)).await?;
    if let Some(r) = existing.as_ref().filter(|r| r.spec.approval.is_some()) {
        // Approved: the record is what was approved; it is shown, never rewritten.
        let approval = r.spec.approval.as_ref().expect("filtered");
        if let Some(facts) = approve.filter(|f| *f != approval.facts) {
            return Err(Error::new(
                Code::PlanChanged,
                format!("{what} was approved by {} for facts {}, not {facts}: a new recovery is a new record", approval.by, approval.facts),
            ));
        }
        let p = show::Proposal::of(name, &kube.namespace, r);
        print(out, &p, || show::recovery(&p))?;
        return Ok(0);
    }
    let plan = plan(kube, name, picked, timeout).await?;
    let record = match existing {
        Some(r) if r.spec.survivor.as_deref() == picked => r,
        Some(_) => {
            let (pp, patch) = (PatchParams::default(), Patch::Merge(json!({"spec": {"survivor": picked}})));
            kube.call(&what, Code::NotFound, || api.patch(name, &pp, &patch)).await?
        }
        None => {
            let r =
                EtcdRecovery::new(name, EtcdRecoverySpec { stateful_set: name.into(), survivor: picked.map(String::from), approval: None });
            // Not retried: two persons making it at once is a conflict to read again.
            api.create(&PostParams::default(), &r).await.map_err(|e| api_error(&what, e))?
        }
    };
    let facts = plan.choice.facts.clone();
    let Some(approved) = approve else {
        let r = write_status(
            kube,
            &api,
            name,
            &plan,
            &format!("approve with: kubectl etcd-medic recover {name} -n {} --approve {facts}", kube.namespace),
        )
        .await?;
        let p = show::Proposal::of(name, &kube.namespace, &r);
        print(out, &p, || show::recovery(&p))?;
        return Ok(0);
    };
    if approved != facts {
        let r = write_status(
            kube,
            &api,
            name,
            &plan,
            &format!("the facts changed since the plan approved ({approved}): approve {facts} if it is still wanted"),
        )
        .await?;
        let p = show::Proposal::of(name, &kube.namespace, &r);
        print(out, &p, || show::recovery(&p))?;
        return Err(Error::new(
            Code::PlanChanged,
            format!(
                "the members' data now gives facts {facts}, not the {approved} approved: read the plan above, and approve it anew if it is still wanted"
            ),
        ));
    }
    let by = whoami(kube).await?;
    // The record as read: an approval racing another writer is a conflict, never a merge.
    let patch = json!({
        "metadata": {"resourceVersion": record.metadata.resource_version},
        "spec": {"approval": {"by": by, "facts": facts}},
    });
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await.map_err(|e| api_error(&what, e))?;
    let now = jiff::Timestamp::now().to_string();
    let status = json!({"status": {
        "phase": APPROVED, "plan": plan, "proposedAt": now, "approvedAt": now,
        "message": format!("approved by {by}; the controller fences the set at its next look, then rebuilds from ordinal 0 when it is the survivor (README: \"Quorum lost\")"),
    }});
    let (pp, status) = (PatchParams::default(), Patch::Merge(status));
    let r = kube.call(&what, Code::NotFound, || api.patch_status(name, &pp, &status)).await?;
    let p = show::Proposal::of(name, &kube.namespace, &r);
    print(out, &p, || show::recovery(&p))?;
    Ok(0)
}

/// The plan awaiting approval, written as the record's status.
async fn write_status(kube: &Kube, api: &Api<EtcdRecovery>, name: &str, plan: &Plan, message: &str) -> Result<EtcdRecovery> {
    let status = json!({"status": {
        "phase": AWAITING_APPROVAL, "plan": plan, "proposedAt": jiff::Timestamp::now().to_string(), "approvedAt": null,
        "message": message,
    }});
    let what = format!("EtcdRecovery {}/{name}", kube.namespace);
    let (pp, status) = (PatchParams::default(), Patch::Merge(status));
    kube.call(&what, Code::NotFound, || api.patch_status(name, &pp, &status)).await
}

/// The requesting user's name as the API server authenticated it (a SelfSubjectReview): the
/// name the admission policy holds `spec.approval.by` to.
async fn whoami(kube: &Kube) -> Result<String> {
    let api: Api<SelfSubjectReview> = Api::all(kube.client.clone());
    let review = SelfSubjectReview::default();
    let pp = PostParams::default();
    let r = kube.call("SelfSubjectReview", Code::NotFound, || api.create(&pp, &review)).await?;
    r.status.and_then(|s| s.user_info).and_then(|u| u.username).filter(|u| !u.is_empty()).ok_or_else(|| {
        Error::new(Code::Unauthenticated, "the API server did not say who you are (SelfSubjectReview): an approval needs a name")
    })
}

fn api_error(what: &str, e: kube::Error) -> Error {
    match e {
        kube::Error::Api(s) => {
            let code = match s.code {
                401 => Code::Unauthenticated,
                403 => Code::Forbidden,
                404 => Code::NotFound,
                // Another writer came first (a create, an approval): read it again.
                409 => Code::PlanChanged,
                _ => Code::InvalidRequest,
            };
            Error::new(code, format!("{what}: {}", s.message))
        }
        e => Error::new(Code::NotReady, format!("{what}: {e}")),
    }
}

/// The plan for StatefulSet `name`: each member's files as the agent on its node reads them
/// (a forced dry run; a pod that is gone, or whose agent does not answer in time, has none),
/// then `etcd_medic_client::recovery::plan`.
async fn plan(kube: &Kube, name: &str, picked: Option<&str>, timeout: Duration) -> Result<Plan> {
    let api: Api<StatefulSet> = Api::namespaced(kube.client.clone(), &kube.namespace);
    let sts = kube.call(&format!("StatefulSet {}/{name}", kube.namespace), Code::NotFound, || api.get(name)).await?;
    let replicas = sts.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1).max(0);
    let mut members = Vec::new();
    for i in 0..replicas {
        let pod = format!("{name}-{i}");
        let found = match kube.pod(&pod).await {
            Ok(p) => Some(p),
            Err(e) if e.code == Code::PodNotFound => None,
            Err(e) => return Err(e),
        };
        let mut m = Member::of(&pod, found.as_ref());
        if found.is_none() {
            m.note = Some("no such pod".into());
        } else {
            match forced_dry_run(kube, pod.clone(), "recover", timeout).await {
                Ok(cr) => match cr.status.as_ref().and_then(|s| s.data.as_ref()) {
                    Some(d) => m.facts = d.facts(),
                    None => m.note = Some(format!("its files were not read ({})", show::error_of(&cr).message)),
                },
                Err(e) => m.note = Some(e.message),
            }
        }
        members.push(m);
    }
    recovery::plan(replicas, &sts.metadata.uid.clone().unwrap_or_default(), members, picked)
}
