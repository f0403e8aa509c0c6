//! One remediation per etcd cluster across all nodes: a coordination.k8s.io Lease named for
//! the cluster id, taken with optimistic concurrency, renewed in the background while
//! working, released at the end, and taken over only once it has stayed unchanged for its
//! whole duration as this node observed it (a holder that died does not lock forever, and a
//! skewed clock never takes over a live holder).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;

use crate::error::{Code, Error, Result};
use crate::kubeapi::KubeApi;
pub use etcd_medic_core::lease::{Acquire, DURATION, Holding, RENEW_EVERY, decide, lease_name, renew_until};

/// The Lease as the decisions of `etcd_medic_core::lease` see it.
pub fn holding(l: &Lease) -> Holding {
    let spec = l.spec.as_ref();
    Holding {
        holder: spec.and_then(|s| s.holder_identity.clone()),
        renewed: spec.and_then(|s| s.renew_time.as_ref().or(s.acquire_time.as_ref())).map(|t| t.0),
        duration_seconds: spec.and_then(|s| s.lease_duration_seconds),
        resource_version: l.metadata.resource_version.clone().unwrap_or_default(),
    }
}

/// The lock gate of a dry run: refused as `acquire` would be, without writing anything.
pub async fn check_free(api: &KubeApi, namespace: &str, name: &str, me: &str) -> Result<()> {
    if let Some(l) = api.lease(namespace, name).await?
        && let Some(holder) = etcd_medic_core::lease::held_by_other(&holding(&l), me, Timestamp::now())
    {
        return Err(busy(&holder, namespace, name));
    }
    Ok(())
}

fn busy(holder: &str, namespace: &str, name: &str) -> Error {
    Error::new(Code::ClusterLocked, format!("{holder} is remediating this etcd cluster (lease {namespace}/{name}); retry when it is done"))
}

pub struct ClusterLock {
    api: KubeApi,
    namespace: String,
    lease: Lease,
    me: String,
    /// When the lease was last written by us, on this node's monotonic clock.
    renewed: Instant,
}

fn holder_of(l: &Lease) -> Option<String> {
    l.spec.as_ref().and_then(|s| s.holder_identity.clone()).filter(|h| !h.is_empty())
}

