//! Carrying out one `EtcdRemediation`, the controller's own or a person's alike: find the
//! agent on the pod's node (the EndpointSlices of the agents' Service), ask it
//! (`POST /v1/remediations` with the pod's UID and the controller's token), follow the
//! remediation to its end and mirror it into the resource's status, with Events on the pod
//! and the resource.
//!
//! Every step can be repeated: the remediation id is written to the status as soon as the
//! agent answers, and an agent asked again for the same pod instance answers the remediation
//! it already has. A new leader that takes over mid-way follows it rather than starting
//! another; nothing is done twice.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};

use etcd_medic_client::crd::{Condition, ErrorStatus, EtcdRemediation, EtcdRemediationStatus, RestoreStatus, cut, status_of};
use etcd_medic_client::{AgentClient, discover};
use etcd_medic_core::contract::Phase;
use etcd_medic_core::request::CreateRequest;

use super::Ctx;
use crate::error::{Code, Error, Result};

pub use etcd_medic_client::crd::is_final;

/// Drives `cr` to its end (or until this replica stops leading).
pub async fn carry_out(ctx: Arc<Ctx>, cr: EtcdRemediation) {
    let (ns, name) = (cr.namespace().unwrap_or_default(), cr.name_any());
    let mut status = cr.status.clone().unwrap_or_default();
    let mut backoff = Duration::from_secs(1);
    let mut said: Option<String> = None;
    // A status not written yet (the write failed): written again before anything else, so
    // that a recorded remediation id is never lost to a blip.
    let mut unwritten = false;
    // A remediation is looked at soon after it is asked (a refusal comes within
    // milliseconds, a heal within a second or two), then less often, up to `poll`.
    let mut look_in = ctx.cfg.poll.min(Duration::from_millis(50));
    while ctx.leading() && still_there(&ctx, &cr) {
        if unwritten {
            match write_status(&ctx, &ns, &name, &status).await {
                Ok(()) => unwritten = false,
                Err(e) if e.code == Code::RemediationNotFound => break,
                Err(_) => {}
            }
        }
        match step(&ctx, &cr, &mut status, &mut unwritten).await {
            Ok(true) => break,
            Ok(false) => {
                backoff = Duration::from_secs(1);
                tokio::time::sleep(look_in).await;
                look_in = (look_in * 2).min(ctx.cfg.poll);
            }
            // The record was deleted: nothing to report to.
            Err(e) if e.code == Code::RemediationNotFound => break,
            Err(e) => {
                // Not an answer (no agent yet, a blip, a pause): say so once per cause, on
                // the resource and the pod, and try again with back-off.
                if said.as_deref() != Some(e.message.as_str()) {
                    let reason = if e.message.starts_with("paused") { "Paused" } else { "AgentUnavailable" };
                    tracing::warn!(remediation = %format!("{ns}/{name}"), code = %e.code, "{}; retrying", e.message);
                    let pending = waiting(&status, &cr, reason, &e);
                    if write_status(&ctx, &ns, &name, &pending).await.is_ok() {
                        status = pending;
                    }
                    ctx.event(&cr, EventType::Warning, reason, &e.message).await;
                    said = Some(e.message.clone());
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
    // What this replica knows now, before the watch brings it: the next look must not start
    // this record again from an older copy.
    let key = (ns, name);
    if let Some(r) = ctx.rems.lock().unwrap().get_mut(&key)
        && r.metadata.uid == cr.metadata.uid
        && !unwritten
    {
        r.status = Some(status);
    }
    ctx.busy.lock().unwrap().remove(&key);
    // A worker is free: records waiting for one start at the next look.
    ctx.changed.notify_one();
}

/// The record is still the one being carried out: not deleted, not replaced by another of
/// the same name.
fn still_there(ctx: &Ctx, cr: &EtcdRemediation) -> bool {
    let key = (cr.namespace().unwrap_or_default(), cr.name_any());
    ctx.rems.lock().unwrap().get(&key).is_some_and(|r| r.metadata.uid == cr.metadata.uid && r.metadata.deletion_timestamp.is_none())
}

/// One step: dispatch, or look at the remediation once. `Ok(true)` when it ended.
async fn step(ctx: &Ctx, cr: &EtcdRemediation, status: &mut EtcdRemediationStatus, unwritten: &mut bool) -> Result<bool> {
    let ns = cr.namespace().unwrap_or_default();
    let name = cr.name_any();
    let generation = cr.metadata.generation;
    let (remediation, dispatched) = match (&status.remediation_id, &status.node) {
        (Some(id), Some(node)) => match agent(ctx, node).await?.get(id).await {
            // Only a remediation of this record's pod is mirrored (a status is writable by
            // whoever may write it, not only by this controller).
            Ok(r) if cr.is_of(&r) => (r, false),
            Ok(r) => {
                let e =
                    Error::invalid(format!("the status names remediation {} of {}/{}, not of this record's pod", r.id, r.namespace, r.pod));
                // Never kept: a restore would otherwise act on another pod's quarantine.
                (status.remediation_id, status.node) = (None, None);
                return end(ctx, cr, status, e).await;
            }
            Err(e) if retryable(&e) => return Err(e),
            Err(e) => return end(ctx, cr, status, e).await,
        },
        _ => {
            let pod = match ctx.api.pod(&ns, &cr.spec.pod).await {
                Ok(p) => p,
                Err(e) if e.code == Code::PodNotFound => return end(ctx, cr, status, e).await,
                Err(e) => return Err(e),
            };
            // Every record waits while a pause annotation holds the pod, whoever made it and
            // whatever its labels say (a label is the record maker's to write), and whether
            // or not the pod is among the watched ones.
            let seen = super::observe::pod_seen(&pod, ctx.cfg.container.as_deref());
            if let Some(on) = super::paused_on(ctx, &seen).await {
                return Err(Error::new(Code::NotReady, format!("paused by the annotation etcd-medic.io/paused on {on}")));
            }
            let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) else {
                return Err(Error::new(Code::NotReady, format!("pod {ns}/{} is not scheduled to a node yet", cr.spec.pod)));
            };
            let req = CreateRequest {
                namespace: ns.clone(),
                pod: cr.spec.pod.clone(),
                pod_uid: cr.spec.pod_uid.clone(),
                dry_run: cr.spec.dry_run,
                force: cr.spec.force,
                reason: Some(cr.spec.reason.clone().unwrap_or_else(|| format!("EtcdRemediation {ns}/{name}"))),
                etcd_endpoints: None,
            };
            let agent = agent(ctx, &node).await?;
            if !ctx.leading() {
                return Ok(false);
            }
            match agent.create_recorded(&req).await {
                Ok(created) => (created.remediation, true),
                Err(e) if retryable(&e) => return Err(e),
                Err(e) => return end(ctx, cr, status, e).await,
            }
        }
    };
    let next = status_of(&remediation, generation, Some(status), &etcd_medic_core::contract::now());
    if next != *status {
        *status = next;
        *unwritten = true;
        write_status(ctx, &ns, &name, status).await?;
        *unwritten = false;
    }
    if dispatched {
        let detected = ctx.detected_at(cr.spec.pod_uid.as_deref());
        if let Some(t) = detected {
            ctx.metrics.to_dispatch.observe(t.elapsed().as_secs_f64());
        }
        let note = format!("remediation {} on node {} ({:?})", remediation.id, remediation.node, remediation.phase);
        tracing::info!(remediation = %format!("{ns}/{name}"), id = %remediation.id, node = %remediation.node, "dispatched");
        ctx.event(cr, EventType::Normal, "Dispatched", &note).await;
    }
    if !remediation.phase.is_final() {
        return Ok(false);
    }
    let phase = format!("{:?}", remediation.phase);
    ctx.metrics.remediations.get_or_create(&super::metrics::PhaseLabels { phase: phase.clone() }).inc();
    // From the detection the record carries: the look that saw the pod healthy again has
    // forgotten it by the time the success is read (and a restarted controller never knew).
    if remediation.phase == Phase::Succeeded
        && let Some(secs) = seconds_since_detection(cr)
    {
        ctx.metrics.to_success.observe(secs);
    }
    let why = remediation.error.as_ref().map(|e| format!(": {} {}", e.code, e.message)).unwrap_or_default();
    let kind = if matches!(remediation.phase, Phase::Succeeded | Phase::Planned) { EventType::Normal } else { EventType::Warning };
    tracing::info!(remediation = %format!("{ns}/{name}"), id = %remediation.id, phase = %phase, "ended{why}");
    ctx.event(cr, kind, &format!("Remediation{phase}"), &format!("remediation {} {phase}{why}", remediation.id)).await;
    Ok(true)
}

/// A restore is asked for (`spec.restore`) and not yet answered for this generation of the
/// spec (a restore done is never asked again; a failed one is, by a later generation): the
/// remediation ended and ran on a known node.
pub fn wants_restore(cr: &EtcdRemediation) -> bool {
    let answered = |r: &RestoreStatus| r.phase != "Failed" || r.observed_generation >= cr.metadata.generation;
    cr.spec.restore && cr.ran_and_ended() && !cr.status.as_ref().and_then(|s| s.restore.as_ref()).is_some_and(answered)
}

/// How often a restore is tried while the agent cannot be asked, before it is Failed.
const RESTORE_TRIES: u32 = 10;

/// Asks the agent that made `cr`'s remediation to put its quarantine back, and records the
/// answer in `status.restore`, once for this generation of the spec. The remediation the
/// status names is proven first to be this record's own (its pod and instance, not a dry
/// run, with a quarantine): a status is writable by whoever may write it, and the agent
/// authorizes the controller for every namespace. A blip is tried again, a bounded number of
/// times, and only while the restore is still asked for.
pub async fn restore(ctx: Arc<Ctx>, cr: EtcdRemediation) {
    ask_restore(&ctx, &cr).await;
    ctx.busy.lock().unwrap().remove(&(cr.namespace().unwrap_or_default(), cr.name_any()));
    ctx.changed.notify_one();
}

async fn ask_restore(ctx: &Ctx, cr: &EtcdRemediation) {
    let (ns, name) = (cr.namespace().unwrap_or_default(), cr.name_any());
    let key = (ns.clone(), name.clone());
    let asked = (cr.metadata.uid.clone().unwrap_or_default(), cr.metadata.generation.unwrap_or(0));
    let mut status = cr.status.clone().unwrap_or_default();
    let (Some(id), Some(node)) = (status.remediation_id.clone(), status.node.clone()) else { return };
    // Asked once per record and generation by this replica, even when writing the answer
    // failed (the agent answers a restore done already with the remediation, but a failed
    // one would be tried again on every look).
    if !ctx.restores.lock().unwrap().insert(asked.clone()) {
        return;
    }
    let mut backoff = Duration::from_secs(1);
    let mut tries = 0;
    let still_asked = || {
        ctx.rems.lock().unwrap().get(&key).is_some_and(|r| {
            r.metadata.uid.as_deref() == Some(asked.0.as_str()) && r.metadata.generation == cr.metadata.generation && wants_restore(r)
        })
    };
    while ctx.leading() && still_there(ctx, cr) && still_asked() {
        tries += 1;
        let answer = async {
            let agent = agent(ctx, &node).await?;
            let r = agent.get(&id).await?;
            if !cr.is_of(&r) || r.dry_run || r.quarantine.is_none() {
                return Err(Error::invalid(format!(
                    "the status names remediation {id}, which is not a quarantine of this record's pod: nothing restored"
                )));
            }
            agent.restore(&id, cr.spec.restore_force).await
        }
        .await;
        let (phase, code, message) = match answer {
            Ok(r) => {
                let q = r.quarantine.as_ref().map(|q| q.name.clone()).unwrap_or_default();
                ("Restored", None, format!("quarantine {q} of remediation {id} put back on node {node}"))
            }
            Err(e) if retryable(&e) && tries < RESTORE_TRIES => {
                tracing::warn!(remediation = %format!("{ns}/{name}"), code = %e.code, "restore: {}; retrying", e.message);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
                continue;
            }
            Err(e) => ("Failed", Some(e.code.as_str().to_string()), cut(&e.message)),
        };
        status.restore = Some(RestoreStatus {
            phase: phase.into(),
            code: code.clone(),
            message: message.clone(),
            time: etcd_medic_core::contract::now(),
            observed_generation: cr.metadata.generation,
        });
        if write_status(ctx, &ns, &name, &status).await.is_err() {
            break;
        }
        let kind = if code.is_none() { EventType::Normal } else { EventType::Warning };
        let why = code.map(|c| format!("{c}: ")).unwrap_or_default();
        tracing::info!(remediation = %format!("{ns}/{name}"), id = %id, phase, "restore {why}{message}");
        ctx.event(cr, kind, &format!("Restore{phase}"), &format!("{why}{message}")).await;
        if let Some(r) = ctx.rems.lock().unwrap().get_mut(&key)
            && r.metadata.uid == cr.metadata.uid
        {
            r.status = Some(status.clone());
        }
        break;
    }
}

/// An error that asking again may not repeat: the agent's absence, a blip, a busy agent.
fn retryable(e: &Error) -> bool {
    matches!(e.code, Code::NotReady | Code::TooManyRequests | Code::ClusterLocked)
}

/// Ends `cr` without a remediation: the pod is gone, or the agent refused the request itself.
async fn end(ctx: &Ctx, cr: &EtcdRemediation, status: &mut EtcdRemediationStatus, e: Error) -> Result<bool> {
    let next = ended(status, cr.metadata.generation, "Failed", &e);
    write_status(ctx, &cr.namespace().unwrap_or_default(), &cr.name_any(), &next).await?;
    *status = next;
    ctx.metrics.remediations.get_or_create(&super::metrics::PhaseLabels { phase: "Failed".into() }).inc();
    ctx.event(cr, EventType::Warning, "RemediationFailed", &format!("{}: {}", e.code, e.message)).await;
    Ok(true)
}

/// A status that ends with `phase` and `e`, without a remediation on a node.
pub fn ended(previous: &EtcdRemediationStatus, generation: Option<i64>, phase: &str, e: &Error) -> EtcdRemediationStatus {
    let now = etcd_medic_core::contract::now();
    let message = format!("{}: {}", e.code, cut(&e.message));
    let cond = |t: &str, s: &str| Condition::new(Some(previous), t, s, phase, &message, generation, &now);
    EtcdRemediationStatus {
        phase: Some(phase.into()),
        error: Some(ErrorStatus { code: e.code.as_str().into(), message: cut(&e.message) }),
        conditions: vec![cond("Processing", "False"), cond("Succeeded", "False")],
        observed_generation: generation,
        ..previous.clone()
    }
}

/// `Pending` while the agent cannot be asked (or a pause holds the pod), saying why.
fn waiting(previous: &EtcdRemediationStatus, cr: &EtcdRemediation, reason: &str, e: &Error) -> EtcdRemediationStatus {
    let mut s = previous.clone();
    if s.phase.is_none() {
        s.phase = Some("Pending".into());
    }
    let message = format!("{}: {}", e.code, cut(&e.message));
    let now = etcd_medic_core::contract::now();
    let processing = Condition::new(Some(previous), "Processing", "True", reason, &message, cr.metadata.generation, &now);
    s.conditions.retain(|c| c.r#type != "Processing");
    s.conditions.push(processing);
    s.observed_generation = cr.metadata.generation;
    s
}

/// The agent on `node`, with the controller's current token (projected tokens rotate).
pub(super) async fn agent(ctx: &Ctx, node: &str) -> Result<AgentClient> {
    let url = discover::agent_on_node(ctx.api.client(), &ctx.cfg.agent_namespace, &ctx.cfg.agent_service, node).await?;
    let client = match &ctx.agent_ca {
        Some(pem) => AgentClient::with_ca_for(&url, pem, ctx.cfg.agent_server_name.as_deref())?,
        None => AgentClient::new(&url)?,
    };
    let token = match &ctx.cfg.agent_token_file {
        Some(f) => std::fs::read_to_string(f)
            .map_err(|e| Error::new(Code::NotReady, format!("cannot read the controller's token {}: {e}", f.display())))?,
        None => String::new(),
    };
    Ok(client.with_token(token).with_timeout(Duration::from_secs(70)))
}

/// Writes the status subresource: every field of `status`, absent ones cleared.
pub async fn write_status(ctx: &Ctx, ns: &str, name: &str, status: &EtcdRemediationStatus) -> Result<()> {
    let mut v = serde_json::to_value(status).map_err(|e| Error::new(Code::Internal, format!("status: {e}")))?;
    if let Value::Object(m) = &mut v {
        for k in etcd_medic_client::crd::STATUS_FIELDS {
            m.entry(k).or_insert(Value::Null);
        }
    }
    let api: Api<EtcdRemediation> = Api::namespaced(ctx.api.client().clone(), ns);
    let patch = json!({"status": v});
    let mut wait = Duration::from_millis(100);
    for attempt in 1.. {
        match api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch)).await {
            Ok(_) => return Ok(()),
            Err(e) if attempt < 6 && matches!(crate::kubeapi::classify(&e), crate::kubeapi::Attempt::Transient(_)) => {
                tokio::time::sleep(wait).await;
                wait *= 2;
            }
            Err(kube::Error::Api(s)) if s.code == 404 => {
                return Err(Error::new(Code::RemediationNotFound, format!("EtcdRemediation {ns}/{name} was deleted")));
            }
            Err(e) => return Err(Error::new(Code::NotReady, format!("cannot write the status of EtcdRemediation {ns}/{name}: {e}"))),
        }
    }
    unreachable!("the loop returns")
}

/// The resource as an Event's `regarding`.
pub fn reference(cr: &EtcdRemediation) -> ObjectReference {
    cr.object_ref(&())
}

/// The pod of `cr` as an Event's `related`.
pub fn pod_reference(cr: &EtcdRemediation) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        namespace: cr.namespace(),
        name: Some(cr.spec.pod.clone()),
        uid: cr.spec.pod_uid.clone(),
        ..Default::default()
    }
}

