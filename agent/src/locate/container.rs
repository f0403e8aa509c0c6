//! Which container runs etcd, and where its data dir is, read from the pod spec the way the
//! kubelet would expand it.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, Pod};

use crate::error::{Code, Error, Result};

/// The etcd container: the one named `name` when given, else one named `etcd`, else the one
/// whose image, command or args name etcd.
pub fn etcd_container<'a>(pod: &'a Pod, name: Option<&str>) -> Result<&'a Container> {
    let containers = pod.spec.as_ref().map(|s| s.containers.as_slice()).unwrap_or_default();
    if let Some(want) = name {
        return containers.iter().find(|c| c.name == want).ok_or_else(|| {
            Error::new(Code::DataDirNotFound, format!("the pod has no container named {want:?} (it has {})", names(containers)))
        });
    }
    if let Some(c) = containers.iter().find(|c| c.name == "etcd") {
        return Ok(c);
    }
    let runs_etcd = |c: &&Container| {
        let image = c.image.as_deref().unwrap_or_default();
        let words = c.command.iter().chain(c.args.iter()).flatten();
        image.rsplit('/').next().unwrap_or_default().starts_with("etcd") || words.clone().any(|w| w == "etcd" || w.ends_with("/etcd"))
    };
    let found: Vec<&Container> = containers.iter().filter(runs_etcd).collect();
    match found.as_slice() {
        [one] => Ok(one),
        [] => Err(Error::new(
            Code::DataDirNotFound,
            format!("no container of the pod runs etcd (containers: {}); name it with --container", names(containers)),
        )),
        _ => Err(Error::new(
            Code::DataDirNotFound,
            format!("several containers run etcd ({}); name one with --container", names(containers)),
        )),
    }
}

fn names(cs: &[Container]) -> String {
    cs.iter().map(|c| c.name.as_str()).collect::<Vec<_>>().join(", ")
}

/// The value of a `fieldRef` the kubelet supports in env vars.
fn field_ref(pod: &Pod, path: &str) -> Option<String> {
    let m = &pod.metadata;
    let label_or_annotation = |prefix: &str, map: &Option<BTreeMap<String, String>>| {
        let key = path.strip_prefix(prefix)?.strip_prefix("['")?.strip_suffix("']")?;
        map.as_ref()?.get(key).cloned()
    };
    match path {
        "metadata.name" => m.name.clone(),
        "metadata.namespace" => m.namespace.clone(),
        "metadata.uid" => m.uid.clone(),
        "spec.nodeName" => pod.spec.as_ref()?.node_name.clone(),
        "spec.serviceAccountName" => pod.spec.as_ref()?.service_account_name.clone(),
        "status.podIP" => pod.status.as_ref()?.pod_ip.clone(),
        "status.hostIP" => pod.status.as_ref()?.host_ip.clone(),
        p if p.starts_with("metadata.labels[") => label_or_annotation("metadata.labels", &m.labels),
        p if p.starts_with("metadata.annotations[") => label_or_annotation("metadata.annotations", &m.annotations),
        _ => None,
    }
}

/// The container's environment as the kubelet builds it: in order, each value expanded
/// against the variables defined before it; `fieldRef`s resolved from the pod. Values from
/// ConfigMaps and Secrets are not read (the agent has no access to them) and stay unset.
pub fn environment(pod: &Pod, c: &Container) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for var in c.env.iter().flatten() {
        let value = match (&var.value, &var.value_from) {
            (Some(v), _) => Some(expand(v, &env)),
            (None, Some(from)) => from.field_ref.as_ref().and_then(|f| field_ref(pod, &f.field_path)),
            (None, None) => Some(String::new()),
        };
        if let Some(v) = value {
            env.insert(var.name.clone(), v);
        }
    }
    env
}

pub use etcd_medic_core::flags::expand;

/// The container's command and arguments, expanded as the kubelet does.
pub fn words(c: &Container, env: &BTreeMap<String, String>) -> Vec<String> {
    c.command.iter().chain(c.args.iter()).flatten().map(|w| expand(w, env)).collect()
}

/// The etcd flags the pod's container `name` starts with, if the pod has that container.
pub fn start_flags<'p>(pod: &'p Pod, name: &str, pod_name: &str) -> Option<(&'p Container, etcd_medic_core::flags::StartFlags)> {
    let c = pod.spec.as_ref().and_then(|s| s.containers.iter().find(|c| c.name == name))?;
    let env = environment(pod, c);
    Some((c, etcd_medic_core::flags::start_flags(&words(c, &env), &env, pod_name)))
}

