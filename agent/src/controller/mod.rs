//! `etcd-medic controller`: watches etcd pods cluster-wide, detects the ones that crash-loop
//! (`etcd_medic_core::detect`), reads why (`etcd_medic_core::signature`), decides whether a
//! remediation may run now, records it as an `EtcdRemediation`, and dispatches it to the
//! agent on the pod's node ([`dispatch`]). Two replicas; one leads ([`leader`]), the other
//! stands by with warm caches.
//!
//! Every "not now" has a reason: a hold (paused, a storm, the cluster busy, too many
//! attempts, a back-off) is logged, counted and told once as an Event on the pod; a crash
//! the agent must not touch (a split brain, a lost quorum, an unknown failure) is recorded
//! as a `Refused` EtcdRemediation, so that a person finds it with `kubectl get etcdrem`.

pub mod dispatch;
mod fence;
pub mod leader;
pub mod metrics;
pub mod observe;
mod pause;
mod quorum;
mod record;
mod rejoin;
pub(crate) use pause::paused_on;
use record::{record, tell_hold};
mod watch;
mod workers;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use kube::ResourceExt;
use kube::api::{Api, LogParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};

use etcd_medic_client::crd::{EtcdRemediation, RESTARTS};
use etcd_medic_core::detect::{self, Around, Hold, Limits, Thresholds};
use etcd_medic_core::signature::{self, Signature};

use crate::error::{Code, Error};
use crate::kubeapi::KubeApi;
use crate::shutdown::Shutdown;
use metrics::Metrics;
use observe::PodSeen;

/// What the controller is told (see `etcd-medic controller --help`).
#[derive(Clone, Debug)]
pub struct Config {
    /// Watched namespaces; all when empty.
    pub namespaces: Vec<String>,
    pub selector: String,
    pub container: Option<String>,
    pub thresholds: Thresholds,
    pub limits: Limits,
    /// How long a set has fewer than a majority of members Ready before its recovery is
    /// proposed ([`quorum`]).
    pub quorum_lost_for: Duration,
    /// The image of the holder pods that give the agents a fenced member's volume (the
    /// agent's own); without it, a fenced recovery's rebuild stays a person's.
    pub holder_image: Option<String>,
    pub dry_run: bool,
    pub agent_namespace: String,
    pub agent_service: String,
    pub agent_token_file: Option<PathBuf>,
    /// The agents' serving CA (HTTPS agents), read at start.
    pub agent_ca_file: Option<PathBuf>,
    /// The name the agents' certificate is verified for, instead of their pod IP.
    pub agent_server_name: Option<String>,
    pub lease_namespace: String,
    pub lease_name: String,
    pub lease_duration: Duration,
    pub identity: String,
    pub admin: SocketAddr,
    pub api_timeout: Duration,
    /// The longest wait between two looks at the watched pods. A look is made at once on
    /// every change the watches bring, and when the next threshold or back-off falls due;
    /// this fallback only refreshes what is not watched (the pause annotations of
    /// StatefulSets and namespaces).
    pub fallback: Duration,
    /// How often a running remediation is looked at.
    pub poll: Duration,
}

/// A pod detected as failing, from the first time it was.
#[derive(Clone, Debug)]
struct Detected {
    at: Instant,
    /// The same moment on the wall clock, for the record.
    at_wall: jiff::Timestamp,
    restarts: u32,
    terminated_now: bool,
    signature: Signature,
    evidence: Option<String>,
}

