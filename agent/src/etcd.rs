//! The etcd cluster as the agent sees it: endpoints from the sibling pods, the member list,
//! each member's health, and the membership changes a remediation makes (retrying
//! `etcdserver: unhealthy cluster`, which etcd answers for seconds after any change).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use k8s_openapi::api::core::v1::Pod;

use crate::error::{Code, Error, Result};
use crate::scope::SetScope;
pub use etcd_medic_core::member::{Member, Seen, agreed_healthy, learners_in};

/// How the agent reaches etcd: per StatefulSet, the client TLS files an operator mounted at
/// `<--etcd-tls-dir>/<namespace>/<statefulset>/` (`ca.crt`, `tls.crt`, `tls.key`: a
/// `kubernetes.io/tls` Secret with its CA), read when a remediation targets that set; only
/// `https://` endpoints use them. One cluster's certificate is never presented to another's
/// endpoints, and a set without its own files gets none. A value the engine is given, never
/// a process-wide setting.
#[derive(Clone, Debug, Default)]
pub struct Etcd {
    tls_dir: Option<PathBuf>,
}

impl Etcd {
    pub fn with_tls_dir(dir: Option<PathBuf>) -> Self {
        Etcd { tls_dir: dir }
    }

    /// The target of `scope` at `endpoints`, with the set's own client TLS if it has some.
    pub fn target(&self, scope: SetScope, endpoints: Vec<String>, cluster_id: Option<u64>) -> Result<Target> {
        let tls = match &self.tls_dir {
            Some(dir) => tls_of(&dir.join(&scope.namespace).join(&scope.name), &scope)?,
            None => None,
        };
        Ok(Target { scope, endpoints, cluster_id, tls })
    }

    async fn connect(&self, t: &Target, endpoint: &str) -> Result<Client> {
        self.connect_with(t, endpoint, Duration::from_secs(5)).await
    }

    async fn connect_with(&self, t: &Target, endpoint: &str, timeout: Duration) -> Result<Client> {
        let mut opts = ConnectOptions::new().with_connect_timeout(Duration::from_secs(2)).with_timeout(timeout);
        if endpoint.starts_with("https://")
            && let Some(tls) = t.tls.as_ref()
        {
            opts = opts.with_tls(tls.clone());
        }
        Client::connect([endpoint], Some(opts)).await.map_err(|e| unavailable(&format!("connect to {endpoint}"), e))
    }

    /// The cluster id and member list from the first endpoint of `t` that answers a
    /// linearizable read, proven to be the set's (see [`SetScope::prove`]) and, once the
    /// remediation knows its cluster, the same cluster as at the check; then each member's
    /// health: it answered a status request at its pod within 2 s, without alarms, naming the
    /// leader that the answering members agree on (see [`agreed_healthy`]). A member cut off
    /// from the leader, or one that answers but follows no leader, is not healthy. The whole
    /// takes at most [`MEMBERS_DEADLINE`], whatever the endpoints do.
    pub async fn members(&self, t: &Target) -> Result<(u64, Vec<Member>)> {
        let listed = tokio::time::timeout(MEMBERS_DEADLINE, async {
            let mut last_err = None;
            for e in &t.endpoints {
                let list = async {
                    let mut c = self.connect(t, e).await?;
                    // A linearizable read completes only through a leader with a quorum and leaves
                    // this member applied at least that far: the list that follows is current.
                    c.get("etcd-medic/linearizable-probe", Some(etcd_client::GetOptions::new().with_count_only()))
                        .await
                        .map_err(|err| unavailable(&format!("a linearizable read through {e}"), err))?;
                    c.member_list().await.map_err(|err| unavailable(&format!("member list from {e}"), err))
                };
                match tokio::time::timeout(Duration::from_secs(5), list).await {
                    Ok(Ok(resp)) => return Ok(resp),
                    Ok(Err(err)) => last_err = Some(err.to_string()),
                    Err(_) => last_err = Some(format!("{e} did not answer in 5 s")),
                }
            }
            Err(last_err)
        })
        .await;
        let resp = match listed {
            Ok(Ok(resp)) => resp,
            Ok(Err(last_err)) => {
                return Err(Error::new(
                    Code::QuorumAtRisk,
                    format!("no etcd endpoint answered ({:?}): {}", t.endpoints, last_err.unwrap_or_else(|| "no endpoints".into())),
                ));
            }
            Err(_) => {
                return Err(Error::new(
                    Code::QuorumAtRisk,
                    format!("the etcd endpoints ({:?}) gave no member list within {MEMBERS_DEADLINE:?}", t.endpoints),
                ));
            }
        };
        let (cluster_id, mut out) = t.accept(&resp)?;
        let seen = futures::future::join_all(out.iter().map(|m| self.status_of(t, t.scope.status_endpoint(m)))).await;
        let seen: Vec<_> = out.iter().zip(seen).map(|(m, s)| (m.id, m.is_learner, s)).collect();
        let healthy = agreed_healthy(&seen);
        for m in &mut out {
            m.healthy = healthy.contains(&m.id);
        }
        Ok((cluster_id, out))
    }

