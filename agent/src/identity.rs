//! Which etcd member a pod may stand for. The agent removes the member listed with the
//! pod's peer URL, so a pod that could name any peer URL could get any member removed: a
//! tenant's bare pod advertising a victim's URL, with `etcdEndpoints` pointing at the
//! victim's cluster, would make the agent a confused deputy. So, before any etcd call:
//! the pod is a StatefulSet's, its peer URL names the pod itself (its IP, or its own
//! `<hostname>.<subdomain>.<namespace>.svc` name, on its own `peer` port). Which cluster is
//! the set's is `crate::scope`'s to prove. Pure.

use k8s_openapi::api::core::v1::{Container, Pod};

use crate::error::{Code, Error, Result};

/// The StatefulSet that controls `pod`: (name, uid).
pub fn stateful_set(pod: &Pod) -> Option<(String, String)> {
    pod.metadata
        .owner_references
        .as_ref()?
        .iter()
        .find(|r| r.controller == Some(true) && r.kind == "StatefulSet" && r.api_version.starts_with("apps/"))
        .map(|r| (r.name.clone(), r.uid.clone()))
}

/// Two pods belong to the same StatefulSet (by uid where both carry one, else by name).
pub fn same_set(a: &Pod, b: &Pod) -> bool {
    match (stateful_set(a), stateful_set(b)) {
        (Some((an, au)), Some((bn, bu))) => {
            a.metadata.namespace == b.metadata.namespace && an == bn && (au.is_empty() || bu.is_empty() || au == bu)
        }
        _ => false,
    }
}

/// The host and port of a URL (`scheme://[userinfo@]host[:port][/…]`), IPv6 brackets removed.
pub(crate) fn host_port(url: &str) -> Option<(String, Option<u16>)> {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let authority = rest.split(['/', '?', '#']).next()?;
    let authority = authority.rsplit_once('@').map(|(_, a)| a).unwrap_or(authority);
    if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']')?;
        let port = after.strip_prefix(':').and_then(|p| p.parse().ok());
        return Some((host.to_ascii_lowercase(), port));
    }
    match authority.rsplit_once(':') {
        Some((h, p)) => Some((h.to_ascii_lowercase(), Some(p.parse().ok()?))),
        None => Some((authority.to_ascii_lowercase(), None)),
    }
}

/// The pod may stand for the member with `peer_url`: a StatefulSet's pod whose peer URL
/// names the pod itself. `UnsupportedProfile` otherwise, before any etcd call.
pub fn check_member_identity(pod: &Pod, container: &Container, peer_url: &str) -> Result<()> {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    if stateful_set(pod).is_none() {
        return Err(Error::new(
            Code::UnsupportedProfile,
            format!("pod {ns}/{name} is not controlled by a StatefulSet: the agent acts only for the members of an etcd StatefulSet"),
        ));
    }
    let (host, port) =
        host_port(peer_url).ok_or_else(|| Error::new(Code::UnsupportedProfile, format!("peer URL {peer_url:?} cannot be read")))?;
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    let mut ips: Vec<String> = status.and_then(|s| s.pod_ip.clone()).into_iter().collect();
    ips.extend(status.and_then(|s| s.pod_ips.as_ref()).into_iter().flatten().map(|i| i.ip.clone()));
    let hostname = spec.and_then(|s| s.hostname.clone()).unwrap_or_else(|| name.clone()).to_ascii_lowercase();
    let own_dns = spec
        .and_then(|s| s.subdomain.as_deref())
        .filter(|d| !d.is_empty())
        .map(|sub| format!("{hostname}.{}.{}.svc", sub.to_ascii_lowercase(), ns.to_ascii_lowercase()));
    let names_pod = ips.iter().any(|ip| ip.eq_ignore_ascii_case(&host))
        || own_dns.as_ref().is_some_and(|d| host == *d || host.starts_with(&format!("{d}.")));
    let peer_port = container.ports.iter().flatten().find(|p| p.name.as_deref() == Some("peer")).map(|p| p.container_port);
    let on_own_port = match (port, peer_port) {
        (Some(u), Some(p)) => i32::from(u) == p,
        _ => true,
    };
    if names_pod && on_own_port {
        return Ok(());
    }
    Err(Error::new(
        Code::UnsupportedProfile,
        format!(
            "peer URL {peer_url} does not name pod {ns}/{name} (its IPs {ips:?}, its name {}, its peer port {}): the agent acts only for the member a pod is",
            own_dns.as_deref().unwrap_or("(no subdomain)"),
            peer_port.map(|p| p.to_string()).unwrap_or_else(|| "(none declared)".into())
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(ns: &str, name: &str, owner: Option<&str>, ip: &str) -> Pod {
        let owners = owner.map(|o| json!([{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": o, "uid": "u-1", "controller": true}]));
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": ns, "ownerReferences": owners.unwrap_or(json!([]))},
            "spec": {"hostname": name, "subdomain": "apisix-etcd-headless", "containers": [{"name": "etcd",
                "ports": [{"name": "client", "containerPort": 2379}, {"name": "peer", "containerPort": 2380}]}]},
            "status": {"podIP": ip, "podIPs": [{"ip": ip}]}
        }))
        .unwrap()
    }

    fn check(p: &Pod, url: &str) -> Result<()> {
        check_member_identity(p, &p.spec.as_ref().unwrap().containers[0], url)
    }

    #[test]
    fn a_pod_stands_only_for_its_own_peer_url() {
        let me = pod("apisix", "apisix-etcd-1", Some("apisix-etcd"), "10.0.0.11");
        assert!(check(&me, "http://apisix-etcd-1.apisix-etcd-headless.apisix.svc.cluster.local:2380").is_ok());
        assert!(check(&me, "http://apisix-etcd-1.apisix-etcd-headless.apisix.svc:2380").is_ok());
        assert!(check(&me, "https://10.0.0.11:2380").is_ok());
        // A victim's name or IP, another namespace's, or another port: refused.
        for url in [
            "http://apisix-etcd-2.apisix-etcd-headless.apisix.svc.cluster.local:2380",
            "http://apisix-etcd-1.apisix-etcd-headless.tenant.svc.cluster.local:2380",
            "http://10.0.0.12:2380",
            "http://10.0.0.11:2381",
            "http://apisix-etcd-1.apisix-etcd-headless.apisix.svc.evil.example:2380.example",
        ] {
            assert_eq!(check(&me, url).unwrap_err().code, Code::UnsupportedProfile, "{url}");
        }
        // The tenant's bare pod advertising the victim's URL.
        let bare = pod("tenant", "apisix-etcd-2", None, "10.0.9.9");
        assert_eq!(
            check(&bare, "http://apisix-etcd-2.apisix-etcd-headless.apisix.svc.cluster.local:2380").unwrap_err().code,
            Code::UnsupportedProfile
        );
        let v6 = pod("apisix", "apisix-etcd-1", Some("apisix-etcd"), "fd00::11");
        assert!(check(&v6, "http://[fd00::11]:2380").is_ok());
    }

    #[test]
    fn siblings_are_the_same_sets_pods() {
        let a = pod("apisix", "apisix-etcd-0", Some("apisix-etcd"), "10.0.0.10");
        let b = pod("apisix", "apisix-etcd-1", Some("apisix-etcd"), "10.0.0.11");
        let other_ns = pod("tenant", "apisix-etcd-1", Some("apisix-etcd"), "10.0.9.11");
        let bare = pod("apisix", "x", None, "10.0.0.99");
        assert!(same_set(&a, &b));
        assert!(!same_set(&a, &other_ns) && !same_set(&a, &bare) && !same_set(&bare, &bare));
    }
}
