//! The step engine: locate, check every gate, take the cluster's lock, quarantine, repair
//! membership, restart the pod, verify. Every step is journaled (fsynced) in the state dir
//! before it runs, so a crash leaves a precise record. The CLI and (later) the API drive
//! this same engine.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{Code, Error, Result};
use crate::etcd;
use crate::guard::{self, Change};
use crate::kubeapi::Deleted;
use crate::lease::{ClusterLock, Kept};
use crate::locate::{Locator, Plan, blocking, container};
use crate::profile::Profile;
use crate::quarantine;
use crate::volume::Volume;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub enum Phase {
    Planned,
    Pending,
    Running,
    Succeeded,
    Failed,
    Refused,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StepRecord {
    pub name: String,
    pub start: String,
    pub end: Option<String>,
    pub outcome: Option<String>,
    pub message: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorRecord {
    pub code: Code,
    pub message: String,
}

/// The Remediation object of the contract.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Remediation {
    pub id: String,
    pub namespace: String,
    pub pod: String,
    #[serde(rename = "podUID")]
    pub pod_uid: Option<String>,
    pub node: String,
    pub phase: Phase,
    pub step: Option<String>,
    pub plan: Option<Plan>,
    #[schema(value_type = Option<String>)]
    pub quarantine_path: Option<PathBuf>,
    pub steps: Vec<StepRecord>,
    pub error: Option<ErrorRecord>,
    pub created_at: String,
    pub finished_at: Option<String>,
    /// Why the caller asked (free text from the request), for people reading it later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The etcd endpoints the caller gave instead of discovery (kept for a resume).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub etcd_endpoints: Vec<String>,
    /// A dry run: it checks, never acts, and never stands in for a real remediation.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
    /// The quarantine this remediation made on the pod's volume, as the agent named it
    /// before moving anything: resume, restore and retention act on this record, never on
    /// what they find on the volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quarantine: Option<QuarantineRecord>,
}

/// Where a remediation put the member's files, recorded in the node's journal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct QuarantineRecord {
    /// `<timestamp>-<id>` under `.etcd-medic/quarantine/` on the volume.
    pub name: String,
    /// What was moved, relative to the data dir.
    pub items: Vec<String>,
    /// The stale member id (hex) the member had: the entry a resume may still remove.
    pub member_id: Option<String>,
    pub state: quarantine::State,
}

impl Remediation {
    /// Whether step `name` ran to its end ("Done") in this remediation.
    pub fn step_done(&self, name: &str) -> bool {
        self.steps.iter().any(|s| s.name == name && s.outcome.as_deref() == Some("Done"))
    }

