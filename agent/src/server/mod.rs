//! `etcd-medic serve`: the HTTP API of DESIGN.md's contract over the remediation engine.
//!
//! A POST is admitted at once (authenticated, authorized, validated, the pod read to learn
//! its UID and node) and answered 202; the engine runs in the background and every step
//! lands in the journal, which stays the source of truth: GET reads the journal (and the
//! in-memory snapshot of what is running), so history survives restarts. A dry run runs
//! the checks inline and answers with the plan or the refusal.

pub mod admit;
pub mod auth;
pub mod limit;
pub mod metrics;
pub mod openapi;
pub mod report;
mod routes;
pub mod tls;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::cli::AuthMode;
use crate::engine::{Engine, Options, Phase, Remediation};
use crate::error::{Code, Error, Result};
use crate::kubeapi::KubeApi;
use crate::locate::{Locator, NodeLayout};
use crate::shutdown::Shutdown;
use auth::{Auth, User};
use etcd_medic_core::contract::RemediationList;
use etcd_medic_core::progress::Update;
use etcd_medic_core::request::CreateRequest;
use etcd_medic_core::resume;
use limit::RateLimiter;
use metrics::{HttpLabels, Metrics};
use report::Reporter;

/// Request bodies above this are refused with 413 before they are read whole.
pub const BODY_LIMIT: usize = 64 * 1024;
/// The most journal bytes one list answer reads (the newest first): a node's history is
/// paged by namespace and limit, never read whole into memory.
const LIST_BYTES: u64 = 16 << 20;
/// A request (a dry run included) that takes longer is answered 503.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a restore's caller waits for its disk work (which goes on after).
const RESTORE_WAIT: Duration = Duration::from_secs(20);

pub struct Config {
    pub layout: NodeLayout,
    pub api_timeout: Duration,
    /// The engine's options; each request sets `dry_run`, `force` and endpoints on a copy.
    pub engine: Options,
    pub auth: AuthMode,
    pub audiences: Vec<String>,
    pub rate_limit: u32,
    pub max_in_flight: u32,
    /// Identities (user names) not bounded per identity, for which a reserve of slots is kept:
    /// the controller's service account.
    pub reserved_for: Vec<String>,
    /// Serve HTTPS with this certificate and key (PEM files, read again when they change).
    pub tls: Option<(std::path::PathBuf, std::path::PathBuf)>,
    /// What a quorum recovery's rebuild runs with.
    pub rebuilder: crate::recovery::Rebuilder,
}

/// What needs the API server: there once it answered and the state dir is writable.
struct Ready {
    locator: Arc<Locator>,
    auth: Auth,
    /// One for the agent: its cache folds a repeated Event into the first one's series.
    recorder: kube::runtime::events::Recorder,
}

pub struct Agent {
    cfg: Config,
    ready: OnceLock<Ready>,
    not_ready_why: Mutex<String>,
    /// Snapshots of the remediations running now, by id.
    runs: Mutex<HashMap<String, Remediation>>,
    /// Serialises admission: two POSTs for one pod UID start one remediation.
    admission: tokio::sync::Mutex<()>,
    /// Pods (namespace, name) whose quarantine is being put back.
    restoring: Mutex<std::collections::HashSet<(String, String)>>,
    /// Members (namespace, pod) a quorum recovery's step works on now.
    stepping: Mutex<std::collections::HashSet<(String, String)>>,
    metrics: Metrics,
    shutdown: Shutdown,
    tasks: TaskTracker,
    limiter: RateLimiter,
    slots: Arc<admit::Slots>,
}

type Answer = std::result::Result<Response, Failure>;

/// An error answer: the problem document, and the remediation it was recorded as, if any.
pub struct Failure {
    error: Error,
    id: Option<String>,
}

