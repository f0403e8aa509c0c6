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
pub mod leader;
pub mod metrics;
pub mod observe;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Namespace, ObjectReference, Pod};
use kube::ResourceExt;
use kube::api::{Api, LogParams, ObjectMeta, PostParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::watcher;

use etcd_medic_client::crd::{CANDIDACY, DETECTED_AT, DiagnosisStatus, EtcdRemediation, EtcdRemediationSpec, FAILING_SINCE, RESTARTS};
use etcd_medic_core::detect::{self, Around, Hold, Limits, Thresholds};
use etcd_medic_core::signature::{self, Action, Signature};

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
        changed: tokio::sync::Notify::new(),
    });
    let admin = crate::server::listen(ctx.cfg.admin)?;
    tokio::spawn(serve_admin(ctx.clone(), admin, shutdown.clone()));
    for scope in scopes {
        tokio::spawn(watch_pods(ctx.clone(), scope.clone()));
        tokio::spawn(watch_remediations(ctx.clone(), scope));
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
    loop {
        cause = if next == ctx.cfg.fallback { Look::Fallback } else { Look::Due };
        tokio::select! {
            r = &mut lost => {
                ctx.leading.store(false, Ordering::SeqCst);
                ctx.metrics.leader.set(0);
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
            reconcile(&ctx);
        }
    }
}

/// Keeps `ctx.pods` as the watch of `scope` (a namespace, or all) sees the selected pods.
async fn watch_pods(ctx: Arc<Ctx>, scope: Option<String>) {
    let api: Api<Pod> = scoped(&ctx, &scope);
    let config = watcher::Config::default().labels(&ctx.cfg.selector);
    keep_watching(ctx, api, config, "pods", scope, |c| &c.pods, |c, p| observe::pod_seen(&p, c.cfg.container.as_deref())).await
}

/// Keeps `ctx.rems` as the watch of `scope` sees the EtcdRemediations.
async fn watch_remediations(ctx: Arc<Ctx>, scope: Option<String>) {
    let api: Api<EtcdRemediation> = scoped(&ctx, &scope);
    keep_watching(ctx, api, watcher::Config::default(), "etcdremediations", scope, |c| &c.rems, slim).await
}

fn scoped<K>(ctx: &Ctx, scope: &Option<String>) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match scope {
        Some(ns) => Api::namespaced(ctx.api.client().clone(), ns),
        None => Api::all(ctx.api.client().clone()),
    }
}

/// The cache a watch keeps, by (namespace, name).
type Cache<V> = Mutex<HashMap<(String, String), V>>;

/// Keeps one of `ctx`'s caches as a watch of `api` sees its objects (`keep` makes what is
/// kept of one). A relist drops what it no longer has (deleted while the watch was down);
/// the first list in counts toward readiness, and the memory its decoding took is handed
/// back.
async fn keep_watching<K, V>(
    ctx: Arc<Ctx>,
    api: Api<K>,
    config: watcher::Config,
    what: &str,
    scope: Option<String>,
    cache: for<'a> fn(&'a Ctx) -> &'a Cache<V>,
    keep: fn(&Ctx, K) -> V,
) where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let name = format!("{what}/{}", scope.as_deref().unwrap_or("*"));
    let mut listed: HashSet<(String, String)> = HashSet::new();
    let mut stream = watcher(api, config).default_backoff().boxed();
    while let Some(ev) = stream.next().await {
        let in_scope = |k: &(String, String)| scope.as_ref().is_none_or(|ns| *ns == k.0);
        match ev {
            Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => {
                let key = (o.namespace().unwrap_or_default(), o.name_any());
                listed.insert(key.clone());
                let kept = keep(&ctx, o);
                cache(&ctx).lock().unwrap().insert(key, kept);
            }
            Ok(watcher::Event::Delete(o)) => {
                cache(&ctx).lock().unwrap().remove(&(o.namespace().unwrap_or_default(), o.name_any()));
            }
            Ok(watcher::Event::Init) => listed.clear(),
            Ok(watcher::Event::InitDone) => {
                cache(&ctx).lock().unwrap().retain(|k, _| !in_scope(k) || listed.contains(k));
                if ctx.synced.lock().unwrap().insert(name.clone()) {
                    tracing::info!(watch = %name, "first list in");
                }
                release_freed_memory();
            }
            Err(e) => tracing::warn!(watch = %name, "watch failed: {e}; retrying (is the EtcdRemediation CRD installed?)"),
        }
        ctx.metrics.watched.set(ctx.pods.lock().unwrap().len() as i64);
        ctx.changed.notify_one();
    }
}

