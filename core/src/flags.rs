//! What a pod's etcd container is started with: Kubernetes' `$(VAR)` expansion of command
//! and arguments, and the etcd flags (or their `ETCD_*` variables) the engine reads. Pure:
//! the agent gathers the words and the environment from the pod.

use std::collections::BTreeMap;

/// Kubernetes' `$(VAR)` expansion: defined variables are replaced, `$$` escapes a `$`, and
/// references to undefined variables stay as written.
pub fn expand(input: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(body) = after.strip_prefix('(')
            && let Some(end) = body.find(')')
        {
            let name = &body[..end];
            match env.get(name) {
                Some(v) => out.push_str(v),
                None => {
                    out.push_str("$(");
                    out.push_str(name);
                    out.push(')');
                }
            }
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// The flags etcd starts with that the engine needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StartFlags {
    /// The first `--initial-advertise-peer-urls`: the member's identity in the member list.
    pub peer_url: Option<String>,
    /// `--name`, else the pod's name.
    pub name: String,
    /// `--initial-cluster-state`.
    pub cluster_state: Option<String>,
}

/// From the container's expanded command and arguments (`words`), else its environment.
pub fn start_flags(words: &[String], env: &BTreeMap<String, String>, pod: &str) -> StartFlags {
    let flag = |name: &str| {
        words.iter().enumerate().find_map(|(i, w)| {
            w.strip_prefix(&format!("--{name}="))
                .map(String::from)
                .or_else(|| (w == &format!("--{name}")).then(|| words.get(i + 1).cloned()).flatten())
        })
    };
    let envv = |k: &str| env.get(k).cloned().filter(|v| !v.is_empty());
    let peer_url = flag("initial-advertise-peer-urls")
        .or_else(|| envv("ETCD_INITIAL_ADVERTISE_PEER_URLS"))
        .map(|u| u.split(',').next().unwrap_or_default().to_string());
    let name = flag("name").or_else(|| envv("ETCD_NAME")).unwrap_or_else(|| pod.to_string());
    let cluster_state = flag("initial-cluster-state").or_else(|| envv("ETCD_INITIAL_CLUSTER_STATE"));
    StartFlags { peer_url, name, cluster_state }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expansion_follows_kubernetes() {
        let env: BTreeMap<String, String> = [("A".into(), "x".into()), ("B".into(), "y".into())].into();
        assert_eq!(expand("$(A)/$(B)", &env), "x/y");
        assert_eq!(expand("$$(A)", &env), "$(A)");
        assert_eq!(expand("$(MISSING)/z", &env), "$(MISSING)/z");
        assert_eq!(expand("cost $5 $", &env), "cost $5 $");
        assert_eq!(expand("$(A", &env), "$(A");
    }

    #[test]
    fn flags_win_over_variables_and_the_first_peer_url_counts() {
        let words: Vec<String> =
            ["etcd", "--name", "m1", "--initial-advertise-peer-urls=http://a:2380,http://b:2380"].iter().map(|s| s.to_string()).collect();
        let env: BTreeMap<String, String> =
            [("ETCD_NAME".into(), "ignored".into()), ("ETCD_INITIAL_CLUSTER_STATE".into(), "existing".into())].into();
        let f = start_flags(&words, &env, "pod-1");
        assert_eq!(f, StartFlags { peer_url: Some("http://a:2380".into()), name: "m1".into(), cluster_state: Some("existing".into()) });
        let f = start_flags(&[], &BTreeMap::new(), "pod-1");
        assert_eq!(f, StartFlags { peer_url: None, name: "pod-1".into(), cluster_state: None });
        let env: BTreeMap<String, String> = [("ETCD_INITIAL_ADVERTISE_PEER_URLS".into(), "http://c:2380".into())].into();
        assert_eq!(start_flags(&[], &env, "p").peer_url.as_deref(), Some("http://c:2380"));
    }
}
