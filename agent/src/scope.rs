//! Which etcd cluster is whose, proven from Kubernetes alone. A tenant controls its pods and
//! what its etcd answers: a pod of its set can be a relay to another tenant's client port,
//! and the member list, the cluster id and the client URLs that come back are then the
//! victim's. So the cluster is the StatefulSet (namespace + UID), and what etcd answers is
//! accepted as that cluster only when every member's peer URL names a pod of the set; the
//! set's own pods are the only places the agent connects to. Pure.

use k8s_openapi::api::core::v1::Pod;

use crate::error::{Code, Error, Result};
use crate::identity::{host_port, same_set, stateful_set};
use etcd_medic_core::member::Member;

/// A pod of the set as the agent may reach and recognise it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Owned {
    ips: Vec<String>,
    /// `<hostname>.<subdomain>.<namespace>.svc`, when the pod has a subdomain.
    dns: Option<String>,
    peer_port: Option<u16>,
    /// Its client endpoint (`status.podIP` and the `client` port), the only one the agent uses.
    client: Option<String>,
}

/// An etcd StatefulSet and its pods as the API server shows them now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetScope {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// The pod the remediation is for (excluded from the endpoints asked).
    pub pod: String,
    /// The subdomain (the headless service) and peer port every pod of the set shares: a
    /// member whose pod does not exist right now is still recognised by its stable name.
    subdomain: Option<String>,
    peer_port: Option<u16>,
    pods: Vec<(String, Owned)>,
}

impl SetScope {
    /// The scope of `pod` among `all` pods of its namespace; `UnsupportedProfile` for a pod
    /// no StatefulSet controls (with a UID, as the API server always sets it).
    pub fn of(pod: &Pod, all: &[Pod], container: &str) -> Result<SetScope> {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let (set, uid) = stateful_set(pod).filter(|(_, uid)| !uid.is_empty()).ok_or_else(|| {
            Error::new(
                Code::UnsupportedProfile,
                format!(
                    "pod {namespace}/{name} is not controlled by a StatefulSet: the agent acts only for the members of an etcd StatefulSet"
                ),
            )
        })?;
        let scheme = crate::etcd::client_scheme(pod, container);
        let mut pods: Vec<(String, Owned)> = all
            .iter()
            .filter(|p| {
                p.metadata.name.as_deref() != Some(name.as_str()) && same_set(pod, p) && stateful_set(p).is_some_and(|(_, u)| u == uid)
            })
            .chain(std::iter::once(pod))
            .map(|p| (p.metadata.name.clone().unwrap_or_default(), owned(p, container, &namespace, scheme)))
            .collect();
        pods.sort_by(|a, b| a.0.cmp(&b.0));
        let subdomain = pod.spec.as_ref().and_then(|s| s.subdomain.clone()).filter(|s| !s.is_empty()).map(|s| s.to_ascii_lowercase());
        let peer_port = pods.iter().find(|(n, _)| *n == name).and_then(|(_, o)| o.peer_port);
        Ok(SetScope { namespace, name: set, uid, pod: name, subdomain, peer_port, pods })
    }

    /// Who the set is, for messages: never anything an endpoint answered.
    pub fn describe(&self) -> String {
        format!("StatefulSet {}/{}", self.namespace, self.name)
    }

    /// The name of the set's lock: its namespace and UID, which no endpoint's answer can name.
    pub fn lease_name(&self) -> String {
        etcd_medic_core::lease::lease_name(&self.namespace, &self.uid)
    }

    /// The client endpoints of the set's other pods: the only endpoints the agent asks.
    pub fn sibling_endpoints(&self) -> Vec<String> {
        self.pods.iter().filter(|(n, _)| *n != self.pod).filter_map(|(_, o)| o.client.clone()).collect()
    }

    /// Endpoints a caller gave, each of which must name a pod of the set on its client port
    /// (by IP or by its own DNS name); `InvalidRequest` otherwise, naming nothing beyond the set.
    pub fn check_given(&self, given: &[String]) -> Result<()> {
        for url in given {
            let ok = host_port(url).is_some_and(|(host, port)| {
                self.pods.iter().any(|(_, o)| {
                    let client_port = o.client.as_deref().and_then(host_port).and_then(|(_, p)| p);
                    names(o, &host) && (port.is_none() || port == client_port)
                })
            });
            if !ok {
                return Err(Error::invalid(format!(
                    "etcdEndpoints must each name a pod of {} on its client port; one does not",
                    self.describe()
                )));
            }
        }
        Ok(())
    }