pub struct Ctx {
    pub cfg: Config,
    /// PEM of the agents' serving CA.
    agent_ca: Option<Vec<u8>>,
    pub api: KubeApi,
    pub metrics: Metrics,
    recorder: Recorder,
    pods: Mutex<HashMap<(String, String), PodSeen>>,
    rems: Mutex<HashMap<(String, String), EtcdRemediation>>,
    /// The watches whose first list is in.
    synced: Mutex<HashSet<String>>,
    watches: usize,
    leading: AtomicBool,
    lead: Arc<leader::Lead>,
    /// Remediations being carried out by this replica.
    busy: Mutex<HashSet<(String, String)>>,
    /// The restores asked by this replica, by record uid and spec generation.
    restores: Mutex<HashSet<(String, i64)>>,
    detected: Mutex<HashMap<String, Detected>>,
    /// The hold each held pod (by uid) was last told of.
    held: Mutex<HashMap<String, String>>,
    pauses: Mutex<HashMap<String, (Instant, bool)>>,
    /// Pods (by uid) whose record could not be created, and when to try again: a refusal of
    /// the API server (a quota, a webhook, an invalid name) is not asked again every second.
    create_failed: Mutex<HashMap<String, Instant>>,
    /// The sets without quorum, and the recoveries proposed ([`quorum`]).
    quorum: Mutex<quorum::Lost>,
    /// The approved recoveries being fenced ([`fence`]).
    fences: Mutex<fence::Busy>,
    pub(crate) changed: tokio::sync::Notify,
}

impl Ctx {
    /// This replica leads, and its last renewal is recent enough to act on (see
    /// `leader::Lead`): checked before every write that acts.
    pub fn leading(&self) -> bool {
        self.leading.load(Ordering::SeqCst) && self.lead.held()
    }

    /// Every watch has its first list: decisions see the whole picture.
    pub fn ready(&self) -> bool {
        self.synced.lock().unwrap().len() == self.watches
    }

    fn detected_at(&self, uid: Option<&str>) -> Option<Instant> {
        uid.and_then(|u| self.detected.lock().unwrap().get(u).map(|d| d.at))
    }

    /// An Event on `cr` (its pod as `related`); a failure to record it is logged only.
    async fn event(&self, cr: &EtcdRemediation, kind: EventType, reason: &str, note: &str) {
        let ev = dispatch::event(reason, note, kind, cr);
        if let Err(e) = self.recorder.publish(&ev, &dispatch::reference(cr)).await {
            tracing::warn!(reason, "could not record the Event: {e}");
        }
    }

    async fn pod_event(&self, pod: &PodSeen, kind: EventType, reason: &str, note: &str) {
        let regarding = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            namespace: Some(pod.namespace.clone()),
            name: Some(pod.name.clone()),
            uid: Some(pod.uid.clone()),
            ..Default::default()
        };
        let ev = Event {
            type_: kind,
            reason: reason.into(),
            note: Some(signature::truncate(note, 1000)),
            action: "Detect".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &regarding).await {
            tracing::warn!(reason, "could not record the Event: {e}");
        }
    }
}