/// A list decodes every selected pod in full before the controller keeps its few fields:
/// the allocator keeps that peak. Hand it back to the system once a list is in.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap pages to the system.
    unsafe {
        libc::malloc_trim(0);
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

/// Records carried out at once by this replica, and at most this many of one namespace: a
/// tenant's thousand records wait their turn, and never delay another namespace's.
pub const WORKERS: usize = 32;
pub const WORKERS_PER_NAMESPACE: usize = 4;

/// Starts carrying out the EtcdRemediations that have not ended, and the restores asked of
/// ones that have, unless a task of this replica is already at it: within [`WORKERS`], and
/// [`WORKERS_PER_NAMESPACE`] per namespace, the least served namespaces first, each
/// namespace's oldest records first. The rest wait for a worker to end (each end is a look).
fn reconcile(ctx: &Arc<Ctx>) {
    let refused = |r: &EtcdRemediation| decision(r) == Some("refused");
    let mut work: Vec<(EtcdRemediation, bool)> = ctx
        .rems
        .lock()
        .unwrap()
        .values()
        .filter(|r| r.metadata.deletion_timestamp.is_none())
        .filter_map(|r| {
            let open = !refused(r) && !dispatch::is_final(r.status.as_ref());
            (open || dispatch::wants_restore(r)).then(|| (r.clone(), open))
        })
        .collect();
    work.sort_by(|(a, _), (b, _)| {
        a.metadata.creation_timestamp.cmp(&b.metadata.creation_timestamp).then_with(|| a.name_any().cmp(&b.name_any()))
    });
    let mut busy = ctx.busy.lock().unwrap();
    let mut per_ns: HashMap<String, usize> = HashMap::new();
    for (ns, _) in busy.iter() {
        *per_ns.entry(ns.clone()).or_default() += 1;
    }
    for (r, open) in pick_fairly(work, &busy, &mut per_ns, WORKERS.saturating_sub(busy.len())) {
        busy.insert((r.namespace().unwrap_or_default(), r.name_any()));
        if open {
            tokio::spawn(dispatch::carry_out(ctx.clone(), r));
        } else {
            tokio::spawn(dispatch::restore(ctx.clone(), r));
        }
    }
}

/// Up to `room` of `work` (oldest first) not in `busy`: round by round, one more per
/// namespace, the namespaces with the fewest at work first, none above its share. Pure.
fn pick_fairly<T: kube::Resource>(
    work: Vec<(T, bool)>,
    busy: &HashSet<(String, String)>,
    per_ns: &mut HashMap<String, usize>,
    mut room: usize,
) -> Vec<(T, bool)> {
    let mut queues: std::collections::BTreeMap<String, std::collections::VecDeque<(T, bool)>> = Default::default();
    for (r, open) in work {
        let key = (r.meta().namespace.clone().unwrap_or_default(), r.meta().name.clone().unwrap_or_default());
        if !busy.contains(&key) {
            queues.entry(key.0).or_default().push_back((r, open));
        }
    }
    let mut picked = Vec::new();
    while room > 0 {
        let next = queues
            .iter()
            .filter(|(ns, q)| !q.is_empty() && per_ns.get(*ns).copied().unwrap_or(0) < WORKERS_PER_NAMESPACE)
            .min_by_key(|(ns, _)| per_ns.get(*ns).copied().unwrap_or(0))
            .map(|(ns, _)| ns.clone());
        let Some(ns) = next else { break };
        let item = queues.get_mut(&ns).and_then(|q| q.pop_front()).expect("a non-empty queue");
        *per_ns.entry(ns).or_default() += 1;
        picked.push(item);
        room -= 1;
    }
    picked
}

/// What the controller keeps of a record: not its managed fields, nor annotations other
/// than its own (a record's annotations can be 256 KiB, and a tenant writes them).
fn slim(_: &Ctx, mut r: EtcdRemediation) -> EtcdRemediation {
    r.metadata.managed_fields = None;
    if let Some(a) = r.metadata.annotations.as_mut() {
        a.retain(|k, v| k.starts_with("etcd-medic.io/") && v.len() <= 1024);
    }
    r
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
    // Pods no longer failing are forgotten (a new failure is a new detection).
    let failing: HashSet<String> = by_thresholds.iter().chain(&below).map(|p| p.uid.clone()).collect();
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
/// latter two looked up at most every 10 s).
async fn paused_on(ctx: &Ctx, pod: &PodSeen) -> Option<String> {
    if pod.paused {
        return Some(format!("pod {}/{}", pod.namespace, pod.name));
    }
    if let Some(set) = &pod.cluster {
        let key = format!("statefulset {}/{set}", pod.namespace);
        let api: Api<StatefulSet> = Api::namespaced(ctx.api.client().clone(), &pod.namespace);
        if cached_pause(ctx, &key, || async {
            api.get_opt(set).await.map(|s| s.is_some_and(|s| observe::is_paused(s.metadata.annotations.as_ref())))
        })
        .await
        {
            return Some(key);
        }
    }
    let key = format!("namespace {}", pod.namespace);
    let api: Api<Namespace> = Api::all(ctx.api.client().clone());
    let ns = pod.namespace.clone();
    if cached_pause(ctx, &key, || async move {
        api.get_opt(&ns).await.map(|n| n.is_some_and(|n| observe::is_paused(n.metadata.annotations.as_ref())))
    })
    .await
    {
        return Some(key);
    }
    None
}

async fn cached_pause<F, Fut>(ctx: &Ctx, key: &str, look: F) -> bool
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = kube::Result<bool>>,
{
    if let Some((at, paused)) = ctx.pauses.lock().unwrap().get(key)
        && at.elapsed() < Duration::from_secs(10)
    {
        return *paused;
    }
    // Unreadable counts as paused: the controller does not act on what it cannot see.
    let paused = match tokio::time::timeout(ctx.cfg.api_timeout, look()).await {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => {
            tracing::warn!("cannot read the pause annotation of {key}: {e}; holding");
            true
        }
        Err(_) => true,
    };
    ctx.pauses.lock().unwrap().insert(key.to_string(), (Instant::now(), paused));
    paused
}

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

/// A hold, told once per pod and reason: a log line, a decision counted, an Event.
async fn tell_hold(ctx: &Ctx, pod: &PodSeen, hold: &Hold) {
    let reason = hold.as_str().to_string();
    if ctx.held.lock().unwrap().insert(pod.uid.clone(), reason.clone()).as_deref() == Some(reason.as_str()) {
        return;
    }
    let detail = serde_json::to_string(hold).unwrap_or_default();
    tracing::info!(namespace = %pod.namespace, pod = %pod.name, hold = %reason, detail = %detail, "remediation held");
    ctx.metrics.decision("hold", &reason);
    // The hold is in the Event's reason: Events of one reason fold into one series, whose
    // note stays the first one's.
    let note = format!("etcd-medic holds the remediation of this failing pod: {reason} {detail}");
    ctx.pod_event(pod, EventType::Warning, &format!("Held{reason}"), &note).await;
}

/// Records the decision for a candidate that may be dispatched: an EtcdRemediation that the
/// reconcile loop carries out, or, for a crash the agent must not touch, one that ends
/// `Refused` here with the reason and the evidence.
async fn record(ctx: &Ctx, pod: &PodSeen, d: &Detected, by: detect::Candidacy, look: Look) {
    let (action, code, why) = signature::decide(d.signature, None);
    let evidence = d.evidence.clone().unwrap_or_default();
    if !ctx.leading() || ctx.create_failed.lock().unwrap().get(&pod.uid).is_some_and(|t| Instant::now() < *t) {
        return;
    }
    let cr = EtcdRemediation {
        metadata: ObjectMeta {
            name: Some(record_name(&pod.name, &pod.uid, records_of(ctx, pod))),
            namespace: Some(pod.namespace.clone()),
            labels: Some(
                [
                    ("app.kubernetes.io/managed-by".to_string(), "etcd-medic-controller".to_string()),
                    // A label value is at most 63 characters: a longer pod name is in the spec only.
                    ("etcd-medic.io/pod".to_string(), if pod.name.len() <= 63 { pod.name.clone() } else { String::new() }),
                    (DECISION.to_string(), if action == Action::Refuse { "refused" } else { "dispatch" }.to_string()),
                    (CANDIDACY.to_string(), by.as_str().to_string()),
                ]
                .into(),
            ),
            annotations: Some(
                [(DETECTED_AT.to_string(), d.at_wall.to_string()), (RESTARTS.to_string(), pod.restarts.to_string())]
                    .into_iter()
                    .chain(pod.not_ready_since.map(|t| (FAILING_SINCE.to_string(), t.to_string())))
                    .collect(),
            ),
            ..Default::default()
        },
        spec: EtcdRemediationSpec {
            pod: pod.name.clone(),
            pod_uid: Some(pod.uid.clone()),
            reason: Some(signature::truncate(&format!("{}: {evidence}", d.signature.as_str()), 1000)),
            dry_run: ctx.cfg.dry_run,
            force: false,
            restore: false,
        },
        status: None,
    };
    let api: Api<EtcdRemediation> = Api::namespaced(ctx.api.client().clone(), &pod.namespace);
    let created = match api.create(&PostParams::default(), &cr).await {
        Ok(c) => c,
        // The name is this instance's and attempt's: a create whose answer was lost went
        // through, and the watch brings the record.
        Err(kube::Error::Api(s)) if s.code == 409 => return,
        Err(e) => {
            tracing::warn!(namespace = %pod.namespace, pod = %pod.name, "cannot record the EtcdRemediation: {e}; again in 30s");
            ctx.create_failed.lock().unwrap().insert(pod.uid.clone(), Instant::now() + Duration::from_secs(30));
            return;
        }
    };
    let key = (pod.namespace.clone(), created.name_any());
    ctx.rems.lock().unwrap().insert(key, created.clone());
    match (action, code) {
        (Action::Refuse, Some(code)) => {
            ctx.metrics.decision("refuse", code.as_str());
            let mut status = dispatch::ended(&Default::default(), created.metadata.generation, "Refused", &Error::new(code, why.clone()));
            status.diagnosis = Some(DiagnosisStatus {
                signature: d.signature.as_str().into(),
                action: "refuse".into(),
                evidence: d.evidence.clone().into_iter().collect(),
            });
            tracing::warn!(namespace = %pod.namespace, pod = %pod.name, code = %code, "refused: {why}");
            if dispatch::write_status(ctx, &pod.namespace, &created.name_any(), &status).await.is_ok() {
                let mut done = created.clone();
                done.status = Some(status);
                ctx.rems.lock().unwrap().insert((pod.namespace.clone(), created.name_any()), done);
            }
            ctx.metrics.remediations.get_or_create(&metrics::PhaseLabels { phase: "Refused".into() }).inc();
            ctx.event(&created, EventType::Warning, "RemediationRefused", &format!("{code}: {why} (evidence: {evidence})")).await;
        }
        _ => {
            ctx.metrics.decision("dispatch", d.signature.as_str());
            tracing::info!(
                namespace = %pod.namespace,
                pod = %pod.name,
                remediation = %created.name_any(),
                candidacy = by.as_str(),
                look = look.as_str(),
                restarts = pod.restarts,
                "dispatching"
            );
            ctx.event(&created, EventType::Normal, "Detected", &format!("{}: {evidence}", d.signature.as_str())).await;
        }
    }
    ctx.changed.notify_one();
}

/// The records of this pod instance so far.
fn records_of(ctx: &Ctx, pod: &PodSeen) -> usize {
    ctx.rems
        .lock()
        .unwrap()
        .values()
        .filter(|r| r.namespace().as_deref() == Some(&pod.namespace) && r.spec.pod_uid.as_deref() == Some(&pod.uid))
        .count()
}

/// A record's name: the pod's, its instance (the UID's first 8 characters) and the attempt,
/// so that asking twice for one attempt is an AlreadyExists, never a second record. At most
/// 253 characters.
pub fn record_name(pod: &str, uid: &str, earlier: usize) -> String {
    let suffix = format!("-{}-{}", uid.chars().filter(char::is_ascii_alphanumeric).take(8).collect::<String>().to_lowercase(), earlier + 1);
    let mut base = pod.to_string();
    base.truncate(253 - suffix.len());
    format!("{}{suffix}", base.trim_end_matches(['-', '.']))
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

#[cfg(test)]
mod fair_tests {
    use super::*;

    fn rec(ns: &str, name: &str) -> (EtcdRemediation, bool) {
        let mut r = EtcdRemediation::new(name, Default::default());
        r.metadata.namespace = Some(ns.into());
        (r, true)
    }

    #[test]
    fn a_tenants_thousand_records_never_delay_another_namespace() {
        let mut work: Vec<_> = (0..1000).map(|i| rec("tenant", &format!("r{i:04}"))).collect();
        work.push(rec("apisix", "heal"));
        let mut per_ns = HashMap::new();
        let picked = pick_fairly(work, &HashSet::new(), &mut per_ns, WORKERS);
        let names: Vec<String> = picked.iter().map(|(r, _)| format!("{}/{}", r.namespace().unwrap(), r.name_any())).collect();
        assert_eq!(names.len(), WORKERS_PER_NAMESPACE + 1, "{names:?}");
        assert!(names.contains(&"apisix/heal".to_string()));
        assert_eq!(names[0..2], ["apisix/heal", "tenant/r0000"], "the least served namespace first, the oldest of each");
        // With the tenant at its share already, only others are started.
        let again = pick_fairly(vec![rec("tenant", "r9"), rec("b", "x")], &HashSet::new(), &mut per_ns, WORKERS);
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].0.namespace().as_deref(), Some("b"));
        // Busy ones are never started twice, and room bounds the total.
        let busy: HashSet<(String, String)> = [("c".to_string(), "1".to_string())].into();
        let picked = pick_fairly(vec![rec("c", "1"), rec("c", "2"), rec("d", "1")], &busy, &mut HashMap::new(), 1);
        assert_eq!(picked.len(), 1);
        assert_ne!((picked[0].0.namespace(), picked[0].0.name_any()), (Some("c".to_string()), "1".to_string()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_is_named_for_its_pod_instance_and_attempt() {
        assert_eq!(record_name("apisix-etcd-1", "4396a12d-23e6-4ea5", 0), "apisix-etcd-1-4396a12d-1");
        assert_eq!(record_name("apisix-etcd-1", "4396A12D-23e6", 2), "apisix-etcd-1-4396a12d-3");
        let long = record_name(&"e".repeat(300), "u1", 0);
        assert!(long.len() <= 253 && long.ends_with("-u1-1"), "{long}");
    }
}