    /// The pod of the set a peer URL names: `Some(Some(pod))` for a pod that exists,
    /// `Some(None)` for the stable name of one that does not right now
    /// (`<set>-<ordinal>.<subdomain>.<namespace>.svc`), `None` for anything else.
    fn owner_of(&self, url: &str) -> Option<Option<&str>> {
        let (host, port) = host_port(url)?;
        if let Some((n, _)) = self.pods.iter().find(|(_, o)| names(o, &host) && port_ok(port, o.peer_port)) {
            return Some(Some(n.as_str()));
        }
        let sub = self.subdomain.as_ref()?;
        let suffix = format!(".{sub}.{}.svc", self.namespace);
        let first = host.split_once('.').map(|(f, _)| f)?;
        let ordinal = first.strip_prefix(&format!("{}-", self.name))?;
        let stable = !ordinal.is_empty() && ordinal.bytes().all(|b| b.is_ascii_digit());
        let rest = &host[first.len()..];
        let in_domain = rest == suffix || rest.starts_with(&format!("{suffix}."));
        (stable && in_domain && port_ok(port, self.peer_port)).then_some(None)
    }

    /// Every member of `members` is a pod of the set (each of its peer URLs names one), else
    /// `ForeignMember`. The message names no member, URL or cluster id: they may be another
    /// tenant's.
    pub fn prove(&self, members: &[Member]) -> Result<()> {
        let foreign = members.iter().filter(|m| m.peer_urls.is_empty() || m.peer_urls.iter().any(|u| self.owner_of(u).is_none())).count();
        if foreign == 0 {
            return Ok(());
        }
        Err(Error::new(
            Code::ForeignMember,
            format!(
                "the etcd cluster that answered at the pods of {} lists {foreign} of {} members whose peer URLs name no pod of that StatefulSet: it is not provably this set's cluster, so nothing is done and nothing it answered is shown. If the set's peer URLs are not its pods' IPs or <pod>.<service>.<namespace>.svc names, it cannot be healed by the agent",
                self.describe(),
                members.len()
            ),
        ))
    }

    /// Where to ask a proven member for its status: the client endpoint of the pod its peer
    /// URL names, never a client URL etcd advertised.
    pub fn status_endpoint(&self, member: &Member) -> Option<String> {
        let pod = member.peer_urls.iter().find_map(|u| self.owner_of(u).flatten())?;
        self.pods.iter().find(|(n, _)| n == pod)?.1.client.clone()
    }
}

fn port_ok(port: Option<u16>, expected: Option<u16>) -> bool {
    match (port, expected) {
        (Some(u), Some(p)) => u == p,
        _ => true,
    }
}

fn names(o: &Owned, host: &str) -> bool {
    o.ips.iter().any(|ip| ip.eq_ignore_ascii_case(host)) || o.dns.as_ref().is_some_and(|d| host == d || host.starts_with(&format!("{d}.")))
}