/// Runs the controller until the shutdown, or until it loses the lead (an error: the
/// process exits and restarts as a standby).
pub async fn run(cfg: Config, shutdown: Shutdown) -> anyhow::Result<()> {
    let agent_ca = match &cfg.agent_ca_file {
        Some(f) => Some(std::fs::read(f).map_err(|e| Error::invalid(format!("cannot read --agent-ca-file {}: {e}", f.display())))?),
        None => None,
    };
    let api = KubeApi::from_environment(cfg.api_timeout).await?;
    let scopes: Vec<Option<String>> =
        if cfg.namespaces.is_empty() { vec![None] } else { cfg.namespaces.iter().cloned().map(Some).collect() };
    let recorder = Recorder::new(
        api.client().clone(),
        Reporter { controller: "etcd-medic.io/controller".into(), instance: Some(cfg.identity.clone()) },
    );
    let ctx = Arc::new(Ctx {
        watches: scopes.len() * 2,
        cfg,
        agent_ca,
        api,
        metrics: Metrics::default(),
        recorder,
        pods: Mutex::default(),
        rems: Mutex::default(),
        synced: Mutex::default(),
        leading: AtomicBool::new(false),
        lead: Arc::default(),
        busy: Mutex::default(),
        restores: Mutex::default(),
        detected: Mutex::default(),
        held: Mutex::default(),
        pauses: Mutex::default(),
        create_failed: Mutex::default(),
        quorum: Mutex::default(),
        fences: Mutex::default(),
        changed: tokio::sync::Notify::new(),
    });
    let admin = crate::server::listen(ctx.cfg.admin)?;
    tokio::spawn(serve_admin(ctx.clone(), admin, shutdown.clone()));
    for scope in scopes {
        tokio::spawn(watch::watch_pods(ctx.clone(), scope.clone()));
        tokio::spawn(watch::watch_remediations(ctx.clone(), scope));
    }
    let election = leader::Election {
        api: ctx.api.clone(),
        namespace: ctx.cfg.lease_namespace.clone(),
        name: ctx.cfg.lease_name.clone(),
        me: ctx.cfg.identity.clone(),
        duration: ctx.cfg.lease_duration,
        lead: ctx.lead.clone(),
    };
    let lease = match election.acquire(&shutdown).await {
        Ok(l) => l,
        Err(_) => return Ok(()),
    };
    ctx.leading.store(true, Ordering::SeqCst);
    ctx.metrics.leader.set(1);
    let lost = {
        let shutdown = shutdown.clone();
        tokio::spawn(async move { election.keep(lease, &shutdown).await })
    };
    tokio::pin!(lost);
    // Looks are made on the watches' changes (coalesced: a burst of events is one look) and
    // when something the last look waited for falls due.
    let mut next = Duration::ZERO;
    let mut cause;
    let mut fenced_at = None;
    loop {
        cause = if next == ctx.cfg.fallback { Look::Fallback } else { Look::Due };
        tokio::select! {
            r = &mut lost => {
                ctx.leading.store(false, Ordering::SeqCst);
                // What only the leader counts is no longer this replica's to tell.
                ctx.metrics.leader.set(0);
                ctx.metrics.failing.set(0);
                ctx.metrics.holds.clear();
                if shutdown.stopping() {
                    return Ok(());
                }
                let e = r.unwrap_or_else(|e| Error::new(Code::Internal, format!("the lease's renewal ended: {e}")));
                tracing::error!("{}; exiting to stand by anew", e.message);
                return Err(e.into());
            }
            _ = tokio::time::sleep(next) => {}
            _ = ctx.changed.notified() => cause = Look::Event,
        }
        next = ctx.cfg.fallback;
        if ctx.ready() && ctx.leading() && !shutdown.stopping() {
            ctx.metrics.looks.get_or_create(&metrics::CauseLabels { cause: cause.as_str().into() }).inc();
            if let Some(due) = evaluate(&ctx, cause).await {
                next = next.min(due);
            }
            workers::reconcile(&ctx);
            // Approved recoveries: at the first look and then at the fallback's pace (an
            // approval is a person's act, not a pod's event).
            if fenced_at.is_none_or(|t: Instant| t.elapsed() >= ctx.cfg.fallback) {
                fence::look(&ctx).await;
                fenced_at = Some(Instant::now());
            }
        }
    }
}

/// The label with which the controller records what it decided for its own records: a
/// `refused` one is never dispatched, even before its status (written right after the
/// create) is seen.
const DECISION: &str = "etcd-medic.io/decision";

/// What the controller decided for a record of its own (`None`: a person's).
pub fn decision(r: &EtcdRemediation) -> Option<&str> {
    r.labels().get(DECISION).map(String::as_str)
}

/// What caused a look at the watched pods.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Look {
    /// A watch brought a change (events that come together make one look).
    Event,
    /// Something the last look waited for fell due (a threshold, a back-off), or the first
    /// look after the lead was taken.
    Due,
    /// Nothing happened for `Config::fallback`.
    Fallback,
}

impl Look {
    fn as_str(self) -> &'static str {
        match self {
            Look::Event => "event",
            Look::Due => "due",
            Look::Fallback => "fallback",
        }
    }
}

/// A failing pod that is a candidate, and by which rule (with its signature, when the rule
/// read it).
struct Candidate {
    pod: PodSeen,
    by: detect::Candidacy,
    read: Option<Detected>,
}