    /// What a member's pod answers to a status request within 2 s.
    async fn status_of(&self, t: &Target, endpoint: Option<String>) -> Option<Seen> {
        let u = endpoint?;
        let check = async { self.connect(t, &u).await.ok()?.status().await.ok() };
        let s = tokio::time::timeout(Duration::from_secs(2), check).await.ok()??;
        Some(Seen { leader: s.leader(), clean: s.errors().is_empty() })
    }

    /// Removes member `id` through the first endpoint that answers as the target cluster.
    /// A remove that was applied but whose answer was lost is retried and then answers `member
    /// not found`: that is success.
    pub async fn remove_member(&self, t: &Target, id: u64) -> Result<()> {
        let c = self.proven_client(t).await?;
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
    pub async fn add_member(&self, t: &Target, peer_url: &str, learner: bool) -> Result<u64> {
        let mut last = None;
        for _ in 0..3 {
            let c = self.proven_client(t).await?;
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
                    let (_, list) = self.members(t).await?;
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
    pub async fn promote_member(&self, t: &Target, id: u64) -> Result<bool> {
        let mut c = self.proven_client(t).await?;
        match c.member_promote(id).await {
            Ok(_) => Ok(true),
            Err(e) if e.to_string().contains("not in sync") || e.to_string().contains("unhealthy cluster") => Ok(false),
            // A promotion applied whose answer was lost.
            Err(e) if e.to_string().contains("not a learner") => Ok(true),
            Err(e) => Err(unavailable(&format!("member promote {id:x}"), e)),
        }
    }

    /// Whether the cluster's version has learners (etcd 3.4 and later), from the first member
    /// that answers a status request as the target cluster.
    pub async fn supports_learners(&self, t: &Target) -> Result<bool> {
        let mut c = self.proven_client(t).await?;
        let status = c.status().await.map_err(|e| unavailable("status", e))?;
        Ok(learners_in(status.version()))
    }

    /// A client of the first endpoint whose member list, read on that very connection, is
    /// the target's (proven the set's, the cluster of the check): the change that follows goes
    /// over the same connection, so a relay cannot swap clusters between the proof and it.
    async fn proven_client(&self, t: &Target) -> Result<Client> {
        let mut refused = None;
        for e in &t.endpoints {
            let attempt = tokio::time::timeout(Duration::from_secs(5), async {
                // Membership changes wait for the change to apply: a busy cluster needs more than 5 s.
                let mut c = self.connect_with(t, e, Duration::from_secs(15)).await?;
                let resp = c.member_list().await.map_err(|err| unavailable(e, err))?;
                t.accept(&resp)?;
                Ok::<_, Error>(c)
            })
            .await;
            match attempt {
                Ok(Ok(c)) => return Ok(c),
                Ok(Err(err)) if err.code == Code::ForeignMember => refused = Some(err),
                _ => {}
            }
        }
        Err(refused.unwrap_or_else(|| Error::new(Code::QuorumAtRisk, format!("no etcd endpoint answered among {:?}", t.endpoints))))
    }
}

/// The most members taken from an answer: etcd advises 3 to 7; a longer list is no set's.
pub const MAX_MEMBERS: usize = 64;
/// The most bytes of a member's name, and of each of its URLs (at most 4 of each), kept for
/// the record (the proof reads every URL): a journal stays small whatever etcd answers.
const MAX_FIELD: usize = 256;
/// The whole member list with every member's health, whatever the endpoints do.
pub const MEMBERS_DEADLINE: Duration = Duration::from_secs(15);

/// An etcd cluster as a remediation may act on it: the StatefulSet that proves it, the
/// endpoints asked (its pods), and the cluster id it answered with at the check.
#[derive(Clone)]
pub struct Target {
    pub scope: SetScope,
    pub endpoints: Vec<String>,
    pub cluster_id: Option<u64>,
    /// The set's own client TLS (see [`Etcd::target`]).
    tls: Option<TlsOptions>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("scope", &self.scope)
            .field("endpoints", &self.endpoints)
            .field("cluster_id", &self.cluster_id)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// The client TLS in `dir`, if it exists: `ca.crt` (optional), `tls.crt` and `tls.key`
/// (together). Files of another shape are an error naming the set, not a silent plain
/// connection.
fn tls_of(dir: &Path, scope: &SetScope) -> Result<Option<TlsOptions>> {
    if !dir.is_dir() {
        return Ok(None);
    }
    let bad = |why: String| Error::invalid(format!("etcd client TLS of {} in {}: {why}", scope.describe(), dir.display()));
    let read = |name: &str| -> Result<Option<Vec<u8>>> {
        match std::fs::read(dir.join(name)) {
            Ok(b) if b.len() <= 1 << 20 => Ok(Some(b)),
            Ok(_) => Err(bad(format!("{name} is over 1 MiB"))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(bad(format!("{name}: {e}"))),
        }
    };
    let mut tls = TlsOptions::new();
    if let Some(ca) = read("ca.crt")? {
        tls = tls.ca_certificate(Certificate::from_pem(ca));
    }
    match (read("tls.crt")?, read("tls.key")?) {
        (Some(c), Some(k)) => tls = tls.identity(Identity::from_pem(c, k)),
        (None, None) => {}
        _ => return Err(bad("tls.crt and tls.key go together".into())),
    }
    Ok(Some(tls))
}

impl Target {
    /// The id and members of a member list answer, if it is the target's: bounded in size,
    /// every member a pod of the set, and the cluster of the check once there was one.
    fn accept(&self, resp: &etcd_client::MemberListResponse) -> Result<(u64, Vec<Member>)> {
        let listed = resp.members();
        if listed.len() > MAX_MEMBERS {
            return Err(Error::new(
                Code::ForeignMember,
                format!("the etcd cluster that answered at the pods of {} lists more than {MAX_MEMBERS} members", self.scope.describe()),
            ));
        }
        let field = |s: &str| -> String { s.chars().take(MAX_FIELD).collect() };
        let urls = |u: &[String]| -> Vec<String> { u.iter().take(4).map(|u| field(u)).collect() };
        let members: Vec<Member> = listed
            .iter()
            .map(|m| Member {
                id: m.id(),
                name: field(m.name()),
                peer_urls: urls(m.peer_urls()),
                client_urls: urls(m.client_urls()),
                is_learner: m.is_learner(),
                healthy: false,
            })
            .collect();
        self.scope.prove(&members)?;
        let id = resp.header().map(|h| h.cluster_id()).unwrap_or_default();
        if let Some(expected) = self.cluster_id.filter(|e| *e != id) {
            return Err(Error::new(
                Code::ForeignMember,
                format!(
                    "the pods of {} answered for cluster {id:016x}, not {expected:016x} as when the remediation began: nothing more is done",
                    self.scope.describe()
                ),
            ));
        }
        Ok((id, members))
    }
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> Error {
    Error::new(Code::QuorumAtRisk, format!("{what}: {e}"))
}

/// The scheme the pod's etcd serves clients with: that of the first URL it advertises
/// (`--advertise-client-urls` or `ETCD_ADVERTISE_CLIENT_URLS`), else `http`.
pub(crate) fn client_scheme(pod: &Pod, container: &str) -> &'static str {
    let Some(c) = pod.spec.as_ref().and_then(|s| s.containers.iter().find(|c| c.name == container)) else { return "http" };
    let from_env = c.env.iter().flatten().find(|e| e.name == "ETCD_ADVERTISE_CLIENT_URLS").and_then(|e| e.value.clone());
    let from_args =
        c.command.iter().chain(c.args.iter()).flatten().find_map(|w| w.strip_prefix("--advertise-client-urls=").map(String::from));
    match from_args.or(from_env) {
        Some(u) if u.trim_start().starts_with("https://") => "https",
        _ => "http",
    }
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
        let siblings = |p: &Pod| SetScope::of(p, &all, "etcd").unwrap().sibling_endpoints();
        assert_eq!(siblings(&me), ["http://10.0.0.1:2379", "http://10.0.0.3:2379"]);
        // A member that advertises https is reached over https.
        let mut tls = me.clone();
        tls.spec.as_mut().unwrap().containers[0].env = Some(vec![k8s_openapi::api::core::v1::EnvVar {
            name: "ETCD_ADVERTISE_CLIENT_URLS".into(),
            value: Some("https://$(MY_POD_NAME):2379".into()),
            ..Default::default()
        }]);
        assert_eq!(siblings(&tls), ["https://10.0.0.1:2379", "https://10.0.0.3:2379"]);
    }
}