    /// A new remediation, `Pending` until the engine runs it.
    pub fn new(node: &str, namespace: &str, pod: &str, pod_uid: Option<&str>) -> Self {
        Remediation {
            id: uuid::Uuid::new_v4().simple().to_string()[..12].to_string(),
            namespace: namespace.into(),
            pod: pod.into(),
            pod_uid: pod_uid.map(String::from),
            node: node.into(),
            phase: Phase::Pending,
            step: None,
            plan: None,
            quarantine_path: None,
            steps: Vec::new(),
            error: None,
            created_at: now(),
            finished_at: None,
            reason: None,
            etcd_endpoints: Vec::new(),
            dry_run: false,
            quarantine: None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Options {
    pub dry_run: bool,
    pub force: bool,
    pub etcd_endpoints: Vec<String>,
    pub state_dir: PathBuf,
    pub verify_timeout: Duration,
    /// Quarantines kept per member; older ones go once a later remediation succeeded.
    pub keep_quarantines: usize,
    /// Where the clusters' Leases live; `None`: in the etcd pod's own namespace.
    pub lease_namespace: Option<String>,
}

fn now() -> String {
    jiff::Timestamp::now().to_string()
}

use crate::journal::write as journal;
pub use crate::journal::{close_abandoned, needs_resume, validate_id};
pub use crate::journal::{list as list_journals, path as journal_path, prune as prune_journals, read as read_journal};

pub struct Engine<'a> {
    pub locator: &'a Locator,
    pub opts: Options,
    /// Called after every step starts and ends (progress on a terminal, events, metrics).
    pub progress: &'a (dyn Fn(&Remediation) + Send + Sync),
    /// Set on shutdown: no step starts after it; a step that waits (Verify) stops waiting.
    /// A remediation that had changed something stays `Running` in its journal, keeps the
    /// cluster's lease until it expires, and is resumed by the next start.
    pub stop: &'a AtomicBool,
}

/// What the checks found, for the steps that act.
struct Checked {
    plan: Plan,
    /// The volume root proven by the check: every action on the volume goes through it.
    vol: Arc<Volume>,
    /// The data dir, relative to the volume root.
    data: PathBuf,
    endpoints: Vec<String>,
    cluster_id: u64,
    peer_url: String,
    member_name: String,
    stale: Option<u64>,
}

impl Engine<'_> {
    /// Runs one remediation to its end (verification included) and returns it.
    pub async fn run(&self, namespace: &str, pod: &str, pod_uid: Option<&str>) -> Remediation {
        self.run_as(Remediation::new(&self.locator.layout.node_name, namespace, pod, pod_uid)).await
    }

    /// Runs `r` (made by `Remediation::new`, so that its id is known before it runs).
    pub async fn run_as(&self, r: Remediation) -> Remediation {
        if !self.opts.dry_run {
            crate::journal::close_abandoned_of(&self.opts.state_dir, &r.namespace, &r.pod);
        }
        self.run_locked(r).await
    }

    async fn run_locked(&self, mut r: Remediation) -> Remediation {
        // An agent that died after it changed something left a Running journal: finish that
        // remediation instead of starting another (its destructive steps are not repeated).
        if !self.opts.dry_run
            && let Some(mut r) = crate::journal::unfinished(&self.opts.state_dir, &r.namespace, &r.pod)
        {
            let resumes = r.steps.iter().filter(|s| s.name == "Resume").count();
            if resumes >= crate::journal::MAX_RESUMES {
                // A step that cannot finish is not retried on every start for ever.
                let e = Error::new(
                    Code::NotReady,
                    format!("resumed {resumes} times without finishing; a person must look (restore with `etcd-medic restore {}`)", r.id),
                );
                return self.finish(r, Err((e, true)));
            }
            let _running = match crate::journal::lock_run(&self.opts.state_dir, &r.id) {
                Ok(l) => l,
                Err(e) => return self.finish(r, Err((e, true))),
            };
            // The pod it restarted may have rejoined long ago, and a later instance fail anew:
            // then that remediation reached its goal, and this failure gets its own.
            match self.reached_goal(&r).await {
                Some(evidence) => {
                    tracing::info!(id = %r.id, "closing an unfinished remediation from evidence: {evidence}");
                    close_from_evidence(&self.opts.state_dir, &mut r, &evidence);
                    (self.progress)(&r);
                    // A pod that does not fail now needs nothing more: that one was the answer.
                    if !self.fails_now(&r).await {
                        return r;
                    }
                }
                None => {
                    let outcome = self.resume(&mut r).await;
                    return self.finish(r, outcome);
                }
            }
        }
        let _running = if self.opts.dry_run {
            None
        } else {
            match crate::journal::lock_run(&self.opts.state_dir, &r.id) {
                Ok(l) => Some(l),
                Err(e) => return self.finish(r, Err((e, false))),
            }
        };
        r.phase = Phase::Running;
        r.etcd_endpoints = self.opts.etcd_endpoints.clone();
        r.dry_run = self.opts.dry_run;
        let outcome = self.steps(&mut r).await;
        self.finish(r, outcome)
    }

    /// Test hook (`crate::failpoint`): `after:<Step>` holds the engine right after that step
    /// is journaled, until it is killed, or stopped at this safe point.
    async fn failpoint(&self, step: &str) {
        if crate::failpoint::armed(&format!("after:{step}")) {
            eprintln!("failpoint after:{step} reached: holding until killed or stopped");
            let until = Instant::now() + Duration::from_secs(600);
            while !self.stopping() && Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    fn lease_namespace<'n>(&'n self, pod_namespace: &'n str) -> &'n str {
        self.opts.lease_namespace.as_deref().unwrap_or(pod_namespace)
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn finish(&self, mut r: Remediation, outcome: std::result::Result<(), (Error, bool)>) -> Remediation {
        if let Err((e, true)) = &outcome
            && self.stopping()
        {
            // Stopped at a safe point after acting: the journal stays Running for the resume.
            tracing::warn!(id = %r.id, "stopped at a safe point ({}); the next start resumes it", e.message);
            r.step = None;
            let _ = journal(&self.opts.state_dir, &r);
            (self.progress)(&r);
            return r;
        }
        r.step = None;
        r.finished_at = Some(now());
        match outcome {
            Ok(()) => r.phase = if self.opts.dry_run { Phase::Planned } else { Phase::Succeeded },
            Err((e, acted)) => {
                r.phase = if acted { Phase::Failed } else { Phase::Refused };
                r.error = Some(ErrorRecord { code: e.code, message: e.message });
            }
        }
        let _ = journal(&self.opts.state_dir, &r);
        (self.progress)(&r);
        r
    }

    /// Journals the step, runs it, journals its outcome. The error says whether anything
    /// had been changed when it failed (`Failed`) or not (`Refused`).
    async fn step<T>(
        &self,
        r: &mut Remediation,
        name: &str,
        acted: bool,
        fut: impl Future<Output = Result<(T, String)>>,
    ) -> std::result::Result<T, (Error, bool)> {
        if self.stopping() {
            // Whether anything was changed is what the journal says, not what this step would do.
            let changed = needs_resume(r);
            return Err((Error::new(Code::NotReady, format!("the agent is shutting down: stopped before {name}")), changed));
        }
        crate::failpoint::panic_at(&format!("panic:{name}"));
        r.step = Some(name.into());
        r.steps.push(StepRecord { name: name.into(), start: now(), end: None, outcome: None, message: String::new() });
        if !self.opts.dry_run || !acted {
            journal(&self.opts.state_dir, r).map_err(|e| (e, acted))?;
        }
        (self.progress)(r);
        let res = fut.await;
        let last = r.steps.last_mut().unwrap();
        last.end = Some(now());
        let out = match res {
            Ok((v, msg)) => {
                last.outcome = Some("Done".into());
                last.message = msg;
                Ok(v)
            }
            Err(e) => {
                last.outcome = Some(e.code.to_string());
                last.message = e.message.clone();
                Err((e, acted))
            }
        };
        let _ = journal(&self.opts.state_dir, r);
        (self.progress)(r);
        self.failpoint(name).await;
        out
    }

    /// Whether an unfinished remediation already reached its goal, from evidence: it had
    /// restarted the pod, the pod was replaced since, and etcd wrote new member data on the
    /// volume after the quarantine (a WAL, or a `member_id` other than the stale one) or the
    /// member list shows the member started under a new id. `None`: resume it.
    async fn reached_goal(&self, r: &Remediation) -> Option<String> {
        let plan = r.plan.as_ref().filter(|_| r.step_done("Restart"))?;
        let pod = self.locator.api.pod(&plan.namespace, &plan.pod).await.ok()?;
        if pod.metadata.uid.as_deref() == Some(plan.pod_uid.as_str()) {
            return None;
        }
        let stale = r.quarantine.as_ref().and_then(|q| q.member_id.clone());
        // The volume speaks for the Bitnami image, which starts etcd only once its member was
        // added as a voter; a plain set's member comes back as the agent's learner, so only
        // the member list (started and voting) speaks for it.
        if plan.profile != Profile::Plain
            && let Ok(located) = self.locator.open(&plan.namespace, &plan.pod, None, false).await
        {
            let (vol, data) = (located.volume.clone(), located.data.clone());
            let found = blocking(move || {
                let wal = data.join("member/wal");
                let new_wal = vol.entry(&wal)?.is_some_and(|e| e.kind == crate::volume::Kind::Dir)
                    && vol
                        .list(&wal, 10_000)?
                        .iter()
                        .any(|(n, k)| *k == crate::volume::Kind::File && n.to_string_lossy().ends_with(".wal"));
                let id = vol.read_small(&data.join("member_id"), 64).ok().flatten().and_then(|b| crate::volume::parse_member_id(&b).ok());
                Ok((new_wal, id))
            })
            .await;
            match found {
                Ok((true, _)) => return Some("etcd wrote a new WAL on the volume since the quarantine".into()),
                Ok((_, Some(id))) if Some(format!("{id:x}")) != stale => {
                    return Some(format!("the volume holds member id {id:x}, not the stale one, since the quarantine"));
                }
                _ => {}
            }
        }
        let c = pod.spec.as_ref().and_then(|s| s.containers.iter().find(|c| c.name == plan.container))?;
        let (peer_url, _, _) = start_flags(c, &container::environment(&pod, c), &plan.pod);
        let peer_url = peer_url?;
        let given = if r.etcd_endpoints.is_empty() { &self.opts.etcd_endpoints } else { &r.etcd_endpoints };
        let endpoints = if given.is_empty() {
            etcd::sibling_endpoints(&pod, &self.locator.api.pods(&plan.namespace).await.ok()?, &plan.container)
        } else {
            given.clone()
        };
        let (_, members) = etcd::members(&endpoints).await.ok()?;
        members
            .iter()
            .find(|m| !m.name.is_empty() && !m.is_learner && m.peer_urls.contains(&peer_url) && Some(format!("{:x}", m.id)) != stale)
            .map(|m| format!("member {:x} started and voting with the pod's peer URL after the restart", m.id))
    }

    /// The pod of `r`, as it is now, is failing: its etcd container crash-loops or its last
    /// run failed, and it is not running (or the pod cannot be read: let the checks say why).
    async fn fails_now(&self, r: &Remediation) -> bool {
        let Some(plan) = r.plan.as_ref() else { return true };
        match self.locator.api.pod(&plan.namespace, &plan.pod).await {
            Ok(pod) => matches!(guard::pod_failure(&pod, &plan.container, false), Ok(Some(_))),
            Err(_) => true,
        }
    }

    /// Finishes a remediation from its journal: the lock again, then the steps not yet done.
    async fn resume(&self, r: &mut Remediation) -> std::result::Result<(), (Error, bool)> {
        r.phase = Phase::Running;
        let checked = self.step(r, "Resume", true, self.recheck(r.clone())).await?;
        // Something was changed already: a failure to take the lock again is Failed, not Refused.
        self.lock_and_act(r, &checked, true).await
    }

    /// Takes the cluster's lease (step Lock), acts, and gives the lease back (see `release`).
    async fn lock_and_act(&self, r: &mut Remediation, checked: &Checked, acted: bool) -> std::result::Result<(), (Error, bool)> {
        let (ns, me) = (r.namespace.clone(), holder(&self.locator.layout.node_name, &r.id));
        let lock = self
            .step(r, "Lock", acted, async {
                // A holder of this node whose process is gone (killed mid-way) is no holder.
                let node = self.locator.layout.node_name.clone();
                let state_dir = self.opts.state_dir.clone();
                let gone = move |h: &str| h.split_once('/').is_some_and(|(n, id)| n == node && !crate::journal::is_running(&state_dir, id));
                let l =
                    ClusterLock::acquire(&self.locator.api, self.lease_namespace(&ns), checked.cluster_id, &me, self.stop, &gone).await?;
                Ok((l, format!("lease etcd-medic-{:016x} held by {me}", checked.cluster_id)))
            })
            .await?;
        // Renewed in the background from here on, whatever step runs.
        let kept = lock.keep();
        let result = self.act(r, checked, &kept).await;
        if let Some(lock) = kept.into_lock().await {
            self.release(lock, &result).await;
        }
        result
    }

    /// Gives the cluster's lease back, unless the agent stops mid-way: then it stays held
    /// (until it expires) so no other node starts on this cluster before the resume.
    async fn release(&self, lock: ClusterLock, result: &std::result::Result<(), (Error, bool)>) {
        if !(self.stopping() && matches!(result, Err((_, true)))) {
            let _ = lock.release().await;
        }
    }

    /// What a resumed remediation needs, from its journal and the cluster as it is now. The
    /// gates that guard the first destructive step are not asked again: it is done.
    async fn recheck(&self, r: Remediation) -> Result<(Checked, String)> {
        let plan = r.plan.clone().ok_or_else(|| Error::new(Code::NotReady, format!("journal {} has no plan to resume", r.id)))?;
        let pod = self.locator.api.pod(&plan.namespace, &plan.pod).await?;
        let c = pod
            .spec
            .as_ref()
            .and_then(|s| s.containers.iter().find(|c| c.name == plan.container))
            .ok_or_else(|| Error::new(Code::NotReady, "the pod lost its etcd container"))?;
        let env = container::environment(&pod, c);
        let (peer_url, member_name, _) = start_flags(c, &env, &plan.pod);
        let peer_url = peer_url.ok_or_else(|| Error::new(Code::UnsupportedProfile, "the pod names no peer URL"))?;
        let given = if r.etcd_endpoints.is_empty() { &self.opts.etcd_endpoints } else { &r.etcd_endpoints };
        let endpoints = if given.is_empty() {
            etcd::sibling_endpoints(&pod, &self.locator.api.pods(&plan.namespace).await?, &plan.container)
        } else {
            given.clone()
        };
        let (cluster_id, members) = etcd::members(&endpoints).await?;
        // Only the entry the first run found stale may go; the member may have rejoined by
        // itself in the meantime under a new id, and that one stays. The journal records
        // that id (never the volume: the tenant writes there).
        let located = self.locator.open(&plan.namespace, &plan.pod, None, false).await?;
        let old_id = r.quarantine.as_ref().and_then(|q| q.member_id.as_deref()).and_then(|id| u64::from_str_radix(id, 16).ok());
        let stale = members.iter().find(|m| m.peer_urls.contains(&peer_url) && Some(m.id) == old_id).map(|m| m.id);
        if !r.step_done("Membership") {
            guard::check_quorum(&members.iter().map(etcd::Member::view).collect::<Vec<_>>(), stale, Change::ReplaceMember)?;
        }
        let done: Vec<&str> = r.steps.iter().filter(|s| s.outcome.as_deref() == Some("Done")).map(|s| s.name.as_str()).collect();
        let msg = format!("resuming remediation {} after {}", r.id, done.last().copied().unwrap_or("nothing"));
        let (vol, data) = (located.volume, located.data);
        Ok((Checked { plan, vol, data, endpoints, cluster_id, peer_url, member_name, stale }, msg))
    }

    async fn steps(&self, r: &mut Remediation) -> std::result::Result<(), (Error, bool)> {
        let (ns, name, uid) = (r.namespace.clone(), r.pod.clone(), r.pod_uid.clone());
        let checked = self.step(r, "Check", false, self.check(&ns, &name, uid.as_deref())).await?;
        r.pod_uid = Some(checked.plan.pod_uid.clone());
        r.plan = Some(checked.plan.clone());
        if self.opts.dry_run {
            // Every gate's verdict, the cluster's lock included, without taking it.
            let me = holder(&self.locator.layout.node_name, &r.id);
            return self
                .step(r, "Lock", false, async {
                    crate::lease::check_free(&self.locator.api, self.lease_namespace(&ns), checked.cluster_id, &me).await?;
                    Ok(((), format!("lease etcd-medic-{:016x} is free", checked.cluster_id)))
                })
                .await;
        }
        self.lock_and_act(r, &checked, false).await
    }

    async fn act(&self, r: &mut Remediation, c: &Checked, lock: &Kept) -> std::result::Result<(), (Error, bool)> {
        let plan = &c.plan;
        let resumed = r.steps.iter().any(|s| s.name == "Resume");
        if r.step_done("Quarantine") {
            return self.act_after_quarantine(r, c, lock, resumed).await;
        }
        if r.quarantine.is_none() {
            // Named and journaled before anything moves: a resume, a restore and retention
            // find it by this record, never by what is on the volume.
            let member_id = match c.stale {
                Some(i) => Some(format!("{i:x}")),
                None => stored_member_id(&c.vol, &c.data).await,
            };
            r.quarantine = Some(QuarantineRecord {
                name: quarantine::dir_name(&jiff::Timestamp::now(), &r.id),
                items: plan.r#move.iter().map(|m| m.path.clone()).collect(),
                member_id,
                state: quarantine::State::Moving,
            });
        }
        let record = r.quarantine.clone().expect("set above");
        let (vol, data, proc_root) = (c.vol.clone(), c.data.clone(), self.locator.layout.proc_root.clone());
        let (id, ns, pod, uid, profile) = (r.id.clone(), plan.namespace.clone(), plan.pod.clone(), plan.pod_uid.clone(), plan.profile);
        let sizes: Vec<(String, u64)> =
            record.items.iter().map(|i| (i.clone(), plan.r#move.iter().find(|m| &m.path == i).map_or(0, |m| m.bytes))).collect();
        let dir = vol.shown(&quarantine::rel_dir(&record.name));
        self.step(
            r,
            "Quarantine",
            true,
            blocking(move || {
                if matches!(profile, Profile::BitnamiMemberId | Profile::Bitnami) {
                    // Before anything moves: the crash-looping container restarts on its own, and
                    // the image empties data/ before its single `member add`; this dot-file keeps
                    // data/ from ever looking empty, so a failed add is retried on the next start
                    // instead of bootstrapping a new cluster (FIELD-NOTES.md).
                    vol.write_file(&data.join(KEEP_FILE), KEEP_TEXT)?;
                }
                // etcd's own locks first, then the process scan: an etcd that starts from here on
                // cannot open the data, and one that runs already holds a lock or shows in /proc.
                let locks = vol.lock(&vol.etcd_lock_files(&data)?)?;
                guard::no_holders(&proc_root, &vol, &data)?;
                let req = quarantine::Request {
                    id: &id,
                    name: &record.name,
                    namespace: &ns,
                    pod: &pod,
                    pod_uid: &uid,
                    member_id: record.member_id.as_deref(),
                    profile: profile.as_str(),
                    data: &data,
                    items: &sizes,
                };
                let m = quarantine::quarantine(&vol, &req, jiff::Timestamp::now())?;
                let held = locks.count();
                drop(locks);
                let moved = m.items.iter().filter(|i| i.present).map(|i| i.path.as_str()).collect::<Vec<_>>().join(", ");
                let into = vol.shown(&quarantine::rel_dir(&record.name));
                Ok(((), format!("moved {moved} into {} ({held} of etcd's locks held through the moves)", into.display())))
            }),
        )
        .await?;
        if let Some(q) = r.quarantine.as_mut() {
            q.state = quarantine::State::Quarantined;
        }
        r.quarantine_path = Some(dir);
        self.act_after_quarantine(r, c, lock, resumed).await
    }

    async fn act_after_quarantine(
        &self,
        r: &mut Remediation,
        c: &Checked,
        lock: &Kept,
        resumed: bool,
    ) -> std::result::Result<(), (Error, bool)> {
        let plan = &c.plan;
        // Safe points: the cluster's lease still ours before each step that changes something.
        lock.check().map_err(|e| (e, true))?;
        if !r.step_done("Membership") {
            self.step(r, "Membership", true, self.membership(c)).await?;
        }
        lock.check().map_err(|e| (e, true))?;
        if !r.step_done("Restart") {
            self.step(r, "Restart", true, async {
                let deleted = self.locator.api.delete_pod(&plan.namespace, &plan.pod, &plan.pod_uid).await;
                crate::failpoint::hold("in:Restart");
                match deleted {
                    Ok(Deleted::Now) => Ok(((), format!("deleted pod {}/{} (uid {})", plan.namespace, plan.pod, plan.pod_uid))),
                    Ok(Deleted::Earlier(why)) => {
                        Ok(((), format!("pod {}/{} (uid {}) deleted: {why}", plan.namespace, plan.pod, plan.pod_uid)))
                    }
                    // Resumed after the delete went through: the pod was already replaced.
                    Err(e) if resumed && matches!(e.code, Code::PodUIDMismatch | Code::PodNotFound) => {
                        Ok(((), format!("pod {}/{} was already replaced", plan.namespace, plan.pod)))
                    }
                    Err(e) => Err(e),
                }
            })
            .await?;
        }
        self.step(r, "Verify", true, self.verify(c, lock)).await?;
        // The member is back: quarantines older than the newest `keep` may go. A failure to
        // prune is reported, never a reason to call a healed member Failed.
        let id = r.id.clone();
        if let Err((e, _)) = self.step(r, "Retention", true, self.prune(&plan.namespace, &plan.pod, &id)).await {
            tracing::warn!(code = %e.code, "retention: {}", e.message);
        }
        Ok(())
    }

    /// Retention: this pod's quarantines as its journals recorded them, oldest first; those
    /// `to_prune` picks are removed, each only if it is, on the volume, a real directory
    /// named exactly as recorded. Names on the volume are never taken from the volume.
    async fn prune(&self, ns: &str, pod: &str, id: &str) -> Result<((), String)> {
        let located = self.locator.open(ns, pod, None, false).await?;
        let state_dir = self.opts.state_dir.clone();
        let keep = self.opts.keep_quarantines;
        let (ns, pod, id) = (ns.to_string(), pod.to_string(), id.to_string());
        blocking(move || {
            let mut mine: Vec<Remediation> = crate::journal::list(&state_dir)
                .into_iter()
                .filter(|j| j.namespace == ns && j.pod == pod)
                .filter(|j| j.quarantine.as_ref().is_some_and(|q| q.state == quarantine::State::Quarantined || j.id == id))
                .collect();
            mine.sort_by(|a, b| a.quarantine.as_ref().map(|q| &q.name).cmp(&b.quarantine.as_ref().map(|q| &q.name)));
            let names: Vec<String> = mine.iter().filter_map(|j| j.quarantine.as_ref().map(|q| q.name.clone())).collect();
            let Some(succeeded) = mine.iter().find(|j| j.id == id).and_then(|j| j.quarantine.as_ref()).map(|q| q.name.clone()) else {
                return Ok(((), "no quarantine recorded; nothing to prune".into()));
            };
            let gone = quarantine::to_prune(&names, &succeeded, keep);
            let vol = &located.volume;
            let mut pruned = 0;
            for mut j in mine.into_iter().filter(|j| j.quarantine.as_ref().is_some_and(|q| gone.contains(&q.name))) {
                let name = j.quarantine.as_ref().map(|q| q.name.clone()).unwrap_or_default();
                match quarantine::check_exists(vol, &name) {
                    Ok(()) => {
                        vol.remove_tree(&quarantine::rel_dir(&name), crate::volume::Limits::default())?;
                        pruned += 1;
                    }
                    // Gone already (a person removed it): the record says so from now on.
                    Err(e) if e.code == Code::DataDirNotFound => {}
                    Err(e) => return Err(e),
                }
                if let Some(q) = j.quarantine.as_mut() {
                    q.state = quarantine::State::Pruned;
                }
                journal(&state_dir, &j)?;
            }
            Ok(((), format!("kept {} quarantine(s), pruned {pruned}", names.len() - gone.len())))
        })
        .await
    }

    async fn check(&self, ns: &str, name: &str, uid: Option<&str>) -> Result<(Checked, String)> {
        let located = self.locator.open(ns, name, uid, true).await?;
        let plan = located.plan;
        // Read again, and only the instance that was located: a replacement is another pod.
        let pod = self.locator.api.pod(ns, name).await?;
        self.locator.admit(&pod, Some(&plan.pod_uid))?;
        let c = pod
            .spec
            .as_ref()
            .and_then(|s| s.containers.iter().find(|c| c.name == plan.container))
            .ok_or_else(|| Error::new(Code::PodUIDMismatch, format!("pod {ns}/{name} changed while it was checked")))?;
        let env = container::environment(&pod, c);
        let (peer_url, member_name, state) = start_flags(c, &env, name);
        // What the deployment is decides first: it does not change while the pod crash-loops.
        let peer_url = peer_url.ok_or_else(|| {
            Error::new(Code::UnsupportedProfile, "the pod names no --initial-advertise-peer-urls / ETCD_INITIAL_ADVERTISE_PEER_URLS")
        })?;
        if plan.profile == Profile::Plain && state.as_deref() != Some("existing") {
            return Err(Error::new(
                Code::UnsupportedProfile,
                "the pod starts etcd with --initial-cluster-state=new: with an empty data dir it comes back under its old, removed id; start it with `existing` (or a start script that decides) first",
            ));
        }
        let failure = guard::pod_failure(&pod, &plan.container, self.opts.force)?;
        let (vol, data) = (located.volume, located.data);
        {
            let (vol, data, proc_root) = (vol.clone(), data.clone(), self.locator.layout.proc_root.clone());
            blocking(move || guard::no_holders(&proc_root, &vol, &data)).await?;
        }
        // The member this pod may stand for is the one its peer URL names, and that must be
        // the pod itself: checked before any etcd call.
        crate::identity::check_member_identity(&pod, c, &peer_url)?;
        let discovered = etcd::sibling_endpoints(&pod, &self.locator.api.pods(ns).await?, &plan.container);
        let endpoints = crate::identity::choose_endpoints(&discovered, &self.opts.etcd_endpoints)?;
        if endpoints.is_empty() {
            return Err(Error::new(
                Code::SoleMember,
                format!("pod {ns}/{name} has no sibling etcd members: a sole member has nothing to rejoin; restore it from a backup"),
            ));
        }
        let given = endpoints != discovered;
        let (cluster_id, members) = etcd::members(&endpoints).await.map_err(|e| {
            // What hosts a caller named answered is not told back: no probing through the agent.
            if given { Error::invalid("none of the etcd endpoints given answered as a member of an etcd cluster") } else { e }
        })?;
        // Endpoints a caller gave must be the pod's own cluster: the quorum check and the
        // cluster's lock would otherwise guard another one.
        if given {
            let (siblings_id, _) = etcd::members(&discovered).await?;
            if siblings_id != cluster_id {
                return Err(Error::invalid(format!(
                    "the etcd endpoints given ({endpoints:?}) serve cluster {cluster_id:016x}, but the pod's sibling members serve cluster {siblings_id:016x}"
                )));
            }
        }
        let stale = members.iter().find(|m| m.peer_urls.contains(&peer_url)).map(|m| m.id);
        guard::check_quorum(&members.iter().map(etcd::Member::view).collect::<Vec<_>>(), stale, Change::ReplaceMember)?;
        check_space(&plan, &vol)?;
        let why =
            failure.map(|f| format!("{}: {}", f.reason, f.message.lines().last().unwrap_or_default())).unwrap_or_else(|| "forced".into());
        let msg = format!(
            "{} ({}), {} of {} members healthy, {why}",
            plan.host_path.display(),
            plan.profile.as_str(),
            members.iter().filter(|m| m.healthy).count(),
            members.len()
        );
        Ok((Checked { plan, vol, data, endpoints, cluster_id, peer_url, member_name, stale }, msg))
    }

    async fn membership(&self, c: &Checked) -> Result<((), String)> {
        let mut done = Vec::new();
        if let Some(id) = c.stale {
            etcd::remove_member(&c.endpoints, id).await?;
            done.push(format!("removed stale member {id:x}"));
        }
        match c.plan.profile {
            Profile::BitnamiMemberId | Profile::Bitnami => {
                done.push(format!("data/{KEEP_FILE} keeps data/ non-empty; the image re-adds the member"));
            }
            Profile::Plain => {
                let (_, members) = etcd::members(&c.endpoints).await?;
                match members.iter().find(|m| m.peer_urls.contains(&c.peer_url) && Some(m.id) != c.stale) {
                    // Added before an interruption (not started yet): not added twice.
                    Some(m) if m.name.is_empty() => done.push(format!("{} is already member {:x}", c.member_name, m.id)),
                    Some(m) => {
                        return Err(Error::new(
                            Code::UnsafePath,
                            format!("a started member {:x} already has peer URL {}; not guessing which one to keep", m.id, c.peer_url),
                        ));
                    }
                    None => {
                        // A learner does not count for quorum until it caught up; it is
                        // promoted during verification.
                        let learner = etcd::supports_learners(&c.endpoints).await?;
                        let id = etcd::add_member(&c.endpoints, &c.peer_url, learner).await?;
                        let what = if learner { "learner" } else { "voting member" };
                        done.push(format!("added {} as {what} {id:x}", c.member_name));
                    }
                }
            }
        }
        // etcd accepts the image's `member add` only once its leader has been connected to
        // every voting member for a few seconds after a change.
        if c.stale.is_some() {
            tokio::time::sleep(Duration::from_secs(6)).await;
        }
        // Test hook: the changes made, the step not yet journaled as done.
        crate::failpoint::hold("in:Membership");
        Ok(((), done.join("; ")))
    }

    async fn verify(&self, c: &Checked, lock: &Kept) -> Result<((), String)> {
        let deadline = Instant::now() + self.opts.verify_timeout;
        let old_uid = Some(c.plan.pod_uid.clone());
        let mut seen = String::from("nothing yet");
        let mut promoted = None;
        let started = Instant::now();
        let mut orphan: Option<(u64, Instant)> = None;
        let mut cleaned = String::new();
        while Instant::now() < deadline {
            if self.stopping() {
                return Err(Error::new(Code::NotReady, format!("the agent is shutting down; verification resumes on restart ({seen})")));
            }
            // A lease lost while waiting fails the remediation: another agent may act now.
            lock.check().map_err(|e| Error::new(e.code, format!("{} (while verifying: {seen})", e.message)))?;
            // A member added as a learner is promoted once it has caught up with the leader.
            let (_, members) = etcd::members(&c.endpoints).await.unwrap_or_default();
            let mine = members.iter().find(|m| m.peer_urls.contains(&c.peer_url) && Some(m.id) != c.stale && !m.name.is_empty());
            if let Some(m) = mine.filter(|m| m.is_learner) {
                match etcd::promote_member(&c.endpoints, m.id).await {
                    Ok(true) => {
                        promoted = Some(m.id);
                        continue;
                    }
                    Ok(false) => seen = format!("learner {:x} started, catching up before its promotion", m.id),
                    Err(e) => seen = e.message,
                }
            } else if let Ok(p) = self.locator.api.pod(&c.plan.namespace, &c.plan.pod).await {
                // An entry the image's own `member add` left when a restart interrupted it
                // (the crash-looping container may start between the moves and the delete):
                // its next add fails on the taken peer URL for ever. Once it has stayed
                // unstarted for 3 s with the container not running, it goes.
                let running = container_running(&p, &c.plan.container);
                match orphaned_entry(c.plan.profile, &members, &c.peer_url, c.stale, running) {
                    Some(id) if orphan.is_some_and(|(o, since)| o == id && since.elapsed() >= Duration::from_secs(3)) => {
                        cleaned = match etcd::remove_member(&c.endpoints, id).await {
                            Ok(()) => {
                                tracing::warn!("removed member {id:x}: added by an interrupted start of the image, never started");
                                format!("; removed unstarted member {id:x} left by an interrupted `member add`")
                            }
                            Err(e) => format!("; unstarted member {id:x} left by an interrupted `member add`: {}", e.message),
                        };
                        orphan = None;
                    }
                    Some(id) if orphan.is_none_or(|(o, _)| o != id) => orphan = Some((id, Instant::now())),
                    Some(_) => {}
                    None => orphan = None,
                }
                let ready = p
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
                let replaced = p.metadata.uid != old_uid;
                if replaced && ready {
                    if let Some(m) = mine.filter(|m| !m.is_learner && m.healthy) {
                        let how = if promoted == Some(m.id) { "promoted from learner, " } else { "" };
                        return Ok(((), format!("pod Ready and member {:x} started and voting ({how}healthy){cleaned}", m.id)));
                    }
                    seen = "pod Ready, member not yet started and voting".into();
                } else {
                    seen = format!(
                        "pod {}, {}",
                        if replaced { "replaced" } else { "not yet replaced" },
                        if ready { "Ready" } else { "not Ready" }
                    );
                }
            }
            // Every 50 ms for the first 10 s (a member usually rejoins within a second, and is
            // seen back within 50 ms), then once a second.
            let fast = started.elapsed() < Duration::from_secs(10);
            tokio::time::sleep(if fast { Duration::from_millis(50) } else { Duration::from_secs(1) }).await;
        }
        Err(Error::new(Code::NotReady, format!("the member did not rejoin within {:?}: {seen}{cleaned}", self.opts.verify_timeout)))
    }
}

/// Puts the quarantine of remediation `id` (or of its quarantine's name) back into the
/// pod's data dir as it is now, refusing while any process holds the data. What is put back
/// and from where comes from the journal; the volume is only checked to hold it.
pub async fn restore(locator: &Locator, state_dir: &Path, id: &str) -> Result<String> {
    let id = id.rsplit('-').next().unwrap_or(id);
    let mut r = read_journal(state_dir, id)?;
    let q =
        r.quarantine.clone().ok_or_else(|| Error::invalid(format!("remediation {id} moved nothing: there is no quarantine to restore")))?;
    match q.state {
        quarantine::State::Restored => return Ok(format!("quarantine {} was restored already", q.name)),
        quarantine::State::Pruned => return Err(Error::invalid(format!("quarantine {} was removed by retention", q.name))),
        _ => {}
    }
    let located = locator.open(&r.namespace, &r.pod, None, false).await?;
    let (vol, data, proc_root) = (located.volume.clone(), located.data.clone(), locator.layout.proc_root.clone());
    let (name, items) = (q.name.clone(), q.items.clone());
    let back = blocking(move || {
        let locks = vol.lock(&vol.etcd_lock_files(&data)?)?;
        guard::no_holders(&proc_root, &vol, &data)?;
        let back = quarantine::restore(&vol, &name, &data, &items)?;
        drop(locks);
        Ok(back)
    })
    .await?;
    if let Some(q) = r.quarantine.as_mut() {
        q.state = quarantine::State::Restored;
    }
    journal(state_dir, &r)?;
    Ok(format!("restored {} into {}", back.join(", "), located.plan.host_path.display()))
}

/// The etcd container of `pod` runs now.
fn container_running(pod: &k8s_openapi::api::core::v1::Pod, container: &str) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.name == container))
        .is_some_and(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()))
}

/// An entry with the pod's peer URL that never started (no name) while the pod's etcd
/// container is not running: the image added it and was stopped before etcd started. Only
/// for Bitnami profiles, whose image adds the member itself (a plain set's entry is the
/// agent's own, added before the restart, and stays). Pure.
fn orphaned_entry(profile: Profile, members: &[etcd::Member], peer_url: &str, stale: Option<u64>, running: bool) -> Option<u64> {
    if running || profile == Profile::Plain {
        return None;
    }
    members.iter().find(|m| m.name.is_empty() && Some(m.id) != stale && m.peer_urls.iter().any(|u| u == peer_url)).map(|m| m.id)
}

/// The lease holder: this node and this remediation, so that two remediations on one node
/// exclude each other too, and a resumed one is recognised as the same holder.
fn holder(node: &str, id: &str) -> String {
    format!("{node}/{id}")
}

/// Closes an unfinished remediation that reached its goal, saying how the agent knows.
fn close_from_evidence(state_dir: &Path, r: &mut Remediation, evidence: &str) {
    r.phase = Phase::Succeeded;
    r.step = None;
    r.steps.push(StepRecord {
        name: "Verify".into(),
        start: now(),
        end: Some(now()),
        outcome: Some("Done".into()),
        message: format!("closed from evidence after the agent stopped: {evidence}"),
    });
    r.finished_at = Some(now());
    let _ = journal(state_dir, r);
}

/// The dot-file that keeps the Bitnami image from ever seeing an empty data dir.
pub const KEEP_FILE: &str = ".etcd-medic-keep";

const KEEP_TEXT: &[u8] = b"kept by etcd-medic so that data/ never looks empty to the start script\n";

/// The member id the image stored in `data/member_id`, if it is one (1-16 hex digits in a
/// small regular file); anything else is ignored with the reason, never copied anywhere.
async fn stored_member_id(vol: &Arc<Volume>, data: &Path) -> Option<String> {
    let (vol, file) = (vol.clone(), data.join("member_id"));
    let read = blocking(move || match vol.read_small(&file, 64)? {
        None => Ok(None),
        Some(bytes) => {
            Ok(crate::volume::parse_member_id(&bytes).map(|id| format!("{id:x}")).map_err(|why| (file, why)).map(Some).unwrap_or_else(
                |(f, why)| {
                    tracing::warn!("ignoring {}: {why}", f.display());
                    None
                },
            ))
        }
    })
    .await;
    read.unwrap_or_else(|e| {
        tracing::warn!(code = %e.code, "ignoring member_id: {}", e.message);
        None
    })
}

/// The peer URL, member name and initial cluster state the container starts etcd with.
fn start_flags(
    c: &k8s_openapi::api::core::v1::Container,
    env: &std::collections::BTreeMap<String, String>,
    pod: &str,
) -> (Option<String>, String, Option<String>) {
    let words: Vec<String> = c.command.iter().chain(c.args.iter()).flatten().map(|w| container::expand(w, env)).collect();
    let flag = |name: &str| {
        words.iter().enumerate().find_map(|(i, w)| {
            w.strip_prefix(&format!("--{name}="))
                .map(String::from)
                .or_else(|| (w == &format!("--{name}")).then(|| words.get(i + 1).cloned()).flatten())
        })
    };
    let envv = |k: &str| env.get(k).cloned().filter(|v| !v.is_empty());
    let peer = flag("initial-advertise-peer-urls")
        .or_else(|| envv("ETCD_INITIAL_ADVERTISE_PEER_URLS"))
        .map(|u| u.split(',').next().unwrap_or_default().to_string());
    let name = flag("name").or_else(|| envv("ETCD_NAME")).unwrap_or_else(|| pod.to_string());
    let state = flag("initial-cluster-state").or_else(|| envv("ETCD_INITIAL_CLUSTER_STATE"));
    (peer, name, state)
}

/// The new member fetches a full snapshot while the quarantine keeps the old one on the same
/// filesystem: room for the db again plus a WAL segment.
fn check_space(plan: &Plan, vol: &Volume) -> Result<()> {
    let need = plan.r#move.iter().find(|m| m.path == "member/snap").map(|m| m.bytes).unwrap_or(0) + 64 * 1024 * 1024;
    let free = vol.free_bytes().map_err(|e| Error::new(Code::InsufficientSpace, e.message))?;
    if free < need {
        return Err(Error::new(
            Code::InsufficientSpace,
            format!("{} has {free} bytes free; the rejoining member needs about {need}", plan.volume.root.display()),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: u64, name: &str, peer: &str) -> etcd::Member {
        etcd::Member { id, name: name.into(), peer_urls: vec![peer.into()], client_urls: vec![], is_learner: false, healthy: true }
    }

    #[test]
    fn only_an_unstarted_entry_of_a_stopped_bitnami_member_is_an_orphan() {
        let peer = "http://apisix-etcd-1.apisix-etcd-headless.apisix.svc.cluster.local:2380";
        let members = [member(1, "apisix-etcd-0", "http://other:2380"), member(7, "", peer)];
        assert_eq!(orphaned_entry(Profile::BitnamiMemberId, &members, peer, None, false), Some(7));
        assert_eq!(orphaned_entry(Profile::BitnamiMemberId, &members, peer, None, true), None, "the image is starting it");
        assert_eq!(orphaned_entry(Profile::Plain, &members, peer, None, false), None, "the agent's own learner stays");
        assert_eq!(orphaned_entry(Profile::Bitnami, &members, peer, Some(7), false), None, "the stale entry is Membership's");
        let started = [member(7, "apisix-etcd-1", peer)];
        assert_eq!(orphaned_entry(Profile::Bitnami, &started, peer, None, false), None, "a started member is never an orphan");
    }
}
