//! The HTTP operations, as the OpenAPI document describes them: each one hands over to the
//! agent's method of the same name.

use std::sync::Arc;

use axum::Extension;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};

use super::auth::User;
use super::{Agent, Answer, Failure, ListQuery, RestoreQuery, openapi};
use crate::engine::Remediation;
use crate::error::{Code, Error, Problem};
use etcd_medic_core::contract::RemediationList;
use etcd_medic_core::request::CreateRequest;

/// The answers every `/v1` operation may give a caller, whatever it asked.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
enum CallerErrors {
    #[response(status = 401, description = "Unauthenticated", content_type = "application/problem+json")]
    Unauthenticated(Problem),
    #[response(status = 403, description = "Forbidden", content_type = "application/problem+json")]
    Forbidden(Problem),
    #[response(status = 429, description = "TooManyRequests", content_type = "application/problem+json")]
    TooManyRequests(Problem),
    #[response(status = 503, description = "NotReady", content_type = "application/problem+json")]
    NotReady(Problem),
}

#[utoipa::path(post, path = "/v1/remediations", tag = "remediations", request_body = CreateRequest,
    description = "Asks this node's agent to remediate one pod. Answered at once: 202 with the new remediation (phase Pending) and its Location; 200 with the existing one when this pod instance (UID) already has one running or finished (Refused ones excepted: nothing was changed, so asking again is safe); 200 with phase Planned for a dry run, which runs every gate inline. Refusals of a remediation that runs in the background show in its phase (Refused) and error.code.",
    responses(
        (status = 202, description = "Accepted; runs in the background", body = Remediation, headers(("Location" = String, description = "/v1/remediations/{id}"))),
        (status = 200, description = "The existing remediation of this pod instance, or a dry run's plan (phase Planned)", body = Remediation),
        (status = 400, description = "InvalidRequest", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "PodNotFound, PVCNotFound, PVNotFound", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "PodUIDMismatch, ClusterLocked (dry run)", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "PayloadTooLarge", body = Problem, content_type = "application/problem+json"),
        (status = 421, description = "WrongNode: detail names the pod's node", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "A gate refused (dry run): PodHealthy, PodRunning, QuorumAtRisk, SoleMember, DataDirNotFound, NotEtcdData, UnsafePath, NotAMount, InsufficientSpace, UnsupportedProfile, SplitBrain, UnknownFailure, SelfHealing, ForeignMember, NotThisMember", body = Problem, content_type = "application/problem+json"),
        CallerErrors,
    ),
    security(("bearer" = [])))]
pub(super) async fn create(
    State(a): State<Arc<Agent>>,
    Extension(user): Extension<User>,
    headers: HeaderMap,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Answer {
    a.create(&user, &headers, body).await
}

#[utoipa::path(get, path = "/v1/remediations/{id}", tag = "remediations",
    params(("id" = String, Path, description = "The remediation's id")),
    responses(
        (status = 200, description = "The remediation: phase, step, steps with timings, error", body = Remediation),
        (status = 404, description = "RemediationNotFound", body = Problem, content_type = "application/problem+json"),
        CallerErrors,
    ),
    security(("bearer" = [])))]
pub(super) async fn show(State(a): State<Arc<Agent>>, Extension(user): Extension<User>, Path(id): Path<String>) -> Answer {
    a.show(&user, &id).await
}

#[utoipa::path(post, path = "/v1/remediations/{id}/restore", tag = "remediations",
    description = "Puts the quarantine of remediation `id` back into its pod's data dir as it is now (what and from where come from the node's journal), and answers the remediation with `quarantine.state` Restored. Authorized as `update` on etcdremediations in the pod's namespace. Refused while any process uses the data (PodRunning: scale the StatefulSet down or wait for the crash loop's back-off), once the remediation removed the member and added it again under a new id unless `force=true` (QuorumAtRisk: the data would be a removed member's), while a remediation of the pod runs, and when files of the same name came back meanwhile (UnsafePath). Restoring twice answers the same.",
    params(("id" = String, Path, description = "The remediation's id"), RestoreQuery),
    responses(
        (status = 200, description = "Restored (or restored already): the remediation as journaled", body = Remediation),
        (status = 400, description = "InvalidRequest: nothing was quarantined, retention removed it, or a remediation of the pod runs", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "RemediationNotFound, or the pod's volume is gone (PodNotFound, PVCNotFound, PVNotFound, DataDirNotFound)", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "PodRunning, QuorumAtRisk, UnsafePath, NotAMount", body = Problem, content_type = "application/problem+json"),
        CallerErrors,
    ),
    security(("bearer" = [])))]
