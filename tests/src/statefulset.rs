//! A StatefulSet controller and kubelet for one etcd set on one node: it creates the pods,
//! runs each pod's container (the Bitnami setup script or plain etcd) with real etcd,
//! restarts failed containers with back-off, probes readiness, keeps pod status true, and
//! when a pod is deleted runs its preStop hook, stops it, and creates the replacement under
//! a new UID with the same PVC mounted again.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::apiserver::store::{RESOURCES, ResourceDef, now_rfc3339};
use crate::apiserver::{ApiServer, ChangeKind};
use crate::bitnami::{self, Decision, Decision11, VolumeFacts};
use crate::etcd::{self, ClusterState, EtcdConfig, EtcdProcess, MemberSpec, format_id, parse_id};
use crate::kubelet::NodeTree;
use crate::objects::{self, SetShape, StartProfile};
use etcd_medic_core::step::HOLDS_LABEL;

/// Knobs of the simulated kubelet. The kubelet's real back-off starts at 10 s; the lab's
/// default is shorter so tests stay quick, with the same doubling and cap.
#[derive(Clone, Debug)]
pub struct SimOptions {
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub probe_interval: Duration,
    /// As the kubelet: a container's first crash is restarted at once (the back-off starts
    /// with the second), and every start shows `running` until the process exits, even one
    /// that fails in the image's start-up script.
    pub as_kubelet: bool,
    /// What a start takes before the image's script first acts (pulling nothing, the
    /// container's own start-up); the lab's script itself takes milliseconds.
    pub start_delay: Duration,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(4),
            probe_interval: Duration::from_millis(250),
            as_kubelet: false,
            start_delay: Duration::ZERO,
        }
    }
}

impl SimOptions {
    /// The kubelet's own schedule (`pkg/kubelet/kuberuntime`'s `doBackOff` with
    /// `flowcontrol.Backoff`): the first crash restarted at once, then 10 s, doubling to
    /// 5 min; a probe every 250 ms (the chart's readiness probe runs every 10 s: the lab
    /// reports Ready sooner, which only shortens what the benchmarks measure after a heal);
    /// each start running for 1 s before the image's script acts (an assumption: the Bitnami
    /// image's start-up varies with the node; it makes the window in which a crashed
    /// container runs again, which the controller must meet, as wide as on a node).
    pub fn kubelet() -> Self {
        SimOptions {
            backoff_base: Duration::from_secs(10),
            backoff_max: Duration::from_secs(300),
            as_kubelet: true,
            start_delay: Duration::from_secs(1),
            ..Default::default()
        }
    }
}

/// Faults a test can arm.
#[derive(Default)]
pub struct Switches {
    /// The next `member add` of the setup script fails once with `etcdserver: unhealthy
    /// cluster`, as it does right after a membership change.
    pub fail_next_member_add: AtomicBool,
    /// The preStop hook's `member_removal.log` is lost (not synced before the node went).
    pub lose_removal_log: AtomicBool,
    /// Containers stop without their preStop hook (a node that lost power).
    pub skip_pre_stop: AtomicBool,
    /// The kubelet holds crashed containers in back-off (its real back-off reaches 5 min):
    /// no restart while set. Tests that compare a volume byte for byte need this, since
    /// etcd 3.6 writes to its db even on a start that fails.
    pub hold_restarts: AtomicBool,
    /// The pods' `terminationMessagePolicy` is `File` (the Bitnami chart's default) rather
    /// than `FallbackToLogsOnError`: a crash leaves no termination message, only its log.
    pub no_termination_message: AtomicBool,
    /// Lines a pod's container prints (by ordinal) before its start-up script on every start:
    /// what an image may print of its own (a tenant chooses its image), or what a peer's
    /// requests made etcd print.
    pub printed_first: Mutex<std::collections::BTreeMap<usize, Vec<String>>>,
    /// Lines a pod's container prints (by ordinal) as it ends, after its process exited: a Go
    /// runtime's goroutine dump pushes the lines that said why out of the log's tail.
    pub printed_last: Mutex<std::collections::BTreeMap<usize, Vec<String>>>,
    /// Pods (by ordinal) whose container loop is parked by `hold_restarts`.
    held: Mutex<std::collections::BTreeSet<usize>>,
    /// Pods (by ordinal) let out of `hold_restarts` for one start.
    let_go: Mutex<std::collections::BTreeSet<usize>>,
}

fn res(plural: &str, group: &str) -> &'static ResourceDef {
    RESOURCES.iter().find(|r| r.plural == plural && r.group == group).unwrap()
}

