//! The step engine: check every gate, take the cluster's lock, quarantine, repair
//! membership, restart the pod, verify, prune old quarantines. Every step is journaled
//! (fsynced) in the state dir before it runs, so a crash leaves a precise record; a journal
//! left Running after a change is resumed, never repeated. The CLI and the server run this
//! one entry, [`Engine::run_as`], and follow it through its typed progress events.
//!
//! What the engine decides (the stale member, resume points, how a run ends, verification's
//! verdicts) is in `etcd_medic_core`; here it observes and acts.

mod act;
mod check;
pub mod gates;
mod restore;
mod verify;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;

use crate::error::{Code, Error, Result};
use crate::etcd::Etcd;
use crate::failpoint::Failpoint;
use crate::journal::write as journal;
use crate::lease::{ClusterLock, Kept};
use crate::locate::Locator;
use etcd_medic_core::contract::{Outcome, StepRecord, now};
use etcd_medic_core::progress::{Progress, Update};
use etcd_medic_core::resume::{self, Halt, holder};

pub use act::KEEP_FILE;
pub use check::Checked;
pub use etcd_medic_core::contract::{ErrorRecord, Phase, QuarantineRecord, Remediation, Step};
pub use restore::restore;

/// How long etcd needs after a member was removed before it accepts the image's
/// `member add`: its leader must have been connected to every voter for a few seconds.
pub const SETTLE: Duration = Duration::from_secs(6);

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
    /// How long etcd needs after removing a member before it accepts the image's
    /// `member add`: its leader must have been connected to every voter for a while.
    pub settle: Duration,
    /// How the agent reaches etcd (client TLS).
    pub etcd: Etcd,
    /// The test hook armed in this process (none in a release build).
    pub failpoint: Failpoint,
}

/// Who follows a remediation's progress: a channel's sender (the CLI's printer, the
/// server's reporter), or a function called before the engine goes on (the lab mounts its
/// attacks at the worst moment with one). Never blocks the engine for long.
pub trait Observe: Send + Sync {
    fn observe(&self, update: Update);
}

impl Observe for UnboundedSender<Update> {
    fn observe(&self, update: Update) {
        // A follower that went away (a caller hung up) never stops the engine.
        let _ = self.send(update);
    }
}

impl<F: Fn(Update) + Send + Sync> Observe for F {
    fn observe(&self, update: Update) {
        self(update)
    }
}

pub struct Engine<'a> {
    pub locator: &'a Locator,
    pub opts: Options,
    /// Every step's start and end and the run's end, each with the remediation right after
    /// (a terminal, Events, metrics, the server's view of what runs).
    pub progress: &'a dyn Observe,
    /// Set on shutdown: no step starts after it; a step that waits (Verify) stops waiting.
    /// A remediation that had changed something stays `Running` in its journal, keeps the
    /// cluster's lease until it expires, and is resumed by the next start.
    pub stop: &'a AtomicBool,
}