/// A WAL kept outside the data dir (`--wal-dir`, `ETCD_WAL_DIR`) or another volume mounted
/// inside it would be left behind by a move of `member/wal`: refuse rather than half-move.
pub fn no_separate_wal(c: &Container, env: &BTreeMap<String, String>, data_dir: &str) -> Result<()> {
    let words = words(c, env);
    let flag = words.iter().any(|w| w == "--wal-dir" || w.starts_with("--wal-dir="));
    if flag || env.get("ETCD_WAL_DIR").is_some_and(|v| !v.is_empty()) {
        return Err(Error::new(
            Code::UnsupportedProfile,
            format!(
                "container {:?} keeps its WAL outside the data dir (--wal-dir / ETCD_WAL_DIR): moving member/wal would leave the real WAL behind",
                c.name
            ),
        ));
    }
    let dd = data_dir.trim_end_matches('/');
    if let Some(m) = c.volume_mounts.iter().flatten().find(|m| m.mount_path.trim_end_matches('/').starts_with(&format!("{dd}/"))) {
        return Err(Error::new(
            Code::UnsupportedProfile,
            format!("volume {:?} is mounted inside the data dir at {}: a move would split the member's data", m.name, m.mount_path),
        ));
    }
    Ok(())
}

/// Names set from sources the agent cannot read (ConfigMaps, Secrets, `envFrom`).
fn unresolved(c: &Container) -> (Vec<String>, bool) {
    let names = c
        .env
        .iter()
        .flatten()
        .filter(|v| v.value.is_none() && v.value_from.as_ref().is_some_and(|f| f.field_ref.is_none()))
        .map(|v| v.name.clone())
        .collect();
    (names, c.env_from.as_ref().is_some_and(|e| !e.is_empty()))
}

/// Where the data dir was found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DataDirSource {
    Env,
    Flag,
    ProfileDefault,
}