struct PodRun {
    uid: String,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

struct Inner {
    shape: SetShape,
    /// The StatefulSet's UID, in its pods' controller reference as the real controller sets it.
    set_uid: String,
    members: Vec<MemberSpec>,
    api: Arc<ApiServer>,
    node: Arc<NodeTree>,
    switches: Arc<Switches>,
    opts: SimOptions,
    log_dir: PathBuf,
    pods: Mutex<Vec<Option<PodRun>>>,
    /// Members that were Ready once: the set's first install is behind them.
    installed: Mutex<Vec<bool>>,
    /// The etcd process each pod's container runs now, if any.
    pids: Mutex<Vec<Option<u32>>>,
    /// The StatefulSet's `spec.replicas` as last seen, and the ordinals scaled away (their
    /// pods deleted and not replaced until the set is scaled up again).
    replicas: Mutex<(usize, Vec<bool>)>,
}

pub struct StatefulSetSim {
    inner: Arc<Inner>,
    watcher: JoinHandle<()>,
}

impl Drop for StatefulSetSim {
    fn drop(&mut self) {
        self.watcher.abort();
        for run in self.inner.pods.lock().unwrap().iter_mut().filter_map(Option::take) {
            run.task.abort();
        }
    }
}

/// What one container start came to.
enum Start {
    Running(Box<EtcdProcess>),
    Exited { code: i32, message: String },
}

impl StatefulSetSim {
    /// Creates the set's objects and starts every pod at once (podManagementPolicy:
    /// Parallel, as the chart sets it).
    pub async fn start(api: Arc<ApiServer>, node: Arc<NodeTree>, shape: SetShape, log_dir: PathBuf, opts: SimOptions) -> Result<Self> {
        std::fs::create_dir_all(&log_dir)?;
        let store = api.store().clone();
        let members: Vec<MemberSpec> = (0..shape.replicas).map(|i| MemberSpec::new(shape.pod_name(i))).collect();
        let ns = shape.namespace.clone();
        let _ = store.create(res("namespaces", ""), "", json!({"metadata": {"name": ns}}));
        // The template holds the etcd container as the pods run it (ordinal 0's: the lab's
        // members differ by port where a chart's differ by the pod's name); the claims'
        // volumes, node and host name are the controller's to add, per pod.
        let mut set = objects::statefulset(&shape);
        let mut template = objects::pod(&shape, "", 0, &members)["spec"].clone();
        for per_pod in ["volumes", "nodeName", "hostname", "subdomain"] {
            template.as_object_mut().map(|t| t.remove(per_pod));
        }
        set["spec"]["template"]["spec"] = template;
        let set = store.create(res("statefulsets", "apps"), &ns, set).map_err(|e| anyhow!(e.message))?;
        let set_uid = set["metadata"]["uid"].as_str().unwrap_or_default().to_string();
        for i in 0..shape.replicas {
            store.create(res("persistentvolumes", ""), "", objects::pv(&shape, i)).map_err(|e| anyhow!(e.message))?;
            store.create(res("persistentvolumeclaims", ""), &ns, objects::pvc(&shape, i)).map_err(|e| anyhow!(e.message))?;
        }
        let inner = Arc::new(Inner {
            pods: Mutex::new((0..shape.replicas).map(|_| None).collect()),
            installed: Mutex::new(vec![false; shape.replicas]),
            pids: Mutex::new(vec![None; shape.replicas]),
            replicas: Mutex::new((shape.replicas, vec![false; shape.replicas])),
            shape,
            set_uid,
            members,
            api,
            node,
            switches: Arc::new(Switches::default()),
            opts,
            log_dir,
        });
        for i in 0..inner.shape.replicas {
            create_pod(&inner, i)?;
        }
        let watcher = tokio::spawn(watch_deletes(inner.clone()));
        Ok(StatefulSetSim { inner, watcher })
    }

    pub fn shape(&self) -> &SetShape {
        &self.inner.shape
    }

    pub fn members(&self) -> &[MemberSpec] {
        &self.inner.members
    }

    pub fn switches(&self) -> &Switches {
        &self.inner.switches
    }

    /// Every member's client URL.
    pub fn endpoints(&self) -> Vec<String> {
        self.inner.members.iter().map(MemberSpec::client_url).collect()
    }

    /// Client URLs of all members but `ordinal`.
    pub fn other_endpoints(&self, ordinal: usize) -> Vec<String> {
        self.inner.members.iter().enumerate().filter(|(i, _)| *i != ordinal).map(|(_, m)| m.client_url()).collect()
    }

    pub fn pod(&self, ordinal: usize) -> Result<Value> {
        self.inner
            .api
            .store()
            .get(res("pods", ""), &self.inner.shape.namespace, &self.inner.shape.pod_name(ordinal))
            .map_err(|e| anyhow!(e.message))
    }

    pub fn pod_uid(&self, ordinal: usize) -> Result<String> {
        Ok(self.pod(ordinal)?["metadata"]["uid"].as_str().unwrap_or_default().to_string())
    }

    /// The host path of the pod's volume now (it changes with the pod's UID).
    pub fn volume_path(&self, ordinal: usize) -> Result<PathBuf> {
        let uid = self.pod_uid(ordinal)?;
        Ok(self.inner.node.volume_path(&uid, &self.inner.shape.pv_name(ordinal), &self.inner.shape.volume_source(ordinal)))
    }

    /// Where member `ordinal`'s volume lives on the node when no pod mounts it (a local or
    /// hostPath PV's directory, a CSI volume's staging mount).
    pub fn pv_path(&self, ordinal: usize) -> PathBuf {
        let s = &self.inner.shape;
        self.inner.node.backing_path(&s.pv_name(ordinal), &s.volume_source(ordinal))
    }

    /// The etcd processes the set's containers run now.
    pub fn etcd_pids(&self) -> Vec<u32> {
        self.inner.pids.lock().unwrap().iter().flatten().copied().collect()
    }

    /// Whether pod `ordinal` exists.
    pub fn has_pod(&self, ordinal: usize) -> bool {
        self.pod(ordinal).is_ok()
    }

    pub fn data_dir(&self, ordinal: usize) -> Result<PathBuf> {
        Ok(self.volume_path(ordinal)?.join(self.inner.shape.profile.data_subdir()))
    }

    /// `kubectl delete pod` as a drain or a person does it (graceful).
    pub fn delete_pod(&self, ordinal: usize) -> Result<()> {
        let s = &self.inner.shape;
        self.inner.api.store().delete(res("pods", ""), &s.namespace, &s.pod_name(ordinal), &json!({})).map_err(|e| anyhow!(e.message))?;
        Ok(())
    }