/// One look at every watched pod: the candidates, the holds, the dispatches. Returns when
/// the next look is due for a reason no watch event brings (a pod reaching `--failing-for`,
/// a back-off ending), if any.
async fn evaluate(ctx: &Arc<Ctx>, look: Look) -> Option<Duration> {
    let now = jiff::Timestamp::now();
    let t = ctx.cfg.thresholds;
    let mut due: Option<Duration> = None;
    let mut wake = |d: Duration| due = Some(due.map_or(d, |x| x.min(d)));
    // Only members of a StatefulSet: an etcd cluster the agent knows how to heal, and no
    // stray pod that merely carries the label counts toward a storm.
    let (by_thresholds, below, members) = {
        let pods = ctx.pods.lock().unwrap();
        let mut members: HashMap<(String, String), ClusterSeenAll> = HashMap::new();
        let (mut by_thresholds, mut below) = (Vec::new(), Vec::new());
        for p in pods.values() {
            let Some(cluster) = &p.cluster else { continue };
            let m = members.entry((p.namespace.clone(), cluster.clone())).or_default();
            m.members += 1;
            if p.ready() {
                m.ready.insert(p.uid.clone());
            }
            if p.deleting {
                continue;
            }
            match detect::detect(&p.container(now), &t) {
                Ok(()) => by_thresholds.push(p.clone()),
                Err(e) if e.below_thresholds() => {
                    // Time alone makes it a candidate: look again then.
                    if p.restarts >= t.min_restarts
                        && let Some(since) = p.not_ready_since
                    {
                        let left = since.as_millisecond() + t.failing_for_secs * 1000 - now.as_millisecond();
                        wake(Duration::from_millis(left.clamp(0, i64::MAX) as u64));
                    }
                    below.push(p.clone());
                }
                Err(_) => {}
            }
        }
        (by_thresholds, below, members)
    };
    let counted: Vec<((String, String), usize, usize)> = members.iter().map(|(k, m)| (k.clone(), m.members, m.ready.len())).collect();
    if let Some(d) = quorum::look(ctx, &counted) {
        wake(d);
    }
    // Pods no longer failing are forgotten (a new failure is a new detection).
    let failing: HashSet<String> = by_thresholds.iter().chain(&below).map(|p| p.uid.clone()).collect();
    ctx.metrics.failing.set(failing.len() as i64);
    ctx.detected.lock().unwrap().retain(|uid, _| failing.contains(uid.as_str()));
    ctx.create_failed.lock().unwrap().retain(|uid, _| failing.contains(uid.as_str()));
    ctx.pauses.lock().unwrap().retain(|_, (at, _)| at.elapsed() < Duration::from_secs(10));
    ctx.held.lock().unwrap().retain(|uid, _| failing.contains(uid.as_str()));
    let mut candidates: Vec<Candidate> =
        by_thresholds.into_iter().map(|pod| Candidate { pod, by: detect::Candidacy::Thresholds, read: None }).collect();
    // Failing members per cluster, candidates or not (yet): more than one is a ClusterStorm.
    let mut per_cluster: HashMap<(String, String), usize> = HashMap::new();
    for p in candidates.iter().map(|c| &c.pod).chain(&below) {
        *per_cluster.entry((p.namespace.clone(), p.cluster.clone().unwrap_or_default())).or_default() += 1;
    }
    // The first-crash rule: a failure that can only repeat.
    if t.first_crash {
        for pod in below {
            if recorded_for(ctx, &pod) {
                continue;
            }
            let d = detection(ctx, &pod).await;
            match detect::first_crash(&pod.container(now), &t, d.signature) {
                Ok(()) => candidates.push(Candidate { pod, by: detect::Candidacy::FirstCrash, read: Some(d) }),
                Err(why) => tracing::debug!(namespace = %pod.namespace, pod = %pod.name, why = ?why, "not a candidate at its first crash"),
            }
        }
    }
    // Storms are counted per namespace (one tenant's failures hold only its own heals) and
    // across namespaces (many tenants failing at once hold every heal).
    let mut failing_clusters_in: HashMap<String, usize> = HashMap::new();
    for (ns, _) in candidates.iter().map(|c| (&c.pod.namespace, &c.pod.cluster)).collect::<HashSet<_>>() {
        *failing_clusters_in.entry(ns.clone()).or_default() += 1;
    }
    let mut clusters_in: HashMap<String, usize> = HashMap::new();
    for (ns, _) in members.keys() {
        *clusters_in.entry(ns.clone()).or_default() += 1;
    }
    let (failing_namespaces, namespaces) = (failing_clusters_in.len(), clusters_in.len());
    let mut holds: HashMap<&'static str, i64> = HashMap::new();
    for Candidate { pod, by, read } in candidates {
        let pod = &pod;
        if recorded_for(ctx, pod) {
            continue;
        }
        let d = match read {
            Some(d) => d,
            None => detection(ctx, pod).await,
        };
        let cluster = pod.cluster.clone().unwrap_or_default();
        let around = Around {
            paused_on: paused_on(ctx, pod).await,
            failing_in_cluster: per_cluster.get(&(pod.namespace.clone(), cluster.clone())).copied().unwrap_or(1),
            cluster: members.get(&(pod.namespace.clone(), cluster.clone())).map(|m| m.without(&pod.uid)).unwrap_or_default(),
            failing_clusters: failing_clusters_in.get(&pod.namespace).copied().unwrap_or(1),
            clusters: clusters_in.get(&pod.namespace).copied().unwrap_or(1),
            failing_namespaces,
            namespaces,
            in_flight: in_flight(ctx, &pod.namespace, &cluster),
            attempts_secs_ago: attempts(ctx, pod, now, false),
            refusals_secs_ago: attempts(ctx, pod, now, true),
        };
        match detect::decide(&around, &ctx.cfg.limits) {
            Err(hold) => {
                match &hold {
                    Hold::Cooldown { retry_in_secs } => wake(Duration::from_secs(*retry_in_secs as u64)),
                    Hold::Paused { .. } => wake(Duration::from_secs(10)),
                    _ => {}
                }
                *holds.entry(hold.as_str()).or_default() += 1;
                tell_hold(ctx, pod, &hold).await;
            }
            Ok(()) => {
                ctx.held.lock().unwrap().remove(&pod.uid);
                record(ctx, pod, &d, by, look).await;
            }
        }
    }
    ctx.metrics.holds.clear();
    for (reason, n) in holds {
        ctx.metrics.holds.get_or_create(&metrics::ReasonLabels { reason: reason.into() }).set(n);
    }
    if let Some(retry) = ctx.create_failed.lock().unwrap().values().min() {
        wake(retry.saturating_duration_since(Instant::now()));
    }
    due
}

