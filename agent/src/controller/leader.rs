//! Leader election among the controller's replicas through a coordination.k8s.io Lease, as
//! client-go's: the leader renews it every third of its duration; another replica takes it
//! over only after watching it unchanged for a whole duration on its own clock (a clock
//! skew never unseats a live leader); a leader that cannot renew before the lease would
//! expire stops leading, and the process exits so that it restarts clean. The decisions
//! are `etcd_medic_core::lease`'s, shared with the clusters' locks.

use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;

use crate::error::{Code, Error, Result};
use crate::kubeapi::KubeApi;
use crate::lease::{Acquire, decide, holding};
use crate::shutdown::Shutdown;

pub struct Election {
    pub api: KubeApi,
    pub namespace: String,
    pub name: String,
    /// This replica (its pod name and a random suffix).
    pub me: String,
    pub duration: Duration,
    /// When the lease was last written as ours: the lead is good only for two thirds of a
    /// duration after it, whatever a renewal in flight may still bring (see [`Lead`]).
    pub lead: std::sync::Arc<Lead>,
}

/// Whether this replica may act now: it wrote the lease as its own less than two thirds of
/// a duration ago. A standby takes over only after a whole duration unchanged on its own
/// clock, so a leader whose renewals hang stops acting before another starts.
#[derive(Default)]
pub struct Lead {
    written: std::sync::Mutex<Option<Instant>>,
    duration: std::sync::Mutex<Duration>,
}

impl Lead {
    pub fn held(&self) -> bool {
        !self.left().is_zero()
    }

    /// How long this replica may still act without another renewal.
    pub fn left(&self) -> Duration {
        let budget = *self.duration.lock().unwrap() * 2 / 3;
        self.written.lock().unwrap().map_or(Duration::ZERO, |t| budget.saturating_sub(t.elapsed()))
    }

    fn wrote(&self, at: Instant, duration: Duration) {
        *self.duration.lock().unwrap() = duration;
        *self.written.lock().unwrap() = Some(at);
    }

    fn lost(&self) {
        *self.written.lock().unwrap() = None;
    }
}

impl Election {
    fn spec(&self, acquired: Option<MicroTime>) -> LeaseSpec {
        let now = MicroTime(Timestamp::now());
        LeaseSpec {
            holder_identity: Some(self.me.clone()),
            lease_duration_seconds: Some(self.duration.as_secs().max(1) as i32),
            acquire_time: Some(acquired.unwrap_or_else(|| now.clone())),
            renew_time: Some(now),
            ..Default::default()
        }
    }

    /// Waits until this replica leads (`NotReady` when the shutdown comes first).
    pub async fn acquire(&self, shutdown: &Shutdown) -> Result<Lease> {
        let mut watched: Option<(String, Instant)> = None;
        let mut logged = None;
        loop {
            if shutdown.stopping() {
                return Err(Error::new(Code::NotReady, "shutting down before leading"));
            }
            let attempt = Instant::now();
            let written = match self.api.lease(&self.namespace, &self.name).await {
                Err(e) => Err(e),
                Ok(None) => {
                    let l = Lease {
                        metadata: kube::api::ObjectMeta { name: Some(self.name.clone()), ..Default::default() },
                        spec: Some(self.spec(None)),
                    };
                    self.api.write_lease(&self.namespace, &l, true).await
                }
                Ok(Some(mut l)) => {
                    let h = holding(&l);
                    let seen = watched.as_ref().map(|(rv, since): &(String, Instant)| (rv.as_str(), *since));
                    match decide(Some(&h), &self.me, |_| false, seen, Timestamp::now(), Instant::now()) {
                        Acquire::Take | Acquire::TakeOver { .. } => {
                            l.spec = Some(self.spec(None));
                            self.api.write_lease(&self.namespace, &l, false).await
                        }
                        Acquire::Busy { holder } => {
                            if logged.as_ref() != Some(&holder) {
                                tracing::info!(leader = %holder, "standing by: {holder} leads");
                                logged = Some(holder);
                            }
                            watched = None;
                            Err(Error::new(Code::ClusterLocked, "another replica leads"))
                        }
                        Acquire::Watch => {
                            watched = Some((h.resource_version.clone(), Instant::now()));
                            Err(Error::new(Code::ClusterLocked, "watching a lease that looks expired"))
                        }
                        Acquire::Wait => Err(Error::new(Code::ClusterLocked, "watching a lease that looks expired")),
                    }
                }
            };
            match written {
                Ok(lease) => {
                    self.lead.wrote(attempt, self.duration);
                    tracing::info!(lease = %format!("{}/{}", self.namespace, self.name), "leading");
                    return Ok(lease);
                }
                Err(e) if e.code != Code::ClusterLocked => tracing::debug!("leader election: {}", e.message),
                Err(_) => {}
            }
            tokio::select! {
                _ = tokio::time::sleep(self.retry_every()) => {}
                _ = shutdown.stopped() => {}
            }
        }
    }