    /// Waits until `pred` holds for the pod's JSON; returns that pod.
    pub async fn wait_pod(&self, ordinal: usize, timeout: Duration, what: &str, pred: impl Fn(&Value) -> bool) -> Result<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Ok(p) = self.pod(ordinal)
                && pred(&p)
            {
                return Ok(p);
            }
            if tokio::time::Instant::now() > deadline {
                let status = self.pod(ordinal).map(|p| p["status"].clone()).unwrap_or_default();
                bail!("pod {} not {what} within {timeout:?}; status: {status}", self.inner.shape.pod_name(ordinal));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn wait_ready(&self, ordinal: usize, timeout: Duration) -> Result<Value> {
        self.wait_pod(ordinal, timeout, "Ready", |p| pod_ready(p) && p["metadata"]["deletionTimestamp"].is_null()).await
    }

    pub async fn wait_all_ready(&self, timeout: Duration) -> Result<()> {
        for i in 0..self.inner.shape.replicas {
            self.wait_ready(i, timeout).await?;
        }
        Ok(())
    }

    /// Waits for `CrashLoopBackOff` after a termination whose message ends with
    /// `last_line`, and returns that message. The first restart after a removal may fail
    /// otherwise (the script finds the cluster electing a leader and starts etcd unchecked);
    /// the crash loop then settles on one error, as users see it.
    pub async fn wait_crash_loop(&self, ordinal: usize, timeout: Duration, last_line: &str) -> Result<String> {
        let p = self
            .wait_pod(ordinal, timeout, &format!("in CrashLoopBackOff with {last_line:?}"), |p| {
                p.pointer("/status/containerStatuses/0/state/waiting/reason").and_then(Value::as_str) == Some("CrashLoopBackOff")
                    && termination_message(p).lines().last() == Some(last_line)
            })
            .await?;
        Ok(termination_message(&p))
    }

    /// The container's log of its current or last start (`kubectl logs`).
    pub fn container_log(&self, ordinal: usize) -> String {
        std::fs::read_to_string(self.inner.log_dir.join(format!("{}.log", self.inner.shape.pod_name(ordinal)))).unwrap_or_default()
    }

    /// The log of the container's previous start (`kubectl logs --previous`).
    pub fn previous_container_log(&self, ordinal: usize) -> String {
        std::fs::read_to_string(self.inner.log_dir.join(format!("{}.previous.log", self.inner.shape.pod_name(ordinal)))).unwrap_or_default()
    }

    /// Stops the container of `ordinal` for good, without its preStop hook, as a node that
    /// lost power does; the pod object stays as it was.
    pub async fn kill_container(&self, ordinal: usize) {
        self.inner.switches.skip_pre_stop.store(true, Ordering::SeqCst);
        let run = self.inner.pods.lock().unwrap()[ordinal].take();
        if let Some(run) = run {
            let _ = run.stop.send(true);
            let _ = run.task.await;
        }
        self.inner.switches.skip_pre_stop.store(false, Ordering::SeqCst);
    }

    /// Kills the etcd process of `ordinal`'s container with SIGKILL, as the kernel's OOM
    /// killer or a failed liveness probe ends it: the kubelet sees a crash and restarts it
    /// (unless restarts are held).
    pub fn crash_container(&self, ordinal: usize) -> Result<()> {
        let pid = self.inner.pids.lock().unwrap()[ordinal].ok_or_else(|| anyhow!("{} runs no etcd", self.inner.shape.pod_name(ordinal)))?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL)?;
        Ok(())
    }