impl ClusterLock {
    /// Takes the cluster's lease. A lease another holder renewed recently (by its clock) is
    /// `ClusterLocked` at once. One that looks expired is watched: taken over only once its
    /// resourceVersion has not changed for the lease's duration on this node's clock (a
    /// holder alive with a skewed clock renews meanwhile, and keeps it); `stop` ends the wait.
    /// `gone(holder)` says whether a holder is known to be dead (a remediation of this node
    /// that no process runs any more): its lease is taken over at once.
    pub async fn acquire(
        api: &KubeApi,
        namespace: &str,
        name: &str,
        me: &str,
        stop: &AtomicBool,
        gone: &(dyn Fn(&str) -> bool + Send + Sync),
    ) -> Result<Self> {
        let name = name.to_string();
        let spec = || LeaseSpec {
            holder_identity: Some(me.to_string()),
            lease_duration_seconds: Some(DURATION.as_secs() as i32),
            acquire_time: Some(MicroTime(Timestamp::now())),
            renew_time: Some(MicroTime(Timestamp::now())),
            ..Default::default()
        };
        let mut watched: Option<(String, Instant)> = None;
        // A write that failed without an answer may have gone through: the lease is read
        // again (ours now, it is simply written again) until the API server's retry budget.
        let deadline = Instant::now() + api.retry_for();
        let mut backoff = Duration::from_millis(100);
        loop {
            let written = match api.lease(namespace, &name).await? {
                None => {
                    let l =
                        Lease { metadata: kube::api::ObjectMeta { name: Some(name.clone()), ..Default::default() }, spec: Some(spec()) };
                    api.write_lease(namespace, &l, true).await
                }
                Some(mut l) => {
                    let h = holding(&l);
                    let seen = watched.as_ref().map(|(rv, since): &(String, Instant)| (rv.as_str(), *since));
                    match decide(Some(&h), me, gone, seen, Timestamp::now(), Instant::now()) {
                        Acquire::Take => {}
                        Acquire::Busy { holder } => return Err(busy(&holder, namespace, &name)),
                        Acquire::Watch => {
                            tracing::info!("lease {namespace}/{name} of {:?} looks expired; watching it for {:?}", h.holder, h.duration());
                            watched = Some((h.resource_version.clone(), Instant::now()));
                            continue;
                        }
                        Acquire::Wait => {
                            if stop.load(Ordering::SeqCst) {
                                return Err(Error::new(Code::NotReady, "the agent is shutting down: stopped while waiting for a lease"));
                            }
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            continue;
                        }
                        Acquire::TakeOver { holder } => {
                            tracing::warn!("taking over lease {namespace}/{name}: {holder} left it unchanged for {:?}", h.duration());
                        }
                    }
                    l.spec = Some(spec());
                    api.write_lease(namespace, &l, false).await
                }
            };
            match written {
                Ok(lease) => {
                    return Ok(ClusterLock {
                        api: api.clone(),
                        namespace: namespace.to_string(),
                        lease,
                        me: me.to_string(),
                        renewed: Instant::now(),
                    });
                }
                Err(e) if e.code == Code::ClusterLocked || Instant::now() + backoff > deadline => return Err(locked(e, &name)),
                Err(e) => {
                    tracing::debug!("writing lease {namespace}/{name} failed ({}); reading it again", e.message);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    fn name(&self) -> String {
        self.lease.metadata.name.clone().unwrap_or_default()
    }

    /// Renews the lease. A failure is retried with back-off until the lease would expire
    /// (on this node's clock); a conflict is settled by reading the lease: still ours (a
    /// renewal whose answer was lost) is renewed again, another holder's is `ClusterLocked`.
    pub async fn renew(&mut self) -> Result<()> {
        let until = renew_until(self.renewed, holding(&self.lease).duration());
        let mut backoff = Duration::from_millis(200);
        loop {
            let mut l = self.lease.clone();
            if let Some(s) = l.spec.as_mut() {
                s.renew_time = Some(MicroTime(Timestamp::now()));
            }
            let last = match self.api.write_lease(&self.namespace, &l, false).await {
                Ok(l) => {
                    self.lease = l;
                    self.renewed = Instant::now();
                    return Ok(());
                }
                Err(e) if e.code == Code::ClusterLocked => match self.api.lease(&self.namespace, &self.name()).await {
                    Ok(Some(cur)) if holder_of(&cur).as_deref() == Some(self.me.as_str()) => {
                        self.lease = cur;
                        continue;
                    }
                    Ok(Some(cur)) => {
                        let who = holder_of(&cur).unwrap_or_else(|| "nobody".into());
                        return Err(Error::new(
                            Code::ClusterLocked,
                            format!("lease {}/{} is now held by {who}", self.namespace, self.name()),
                        ));
                    }
                    Ok(None) => {
                        return Err(Error::new(Code::ClusterLocked, format!("lease {}/{} was deleted", self.namespace, self.name())));
                    }
                    Err(e) => e,
                },
                Err(e) => e,
            };
            if Instant::now() + backoff > until {
                return Err(Error::new(
                    Code::NotReady,
                    format!("could not renew lease {}/{} before it would expire: {}", self.namespace, self.name(), last.message),
                ));
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// Keeps the lease renewed in the background every [`RENEW_EVERY`] while the engine
    /// works, so that no step, however long, outlives it; a renewal that fails for good is
    /// reported by [`Kept::check`] at the engine's next safe point.
    pub fn keep(mut self) -> Kept {
        let lost = Arc::new(Mutex::new(None));
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let report = lost.clone();
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(RENEW_EVERY) => {}
                    _ = stopped.changed() => return self,
                }
                if let Err(e) = self.renew().await {
                    tracing::error!(code = %e.code, "lost the cluster's lease: {}", e.message);
                    *report.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                    return self;
                }
            }
        });
        Kept { lost, stop, task }
    }

    /// Gives the lease up (holder cleared), so the next remediation need not wait for expiry.
    pub async fn release(self) -> Result<()> {
        let mut l = self.lease.clone();
        if let Some(s) = l.spec.as_mut()
            && s.holder_identity.as_deref() == Some(&self.me)
        {
            s.holder_identity = None;
            s.renew_time = None;
            s.acquire_time = None;
        }
        self.api.write_lease(&self.namespace, &l, false).await.map(|_| ())
    }
}

/// A lease held and renewed in the background (see [`ClusterLock::keep`]).
pub struct Kept {
    lost: Arc<Mutex<Option<Error>>>,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<ClusterLock>,
}

impl Kept {
    /// `Err` once the lease could not be renewed (taken by another holder, or the API
    /// server unreachable until it would expire): the engine stops at its next safe point.
    pub fn check(&self) -> Result<()> {
        match self.lost.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Stops the renewals and gives the lock back (to release it, or keep it until expiry).
    pub async fn into_lock(self) -> Option<ClusterLock> {
        let _ = self.stop.send(true);
        self.task.await.ok()
    }
}

fn locked(e: Error, name: &str) -> Error {
    if e.code == Code::ClusterLocked { Error::new(Code::ClusterLocked, format!("another agent took lease {name} first")) } else { e }
}