    fn retry_every(&self) -> Duration {
        (self.duration / 5).max(Duration::from_millis(200))
    }

    /// Renews `lease` every third of its duration until the shutdown (then releases it, so
    /// that a standby leads at once) or until it is lost: another holder wrote it, or no
    /// renewal succeeded for two thirds of the duration.
    pub async fn keep(&self, mut lease: Lease, shutdown: &Shutdown) -> Error {
        let lost = |e: Error| {
            self.lead.lost();
            e
        };
        // After a failed renewal, try again soon (client-go's retry period), not a third of
        // the duration later: one blip must not cost the lead.
        let retry = (self.duration / 10).max(Duration::from_millis(200));
        let mut wait = self.duration / 3;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.stopped() => {
                    self.lead.lost();
                    self.release(lease).await;
                    return Error::new(Code::NotReady, "shutting down");
                }
            }
            let left = self.lead.left();
            if left.is_zero() {
                return lost(Error::new(Code::NotReady, "the lead lapsed: no renewal went through in time"));
            }
            let attempt = Instant::now();
            let mut next = lease.clone();
            let acquired = lease.spec.as_ref().and_then(|s| s.acquire_time.clone());
            next.spec = Some(self.spec(acquired));
            // Every call is bounded by what is left of the lead: a hanging API server cannot
            // keep this replica believing it leads.
            match tokio::time::timeout(left, self.api.write_lease(&self.namespace, &next, false)).await {
                Ok(Ok(l)) => {
                    lease = l;
                    self.lead.wrote(attempt, self.duration);
                    wait = self.duration / 3;
                }
                Ok(Err(e)) if e.code == Code::ClusterLocked => {
                    return lost(Error::new(Code::ClusterLocked, format!("lost the lead: {}", e.message)));
                }
                failed => {
                    let why = match failed {
                        Ok(Err(e)) => e.message,
                        _ => "the renewal did not answer in time".into(),
                    };
                    // A renewal whose answer was lost may have gone through: read it back,
                    // within the same bound.
                    let left = self.lead.left().min(Duration::from_secs(2));
                    match tokio::time::timeout(left, self.api.lease(&self.namespace, &self.name)).await {
                        Ok(Ok(Some(l))) if holding(&l).holder.as_deref() == Some(self.me.as_str()) => lease = l,
                        Ok(Ok(_)) => return lost(Error::new(Code::ClusterLocked, format!("lost the lead: {why}"))),
                        _ => {}
                    }
                    tracing::warn!("could not renew the lead ({why}); again in {retry:?}, {:?} of it left", self.lead.left());
                    wait = retry;
                }
            }
        }
    }

    /// Gives the lease up (holder cleared), so that a standby need not wait for it to expire.
    async fn release(&self, mut lease: Lease) {
        if let Some(s) = lease.spec.as_mut() {
            s.holder_identity = None;
            s.renew_time = Some(MicroTime(Timestamp::now()));
        }
        if let Err(e) = self.api.write_lease(&self.namespace, &lease, false).await {
            tracing::warn!("could not release the lead: {}", e.message);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lead_is_good_for_two_thirds_of_a_duration_after_a_write() {
        let lead = Lead::default();
        assert!(!lead.held(), "never written");
        lead.wrote(Instant::now(), Duration::from_secs(15));
        assert!(lead.held() && lead.left() <= Duration::from_secs(10) && lead.left() > Duration::from_secs(9));
        lead.wrote(Instant::now() - Duration::from_secs(11), Duration::from_secs(15));
        assert!(!lead.held(), "a write older than two thirds of the duration no longer counts");
        lead.wrote(Instant::now(), Duration::from_secs(15));
        lead.lost();
        assert_eq!(lead.left(), Duration::ZERO);
    }
}