impl From<Error> for Failure {
    fn from(error: Error) -> Self {
        Failure { error, id: None }
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let mut p = self.error.problem();
        p.id = self.id;
        let status = StatusCode::from_u16(p.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut resp = (status, Json(p)).into_response();
        resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

impl Agent {
    /// An agent that stops when `shutdown` does (see [`serve`]).
    pub fn new(cfg: Config, shutdown: Shutdown) -> Arc<Self> {
        Arc::new(Agent {
            limiter: RateLimiter::new(cfg.rate_limit),
            slots: admit::Slots::new(cfg.max_in_flight),
            cfg,
            ready: OnceLock::new(),
            not_ready_why: Mutex::new("starting".into()),
            runs: Mutex::new(HashMap::new()),
            admission: tokio::sync::Mutex::new(()),
            restoring: Mutex::default(),
            stepping: Mutex::default(),
            metrics: Metrics::default(),
            shutdown,
            tasks: TaskTracker::new(),
        })
    }

    fn stopping(&self) -> bool {
        self.shutdown.stopping()
    }

    fn ready(&self) -> Result<&Ready> {
        if self.stopping() {
            return Err(Error::new(Code::NotReady, "the agent is shutting down"));
        }
        self.ready
            .get()
            .ok_or_else(|| Error::new(Code::NotReady, format!("the agent is not ready: {}", self.not_ready_why.lock().unwrap())))
    }

    /// Waits (with back-off) for the API server and the state dir, then resumes what the
    /// journal says was left unfinished.
    pub async fn become_ready(self: Arc<Self>) {
        let mut wait = Duration::from_millis(500);
        while !self.stopping() {
            match self.try_ready().await {
                Ok((ready, version)) => {
                    let _ = self.ready.set(ready);
                    tracing::info!(apiserver = %version, node = %self.cfg.layout.node_name, "ready");
                    self.resume_all().await;
                    return;
                }
                Err(e) => {
                    tracing::warn!(code = %e.code, retry_in = ?wait, "not ready: {}", e.message);
                    *self.not_ready_why.lock().unwrap() = e.message;
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(15));
                }
            }
        }
    }

    async fn try_ready(&self) -> Result<(Ready, String)> {
        check_state_dir(&self.cfg.engine.state_dir)?;
        let proc_root = self.cfg.layout.proc_root.clone();
        crate::locate::blocking(move || crate::host::processes::can_inspect(&proc_root)).await?;
        let api = KubeApi::from_environment(self.cfg.api_timeout).await?;
        let version = api.ping().await?;
        let auth = match self.cfg.auth {
            AuthMode::Kubernetes => Auth::kubernetes(api.clone(), self.cfg.audiences.clone()),
            AuthMode::None => Auth::none(),
        };
        let recorder = report::recorder(api.client().clone(), &self.cfg.layout.node_name);
        Ok((Ready { locator: Arc::new(Locator { api, layout: self.cfg.layout.clone() }), auth, recorder }, version))
    }

    /// Every remediation the journal shows Running: resumed if it had changed something,
    /// closed as Refused (nothing changed) otherwise.
    async fn resume_all(self: &Arc<Self>) {
        let _admitting = self.admission.lock().await;
        for mut r in crate::journal::list_where(&self.cfg.engine.state_dir, |r| r.phase == Phase::Running) {
            if resume::needs_resume(&r) {
                tracing::warn!(id = %r.id, namespace = %r.namespace, pod = %r.pod, "resuming a remediation the agent left unfinished");
                let opts = self.options(false, false, None);
                self.runs.lock().unwrap().insert(r.id.clone(), r.clone());
                self.spawn(opts, r);
            } else if let Err(e) = crate::journal::close_abandoned(&self.cfg.engine.state_dir, &mut r) {
                tracing::error!(id = %r.id, "could not close an abandoned journal: {}", e.message);
            }
        }
    }

    fn options(&self, dry_run: bool, force: bool, endpoints: Option<Vec<String>>) -> Options {
        let mut o = self.cfg.engine.clone();
        o.dry_run = dry_run;
        o.force = force;
        if let Some(e) = endpoints {
            o.etcd_endpoints = e;
        }
        o
    }

    fn spawn(self: &Arc<Self>, opts: Options, r: Remediation) {
        let agent = self.clone();
        let span = tracing::info_span!("remediation", id = %r.id, namespace = %r.namespace, pod = %r.pod);
        self.tasks.spawn(
            async move {
                agent.metrics.in_flight.inc();
                let id = r.id.clone();
                let first = r.clone();
                // The engine runs in a task of its own: should it die (a bug), the remediation
                // is recorded as ended with `Internal`, never left blocking its pod.
                let inner = {
                    let agent = agent.clone();
                    tokio::spawn(async move { agent.run(opts, r).await }.in_current_span())
                };
                let done = match inner.await {
                    Ok(done) => done,
                    Err(e) => {
                        let last = agent.runs.lock().unwrap_or_else(|p| p.into_inner()).get(&id).cloned().unwrap_or(first);
                        agent.died(last, &e.to_string())
                    }
                };
                {
                    let mut runs = agent.runs.lock().unwrap();
                    runs.remove(&id);
                    runs.remove(&done.id);
                }
                agent.metrics.in_flight.dec();
            }
            .instrument(span),
        );
    }

    /// Records a remediation whose task died (see `resume::died`).
    fn died(&self, mut r: Remediation, why: &str) -> Remediation {
        tracing::error!(id = %r.id, "the remediation's task died: {why}");
        resume::died(&mut r, why);
        let _ = crate::journal::write(&self.cfg.engine.state_dir, &r);
        r
    }

    /// Runs the engine on `r`, reporting each snapshot (logs, metrics, Events) in order.
    async fn run(self: &Arc<Self>, opts: Options, r: Remediation) -> Remediation {
        let done = self.run_engine(opts, r).await;
        let state_dir = self.cfg.engine.state_dir.clone();
        let _ = tokio::task::spawn_blocking(move || crate::journal::prune(&state_dir)).await;
        done
    }

    async fn run_engine(self: &Arc<Self>, opts: Options, r: Remediation) -> Remediation {
        let ready = self.ready.get().expect("runs only once ready");
        let dry = opts.dry_run;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Update>();
        // What runs is known at once (GET, admission); logs, metrics and Events follow.
        let follow = move |u: Update| {
            if !dry {
                self.runs.lock().unwrap().insert(u.remediation.id.clone(), u.remediation.clone());
            }
            let _ = tx.send(u);
        };
        let engine_run = async move {
            let engine = Engine { locator: &ready.locator, opts, progress: &follow, stop: self.shutdown.flag() };
            engine.run_as(r).await
        };
        let mut reporter = Reporter::new(&ready.recorder, &self.metrics, !dry);
        let reporting = async {
            while let Some(u) = rx.recv().await {
                reporter.report(&u).await;
            }
        };
        tokio::join!(engine_run, reporting).0
    }

    /// What a new request for this pod must not run beside: a remediation of this pod that
    /// is running (or left unfinished in the journal: it is being resumed), whatever the
    /// pod's UID is now, or one of this pod instance that ended after acting. Dry runs never
    /// count, nor do refusals (they changed nothing; asking again is safe).
    fn existing(&self, namespace: &str, pod: &str, pod_uid: &str) -> Option<Remediation> {
        if let Some(r) = self.runs.lock().unwrap().values().find(|r| resume::blocks_new(r, namespace, pod, pod_uid, true)) {
            return Some(r.clone());
        }
        crate::journal::list_where(&self.cfg.engine.state_dir, |r| resume::blocks_new(r, namespace, pod, pod_uid, false)).into_iter().next()
    }

    async fn create(self: &Arc<Self>, user: &User, headers: &HeaderMap, body: std::result::Result<Bytes, BytesRejection>) -> Answer {
        let ready = self.ready()?;
        let body = body.map_err(|rej| {
            if rej.status() == StatusCode::PAYLOAD_TOO_LARGE {
                Error::new(Code::PayloadTooLarge, format!("the body is larger than {BODY_LIMIT} bytes"))
            } else {
                Error::invalid(format!("the body could not be read: {}", rej.body_text()))
            }
        })?;
        if let Some(ct) = headers.get(header::CONTENT_TYPE) {
            let json =
                ct.to_str().ok().and_then(|v| v.split(';').next()).is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"));
            if !json {
                return Err(Error::invalid("Content-Type must be application/json").into());
            }
        }
        let req = CreateRequest::parse(&body)?;
        ready.auth.authorize(user, "create", &req.namespace).await?;
        let pod = ready.locator.api.pod(&req.namespace, &req.pod).await?;
        let uid = ready.locator.admit(&pod, req.pod_uid.as_deref())?;
        let mut r = Remediation::new(&self.cfg.layout.node_name, &req.namespace, &req.pod, Some(&uid));
        r.reason = req.reason.clone();
        tracing::info!(user = %user.name, namespace = %req.namespace, pod = %req.pod, dry_run = req.dry_run, force = req.force, id = %r.id, "remediation requested");
        let opts = self.options(req.dry_run, req.force, req.etcd_endpoints);
        if req.dry_run {
            // Its own task: a caller that hangs up (or the request timeout) cannot cut a dry
            // run off before its journal says how it ended.
            let span = tracing::info_span!("remediation", id = %r.id, namespace = %r.namespace, pod = %r.pod, dry_run = true);
            let agent = self.clone();
            let done = self
                .tasks
                .spawn(async move { agent.run(opts, r).await }.instrument(span))
                .await
                .map_err(|e| Error::new(Code::Internal, format!("the dry run did not complete: {e}")))?;
            return match &done.error {
                None => Ok((StatusCode::OK, Json(done)).into_response()),
                Some(e) => Err(Failure { error: Error::new(e.code, e.message.clone()), id: Some(done.id.clone()) }),
            };
        }
        let _admitting = self.admission.lock().await;
        if self.stopping() {
            return Err(Error::new(Code::NotReady, "the agent is shutting down").into());
        }
        if let Some(existing) = self.existing(&req.namespace, &req.pod, &uid) {
            return Ok((StatusCode::OK, Json(existing)).into_response());
        }
        if self.restoring.lock().unwrap().contains(&(req.namespace.clone(), req.pod.clone())) {
            return Err(Error::new(
                Code::ClusterLocked,
                format!("a restore of pod {}/{} runs; retry once it has ended", req.namespace, req.pod),
            )
            .into());
        }
        self.runs.lock().unwrap().insert(r.id.clone(), r.clone());
        self.spawn(opts, r.clone());
        let location = format!("/v1/remediations/{}", r.id);
        Ok((StatusCode::ACCEPTED, [(header::LOCATION, location)], Json(r)).into_response())
    }

    /// Remediation `id` as it is now: running (known before its journal is first written),
    /// else as journaled.
    fn find(&self, id: &str) -> Result<Remediation> {
        let not_found = || Error::new(Code::RemediationNotFound, format!("no remediation {id:?} on node {}", self.cfg.layout.node_name));
        crate::journal::validate_id(id).map_err(|_| not_found())?;
        let running = self.runs.lock().unwrap().get(id).cloned();
        match running {
            Some(r) => Ok(r),
            None => crate::journal::read(&self.cfg.engine.state_dir, id).map_err(|_| not_found()),
        }
    }

    async fn show(&self, user: &User, id: &str) -> Answer {
        let ready = self.ready()?;
        let r = self.find(id)?;
        ready.auth.authorize(user, "get", &r.namespace).await?;
        Ok(Json(r).into_response())
    }

    /// Puts the quarantine of remediation `id` back (see `engine::restore`), once no
    /// remediation of its pod runs; authorized as `update` in the pod's namespace. The pod is
    /// marked as restoring (no remediation of it starts) until the disk work has ended, however
    /// long a hung volume takes; nothing else on the node waits for it, and the caller waits at
    /// most [`RESTORE_WAIT`].
    async fn restore(self: &Arc<Self>, user: &User, id: &str, force: bool) -> Answer {
        let ready = self.ready()?;
        let r = self.find(id)?;
        ready.auth.authorize(user, "update", &r.namespace).await?;
        let key = (r.namespace.clone(), r.pod.clone());
        {
            let _admitting = self.admission.lock().await;
            let busy = self.runs.lock().unwrap().values().any(|x| !x.dry_run && x.namespace == r.namespace && x.pod == r.pod);
            if busy || resume::needs_resume(&r) {
                return Err(Error::invalid(format!(
                    "a remediation of pod {}/{} is running or unfinished; restore once it has ended",
                    r.namespace, r.pod
                ))
                .into());
            }
            if !self.restoring.lock().unwrap().insert(key.clone()) {
                return Err(Error::new(Code::ClusterLocked, format!("a restore of pod {}/{} runs already", r.namespace, r.pod)).into());
            }
        }
        let agent = self.clone();
        let (id, who) = (id.to_string(), user.name.clone());
        let work = tokio::spawn(async move {
            let ready = agent.ready.get().expect("ready: checked above");
            let done = crate::engine::restore(&ready.locator, &agent.cfg.engine.state_dir, &id, force, &agent.cfg.engine.failpoint).await;
            agent.restoring.lock().unwrap().remove(&key);
            if let Ok((_, said)) = &done {
                tracing::info!(user = %who, id = %id, namespace = %key.0, pod = %key.1, "restore: {said}");
            }
            done
        });
        match tokio::time::timeout(RESTORE_WAIT, work).await {
            Ok(Ok(done)) => Ok(Json(done?.0).into_response()),
            Ok(Err(e)) => Err(Error::new(Code::Internal, format!("the restore did not complete: {e}")).into()),
            Err(_) => Err(Error::new(
                Code::NotReady,
                format!(
                    "the restore of pod {}/{} has not finished within {RESTORE_WAIT:?} (the volume is slow or does not answer); it goes on, and no remediation of the pod starts until it ends: ask again later",
                    r.namespace, r.pod
                ),
            )
            .into()),
        }
    }

    /// A quorum recovery's step on a member's volume (see `crate::recovery`), authorized as
    /// `create` on recoverysteps in the set's namespace (the controller's). One step per
    /// member at a time; the caller waits at most [`RESTORE_WAIT`] (a rebuild goes on, and
    /// asked again once it has ended, answers what it made).
    async fn recovery_step(self: &Arc<Self>, user: &User, body: std::result::Result<Bytes, BytesRejection>) -> Answer {
        let ready = self.ready()?;
        let body = body.map_err(|rej| Error::invalid(format!("the body could not be read: {}", rej.body_text())))?;
        let req = etcd_medic_core::step::StepRequest::parse(&body)?;
        ready.auth.authorize_on(user, auth::RECOVERY_STEPS, "create", &req.namespace).await?;
        let key = (req.namespace.clone(), req.member().to_string());
        if !self.stepping.lock().unwrap().insert(key.clone()) {
            return Err(Error::new(
                Code::ClusterLocked,
                format!("a recovery step of {}/{} runs; ask again once it has ended", key.0, key.1),
            )
            .into());
        }
        tracing::info!(user = %user.name, namespace = %req.namespace, statefulset = %req.stateful_set, holder = %req.holder, action = ?req.action, "recovery step requested");
        let agent = self.clone();
        let work = self.tasks.spawn(async move {
            let ready = agent.ready.get().expect("ready: checked above");
            let done = crate::recovery::step(&ready.locator, &agent.cfg.rebuilder, &req).await;
            agent.stepping.lock().unwrap().remove(&key);
            done
        });
        match tokio::time::timeout(RESTORE_WAIT, work).await {
            Ok(Ok(done)) => Ok(Json(done?).into_response()),
            Ok(Err(e)) => Err(Error::new(Code::Internal, format!("the recovery step did not complete: {e}")).into()),
            Err(_) => Err(Error::new(
                Code::NotReady,
                format!("the recovery step has not ended within {RESTORE_WAIT:?}; it goes on: ask again later"),
            )
            .into()),
        }
    }

    async fn list(&self, user: &User, q: ListQuery) -> Answer {
        let ready = self.ready()?;
        if let Some(ns) = &q.namespace {
            etcd_medic_core::names::validate_namespace(ns)?;
        }
        let limit = q.limit.unwrap_or(100);
        if !(1..=1000).contains(&limit) {
            return Err(Error::invalid("limit must be 1 to 1000").into());
        }
        ready.auth.authorize(user, "get", q.namespace.as_deref().unwrap_or_default()).await?;
        let of_ns = |ns: &str| q.namespace.as_ref().is_none_or(|want| want == ns);
        let running: Vec<Remediation> = self.runs.lock().unwrap().values().filter(|r| of_ns(&r.namespace)).cloned().collect();
        let state_dir = self.cfg.engine.state_dir.clone();
        let journaled = {
            let ns = q.namespace.clone();
            let skip: std::collections::HashSet<String> = running.iter().map(|r| r.id.clone()).collect();
            tokio::task::spawn_blocking(move || {
                let mut out = Vec::new();
                let mut bytes = 0;
                for e in crate::journal::index(&state_dir).into_iter().filter(|e| ns.as_ref().is_none_or(|n| *n == e.namespace)) {
                    if out.len() >= limit as usize || bytes + e.bytes > LIST_BYTES {
                        break;
                    }
                    if skip.contains(&e.id) {
                        continue;
                    }
                    if let Ok(r) = crate::journal::read(&state_dir, &e.id) {
                        bytes += e.bytes;
                        out.push(r);
                    }
                }
                out
            })
            .await
            .unwrap_or_default()
        };
        let mut items: Vec<Remediation> = running.into_iter().chain(journaled).collect();
        items.sort_by(|a, b| b.created_at.cmp(&a.created_at).then_with(|| b.id.cmp(&a.id)));
        items.truncate(limit as usize);
        Ok(Json(RemediationList { items }).into_response())
    }
}

/// The state dir takes a durable write (the journal depends on it).
fn check_state_dir(dir: &std::path::Path) -> Result<()> {
    let io = |e: std::io::Error| Error::new(Code::NotReady, format!("state dir {} is not writable: {e}", dir.display()));
    let sub = dir.join("remediations");
    std::fs::create_dir_all(&sub).map_err(io)?;
    let probe = sub.join(".ready-probe");
    std::fs::write(&probe, b"ok").and_then(|_| std::fs::File::open(&probe)?.sync_all()).map_err(io)?;
    std::fs::remove_file(&probe).map_err(io)
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only remediations of pods in this namespace (and only this namespace's access is
    /// checked); without it, the caller needs access in every namespace.
    #[param(max_length = 63, pattern = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")]
    namespace: Option<String>,
    /// At most this many, newest first (1 to 1000, default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct RestoreQuery {
    /// Put the data back even though the remediation removed the member and added it again
    /// under a new id (refused otherwise, QuorumAtRisk): the data is then a removed member's.
    #[serde(default)]
    force: bool,
}

/// The whole HTTP surface.
pub fn router(agent: Arc<Agent>) -> axum::Router {
    let v1 = axum::Router::new()
        .route("/v1/remediations", post(routes::create).get(routes::list))
        .route("/v1/remediations/{id}", get(routes::show))
        .route("/v1/remediations/{id}/restore", post(routes::restore))
        .route("/v1/recovery-steps", post(routes::recovery_step))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .route_layer(middleware::from_fn_with_state(agent.clone(), admit::limits))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(StatusCode::SERVICE_UNAVAILABLE, REQUEST_TIMEOUT));
    axum::Router::new()
        .route("/healthz", get(routes::healthz))
        .route("/readyz", get(routes::readyz))
        .route("/metrics", get(routes::metrics_text))
        .route("/openapi.json", get(routes::openapi_json))
        .merge(v1)
        .fallback(routes::fallback)
        .layer(middleware::from_fn_with_state(agent.clone(), observe))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(|_| {
            Failure::from(Error::new(Code::Internal, "the agent hit a bug handling this request; nothing was done")).into_response()
        }))
        .with_state(agent)
}

/// Connections the kernel queues before the agent accepts them. The default of 128 overflows
/// under a flood, and a connection that overflowed may be reset with its request unanswered;
/// the kernel caps this at `net.core.somaxconn`.
const BACKLOG: u32 = 4096;

/// A listener on `addr` with a deep accept queue (see [`BACKLOG`]).
pub fn listen(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    let cannot = |e: std::io::Error| anyhow::anyhow!("cannot listen on {addr}: {e}");
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4() } else { tokio::net::TcpSocket::new_v6() }.map_err(cannot)?;
    socket.set_reuseaddr(true).map_err(cannot)?;
    socket.bind(addr).map_err(cannot)?;
    socket.listen(BACKLOG).map_err(cannot)
}