    /// Holds every crashed container in back-off and waits until `ordinal`'s loop is
    /// parked: from then on nothing runs on its volume until `release_restarts`.
    pub async fn hold_restarts(&self, ordinal: usize, timeout: Duration) -> Result<()> {
        let switches = &self.inner.switches;
        switches.hold_restarts.store(true, Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + timeout;
        while !switches.held.lock().unwrap().contains(&ordinal) {
            if tokio::time::Instant::now() > deadline {
                bail!("{} was not held in back-off within {timeout:?}", self.inner.shape.pod_name(ordinal));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    pub fn release_restarts(&self) {
        self.inner.switches.hold_restarts.store(false, Ordering::SeqCst);
    }

    /// Lets `ordinal`'s held container start once more; if that start crashes, it is held
    /// again (restarts stay held for everyone else). Waits until it has left back-off.
    pub async fn release_once(&self, ordinal: usize, timeout: Duration) -> Result<()> {
        self.inner.switches.let_go.lock().unwrap().insert(ordinal);
        let deadline = tokio::time::Instant::now() + timeout;
        while self.inner.switches.let_go.lock().unwrap().contains(&ordinal) {
            if tokio::time::Instant::now() > deadline {
                bail!("{} did not leave back-off within {timeout:?}", self.inner.shape.pod_name(ordinal));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Stops every container (no preStop hook) and detaches the volumes.
    pub async fn shutdown(&self) {
        let runs: Vec<PodRun> = self.inner.pods.lock().unwrap().iter_mut().filter_map(Option::take).collect();
        for run in runs {
            let _ = run.stop.send(true);
            let _ = run.task.await;
        }
    }
}

/// `terminationMessagePolicy: FallbackToLogsOnError`: a container that failed (non-zero
/// exit) without writing a termination message gets its last 80 log lines, at most 2 KiB.
fn fallback_to_logs(exit_code: i32, log: &str) -> String {
    if exit_code == 0 {
        return String::new();
    }
    let lines: Vec<&str> = log.lines().collect();
    let tail = lines[lines.len().saturating_sub(80)..].join("\n");
    let mut cut = tail.len().saturating_sub(2048);
    while !tail.is_char_boundary(cut) {
        cut += 1;
    }
    tail[cut..].to_string()
}

/// `lastState.terminated.message` of the etcd container.
pub fn termination_message(p: &Value) -> String {
    p.pointer("/status/containerStatuses/0/lastState/terminated/message").and_then(Value::as_str).unwrap_or_default().to_string()
}

pub fn pod_ready(p: &Value) -> bool {
    p.pointer("/status/conditions")
        .and_then(Value::as_array)
        .is_some_and(|cs| cs.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"))
}

fn create_pod(inner: &Arc<Inner>, ordinal: usize) -> Result<()> {
    let s = &inner.shape;
    let created = inner
        .api
        .store()
        .create(res("pods", ""), &s.namespace, objects::pod(s, &inner.set_uid, ordinal, &inner.members))
        .map_err(|e| anyhow!(e.message))?;
    let uid = created["metadata"]["uid"].as_str().unwrap().to_string();
    inner.node.attach(&uid, &s.pv_name(ordinal), &s.node_name, &s.volume_source(ordinal))?;
    let (stop, stop_rx) = watch::channel(false);
    let task = tokio::spawn(run_pod(inner.clone(), ordinal, uid.clone(), stop_rx));
    inner.pods.lock().unwrap()[ordinal] = Some(PodRun { uid, stop, task });
    Ok(())
}

/// The StatefulSet controller's answer to a change of `spec.replicas` (podManagementPolicy
/// Parallel): the pods past it deleted at once (gracefully, as a scale-down does), the ones
/// below it made again.
fn rescale(inner: &Arc<Inner>, set: &Value) {
    let want = set.pointer("/spec/replicas").and_then(Value::as_u64).map_or(1, |r| r as usize).min(inner.shape.replicas);
    let s = &inner.shape;
    let mut r = inner.replicas.lock().unwrap();
    if r.0 == want {
        return;
    }
    r.0 = want;
    for ordinal in 0..s.replicas {
        if ordinal >= want {
            let _ = inner.api.store().delete(res("pods", ""), &s.namespace, &s.pod_name(ordinal), &json!({}));
        } else if std::mem::take(&mut r.1[ordinal])
            && let Err(e) = create_pod(inner, ordinal)
        {
            tracing::error!("lab: making {} again failed: {e:#}", s.pod_name(ordinal));
        }
    }
}

/// The StatefulSet controller's and kubelet's answer to a pod delete.
async fn watch_deletes(inner: Arc<Inner>) {
    let mut rx = inner.api.store().subscribe();
    loop {
        let change = match rx.recv().await {
            Ok(c) => c,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
            Err(_) => return,
        };
        if change.resource.plural == "statefulsets"
            && change.object.pointer("/metadata/namespace").and_then(Value::as_str) == Some(&inner.shape.namespace)
            && change.object.pointer("/metadata/name").and_then(Value::as_str) == Some(&inner.shape.set_name())
            && change.kind != ChangeKind::Deleted
        {
            rescale(&inner, &change.object);
            continue;
        }
        if change.resource.plural != "pods"
            || change.object.pointer("/metadata/namespace").and_then(Value::as_str) != Some(&inner.shape.namespace)
        {
            continue;
        }
        if change.object.pointer(&format!("/metadata/labels/{}", HOLDS_LABEL.replace('/', "~1"))).is_some() {
            if let Err(e) = run_holder(&inner, &change.object, change.kind) {
                tracing::error!("lab: a holder pod: {e:#}");
            }
            continue;
        }
        let name = change.object.pointer("/metadata/name").and_then(Value::as_str).unwrap_or_default();
        let Some(ordinal) = (0..inner.shape.replicas).find(|&i| inner.shape.pod_name(i) == name) else { continue };
        let uid = change.object.pointer("/metadata/uid").and_then(Value::as_str).unwrap_or_default().to_string();
        let terminating = change.kind == ChangeKind::Deleted || !change.object["metadata"]["deletionTimestamp"].is_null();
        let current = inner.pods.lock().unwrap()[ordinal].as_ref().map(|r| r.uid.clone());
        if terminating
            && current.as_deref() == Some(uid.as_str())
            && let Err(e) = replace_pod(&inner, ordinal, &uid).await
        {
            tracing::error!("lab: replacing {name} failed: {e:#}");
        }
    }
}

/// The kubelet's answer to a pod that mounts one of the set's claims and runs nothing the
/// lab knows (a quorum recovery's holder, `etcd-medic hold`): the claim's volume attached
/// under the pod's UID and the pod Running; once it is deleted, the volume detached and the
/// pod gone.
fn run_holder(inner: &Arc<Inner>, pod: &Value, kind: ChangeKind) -> Result<()> {
    let s = &inner.shape;
    let (name, uid) = (pod["metadata"]["name"].as_str().unwrap_or_default(), pod["metadata"]["uid"].as_str().unwrap_or_default());
    let claims: Vec<&str> = pod
        .pointer("/spec/volumes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|v| v.pointer("/persistentVolumeClaim/claimName")?.as_str())
        .collect();
    let Some(ordinal) = (0..s.replicas).find(|&i| claims.contains(&s.pvc_name(i).as_str())) else { return Ok(()) };
    if pod.pointer("/spec/nodeName").and_then(Value::as_str) != Some(s.node_name.as_str()) {
        return Ok(());
    }
    let terminating = kind == ChangeKind::Deleted || !pod["metadata"]["deletionTimestamp"].is_null();
    if terminating {
        if inner.node.pod_dir(uid).exists() {
            inner.node.detach(uid, &s.pv_name(ordinal), &s.volume_source(ordinal))?;
            inner.node.remove_pod(uid)?;
        }
        let _ = inner.api.store().finalize(res("pods", ""), &s.namespace, name, uid);
        return Ok(());
    }
    if kind != ChangeKind::Added {
        return Ok(());
    }
    inner.node.attach(uid, &s.pv_name(ordinal), &s.node_name, &s.volume_source(ordinal))?;
    let _ = inner.api.store().modify(res("pods", ""), &s.namespace, name, |p| {
        if p["metadata"]["uid"] != uid {
            return;
        }
        let c = p.pointer("/spec/containers/0/name").cloned().unwrap_or_default();
        p["status"] = json!({"phase": "Running", "containerStatuses": [{"name": c, "ready": true, "restartCount": 0, "started": true,
                              "state": {"running": {"startedAt": now_rfc3339()}}}],
                             "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": now_rfc3339()}]});
    });
    Ok(())
}

async fn replace_pod(inner: &Arc<Inner>, ordinal: usize, uid: &str) -> Result<()> {
    let s = &inner.shape;
    let run = inner.pods.lock().unwrap()[ordinal].take();
    if let Some(run) = run {
        let _ = run.stop.send(true);
        let _ = run.task.await;
    }
    inner.node.detach(uid, &s.pv_name(ordinal), &s.volume_source(ordinal))?;
    inner.node.remove_pod(uid)?;
    let _ = inner.api.store().finalize(res("pods", ""), &s.namespace, &s.pod_name(ordinal), uid);
    {
        // Scaled away: not replaced until the set is scaled up again.
        let mut r = inner.replicas.lock().unwrap();
        if ordinal >= r.0 {
            r.1[ordinal] = true;
            return Ok(());
        }
    }
    create_pod(inner, ordinal)
}

/// The kubelet's container loop for one pod: start, watch, restart with back-off, stop.
async fn run_pod(inner: Arc<Inner>, ordinal: usize, uid: String, mut stop: watch::Receiver<bool>) {
    let mut restarts = 0u32;
    let mut backoff = inner.opts.backoff_base;
    // The crash a start follows, shown as `lastState` while it runs.
    let mut carried_last = Value::Null;
    let pod_name = inner.shape.pod_name(ordinal);
    let log_path = inner.log_dir.join(format!("{pod_name}.log"));
    loop {
        // Each start writes a fresh log; the last one stays as `kubectl logs --previous`.
        let _ = std::fs::rename(&log_path, log_path.with_extension("previous.log"));
        let _ = std::fs::write(&log_path, "");
        let started_at = now_rfc3339();
        if inner.opts.as_kubelet {
            set_status(&inner, ordinal, &uid, restarts, json!({"running": {"startedAt": started_at}}), carried_last.take(), false);
            tokio::select! {
                _ = tokio::time::sleep(inner.opts.start_delay) => {}
                _ = stop.changed() => return,
            }
        }
        for line in inner.switches.printed_first.lock().unwrap().get(&ordinal).into_iter().flatten() {
            raw_log(&log_path, line);
        }
        let outcome = start_container(&inner, ordinal, &uid, &log_path).await;
        let (code, message) = match outcome {
            Err(e) => (1, format!("lab: {e:#}")),
            Ok(Start::Exited { code, message }) => (code, message),
            Ok(Start::Running(mut proc)) => {
                inner.pids.lock().unwrap()[ordinal] = proc.pid();
                set_status(&inner, ordinal, &uid, restarts, json!({"running": {"startedAt": started_at}}), Value::Null, false);
                let mut ready = false;
                let mut id_stored = false;
                let mut tick = tokio::time::interval(inner.opts.probe_interval);
                let exit = loop {
                    tokio::select! {
                        status = proc.wait() => break status,
                        _ = stop.changed() => {
                            pre_stop(&inner, ordinal, &uid).await;
                            proc.stop().await;
                            inner.pids.lock().unwrap()[ordinal] = None;
                            return;
                        }
                        _ = tick.tick() => {
                            let healthy = etcd::endpoint_healthy(&inner.members[ordinal].client_url()).await;
                            if healthy && !id_stored {
                                id_stored = store_member_id(&inner, ordinal, &uid).await;
                            }
                            if healthy != ready {
                                ready = healthy;
                                if ready {
                                    inner.installed.lock().unwrap()[ordinal] = true;
                                }
                                set_status(&inner, ordinal, &uid, restarts, json!({"running": {"startedAt": started_at}}), Value::Null, ready);
                            }
                        }
                    }
                };
                inner.pids.lock().unwrap()[ordinal] = None;
                let code = exit.and_then(|s| s.code()).unwrap_or(137);
                (code, fallback_to_logs(code, &proc.log_tail(80)))
            }
        };
        if *stop.borrow() {
            return;
        }
        for line in inner.switches.printed_last.lock().unwrap().get(&ordinal).into_iter().flatten() {
            raw_log(&log_path, line);
        }
        // The kubelet's own log of this start, where the agent reads it; it keeps the current
        // and the previous start's file.
        write_cri_log(&inner, ordinal, &uid, restarts, &log_path);
        let message = if inner.switches.no_termination_message.load(Ordering::SeqCst) { String::new() } else { message };
        let terminated = json!({"terminated": {"exitCode": code, "reason": if code == 0 { "Completed" } else { "Error" },
                                                "message": message, "startedAt": started_at, "finishedAt": now_rfc3339()}});
        // As the kubelet: the first crash is restarted at once, the status showing it
        // terminated until the next start (the restart count rises with that start).
        let at_once = inner.opts.as_kubelet && restarts == 0;
        if at_once {
            set_status(&inner, ordinal, &uid, restarts, terminated.clone(), Value::Null, false);
            carried_last = terminated;
            restarts += 1;
        } else {
            restarts += 1;
            let waiting = json!({"waiting": {"reason": "CrashLoopBackOff",
                "message": format!("back-off {}s restarting failed container=etcd pod={pod_name}_{}({uid})", backoff.as_secs().max(1), inner.shape.namespace)}});
            set_status(&inner, ordinal, &uid, restarts, waiting, terminated, false);
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.changed() => return,
            }
        }
        while inner.switches.hold_restarts.load(Ordering::SeqCst) && !inner.switches.let_go.lock().unwrap().remove(&ordinal) {
            inner.switches.held.lock().unwrap().insert(ordinal);
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                _ = stop.changed() => break,
            }
        }
        inner.switches.held.lock().unwrap().remove(&ordinal);
        if *stop.borrow() {
            return;
        }
        if at_once {
            continue;
        }
        backoff = (backoff * 2).min(inner.opts.backoff_max);
    }
}

/// The container's output of start number `restarts` in the CRI format the kubelet writes
/// under `/var/log/pods` (`<RFC 3339 time> <stream> F <line>`).
fn write_cri_log(inner: &Inner, ordinal: usize, uid: &str, restarts: u32, plain: &Path) {
    let s = &inner.shape;
    let file = inner.node.container_log_file(&s.namespace, &s.pod_name(ordinal), uid, "etcd", restarts);
    let text = std::fs::read_to_string(plain).unwrap_or_default();
    let ts = now_rfc3339();
    let cri: String = text.lines().map(|l| format!("{ts} stderr F {l}\n")).collect();
    if let Some(dir) = file.parent() {
        let _ = std::fs::create_dir_all(dir);
        if let Some(older) = restarts.checked_sub(2) {
            let _ = std::fs::remove_file(dir.join(format!("{older}.log")));
        }
    }
    let _ = std::fs::write(&file, cri);
}

fn set_status(inner: &Inner, ordinal: usize, uid: &str, restarts: u32, state: Value, last: Value, ready: bool) {
    let s = &inner.shape;
    let _ = inner.api.store().modify(res("pods", ""), &s.namespace, &s.pod_name(ordinal), |p| {
        if p["metadata"]["uid"] != uid {
            return;
        }
        // A condition keeps its lastTransitionTime while its status stays, as the kubelet's.
        let before = p.pointer("/status/conditions").cloned().unwrap_or_default();
        let cond = |t: &str, ok: bool| {
            let status = if ok { "True" } else { "False" };
            let kept = before.as_array().into_iter().flatten().find(|c| c["type"] == t && c["status"] == status);
            let since = kept.and_then(|c| c["lastTransitionTime"].as_str()).map_or_else(now_rfc3339, String::from);
            json!({"type": t, "status": status, "lastTransitionTime": since})
        };
        let mut cs = json!({"name": "etcd", "image": p.pointer("/spec/containers/0/image"), "ready": ready,
                            "restartCount": restarts, "started": state.get("running").is_some(), "state": state});
        if !last.is_null() {
            cs["lastState"] = last;
        } else if let Some(prev) = p.pointer("/status/containerStatuses/0/lastState") {
            cs["lastState"] = prev.clone();
        }
        p["status"]["phase"] = json!("Running");
        p["status"]["containerStatuses"] = json!([cs]);
        p["status"]["conditions"] =
            json!([cond("Initialized", true), cond("Ready", ready), cond("ContainersReady", ready), cond("PodScheduled", true)]);
    });
    let ready_count = (0..s.replicas)
        .filter(|&i| inner.api.store().get(res("pods", ""), &s.namespace, &s.pod_name(i)).is_ok_and(|p| pod_ready(&p)))
        .count();
    let _ = inner.api.store().modify(res("statefulsets", "apps"), &s.namespace, &s.set_name(), |st| {
        st["status"]["readyReplicas"] = json!(ready_count);
    });
}

/// A line of the image's own scripts, in their `etcd HH:MM:SS.ss LEVEL ==> …` format.
fn script_log(path: &Path, line: &str) {
    raw_log(path, &format!("etcd {} {line}", jiff::Timestamp::now().strftime("%H:%M:%S%.2f")));
}

/// A line as a tool prints it (etcdctl's `Error: …` carries no prefix).
fn raw_log(path: &Path, line: &str) {
    use std::io::Write;
    if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
        let _ = writeln!(f, "{line}");
    }
}

fn etcd_config(inner: &Inner, ordinal: usize, volume: &Path, initial_cluster: String, state: ClusterState, log: &Path) -> EtcdConfig {
    EtcdConfig {
        member: inner.members[ordinal].clone(),
        data_dir: volume.join(inner.shape.profile.data_subdir()),
        initial_cluster,
        state,
        token: inner.shape.cluster_token.clone(),
        log_file: log.to_path_buf(),
        snapshot_count: inner.shape.snapshot_count,
    }
}

/// One container start: the setup script (Bitnami) or nothing (plain), then etcd.
async fn start_container(inner: &Arc<Inner>, ordinal: usize, uid: &str, log: &Path) -> Result<Start> {
    let s = &inner.shape;
    let volume = inner.node.volume_path(uid, &s.pv_name(ordinal), &s.volume_source(ordinal));
    let full_cluster = etcd::initial_cluster(&inner.members);
    let (initial_state, _) = match &s.profile {
        StartProfile::Plain { state } => {
            // A set whose manifest says `existing` was installed with `new` and then switched,
            // as operators of such sets do: the lab bootstraps each member once with `new`.
            let state = if inner.installed.lock().unwrap()[ordinal] { *state } else { ClusterState::New };
            let cfg = etcd_config(inner, ordinal, &volume, full_cluster, state, log);
            return Ok(Start::Running(Box::new(EtcdProcess::spawn(cfg)?)));
        }
        StartProfile::Bitnami { initial_state, remove_member_on_termination } => (*initial_state, *remove_member_on_termination),
        StartProfile::Bitnami11 => return start_bitnami_11(inner, ordinal, &volume, log).await,
    };
    let me = &inner.members[ordinal];
    let data = volume.join(s.profile.data_subdir());
    let facts = VolumeFacts::read(&volume, s.profile.data_subdir());
    let (others, healthy) = others_and_health(inner, ordinal).await;
    let decision = bitnami::decide(&facts, inner.members.len(), initial_state == ClusterState::New, healthy);
    if facts.data_empty {
        script_log(log, "INFO  ==> There is no data from previous deployments");
    } else {
        script_log(log, "INFO  ==> Detected data from previous deployments");
    }
    let exit = |line: String| Ok(exit_with(log, &line));
    let spawn = |ic: String, state: ClusterState| -> Result<Start> {
        Ok(Start::Running(Box::new(EtcdProcess::spawn(etcd_config(inner, ordinal, &volume, ic, state, log))?)))
    };
    match decision {
        Decision::Bootstrap => {
            script_log(log, "INFO  ==> Bootstrapping a new cluster");
            spawn(full_cluster, ClusterState::New)
        }
        Decision::StartUnchecked => {
            script_log(log, "WARN  ==> Cluster not responding!");
            script_log(log, "WARN  ==> Disaster recovery is disabled, the cluster will try to recover on it's own");
            spawn(full_cluster, ClusterState::Existing)
        }
        Decision::StartOnData => spawn(full_cluster, ClusterState::Existing),
        Decision::Update(id) => {
            script_log(log, "INFO  ==> Updating member in existing cluster");
            // etcdctl's own words for an id it cannot parse (an empty `member_id` among them).
            let Some(id) = parse_id(&id) else {
                return exit(format!("Error: bad member ID arg (strconv.ParseUint: parsing {id:?}: invalid syntax), expecting ID in Hex"));
            };
            let result = async {
                let mut c = etcd::live_client(&others).await?;
                c.member_update(id, vec![me.peer_url()]).await.map_err(|e| anyhow!(grpc_message(&e)))
            }
            .await;
            match result {
                Ok(_) => spawn(full_cluster, ClusterState::Existing),
                Err(e) => exit(format!("Error: {e}")),
            }
        }
        Decision::AddAsNew | Decision::ReAdd => {
            script_log(log, "INFO  ==> Adding new member to existing cluster");
            if decision == Decision::ReAdd {
                // `rm -rf "$ETCD_DATA_DIR"/*`: the glob skips dot-files.
                for entry in std::fs::read_dir(&data).context("read data dir")? {
                    let entry = entry?;
                    if entry.file_name().to_string_lossy().starts_with('.') {
                        continue;
                    }
                    let p = entry.path();
                    if p.is_dir() && !p.is_symlink() { std::fs::remove_dir_all(&p)? } else { std::fs::remove_file(&p)? }
                }
            }
            add_self(inner, ordinal, &volume, &others, log).await
        }
    }
}

/// The other members' client URLs, and whether enough of them pass the script's health check.
async fn others_and_health(inner: &Inner, ordinal: usize) -> (Vec<String>, bool) {
    let me = &inner.members[ordinal];
    let others: Vec<String> = inner.members.iter().filter(|m| m.name != me.name).map(MemberSpec::client_url).collect();
    let mut others_healthy = 0;
    for e in &others {
        if etcd::endpoint_healthy(e).await {
            others_healthy += 1;
        }
    }
    (others, bitnami::cluster_healthy(others_healthy, inner.members.len()))
}

/// The script's `member add` of this member and the start that follows: one try (a failure
/// ends the start), `new_member_envs` written, etcd started with `existing`.
async fn add_self(inner: &Arc<Inner>, ordinal: usize, volume: &Path, others: &[String], log: &Path) -> Result<Start> {
    let me = &inner.members[ordinal];
    let data = volume.join(inner.shape.profile.data_subdir());
    std::fs::create_dir_all(&data)?;
    if inner.switches.fail_next_member_add.swap(false, Ordering::SeqCst) {
        return Ok(exit_with(log, "Error: etcdserver: unhealthy cluster"));
    }
    let added = async {
        let mut c = etcd::live_client(others).await?;
        c.member_add([me.peer_url()], None).await.map_err(|e| anyhow!(grpc_message(&e)))
    }
    .await;
    let resp = match added {
        Ok(r) => r,
        Err(e) => return Ok(exit_with(log, &format!("Error: {e}"))),
    };
    let added_id = resp.member().map(|m| m.id()).unwrap_or_default();
    let list: Vec<etcd::MemberInfo> = resp.member_list().iter().map(etcd::MemberInfo::from).collect();
    let ic = etcd::initial_cluster_after_add(&list, added_id, &me.name);
    let envs = format!(
        "export ETCD_NAME=\"{}\"\nexport ETCD_INITIAL_CLUSTER=\"{ic}\"\nexport ETCD_INITIAL_ADVERTISE_PEER_URLS=\"{}\"\nexport ETCD_INITIAL_CLUSTER_STATE=\"existing\"\n",
        me.name,
        me.peer_url()
    );
    std::fs::write(data.join("new_member_envs"), envs)?;
    script_log(log, &format!("INFO  ==> Member {} added to cluster", format_id(added_id)));
    Ok(Start::Running(Box::new(EtcdProcess::spawn(etcd_config(inner, ordinal, volume, ic, ClusterState::Existing, log))?)))
}

/// The container ends with `line` as its last output (FallbackToLogsOnError: the
/// termination message is the tail of its log).
fn exit_with(log: &Path, line: &str) -> Start {
    raw_log(log, line);
    let text = std::fs::read_to_string(log).unwrap_or_default();
    Start::Exited { code: 1, message: fallback_to_logs(1, &text) }
}

/// The chart 11/12 script (FIELD-NOTES.md): identity by peer URL, a new cluster when a
/// registered member does not answer, and a data dir wiped and re-added when etcd says the
/// member was removed.
async fn start_bitnami_11(inner: &Arc<Inner>, ordinal: usize, volume: &Path, log: &Path) -> Result<Start> {
    let data = volume.join(inner.shape.profile.data_subdir());
    std::fs::create_dir_all(&data)?;
    let data_empty = std::fs::read_dir(&data).map(|mut d| d.next().is_none()).unwrap_or(true);
    let (others, healthy) = others_and_health(inner, ordinal).await;
    // `etcdctl endpoint status --cluster`: every registered member's client URL answers.
    let registered_answer = match etcd::member_list(&others).await {
        Ok(list) => {
            let mut all = true;
            for url in list.iter().flat_map(|m| m.client_urls.iter()) {
                all &= etcd::endpoint_healthy(url).await;
            }
            all
        }
        Err(_) => false,
    };
    let full_cluster = etcd::initial_cluster(&inner.members);
    let spawn = |state| EtcdProcess::spawn(etcd_config(inner, ordinal, volume, full_cluster.clone(), state, log));
    match bitnami::decide_11(data_empty, inner.members.len(), registered_answer, healthy) {
        Decision11::StartOnData | Decision11::StartUnchecked => Ok(Start::Running(Box::new(spawn(ClusterState::New)?))),
        Decision11::Bootstrap => {
            script_log(log, "INFO  ==> Bootstrapping a new cluster");
            Ok(Start::Running(Box::new(spawn(ClusterState::New)?)))
        }
        Decision11::AddAsNew => add_as_new_11(inner, ordinal, volume, &others, log).await,
        Decision11::StartWatching => {
            script_log(log, "INFO  ==> Detected data from previous deployments");
            let seen = std::fs::metadata(log).map(|m| m.len()).unwrap_or(0) as usize;
            let mut proc = spawn(ClusterState::New)?;
            // The script tails etcd's log until it is connected, or removed.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
            loop {
                let text = std::fs::read_to_string(log).unwrap_or_default();
                let new = text.get(seen..).unwrap_or_default();
                if bitnami::removed_in_log(new) {
                    script_log(log, "WARN  ==> The member was removed from the cluster; its data dir is removed and it is added again");
                    proc.stop().await;
                    // `rm -rf "$ETCD_DATA_DIR"`: the whole dir, dot-files too.
                    std::fs::remove_dir_all(&data)?;
                    return add_as_new_11(inner, ordinal, volume, &others, log).await;
                }
                if new.contains("established TCP streaming connection") || tokio::time::Instant::now() > deadline {
                    return Ok(Start::Running(Box::new(proc)));
                }
                if let Some(status) = proc.try_exit() {
                    let code = status.code().unwrap_or(1);
                    return Ok(Start::Exited { code, message: fallback_to_logs(code, &text) });
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Chart 11/12's join: an old entry with this peer URL is removed first, then the add.
async fn add_as_new_11(inner: &Arc<Inner>, ordinal: usize, volume: &Path, others: &[String], log: &Path) -> Result<Start> {
    let me = &inner.members[ordinal];
    script_log(log, "INFO  ==> Adding new member to existing cluster");
    if let Ok(list) = etcd::member_list(others).await
        && let Some(old) = list.iter().find(|m| m.peer_urls.contains(&me.peer_url()))
        && let Err(e) = etcd::member_remove(others, old.id).await
    {
        return Ok(exit_with(log, &format!("Error: {e}")));
    }
    add_self(inner, ordinal, volume, others, log).await
}

/// What etcdctl prints of a failed call: the gRPC status message
/// (`etcdserver: member not found`), not the transport's wrapping.
fn grpc_message(e: &etcd_client::Error) -> String {
    match e {
        etcd_client::Error::GRpcStatus(s) => s.message().to_string(),
        other => other.to_string(),
    }
}

/// After etcd is up the image finds its id by its client URL and stores it in `member_id`.
async fn store_member_id(inner: &Inner, ordinal: usize, uid: &str) -> bool {
    let s = &inner.shape;
    if !matches!(s.profile, StartProfile::Bitnami { .. }) {
        return true;
    }
    let data = inner.node.volume_path(uid, &s.pv_name(ordinal), &s.volume_source(ordinal)).join(s.profile.data_subdir());
    if data.join("member_id").exists() {
        return true;
    }
    let me = inner.members[ordinal].client_url();
    let Ok(list) = etcd::member_list(std::slice::from_ref(&me)).await else { return false };
    match list.iter().find(|m| m.client_urls.contains(&me)) {
        Some(m) => std::fs::write(data.join("member_id"), format_id(m.id)).is_ok(),
        None => false,
    }
}

/// The image's preStop hook: `etcdctl member remove $(cat member_id)` into
/// `member_removal.log` at the volume root.
async fn pre_stop(inner: &Inner, ordinal: usize, uid: &str) {
    let s = &inner.shape;
    let StartProfile::Bitnami { remove_member_on_termination: true, .. } = s.profile else { return };
    if inner.switches.skip_pre_stop.load(Ordering::SeqCst) {
        return;
    }
    let volume = inner.node.volume_path(uid, &s.pv_name(ordinal), &s.volume_source(ordinal));
    let Some(id) = std::fs::read_to_string(volume.join(s.profile.data_subdir()).join("member_id")).ok().and_then(|t| parse_id(&t)) else {
        return;
    };
    let endpoints = inner.members.iter().map(MemberSpec::client_url).collect::<Vec<_>>();
    let line = async {
        let mut c = etcd::live_client(&endpoints).await?;
        let resp = c.member_remove(id).await?;
        let cluster = resp.header().map(|h| h.cluster_id()).unwrap_or_default();
        anyhow::Ok(format!("Member {} removed from cluster {}\n", format_id(id), format_id(cluster)))
    }
    .await;
    let line = line.unwrap_or_else(|e| format!("Error: {e}\n"));
    if !inner.switches.lose_removal_log.load(Ordering::SeqCst) {
        let _ = std::fs::write(volume.join("member_removal.log"), line);
    }
}

/// Reads a pod's termination message or waiting reason (for tests and the demo).
pub fn container_state(p: &Value) -> String {
    let st = &p["status"]["containerStatuses"][0];
    if let Some(w) = st.pointer("/state/waiting/reason").and_then(Value::as_str) {
        return w.to_string();
    }
    if st.pointer("/state/running").is_some() {
        return if st["ready"] == true { "Running, Ready".into() } else { "Running".into() };
    }
    "Pending".into()
}

#[cfg(test)]
mod tests {
    use super::fallback_to_logs;

    #[test]
    fn termination_message_falls_back_to_the_log_tail_only_on_failure() {
        assert_eq!(fallback_to_logs(0, "a\nb"), "");
        assert_eq!(fallback_to_logs(1, "a\nb"), "a\nb");
        let long: String = (0..200).map(|i| format!("line {i}\n")).collect();
        let m = fallback_to_logs(1, &long);
        assert!(m.starts_with("line 120") && m.ends_with("line 199"), "{m}");
        let wide = "x".repeat(5000);
        assert_eq!(fallback_to_logs(2, &wide).len(), 2048);
    }
}
