//! What a given etcd deployment needs: which start-up rules its pods follow (the chart
//! generation, decided in `etcd_medic_core::generation`), so which files a remediation moves
//! and how membership is repaired. Here: the facts read off the pod.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, Pod};

pub use etcd_medic_core::generation::{Detected, Generation, PodFacts};
pub use etcd_medic_core::profile::{ALL_MOVED, Profile};

/// Is this the Bitnami image (by image name, or by the variables only its scripts read)?
pub fn is_bitnami(c: &Container, env: &BTreeMap<String, String>) -> bool {
    let image = c.image.as_deref().unwrap_or_default();
    image.contains("bitnami/etcd") || env.contains_key("ETCD_ON_K8S") || env.keys().any(|k| k.starts_with("BITNAMI_"))
}

/// What the pod's spec says of its generation; `has_member_id` is what the volume shows.
pub fn facts(pod: &Pod, c: &Container, env: &BTreeMap<String, String>, has_member_id: Option<bool>) -> PodFacts {
    let pre_stop = c.lifecycle.as_ref().and_then(|l| l.pre_stop.as_ref()).and_then(|h| h.exec.as_ref()).and_then(|e| e.command.as_ref());
    PodFacts {
        bitnami: is_bitnami(c, env),
        chart_label: pod.metadata.labels.as_ref().and_then(|l| l.get("helm.sh/chart")).cloned(),
        image: c.image.clone().unwrap_or_default(),
        env: env.keys().cloned().collect(),
        pre_stop_script: pre_stop.is_some_and(|cmd| cmd.iter().any(|a| a.contains("prestop.sh"))),
        has_member_id,
    }
}

/// The generation of a pod and the signal that decided it.
pub fn detect(pod: &Pod, c: &Container, env: &BTreeMap<String, String>, has_member_id: Option<bool>) -> Detected {
    etcd_medic_core::generation::detect(&facts(pod, c, env, has_member_id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(image: &str, labels: serde_json::Value, extra: serde_json::Value) -> (Pod, Container) {
        let mut c = json!({"name": "etcd", "image": image});
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        let p: Pod = serde_json::from_value(json!({"metadata": {"name": "p", "labels": labels}, "spec": {"containers": [c]}})).unwrap();
        let c = p.spec.as_ref().unwrap().containers[0].clone();
        (p, c)
    }

    #[test]
    fn detects_bitnami_with_and_without_member_id() {
        let env = BTreeMap::new();
        let (p, c) = pod("bitnami/etcd:3.5.10", json!({}), json!({}));
        assert_eq!(detect(&p, &c, &env, Some(false)).generation.profile(), Profile::Bitnami);
        assert_eq!(detect(&p, &c, &env, Some(true)).generation.profile(), Profile::BitnamiMemberId);
        let k8s_env: BTreeMap<String, String> = [("ETCD_ON_K8S".to_string(), "yes".to_string())].into();
        let (p, c) = pod("my-mirror/etcd:3.5", json!({}), json!({}));
        assert_eq!(detect(&p, &c, &k8s_env, Some(true)).generation.profile(), Profile::BitnamiMemberId);
        let (p, c) = pod("quay.io/coreos/etcd:v3.5.9", json!({}), json!({}));
        assert_eq!(detect(&p, &c, &env, Some(true)).generation, Generation::Plain);
    }

    #[test]
    fn the_chart_label_and_the_prestop_hook_are_read_off_the_pod() {
        let env = BTreeMap::new();
        // APISIX's chart whose member_id got lost is still the member_id profile.
        let (p, c) = pod("bitnami/etcd:3.5.10", json!({"helm.sh/chart": "etcd-9.7.3"}), json!({}));
        let d = detect(&p, &c, &env, Some(false));
        assert_eq!((d.generation, d.by.as_str()), (Generation::Bitnami10, "label helm.sh/chart=etcd-9.7.3"));
        let (p, c) = pod("bitnami/etcd:3.5.17", json!({"helm.sh/chart": "etcd-11.0.2"}), json!({}));
        assert_eq!(detect(&p, &c, &env, Some(false)).generation, Generation::Bitnami11);
        let hook = json!({"lifecycle": {"preStop": {"exec": {"command": ["/opt/bitnami/scripts/etcd/prestop.sh"]}}}});
        let (p, c) = pod("bitnami/etcd:3.5.10", json!({}), hook);
        assert_eq!(detect(&p, &c, &env, Some(false)).generation, Generation::Bitnami10);
    }
}