/// A cluster's members as one look counts them.
#[derive(Default)]
struct ClusterSeenAll {
    members: usize,
    /// The Ready ones, by uid.
    ready: HashSet<String>,
}

impl ClusterSeenAll {
    /// The cluster as seen by the rule for one of its pods.
    fn without(&self, uid: &str) -> detect::ClusterSeen {
        detect::ClusterSeen { members: self.members, ready_others: self.ready.iter().filter(|u| *u != uid).count() }
    }
}

/// An EtcdRemediation of this pod instance settles it (see `detect::settles`).
fn recorded_for(ctx: &Ctx, pod: &PodSeen) -> bool {
    ctx.rems.lock().unwrap().values().any(|r| {
        let s = r.status.as_ref();
        r.namespace().as_deref() == Some(&pod.namespace)
            && r.spec.pod_uid.as_deref() == Some(&pod.uid)
            && detect::settles(s.and_then(|s| s.phase.as_deref()), s.and_then(|s| s.error.as_ref()).map(|e| e.code.as_str()), decision(r))
    })
}

/// The pod's signature, read once per crash: its termination message, else the previous
/// container's log tail (the chart does not set `FallbackToLogsOnError`).
async fn detection(ctx: &Ctx, pod: &PodSeen) -> Detected {
    if let Some(d) =
        ctx.detected.lock().unwrap().get(&pod.uid).filter(|d| d.restarts == pod.restarts && d.terminated_now == pod.terminated_now)
    {
        return d.clone();
    }
    let (mut sig, mut evidence) = observe::signature_of(&pod.message);
    if sig == Signature::Unknown {
        let api: Api<Pod> = Api::namespaced(ctx.api.client().clone(), &pod.namespace);
        // Bounded in lines and bytes: a tenant's log may hold a few enormous lines.
        // The crashed start: the current container while the kubelet has not started the
        // next (its first crash), else the previous one.
        let lp = LogParams {
            container: ctx.cfg.container.clone(),
            previous: !pod.terminated_now,
            tail_lines: Some(200),
            limit_bytes: Some(64 << 10),
            ..Default::default()
        };
        match tokio::time::timeout(ctx.cfg.api_timeout, api.logs(&pod.name, &lp)).await {
            Ok(Ok(log)) => (sig, evidence) = observe::signature_of(&log),
            Ok(Err(e)) => tracing::debug!(pod = %pod.name, "no previous log: {e}"),
            Err(_) => tracing::debug!(pod = %pod.name, "the previous log did not come in time"),
        }
    }
    let first = ctx.detected.lock().unwrap().get(&pod.uid).map(|d| (d.at, d.at_wall));
    let (at, at_wall) = first.unwrap_or_else(|| (Instant::now(), jiff::Timestamp::now()));
    let d = Detected { at, at_wall, restarts: pod.restarts, terminated_now: pod.terminated_now, signature: sig, evidence };
    if first.is_none() {
        ctx.metrics.detections.get_or_create(&metrics::SignatureLabels { signature: sig.as_str().into() }).inc();
        tracing::info!(namespace = %pod.namespace, pod = %pod.name, signature = sig.as_str(), restarts = pod.restarts, "failing etcd pod detected");
    }
    ctx.detected.lock().unwrap().insert(pod.uid.clone(), d.clone());
    d
}