/// An Event about `cr`, on the resource and (as `related`) its pod.
pub fn event(reason: &str, note: &str, kind: EventType, cr: &EtcdRemediation) -> Event {
    Event {
        type_: kind,
        reason: reason.into(),
        note: Some(etcd_medic_core::signature::truncate(&format!("EtcdRemediation {}: {note}", cr.name_any()), 1000)),
        action: "Remediate".into(),
        secondary: Some(pod_reference(cr)),
    }
}

/// Seconds from the detection a controller's record carries (`etcd-medic.io/detected-at`) to
/// now; `None` for a person's record.
fn seconds_since_detection(cr: &EtcdRemediation) -> Option<f64> {
    let at: jiff::Timestamp = cr.annotations().get(etcd_medic_client::crd::DETECTED_AT)?.parse().ok()?;
    let secs = jiff::Timestamp::now().duration_since(at).as_secs_f64();
    (secs >= 0.0).then_some(secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ended_status_keeps_what_was_known_and_says_why() {
        let before = EtcdRemediationStatus { node: Some("node-b".into()), phase: Some("Pending".into()), ..Default::default() };
        let s = ended(&before, Some(2), "Failed", &Error::new(Code::PodNotFound, "pod apisix/apisix-etcd-1 not found"));
        assert_eq!((s.phase.as_deref(), s.node.as_deref(), s.observed_generation), (Some("Failed"), Some("node-b"), Some(2)));
        assert_eq!(s.error.as_ref().map(|e| e.code.as_str()), Some("PodNotFound"));
        assert!(s.conditions.iter().any(|c| c.r#type == "Succeeded" && c.status == "False"));
        assert!(is_final(Some(&s)));
        assert!(!is_final(Some(&before)) && !is_final(None));
        assert!(retryable(&Error::new(Code::NotReady, "")) && !retryable(&Error::new(Code::PodUIDMismatch, "")));
    }

    #[test]
    fn a_restore_is_asked_once_of_an_ended_remediation_that_ran() {
        let mut cr =
            EtcdRemediation::new("r", etcd_medic_client::crd::EtcdRemediationSpec { pod: "p".into(), restore: true, ..Default::default() });
        let ran = EtcdRemediationStatus {
            phase: Some("Succeeded".into()),
            node: Some("n".into()),
            remediation_id: Some("abc".into()),
            ..Default::default()
        };
        cr.status = Some(ran.clone());
        assert!(wants_restore(&cr));
        cr.status = Some(EtcdRemediationStatus { phase: Some("Running".into()), ..ran.clone() });
        assert!(!wants_restore(&cr), "not while it runs");
        for phase in ["Planned", "Refused"] {
            cr.status = Some(EtcdRemediationStatus { phase: Some(phase.into()), ..ran.clone() });
            assert!(!wants_restore(&cr), "a {phase} remediation moved nothing");
        }
        cr.status = Some(EtcdRemediationStatus { remediation_id: None, ..ran.clone() });
        assert!(!wants_restore(&cr), "nothing ran: nothing to put back");
        cr.metadata.generation = Some(2);
        let failed =
            RestoreStatus { phase: "Failed".into(), code: Some("PodRunning".into()), observed_generation: Some(2), ..Default::default() };
        cr.status = Some(EtcdRemediationStatus { restore: Some(failed.clone()), ..ran.clone() });
        assert!(!wants_restore(&cr), "answered for this generation");
        cr.metadata.generation = Some(4);
        assert!(wants_restore(&cr), "a failed restore asked again by a later generation");
        let done = RestoreStatus { phase: "Restored".into(), ..failed };
        cr.status = Some(EtcdRemediationStatus { restore: Some(done), ..ran.clone() });
        assert!(!wants_restore(&cr), "a restore done is never asked again");
        cr.status = Some(ran);
        cr.spec.restore = false;
        assert!(!wants_restore(&cr));
    }
}