fn owned(p: &Pod, container: &str, namespace: &str, scheme: &str) -> Owned {
    let (spec, status) = (p.spec.as_ref(), p.status.as_ref());
    let mut ips: Vec<String> = status.and_then(|s| s.pod_ip.clone()).into_iter().collect();
    ips.extend(status.and_then(|s| s.pod_ips.as_ref()).into_iter().flatten().map(|i| i.ip.clone()));
    ips.dedup();
    let hostname = spec.and_then(|s| s.hostname.clone()).or_else(|| p.metadata.name.clone()).unwrap_or_default().to_ascii_lowercase();
    let dns = spec
        .and_then(|s| s.subdomain.as_deref())
        .filter(|d| !d.is_empty())
        .map(|sub| format!("{hostname}.{}.{}.svc", sub.to_ascii_lowercase(), namespace.to_ascii_lowercase()));
    let c = spec.and_then(|s| s.containers.iter().find(|c| c.name == container));
    let port = |name: &str| c?.ports.as_ref()?.iter().find(|p| p.name.as_deref() == Some(name)).map(|p| p.container_port);
    let peer_port = port("peer").and_then(|p| u16::try_from(p).ok());
    let client = status.and_then(|s| s.pod_ip.clone()).zip(port("client")).map(|(ip, port)| {
        let host = if ip.contains(':') { format!("[{ip}]") } else { ip };
        format!("{scheme}://{host}:{port}")
    });
    Owned { ips, dns, peer_port, client }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(ns: &str, name: &str, set: &str, uid: &str, ip: &str, peer: i32) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": ns, "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": set, "uid": uid, "controller": true}]},
            "spec": {"hostname": name, "subdomain": "etcd-headless", "containers": [{"name": "etcd",
                "ports": [{"name": "client", "containerPort": 2379}, {"name": "peer", "containerPort": peer}]}]},
            "status": {"podIP": ip, "podIPs": [{"ip": ip}]}
        }))
        .unwrap()
    }

    fn member(id: u64, peer: &str) -> Member {
        Member { id, name: String::new(), peer_urls: vec![peer.into()], client_urls: vec![], is_learner: false, healthy: false }
    }

    fn tenant() -> (Pod, Vec<Pod>) {
        let all = vec![
            pod("tenant", "etcd-0", "etcd", "uid-t", "10.1.0.10", 2380),
            pod("tenant", "etcd-1", "etcd", "uid-t", "10.1.0.11", 2380),
            // Another set of the same namespace, and a pod claiming the set's name with another UID.
            pod("tenant", "other-0", "other", "uid-o", "10.1.0.20", 2380),
            pod("tenant", "etcd-9", "etcd", "uid-forged", "10.2.0.9", 2380),
        ];
        (all[0].clone(), all)
    }

    #[test]
    fn a_member_list_is_the_sets_only_when_every_peer_url_names_one_of_its_pods() {
        let (me, all) = tenant();
        let s = SetScope::of(&me, &all, "etcd").unwrap();
        assert_eq!((s.name.as_str(), s.uid.as_str()), ("etcd", "uid-t"));
        assert_eq!(s.sibling_endpoints(), ["http://10.1.0.11:2379"]);
        let own = [
            member(1, "http://10.1.0.10:2380"),
            member(2, "http://etcd-1.etcd-headless.tenant.svc.cluster.local:2380"),
            // The stable name of a pod that does not exist right now.
            member(3, "http://etcd-2.etcd-headless.tenant.svc:2380"),
        ];
        s.prove(&own).unwrap();
        for foreign in [
            "http://apisix-etcd-0.apisix-etcd-headless.apisix.svc.cluster.local:2380",
            "http://10.0.0.10:2380",
            "http://10.1.0.20:2380",
            "http://10.2.0.9:2380",
            "http://10.1.0.11:2381",
            "http://etcd-x.etcd-headless.tenant.svc:2380",
            "http://etcd-2.etcd-headless.tenant.svc.evil:2380.example",
            "http://etcd-2.other-headless.tenant.svc:2380",
        ] {
            let mut list = own.to_vec();
            list.push(member(9, foreign));
            let e = s.prove(&list).unwrap_err();
            assert_eq!(e.code, Code::ForeignMember, "{foreign}");
            assert!(!e.message.contains(foreign) && !e.message.contains("apisix"), "nothing foreign is told: {}", e.message);
        }
        let mut no_urls = member(4, "");
        no_urls.peer_urls.clear();
        assert_eq!(s.prove(&[no_urls]).unwrap_err().code, Code::ForeignMember);
    }

    #[test]
    fn status_is_asked_at_the_pods_never_at_advertised_urls() {
        let (me, all) = tenant();
        let s = SetScope::of(&me, &all, "etcd").unwrap();
        let mut m = member(2, "http://etcd-1.etcd-headless.tenant.svc.cluster.local:2380");
        m.client_urls = vec!["http://10.0.0.10:2379".into()];
        assert_eq!(s.status_endpoint(&m).as_deref(), Some("http://10.1.0.11:2379"));
        assert_eq!(s.status_endpoint(&member(3, "http://etcd-2.etcd-headless.tenant.svc:2380")), None);
    }

    #[test]
    fn given_endpoints_must_be_the_sets_pods_and_the_lock_is_named_by_namespace_and_uid() {
        let (me, all) = tenant();
        let s = SetScope::of(&me, &all, "etcd").unwrap();
        s.check_given(&["http://10.1.0.11:2379".into(), "http://etcd-1.etcd-headless.tenant.svc.cluster.local:2379".into()]).unwrap();
        for bad in ["http://10.0.0.10:2379", "http://10.1.0.11:2380", "http://10.1.0.20:2379", "file:///etc/passwd"] {
            let e = s.check_given(&[bad.into()]).unwrap_err();
            assert_eq!(e.code, Code::InvalidRequest, "{bad}");
            assert!(!e.message.contains(bad), "{}", e.message);
        }
        assert_eq!(s.lease_name(), "etcd-medic-tenant-uid-t");
        // A pod whose controller reference has no UID is no set's (the API server always sets one).
        let bare = pod("tenant", "etcd-0", "etcd", "", "10.1.0.10", 2380);
        assert_eq!(SetScope::of(&bare, &[], "etcd").unwrap_err().code, Code::UnsupportedProfile);
    }
}