/// Where a pause annotation holds this pod: on it, its StatefulSet or its namespace (the
/// A remediation of `cluster` not yet ended (its pod's name).
fn in_flight(ctx: &Ctx, namespace: &str, cluster: &str) -> Option<String> {
    let pods = ctx.pods.lock().unwrap();
    ctx.rems
        .lock()
        .unwrap()
        .values()
        .filter(|r| {
            r.namespace().as_deref() == Some(namespace)
                && !r.spec.dry_run
                && decision(r) != Some("refused")
                && !dispatch::is_final(r.status.as_ref())
        })
        .find(|r| {
            let of = pods.get(&(namespace.to_string(), r.spec.pod.clone())).and_then(|p| p.cluster.clone());
            of.as_deref().unwrap_or(&r.spec.pod) == cluster
        })
        .map(|r| r.spec.pod.clone())
}

/// How long ago this pod's earlier remediations (dispatched, not dry runs) were made: the
/// attempts, or (`refused`) those the agent refused, which changed nothing, while they hold
/// (`detect::refusal_holds`).
fn attempts(ctx: &Ctx, pod: &PodSeen, now: jiff::Timestamp, refused: bool) -> Vec<i64> {
    let holds = |r: &EtcdRemediation| {
        let recorded_at = r.annotations().get(RESTARTS).and_then(|n| n.parse::<u32>().ok());
        detect::refusal_holds(r.spec.pod_uid.as_deref() == Some(pod.uid.as_str()), recorded_at, pod.restarts)
    };
    ctx.rems
        .lock()
        .unwrap()
        .values()
        .filter(|r| r.namespace().as_deref() == Some(&pod.namespace) && r.spec.pod == pod.name && !r.spec.dry_run)
        .filter(|r| r.status.as_ref().is_some_and(|s| s.remediation_id.is_some() && (s.phase.as_deref() == Some("Refused")) == refused))
        .filter(|r| !refused || holds(r))
        .filter_map(|r| r.metadata.creation_timestamp.as_ref().map(|t| now.duration_since(t.0).as_secs()))
        .collect()
}

/// `/healthz`, `/readyz` (every watch listed) and `/metrics`, on the admin port.
async fn serve_admin(ctx: Arc<Ctx>, listener: tokio::net::TcpListener, shutdown: Shutdown) {
    use axum::http::StatusCode;
    use axum::routing::get;
    let ready = ctx.clone();
    let metrics = ctx.clone();
    let app = axum::Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let r = ready.ready();
                async move { if r { (StatusCode::OK, "ok") } else { (StatusCode::SERVICE_UNAVAILABLE, "the first lists are not in yet") } }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let body = metrics.metrics.encode();
                async move { ([(axum::http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], body) }
            }),
        );
    let stop = shutdown.clone();
    if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(async move { stop.stopped().await }).await {
        tracing::error!("the admin server stopped: {e}");
    }
}
