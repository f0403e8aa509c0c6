//! The etcd cluster as the agent sees it: endpoints from the sibling pods, the member list,
//! each member's health, and the membership changes a remediation makes (retrying
//! `etcdserver: unhealthy cluster`, which etcd answers for seconds after any change).

use std::path::Path;
use std::time::{Duration, Instant};

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use k8s_openapi::api::core::v1::Pod;

use crate::error::{Code, Error, Result};
pub use etcd_medic_core::member::{Member, Seen, agreed_healthy, learners_in};

/// How the agent reaches etcd: the client TLS of `--etcd-cacert`, `--etcd-cert` and
/// `--etcd-key` (read once at start; only `https://` endpoints use it). A value the engine
/// is given, never a process-wide setting.
#[derive(Clone, Default)]
pub struct Etcd {
    tls: Option<TlsOptions>,
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Etcd").field("tls", &self.tls.is_some()).finish()
    }
}

impl Etcd {
    /// Reads the etcd client TLS files once at start (a missing file is an error then, not at the
    /// first remediation). Only `https://` endpoints use them.
    pub fn with_tls(ca: Option<&Path>, cert: Option<&Path>, key: Option<&Path>) -> Result<Self> {
        if ca.is_none() && cert.is_none() && key.is_none() {
            return Ok(Etcd::default());
        }
        let read = |p: &Path| std::fs::read(p).map_err(|e| Error::invalid(format!("etcd TLS: {}: {e}", p.display())));
        let mut tls = TlsOptions::new();
        if let Some(ca) = ca {
            tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
        }
        match (cert, key) {
            (Some(c), Some(k)) => tls = tls.identity(Identity::from_pem(read(c)?, read(k)?)),
            (None, None) => {}
            _ => return Err(Error::invalid("--etcd-cert and --etcd-key go together")),
        }
        Ok(Etcd { tls: Some(tls) })
    }

    async fn connect(&self, endpoint: &str) -> Result<Client> {
        self.connect_with(endpoint, Duration::from_secs(5)).await
    }

    async fn connect_with(&self, endpoint: &str, timeout: Duration) -> Result<Client> {
        let mut opts = ConnectOptions::new().with_connect_timeout(Duration::from_secs(2)).with_timeout(timeout);
        if endpoint.starts_with("https://")
            && let Some(tls) = self.tls.as_ref()
        {
            opts = opts.with_tls(tls.clone());
        }
        Client::connect([endpoint], Some(opts)).await.map_err(|e| unavailable(&format!("connect to {endpoint}"), e))
    }

    /// The cluster id and member list from the first endpoint that answers a linearizable read,
    /// and each member's health: it answered a status request within 2 s, without alarms, naming
    /// the leader that the answering members agree on (see [`agreed_healthy`]). A member cut off
    /// from the leader, or one that answers but follows no leader, is not healthy.
    pub async fn members(&self, endpoints: &[String]) -> Result<(u64, Vec<Member>)> {
        let mut last_err = None;
        for e in endpoints {
            let list = async {
                let mut c = self.connect(e).await?;
                // A linearizable read completes only through a leader with a quorum and leaves
                // this member applied at least that far: the list that follows is current.
                c.get("etcd-medic/linearizable-probe", Some(etcd_client::GetOptions::new().with_count_only()))
                    .await
                    .map_err(|err| unavailable(&format!("a linearizable read through {e}"), err))?;
                c.member_list().await.map_err(|err| unavailable(&format!("member list from {e}"), err))
            };
            match tokio::time::timeout(Duration::from_secs(5), list).await {
                Ok(Ok(resp)) => {
                    let mut seen = Vec::new();
                    for m in resp.members() {
                        seen.push((m.id(), m.is_learner(), self.status_of(m.client_urls()).await));
                    }
                    let healthy = agreed_healthy(&seen);
                    let out = resp
                        .members()
                        .iter()
                        .map(|m| Member {
                            id: m.id(),
                            name: m.name().to_string(),
                            peer_urls: m.peer_urls().to_vec(),
                            client_urls: m.client_urls().to_vec(),
                            is_learner: m.is_learner(),
                            healthy: healthy.contains(&m.id()),
                        })
                        .collect();
                    return Ok((resp.header().map(|h| h.cluster_id()).unwrap_or_default(), out));
                }
                Ok(Err(err)) => last_err = Some(err.to_string()),
                Err(_) => last_err = Some(format!("{e} did not answer in 5 s")),
            }
        }
        Err(Error::new(
            Code::QuorumAtRisk,
            format!("no etcd endpoint answered ({endpoints:?}): {}", last_err.unwrap_or_else(|| "no endpoints".into())),
        ))
    }

