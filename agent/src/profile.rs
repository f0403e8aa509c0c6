//! What a given etcd deployment needs: which start-up rules its pods follow, so which files
//! a remediation moves and how membership is repaired.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Container;

pub use etcd_medic_core::profile::{ALL_MOVED, Profile};

/// Is this the Bitnami image (by image name, or by the variables only its scripts read)?
pub fn is_bitnami(c: &Container, env: &BTreeMap<String, String>) -> bool {
    let image = c.image.as_deref().unwrap_or_default();
    image.contains("bitnami/etcd") || env.contains_key("ETCD_ON_K8S") || env.keys().any(|k| k.starts_with("BITNAMI_"))
}

/// The Bitnami etcd chart's major version from the pod's `helm.sh/chart` label (`etcd-9.7.3`).
pub fn chart_major(labels: Option<&BTreeMap<String, String>>) -> Option<u32> {
    let chart = labels?.get("helm.sh/chart")?;
    chart.strip_prefix("etcd-")?.split('.').next()?.parse().ok()
}

/// The profile of a Bitnami or plain pod. The chart's version decides (charts before 11
/// store `member_id`); without the label, whether the data dir holds `member_id` does.
pub fn detect(
    c: &Container,
    env: &BTreeMap<String, String>,
    labels: Option<&BTreeMap<String, String>>,
    has_member_id: Option<bool>,
) -> Profile {
    if !is_bitnami(c, env) {
        return Profile::Plain;
    }
    match chart_major(labels) {
        Some(major) if major < 11 => return Profile::BitnamiMemberId,
        Some(_) => return Profile::Bitnami,
        None => {}
    }
    if has_member_id == Some(true) { Profile::BitnamiMemberId } else { Profile::Bitnami }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn c(image: &str) -> Container {
        serde_json::from_value(json!({"name": "etcd", "image": image})).unwrap()
    }

    #[test]
    fn detects_bitnami_with_and_without_member_id() {
        let env = BTreeMap::new();
        assert_eq!(detect(&c("bitnami/etcd:3.5.10"), &env, None, Some(false)), Profile::Bitnami);
        assert_eq!(detect(&c("bitnami/etcd:3.5.10"), &env, None, Some(true)), Profile::BitnamiMemberId);
        let k8s_env: BTreeMap<String, String> = [("ETCD_ON_K8S".to_string(), "yes".to_string())].into();
        assert_eq!(detect(&c("my-mirror/etcd:3.5"), &k8s_env, None, Some(true)), Profile::BitnamiMemberId);
        assert_eq!(detect(&c("quay.io/coreos/etcd:v3.5.9"), &env, None, Some(true)), Profile::Plain);
    }

    #[test]
    fn the_chart_version_decides_over_the_files() {
        let label = |v: &str| -> BTreeMap<String, String> { [("helm.sh/chart".to_string(), v.to_string())].into() };
        let env = BTreeMap::new();
        // APISIX's chart whose member_id got lost is still the member_id profile.
        assert_eq!(detect(&c("bitnami/etcd:3.5.10"), &env, Some(&label("etcd-9.7.3")), Some(false)), Profile::BitnamiMemberId);
        assert_eq!(detect(&c("bitnami/etcd:3.5.17"), &env, Some(&label("etcd-11.0.2")), Some(false)), Profile::Bitnami);
        assert_eq!(chart_major(Some(&label("apisix-2.8.0"))), None);
    }

    #[test]
    fn bitnami_moves_member_id_plain_does_not() {
        assert!(Profile::BitnamiMemberId.files_to_move().contains(&"member_id"));
        assert!(!Profile::Plain.files_to_move().contains(&"member_id"));
        assert_eq!(serde_json::to_value(Profile::BitnamiMemberId).unwrap(), json!("bitnami-member-id"));
    }
}