impl Engine<'_> {
    /// Runs one remediation to its end (verification included) and returns it.
    pub async fn run(&self, namespace: &str, pod: &str, pod_uid: Option<&str>) -> Remediation {
        self.run_as(Remediation::new(&self.locator.layout.node_name, namespace, pod, pod_uid)).await
    }

    /// Runs `r` (made by `Remediation::new`, so that its id is known before it runs): a
    /// journal of its pod left unfinished after a change is finished first (and may be the
    /// answer), then `r` runs its steps.
    pub async fn run_as(&self, mut r: Remediation) -> Remediation {
        let state_dir = &self.opts.state_dir;
        if !self.opts.dry_run {
            crate::journal::close_abandoned_of(state_dir, &r.namespace, &r.pod);
            if let Some(mut old) = crate::journal::unfinished(state_dir, &r.namespace, &r.pod) {
                if let Some(e) = resume::too_many_resumes(&old) {
                    return self.finish(old, Err(Halt::failed(e)));
                }
                let _running = match crate::journal::lock_run(state_dir, &old.id) {
                    Ok(l) => l,
                    Err(e) => return self.finish(old, Err(Halt::failed(e))),
                };
                // The pod it restarted may have rejoined long ago, and a later instance fail
                // anew: then that remediation reached its goal, and this failure gets its own.
                let Some(evidence) = self.reached_goal(&old).await else {
                    let outcome = Box::pin(self.resume(&mut old)).await;
                    return self.finish(old, outcome);
                };
                tracing::info!(id = %old.id, "closing an unfinished remediation from evidence: {evidence}");
                resume::close_from_evidence(&mut old, &evidence);
                let _ = journal(state_dir, &old);
                let verified = old.steps.last().map(|s| s.message.clone()).unwrap_or_default();
                self.emit(&old, Progress::StepEnded { step: Step::Verify, outcome: Outcome::Done, message: verified, seconds: 0.0 });
                self.emit(&old, Progress::Finished { phase: old.phase, error: None });
                // A pod that does not fail now needs nothing more: that one was the answer.
                if !self.fails_now(&old).await {
                    return old;
                }
            }
        }
        let _running = if self.opts.dry_run {
            None
        } else {
            match crate::journal::lock_run(state_dir, &r.id) {
                Ok(l) => Some(l),
                Err(e) => return self.finish(r, Err(Halt::refused(e))),
            }
        };
        r.phase = Phase::Running;
        r.etcd_endpoints = self.opts.etcd_endpoints.clone();
        r.dry_run = self.opts.dry_run;
        let outcome = Box::pin(self.steps(&mut r)).await;
        self.finish(r, outcome)
    }

    fn emit(&self, r: &Remediation, progress: Progress) {
        self.progress.observe(Update { progress, remediation: r.clone() });
    }

    /// Test hook: `after:<Step>` holds the engine right after that step is journaled, until
    /// it is killed, or stopped at this safe point.
    async fn failpoint(&self, step: Step) {
        if self.opts.failpoint.armed(&format!("after:{step}")) {
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

    fn holder(&self, r: &Remediation) -> String {
        holder(&self.locator.layout.node_name, &r.id)
    }

    fn finish(&self, mut r: Remediation, outcome: std::result::Result<(), Halt>) -> Remediation {
        if let Err(h) = &outcome
            && h.changed
            && self.stopping()
        {
            tracing::warn!(id = %r.id, "stopped at a safe point ({}); the next start resumes it", h.error.message);
        }
        let ended = resume::finish(&mut r, outcome, self.opts.dry_run, self.stopping());
        let _ = journal(&self.opts.state_dir, &r);
        self.emit(&r, if ended { Progress::Finished { phase: r.phase, error: r.error.clone() } } else { Progress::Paused });
        r
    }

    /// Journals the step, runs it, journals its outcome. A failure says whether anything
    /// had been changed by then (`changed`: the run ends Failed) or not (Refused).
    async fn step<T>(
        &self,
        r: &mut Remediation,
        step: Step,
        changed: bool,
        fut: impl Future<Output = Result<(T, String)>>,
    ) -> std::result::Result<T, Halt> {
        if self.stopping() {
            // Whether anything was changed is what the journal says, not what this step would do.
            let changed = resume::needs_resume(r);
            return Err(Halt { error: Error::new(Code::NotReady, format!("the agent is shutting down: stopped before {step}")), changed });
        }
        self.opts.failpoint.panic_at(&format!("panic:{step}"));
        r.step = Some(step);
        r.steps.push(StepRecord { name: step, start: now(), end: None, outcome: None, message: String::new() });
        if !self.opts.dry_run || !changed {
            journal(&self.opts.state_dir, r).map_err(|error| Halt { error, changed })?;
        }
        self.emit(r, Progress::StepStarted { step });
        let started = Instant::now();
        let res = fut.await;
        let last = r.steps.last_mut().expect("pushed above");
        last.end = Some(now());
        let (out, outcome) = match res {
            Ok((v, msg)) => {
                last.message = msg;
                (Ok(v), Outcome::Done)
            }
            Err(e) => {
                last.message = e.message.clone();
                let code = e.code;
                (Err(Halt { error: e, changed }), Outcome::Failed(code))
            }
        };
        last.outcome = Some(outcome);
        let message = last.message.clone();
        let _ = journal(&self.opts.state_dir, r);
        self.emit(r, Progress::StepEnded { step, outcome, message, seconds: started.elapsed().as_secs_f64() });
        self.failpoint(step).await;
        out
    }

    /// Finishes a remediation from its journal: the lock again, then the steps not yet done.
    async fn resume(&self, r: &mut Remediation) -> std::result::Result<(), Halt> {
        r.phase = Phase::Running;
        let checked = self.step(r, Step::Resume, true, Box::pin(self.recheck(r.clone()))).await?;
        // Something was changed already: a failure to take the lock again is Failed, not Refused.
        self.lock_and_act(r, &checked, true).await
    }

    async fn steps(&self, r: &mut Remediation) -> std::result::Result<(), Halt> {
        let (ns, name, uid) = (r.namespace.clone(), r.pod.clone(), r.pod_uid.clone());
        let found = std::sync::Mutex::new(check::Found::default());
        // Each step's future on the heap: their states together outgrow a thread's stack in
        // debug builds when a caller joins two remediations (the lab does).
        let checked = self.step(r, Step::Check, false, Box::pin(self.check(&ns, &name, uid.as_deref(), &found))).await;
        // A refusal keeps what the check found: the diagnosis and its evidence, the plan.
        let found = found.into_inner().unwrap_or_else(|e| e.into_inner());
        (r.diagnosis, r.plan) = (found.diagnosis, found.plan);
        let checked = checked?;
        r.pod_uid = Some(checked.plan.pod_uid.clone());
        r.plan = Some(checked.plan.clone());
        if self.opts.dry_run {
            // Every gate's verdict, the cluster's lock included, without taking it.
            let me = self.holder(r);
            return self
                .step(r, Step::Lock, false, async {
                    let name = checked.target.scope.lease_name();
                    crate::lease::check_free(&self.locator.api, self.lease_namespace(&ns), &name, &me).await?;
                    Ok(((), format!("lease {name} is free")))
                })
                .await;
        }
        self.lock_and_act(r, &checked, false).await
    }

    /// Takes the cluster's lease (step Lock), acts, and gives the lease back (see `release`).
    async fn lock_and_act(&self, r: &mut Remediation, checked: &Checked, changed: bool) -> std::result::Result<(), Halt> {
        let (ns, me) = (r.namespace.clone(), self.holder(r));
        let lock = self
            .step(r, Step::Lock, changed, async {
                // A holder of this node whose process is gone (killed mid-way) is no holder.
                let node = self.locator.layout.node_name.clone();
                let state_dir = self.opts.state_dir.clone();
                let gone = move |h: &str| h.split_once('/').is_some_and(|(n, id)| n == node && !crate::journal::is_running(&state_dir, id));
                let name = checked.target.scope.lease_name();
                let l = ClusterLock::acquire(&self.locator.api, self.lease_namespace(&ns), &name, &me, self.stop, &gone).await?;
                Ok((l, format!("lease {name} held by {me}")))
            })
            .await?;
        // Renewed in the background from here on, whatever step runs.
        let kept = lock.keep();
        let result = Box::pin(self.act(r, checked, &kept)).await;
        if let Some(lock) = kept.into_lock().await {
            self.release(lock, &result).await;
        }
        result
    }

    /// Gives the cluster's lease back, unless the agent stops mid-way: then it stays held
    /// (until it expires) so no other node starts on this cluster before the resume.
    async fn release(&self, lock: ClusterLock, result: &std::result::Result<(), Halt>) {
        if !(self.stopping() && matches!(result, Err(h) if h.changed)) {
            let _ = lock.release().await;
        }
    }

    /// The steps that change something, then verification and retention, each from the
    /// journal's point of view: a resume skips what is done.
    async fn act(&self, r: &mut Remediation, c: &Checked, lock: &Kept) -> std::result::Result<(), Halt> {
        let resumed = r.resumes() > 0;
        for step in resume::remaining(r) {
            // Safe points: the cluster's lease still ours before each step that changes something.
            if step.changes_data() {
                lock.check().map_err(Halt::failed)?;
            }
            match step {
                Step::Quarantine => Box::pin(self.quarantine(r, c)).await?,
                Step::Membership => self.step(r, step, true, Box::pin(self.membership(c))).await?,
                Step::Restart => self.step(r, step, true, Box::pin(self.restart(&c.plan, resumed))).await?,
                Step::Verify => self.step(r, step, true, Box::pin(self.verify(c, lock))).await?,
                Step::Retention => {
                    // The member is back: quarantines older than the newest `keep` may go. A
                    // failure to prune is reported, never a reason to call a healed member Failed.
                    let id = r.id.clone();
                    if let Err(h) = self.step(r, step, true, self.prune(&c.plan.namespace, &c.plan.pod, &id)).await {
                        tracing::warn!(code = %h.error.code, "retention: {}", h.error.message);
                    }
                }
                Step::Check | Step::Resume | Step::Lock => unreachable!("resume::remaining lists only the acting steps"),
            }
        }
        Ok(())
    }
}