    async fn status_of(&self, urls: &[String]) -> Option<Seen> {
        for u in urls {
            let check = async { self.connect(u).await.ok()?.status().await.ok() };
            if let Ok(Some(s)) = tokio::time::timeout(Duration::from_secs(2), check).await {
                return Some(Seen { leader: s.leader(), clean: s.errors().is_empty() });
            }
        }
        None
    }

    /// Removes member `id` through the first healthy endpoint.
    /// A remove that was applied but whose answer was lost is retried and then answers `member
    /// not found`: that is success.
    pub async fn remove_member(&self, endpoints: &[String], id: u64) -> Result<()> {
        let c = self.first_client(endpoints).await?;
        let r = retry_unhealthy(&format!("member remove {id:x}"), Duration::from_secs(30), || {
            let mut c = c.clone();
            async move { c.member_remove(id).await }
        })
        .await;
        match r {
            Ok(_) => Ok(()),
            Err(e) if e.message.contains("member not found") => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Adds a member with `peer_url` (a learner when `learner`) and returns its id. An add whose
    /// answer was lost (a timeout on a busy cluster) may still have been applied: the member
    /// list decides, so the member is never added twice.
    pub async fn add_member(&self, endpoints: &[String], peer_url: &str, learner: bool) -> Result<u64> {
        let mut last = None;
        for _ in 0..3 {
            let c = self.first_client(endpoints).await?;
            let added = retry_unhealthy(&format!("member add {peer_url}"), Duration::from_secs(30), || {
                let mut c = c.clone();
                let url = peer_url.to_string();
                let opts = learner.then(|| etcd_client::MemberAddOptions::new().with_is_learner());
                async move { c.member_add([url], opts).await }
            })
            .await;
            match added {
                Ok(resp) => return Ok(resp.member().map(|m| m.id()).unwrap_or_default()),
                Err(e) => {
                    let (_, list) = self.members(endpoints).await?;
                    if let Some(m) = list.iter().find(|m| m.peer_urls.iter().any(|u| u == peer_url) && m.name.is_empty()) {
                        return Ok(m.id);
                    }
                    last = Some(e);
                }
            }
        }
        Err(last.expect("three attempts"))
    }

    /// Promotes learner `id` to a voting member: `Ok(false)` while it has not caught up with
    /// the leader yet (etcd refuses until then), `Ok(true)` once it votes.
    pub async fn promote_member(&self, endpoints: &[String], id: u64) -> Result<bool> {
        let mut c = self.first_client(endpoints).await?;
        match c.member_promote(id).await {
            Ok(_) => Ok(true),
            Err(e) if e.to_string().contains("not in sync") || e.to_string().contains("unhealthy cluster") => Ok(false),
            // A promotion applied whose answer was lost.
            Err(e) if e.to_string().contains("not a learner") => Ok(true),
            Err(e) => Err(unavailable(&format!("member promote {id:x}"), e)),
        }
    }

    /// Whether the cluster's version has learners (etcd 3.4 and later), from the first member
    /// that answers a status request.
    pub async fn supports_learners(&self, endpoints: &[String]) -> Result<bool> {
        let mut c = self.first_client(endpoints).await?;
        let status = c.status().await.map_err(|e| unavailable("status", e))?;
        Ok(learners_in(status.version()))
    }

    async fn first_client(&self, endpoints: &[String]) -> Result<Client> {
        for e in endpoints {
            if let Ok(Ok(c)) = tokio::time::timeout(Duration::from_secs(3), async {
                // Membership changes wait for the change to apply: a busy cluster needs more than 5 s.
                let mut c = self.connect_with(e, Duration::from_secs(15)).await?;
                c.status().await.map_err(|err| unavailable(e, err))?;
                Ok::<_, Error>(c)
            })
            .await
            {
                return Ok(c);
            }
        }
        Err(Error::new(Code::QuorumAtRisk, format!("no etcd endpoint answered among {endpoints:?}")))
    }
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> Error {
    Error::new(Code::QuorumAtRisk, format!("{what}: {e}"))
}

/// The scheme the pod's etcd serves clients with: that of the first URL it advertises
/// (`--advertise-client-urls` or `ETCD_ADVERTISE_CLIENT_URLS`), else `http`.
fn client_scheme(pod: &Pod, container: &str) -> &'static str {
    let Some(c) = pod.spec.as_ref().and_then(|s| s.containers.iter().find(|c| c.name == container)) else { return "http" };
    let from_env = c.env.iter().flatten().find(|e| e.name == "ETCD_ADVERTISE_CLIENT_URLS").and_then(|e| e.value.clone());
    let from_args =
        c.command.iter().chain(c.args.iter()).flatten().find_map(|w| w.strip_prefix("--advertise-client-urls=").map(String::from));
    match from_args.or(from_env) {
        Some(u) if u.trim_start().starts_with("https://") => "https",
        _ => "http",
    }
}

/// Client URLs of the other pods of the same StatefulSet: `status.podIP` and the container
/// port named `client`, with the scheme the pod advertises.
pub fn sibling_endpoints(pod: &Pod, siblings: &[Pod], container: &str) -> Vec<String> {
    let scheme = client_scheme(pod, container);
    siblings
        .iter()
        .filter(|p| p.metadata.name != pod.metadata.name && crate::identity::same_set(pod, p))
        .filter_map(|p| {
            let ip = p.status.as_ref()?.pod_ip.clone()?;
            let c = p.spec.as_ref()?.containers.iter().find(|c| c.name == container)?;
            let port = c.ports.as_ref()?.iter().find(|p| p.name.as_deref() == Some("client"))?.container_port;
            Some(format!("{scheme}://{ip}:{port}"))
        })
        .collect()
}

async fn retry_unhealthy<T, F, Fut>(what: &str, deadline: Duration, mut op: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = std::result::Result<T, etcd_client::Error>>,
{
    let until = Instant::now() + deadline;
    let mut delay = Duration::from_millis(250);
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if e.to_string().contains("unhealthy cluster") && Instant::now() < until => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(e) => return Err(unavailable(what, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use serde_json::json;

    fn pod(name: &str, owner: &str, ip: &str, port: i32) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": owner, "uid": "u", "controller": true}]},
            "spec": {"containers": [{"name": "etcd", "ports": [{"name": "client", "containerPort": port}, {"name": "peer", "containerPort": 2380}]}]},
            "status": {"podIP": ip},
        }))
        .unwrap()
    }

    #[test]
    fn siblings_give_their_client_endpoints() {
        let me = pod("apisix-etcd-1", "apisix-etcd", "10.0.0.2", 2379);
        let all = vec![
            pod("apisix-etcd-0", "apisix-etcd", "10.0.0.1", 2379),
            me.clone(),
            pod("apisix-etcd-2", "apisix-etcd", "10.0.0.3", 2379),
            pod("other-0", "other", "10.0.0.9", 2379),
        ];
        assert_eq!(sibling_endpoints(&me, &all, "etcd"), ["http://10.0.0.1:2379", "http://10.0.0.3:2379"]);
        // A member that advertises https is reached over https.
        let mut tls = me.clone();
        tls.spec.as_mut().unwrap().containers[0].env = Some(vec![k8s_openapi::api::core::v1::EnvVar {
            name: "ETCD_ADVERTISE_CLIENT_URLS".into(),
            value: Some("https://$(MY_POD_NAME):2379".into()),
            ..Default::default()
        }]);
        assert_eq!(sibling_endpoints(&tls, &all, "etcd"), ["https://10.0.0.1:2379", "https://10.0.0.3:2379"]);
    }
}