/// The container's etcd data dir: `ETCD_DATA_DIR`, else `--data-dir` in command or args,
/// else `default` (the profile's). Flags win over the environment, as etcd itself does.
pub fn data_dir(pod: &Pod, c: &Container, default: Option<&str>) -> Result<(String, DataDirSource)> {
    let env = environment(pod, c);
    let words = words(c, &env);
    let (unreadable, has_env_from) = unresolved(c);
    let mut flag = None;
    for (i, w) in words.iter().enumerate() {
        if let Some(v) = w.strip_prefix("--data-dir=").or_else(|| w.strip_prefix("-data-dir=")) {
            flag = Some(v.to_string());
        } else if (w == "--data-dir" || w == "-data-dir")
            && let Some(v) = words.get(i + 1)
        {
            flag = Some(v.clone());
        }
    }
    let literal = c.env.iter().flatten().any(|v| v.name == "ETCD_DATA_DIR" && v.value.is_some());
    if flag.is_none() && (unreadable.iter().any(|n| n == "ETCD_DATA_DIR") || (has_env_from && !literal)) {
        return Err(Error::new(
            Code::DataDirNotFound,
            format!(
                "container {:?} may set ETCD_DATA_DIR from a ConfigMap or Secret, which the agent cannot read; set it in the pod spec or pass --data-dir",
                c.name
            ),
        ));
    }
    let (dir, source) = match (flag, env.get("ETCD_DATA_DIR"), default) {
        (Some(f), _, _) => (f, DataDirSource::Flag),
        (None, Some(e), _) if !e.is_empty() => (e.clone(), DataDirSource::Env),
        (None, _, Some(d)) => (d.to_string(), DataDirSource::ProfileDefault),
        _ => {
            return Err(Error::new(
                Code::DataDirNotFound,
                format!(
                    "container {:?} sets neither ETCD_DATA_DIR nor --data-dir; the agent will not guess etcd's working-dir default",
                    c.name
                ),
            ));
        }
    };
    if !dir.starts_with('/') || dir.contains("$(") {
        return Err(Error::new(Code::DataDirNotFound, format!("data dir {dir:?} is not an absolute path the agent can resolve")));
    }
    Ok((dir, source))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(container: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "apisix-etcd-1", "namespace": "apisix", "uid": "u-1", "labels": {"app": "etcd"}},
            "spec": {"nodeName": "node-a", "containers": [container]},
            "status": {"podIP": "10.0.0.7"},
        }))
        .unwrap()
    }

    #[test]
    fn env_resolves_field_refs_in_order() {
        let p = pod(json!({"name": "etcd", "env": [
            {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
            {"name": "ETCD_DATA_DIR", "value": "/var/lib/$(APP)/$(POD)"},
            {"name": "LATE", "value": "$(AFTER)"},
            {"name": "AFTER", "value": "v"},
        ]}));
        let c = &p.spec.as_ref().unwrap().containers[0];
        let env = environment(&p, c);
        assert_eq!(env["ETCD_DATA_DIR"], "/var/lib/etcd/apisix-etcd-1");
        assert_eq!(env["LATE"], "$(AFTER)");
        assert_eq!(data_dir(&p, c, None).unwrap(), ("/var/lib/etcd/apisix-etcd-1".into(), DataDirSource::Env));
    }

    #[test]
    fn data_dir_from_flags_in_both_forms() {
        for args in [json!(["--name=x", "--data-dir=/var/run/etcd/default.etcd"]), json!(["--data-dir", "/var/run/etcd/default.etcd"])] {
            let p = pod(json!({"name": "etcd", "command": ["etcd"], "args": args}));
            let c = &p.spec.as_ref().unwrap().containers[0];
            assert_eq!(data_dir(&p, c, None).unwrap(), ("/var/run/etcd/default.etcd".into(), DataDirSource::Flag));
        }
        let p = pod(json!({"name": "etcd", "command": ["etcd", "--data-dir=/data/$(POD)"],
                           "env": [{"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]}));
        let c = &p.spec.as_ref().unwrap().containers[0];
        assert_eq!(data_dir(&p, c, None).unwrap().0, "/data/apisix-etcd-1");
    }

    #[test]
    fn data_dir_defaults_and_refusals() {
        let p = pod(json!({"name": "etcd", "image": "bitnami/etcd:3.5"}));
        let c = &p.spec.as_ref().unwrap().containers[0];
        assert_eq!(data_dir(&p, c, Some("/bitnami/etcd/data")).unwrap().1, DataDirSource::ProfileDefault);
        assert_eq!(data_dir(&p, c, None).unwrap_err().code, Code::DataDirNotFound);
        let rel = pod(json!({"name": "etcd", "args": ["--data-dir=default.etcd"]}));
        assert_eq!(data_dir(&rel, &rel.spec.as_ref().unwrap().containers[0], None).unwrap_err().code, Code::DataDirNotFound);
    }

    #[test]
    fn data_dir_from_unreadable_sources_is_not_guessed() {
        let from_cm = pod(json!({"name": "etcd", "image": "bitnami/etcd:3.5", "env": [
            {"name": "ETCD_DATA_DIR", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "dir"}}}]}));
        let c = &from_cm.spec.as_ref().unwrap().containers[0];
        assert_eq!(data_dir(&from_cm, c, Some("/bitnami/etcd/data")).unwrap_err().code, Code::DataDirNotFound);
        let env_from = pod(json!({"name": "etcd", "image": "bitnami/etcd:3.5", "envFrom": [{"configMapRef": {"name": "cfg"}}]}));
        let c = &env_from.spec.as_ref().unwrap().containers[0];
        assert_eq!(data_dir(&env_from, c, Some("/bitnami/etcd/data")).unwrap_err().code, Code::DataDirNotFound);
        let overridden = pod(json!({"name": "etcd", "envFrom": [{"configMapRef": {"name": "cfg"}}],
            "env": [{"name": "ETCD_DATA_DIR", "value": "/data"}]}));
        let c = &overridden.spec.as_ref().unwrap().containers[0];
        assert_eq!(data_dir(&overridden, c, None).unwrap().0, "/data");
    }

    #[test]
    fn a_wal_outside_the_data_dir_is_unsupported() {
        let wal_flag = pod(json!({"name": "etcd", "args": ["--data-dir=/d", "--wal-dir=/w"]}));
        let c = &wal_flag.spec.as_ref().unwrap().containers[0];
        assert_eq!(no_separate_wal(c, &environment(&wal_flag, c), "/d").unwrap_err().code, Code::UnsupportedProfile);
        let nested = pod(
            json!({"name": "etcd", "volumeMounts": [{"name": "data", "mountPath": "/d"}, {"name": "wal", "mountPath": "/d/member/wal"}]}),
        );
        let c = &nested.spec.as_ref().unwrap().containers[0];
        assert_eq!(no_separate_wal(c, &BTreeMap::new(), "/d").unwrap_err().code, Code::UnsupportedProfile);
        let fine = pod(json!({"name": "etcd", "volumeMounts": [{"name": "data", "mountPath": "/d"}]}));
        let c = &fine.spec.as_ref().unwrap().containers[0];
        assert!(no_separate_wal(c, &BTreeMap::new(), "/d").is_ok());
    }

    #[test]
    fn etcd_container_is_found_by_name_or_by_what_it_runs() {
        let p: Pod = serde_json::from_value(json!({"metadata": {}, "spec": {"containers": [
            {"name": "sidecar", "image": "busybox"}, {"name": "db", "image": "quay.io/coreos/etcd:v3.5.9"}]}}))
        .unwrap();
        assert_eq!(etcd_container(&p, None).unwrap().name, "db");
        assert_eq!(etcd_container(&p, Some("sidecar")).unwrap().name, "sidecar");
        assert_eq!(etcd_container(&p, Some("nope")).unwrap_err().code, Code::DataDirNotFound);
        let none: Pod = serde_json::from_value(json!({"metadata": {}, "spec": {"containers": [{"name": "a", "image": "nginx"}]}})).unwrap();
        assert_eq!(etcd_container(&none, None).unwrap_err().code, Code::DataDirNotFound);
    }
}
