//! One remediation per etcd cluster across all nodes: a coordination.k8s.io Lease named for
//! the cluster id, taken with optimistic concurrency, renewed while working, released at the
//! end, and taken over only once it has expired (a holder that died does not lock forever).

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;

use crate::error::{Code, Error, Result};
use crate::kubeapi::KubeApi;

/// Long enough for the longest step between renewals (membership retries and settling).
pub const DURATION: Duration = Duration::from_secs(120);

pub fn lease_name(cluster_id: u64) -> String {
    format!("etcd-medic-{cluster_id:016x}")
}

/// Is the lease held by someone other than `me` and not expired at `now`?
pub fn held_by_other(spec: Option<&LeaseSpec>, me: &str, now: Timestamp) -> Option<String> {
    let spec = spec?;
    let holder = spec.holder_identity.clone().filter(|h| !h.is_empty() && h != me)?;
    let renewed = spec.renew_time.as_ref().or(spec.acquire_time.as_ref())?.0;
    let ttl = spec.lease_duration_seconds.unwrap_or(DURATION.as_secs() as i32) as i64;
    let expires = renewed.checked_add(jiff::SignedDuration::from_secs(ttl)).ok()?;
    (now < expires).then_some(holder)
}

/// The lock gate of a dry run: refused as `acquire` would be, without writing anything.
pub async fn check_free(api: &KubeApi, namespace: &str, cluster_id: u64, me: &str) -> Result<()> {
    let name = lease_name(cluster_id);
    if let Some(l) = api.lease(namespace, &name).await?
        && let Some(holder) = held_by_other(l.spec.as_ref(), me, Timestamp::now())
    {
        return Err(busy(&holder, namespace, &name));
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
}

impl ClusterLock {
    pub async fn acquire(api: &KubeApi, namespace: &str, cluster_id: u64, me: &str) -> Result<Self> {
        let name = lease_name(cluster_id);
        let now = Timestamp::now();
        let spec = |acquire: Option<MicroTime>| LeaseSpec {
            holder_identity: Some(me.to_string()),
            lease_duration_seconds: Some(DURATION.as_secs() as i32),
            acquire_time: acquire.or(Some(MicroTime(now))),
            renew_time: Some(MicroTime(now)),
            ..Default::default()
        };
        let lease = match api.lease(namespace, &name).await? {
            None => {
                let l =
                    Lease { metadata: kube::api::ObjectMeta { name: Some(name.clone()), ..Default::default() }, spec: Some(spec(None)) };
                api.write_lease(namespace, &l, true).await.map_err(|e| locked(e, &name))?
            }
            Some(mut l) => {
                if let Some(holder) = held_by_other(l.spec.as_ref(), me, now) {
                    return Err(busy(&holder, namespace, &name));
                }
                l.spec = Some(spec(None));
                api.write_lease(namespace, &l, false).await?
            }
        };
        Ok(ClusterLock { api: api.clone(), namespace: namespace.to_string(), lease, me: me.to_string() })
    }

    pub async fn renew(&mut self) -> Result<()> {
        let mut l = self.lease.clone();
        if let Some(s) = l.spec.as_mut() {
            s.renew_time = Some(MicroTime(Timestamp::now()));
        }
        self.lease = self.api.write_lease(&self.namespace, &l, false).await?;
        Ok(())
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

fn locked(e: Error, name: &str) -> Error {
    if e.code == Code::ClusterLocked { Error::new(Code::ClusterLocked, format!("another agent took lease {name} first")) } else { e }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(holder: &str, renewed_secs_ago: i64, ttl: i32) -> LeaseSpec {
        let t = Timestamp::now().checked_sub(jiff::SignedDuration::from_secs(renewed_secs_ago)).unwrap();
        LeaseSpec {
            holder_identity: Some(holder.into()),
            renew_time: Some(MicroTime(t)),
            lease_duration_seconds: Some(ttl),
            ..Default::default()
        }
    }

    #[test]
    fn a_live_lease_of_another_node_locks_an_expired_one_does_not() {
        let now = Timestamp::now();
        assert_eq!(held_by_other(Some(&spec("node-b", 5, 60)), "node-a", now).as_deref(), Some("node-b"));
        assert_eq!(held_by_other(Some(&spec("node-b", 61, 60)), "node-a", now), None, "expired: taken over");
        assert_eq!(held_by_other(Some(&spec("node-a", 5, 60)), "node-a", now), None, "ours");
        assert_eq!(held_by_other(Some(&spec("", 5, 60)), "node-a", now), None, "released");
        assert_eq!(held_by_other(None, "node-a", now), None);
    }
}