/// Binds nothing itself: serves `listener` until the agent's shutdown begins (see
/// `crate::shutdown`), then stops accepting, lets each running remediation reach a safe
/// point (journaled), and returns.
pub async fn serve(agent: Arc<Agent>, listener: tokio::net::TcpListener) -> anyhow::Result<()> {
    // A certificate that cannot be read fails the start, not the first client.
    let tls = match &agent.cfg.tls {
        Some((cert, key)) => Some(tls::server_config(Arc::new(tls::ReloadingCert::load(cert, key)?))?),
        None => None,
    };
    tracing::info!(listen = %listener.local_addr()?, auth = ?agent.cfg.auth, tls = tls.is_some(), "serving");
    tokio::spawn(agent.clone().become_ready());
    let shutdown = agent.shutdown.clone();
    let stopped = async move { shutdown.stopped().await };
    match tls {
        Some(config) => tls::serve(listener, router(agent.clone()), config, stopped).await?,
        None => {
            axum::serve(listener, router(agent.clone()).into_make_service_with_connect_info::<SocketAddr>())
                .with_graceful_shutdown(stopped)
                .await?
        }
    }
    agent.tasks.close();
    agent.tasks.wait().await;
    tracing::info!("stopped");
    Ok(())
}

/// Counts every answer, and turns any error answer that is not problem+json yet (axum's own
/// 405, a timeout, a body rejection) into one with the contract's code.
async fn observe(State(a): State<Arc<Agent>>, req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().map(|m| m.as_str().to_string()).unwrap_or_else(|| "unmatched".into());
    let mut resp = next.run(req).await;
    let problem = resp.headers().get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/problem+json"));
    if resp.status().as_u16() >= 400 && !problem {
        let code = match resp.status().as_u16() {
            404 => Code::NotFound,
            405 => Code::MethodNotAllowed,
            413 => Code::PayloadTooLarge,
            429 => Code::TooManyRequests,
            408 | 503 => Code::NotReady,
            500.. => Code::Internal,
            _ => Code::InvalidRequest,
        };
        let allow = resp.headers().get(header::ALLOW).cloned();
        resp = Failure::from(Error::new(code, format!("{} ({})", code.title(), resp.status()))).into_response();
        if let Some(allow) = allow {
            resp.headers_mut().insert(header::ALLOW, allow);
        }
    }
    a.metrics.http.get_or_create(&HttpLabels { route, status: resp.status().as_u16() }).inc();
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use tower::ServiceExt;

    /// An agent that never becomes ready (no API server here), with a rate of 1 per second.
    fn agent(dir: &std::path::Path) -> Arc<Agent> {
        let layout = NodeLayout {
            node_name: "node-a".into(),
            host_root: "/".into(),
            kubelet_root: None,
            proc_root: "/proc".into(),
            container: None,
            pod_log_root: "/var/log/pods".into(),
        };
        let engine = Options {
            dry_run: false,
            force: false,
            etcd_endpoints: vec![],
            state_dir: dir.to_path_buf(),
            verify_timeout: Duration::from_secs(1),
            keep_quarantines: 1,
            lease_namespace: None,
            settle: Duration::ZERO,
            etcd: Default::default(),
            failpoint: Default::default(),
        };
        let cfg = Config {
            layout,
            api_timeout: Duration::from_secs(1),
            engine,
            auth: AuthMode::None,
            audiences: vec![],
            rate_limit: 1,
            max_in_flight: 1,
            reserved_for: vec![],
            tls: None,
            rebuilder: crate::recovery::Rebuilder {
                etcd: "etcd".into(),
                state_dir: "/nonexistent".into(),
                timeout: Duration::from_secs(1),
            },
        };
        Agent::new(cfg, Shutdown::new())
    }

    fn request(method: &str, path: &str) -> Request {
        let mut req = Request::builder().method(method).uri(path).body(Body::empty()).unwrap();
        req.extensions_mut().insert(axum::extract::ConnectInfo(SocketAddr::from(([10, 0, 0, 9], 40000))));
        req
    }

    async fn status(app: &axum::Router, method: &str, path: &str) -> (u16, String) {
        let resp = app.clone().oneshot(request(method, path)).await.unwrap();
        let status = resp.status().as_u16();
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn probes_and_metrics_are_never_rate_limited_nor_authenticated() {
        let dir = tempfile::tempdir().unwrap();
        let app = router(agent(dir.path()));
        // One client spends its /v1 budget (a burst of 2 at 1 per second)...
        let mut codes = Vec::new();
        for _ in 0..6 {
            codes.push(status(&app, "GET", "/v1/remediations").await.0);
        }
        assert!(codes.contains(&429), "{codes:?}");
        assert!(codes.iter().all(|c| *c == 429 || *c == 503), "not ready: 503 until the API server answers: {codes:?}");
        // ...and its probes still answer, as often as asked.
        for _ in 0..20 {
            assert_eq!(status(&app, "GET", "/healthz").await.0, 200);
            assert_eq!(status(&app, "GET", "/metrics").await.0, 200);
            let (code, body) = status(&app, "GET", "/readyz").await;
            assert_eq!(code, 503, "not ready here");
            assert!(body.contains("NotReady"), "{body}");
        }
    }

    #[tokio::test]
    async fn every_answer_of_the_router_carries_a_code() {
        let dir = tempfile::tempdir().unwrap();
        let app = router(agent(dir.path()));
        let (code, body) = status(&app, "GET", "/nowhere").await;
        assert_eq!(code, 404);
        assert!(body.contains(r#""code":"NotFound""#), "{body}");
        let (code, body) = status(&app, "POST", "/healthz").await;
        assert_eq!(code, 405);
        assert!(body.contains(r#""code":"MethodNotAllowed""#), "{body}");
        // Under /v1 who is calling is settled first, whatever the method: nothing about the
        // API is answered before (here: not ready, so nobody can be authenticated).
        for (method, path) in [("DELETE", "/v1/remediations"), ("POST", "/v1/remediations/abc/restore")] {
            let (code, body) = status(&app, method, path).await;
            assert_eq!(code, 503, "{body}");
            assert!(body.contains(r#""code":"NotReady""#), "{body}");
        }
    }
}