pub(super) async fn restore(
    State(a): State<Arc<Agent>>,
    Extension(user): Extension<User>,
    Path(id): Path<String>,
    q: std::result::Result<Query<RestoreQuery>, axum::extract::rejection::QueryRejection>,
) -> Answer {
    let Query(q) = q.map_err(|e| Error::invalid(format!("bad query: {}", e.body_text())))?;
    a.restore(&user, &id, q.force).await
}

#[utoipa::path(post, path = "/v1/recovery-steps", tag = "recoveries", request_body = etcd_medic_core::step::StepRequest,
    description = "A quorum recovery's step on one member's volume on this node, once the controller has fenced the set: `Quarantine` moves the member's data into the recovery's quarantine (it rejoins on empty data); `Rebuild` moves the survivor's there, copies it back and rebuilds the copy into a one-member cluster (revision moved forward, older ones compacted). The volume is reached through the holder pod the controller made (`<member>-hold`, labelled etcd-medic.io/holds, owned by the EtcdRecovery). Every fact is read by the agent: the record approved on its plan's facts and Fenced, the StatefulSet the one planned, at 0 and without pods, the holder the record's and mounting the member's own claim, no process using the data. Asked again, a step answers the same. Authorized as `create` on recoverysteps.etcd-medic.io in the set's namespace (the controller's).",
    responses(
        (status = 200, description = "Done (or done already): the quarantine and, for Rebuild, what the rebuild made", body = etcd_medic_core::step::StepDone),
        (status = 400, description = "InvalidRequest: not approved, not the holder, not the survivor (Rebuild) or the survivor (Quarantine)", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "NotFound, PodNotFound, PVCNotFound, PVNotFound, DataDirNotFound", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "PlanChanged, ClusterLocked (a step of this member runs)", body = Problem, content_type = "application/problem+json"),
        (status = 421, description = "WrongNode", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "NotFenced, UnsafePath, NotAMount, NotEtcdData, CorruptData, UnsupportedProfile", body = Problem, content_type = "application/problem+json"),
        CallerErrors,
    ),
    security(("bearer" = [])))]
pub(super) async fn recovery_step(
    State(a): State<Arc<Agent>>,
    Extension(user): Extension<User>,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Answer {
    a.recovery_step(&user, body).await
}

#[utoipa::path(get, path = "/v1/remediations", tag = "remediations", params(ListQuery),
    responses(
        (status = 200, description = "This node's remediations, newest first", body = RemediationList),
        (status = 400, description = "InvalidRequest", body = Problem, content_type = "application/problem+json"),
        CallerErrors,
    ),
    security(("bearer" = [])))]
pub(super) async fn list(
    State(a): State<Arc<Agent>>,
    Extension(user): Extension<User>,
    q: std::result::Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Answer {
    let Query(q) = q.map_err(|e| Error::invalid(format!("bad query: {}", e.body_text())))?;
    a.list(&user, q).await
}

#[utoipa::path(get, path = "/healthz", tag = "probes", responses((status = 200, description = "The process serves", body = String, content_type = "text/plain")))]
pub(super) async fn healthz() -> &'static str {
    "ok"
}

#[utoipa::path(get, path = "/readyz", tag = "probes", responses(
    (status = 200, description = "The API server answers and the state dir is writable", body = String, content_type = "text/plain"),
    (status = 503, description = "NotReady, with why", body = Problem, content_type = "application/problem+json"),
))]
pub(super) async fn readyz(State(a): State<Arc<Agent>>) -> Answer {
    a.ready()?;
    Ok("ok".into_response())
}

#[utoipa::path(get, path = "/metrics", tag = "probes", responses((status = 200, description = "OpenMetrics text", body = String, content_type = "application/openmetrics-text")))]
pub(super) async fn metrics_text(State(a): State<Arc<Agent>>) -> Response {
    a.metrics.ready.set(i64::from(a.ready().is_ok()));
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], a.metrics.encode()).into_response()
}

#[utoipa::path(get, path = "/openapi.json", tag = "probes", responses((status = 200, description = "This document", content_type = "application/json")))]
pub(super) async fn openapi_json() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], openapi::document()).into_response()
}

pub(super) async fn fallback(req: Request) -> Failure {
    Error::new(Code::NotFound, format!("no such path: {} {}", req.method(), req.uri().path())).into()
}
