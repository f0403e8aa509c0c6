//! Which start-up rules an etcd pod follows, told from its spec and image (FIELD-NOTES.md,
//! "Telling generations apart"). Tags, hooks and env can all be overridden, so several
//! signals are read in order of how deliberate they are, and the one that decided is named.

use serde::{Deserialize, Serialize};

use crate::profile::Profile;

/// The start-up rules of a pod's image and chart.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub enum Generation {
    /// Bitnami chart ≤ 10 (APISIX's 9.7.3): a preStop hook removes the member, the image
    /// stores `member_id` and runs `member update` with it on the next start.
    #[serde(rename = "bitnami-10")]
    Bitnami10,
    /// Bitnami chart 11 (etcd 3.5 images): no preStop, no `member_id`; the image finds its
    /// entry by peer URL and wipes and re-adds a removed member itself.
    #[serde(rename = "bitnami-11")]
    Bitnami11,
    /// Bitnami chart 12 (etcd 3.6 images): chart 11's rules.
    #[serde(rename = "bitnami-12")]
    Bitnami12,
    /// etcd started with its own flags, no start script.
    #[serde(rename = "plain")]
    Plain,
}

impl Generation {
    pub fn as_str(self) -> &'static str {
        match self {
            Generation::Bitnami10 => "bitnami-10",
            Generation::Bitnami11 => "bitnami-11",
            Generation::Bitnami12 => "bitnami-12",
            Generation::Plain => "plain",
        }
    }

    /// What a remediation moves and how membership is repaired for it.
    pub fn profile(self) -> Profile {
        match self {
            Generation::Bitnami10 => Profile::BitnamiMemberId,
            Generation::Bitnami11 | Generation::Bitnami12 => Profile::Bitnami,
            Generation::Plain => Profile::Plain,
        }
    }

    /// The image wipes and re-adds a member that etcd says was removed (or whose peers say
    /// the cluster id differs) on its own next start, when the rest of the cluster is healthy.
    pub fn heals_removed_member_itself(self) -> bool {
        matches!(self, Generation::Bitnami11 | Generation::Bitnami12)
    }
}

/// What the pod's spec and its volume show. The agent fills it from the objects.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodFacts {
    /// The Bitnami image (by name, or by the variables only its scripts read).
    pub bitnami: bool,
    /// The pod's `helm.sh/chart` label (`etcd-9.7.3`).
    pub chart_label: Option<String>,
    /// The container's image reference.
    pub image: String,
    /// Names of the container's environment variables.
    pub env: Vec<String>,
    /// The container's preStop hook runs the image's `prestop.sh`.
    pub pre_stop_script: bool,
    /// Whether the data dir holds a `member_id` file (`None`: not looked at).
    pub has_member_id: Option<bool>,
}

/// The generation and the signal that decided it, for a person to check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Detected {
    pub generation: Generation,
    pub by: String,
}

/// The Bitnami chart's major version from `etcd-9.7.3`.
pub fn chart_major(label: &str) -> Option<u32> {
    label.strip_prefix("etcd-")?.split('.').next()?.parse().ok()
}

/// The etcd minor of a Bitnami image tag (`bitnami/etcd:3.5.17-debian-12-r3` → (3, 5)).
fn image_minor(image: &str) -> Option<(u32, u32)> {
    let tag = image.rsplit_once('@').map_or(image, |(name, _)| name).rsplit_once(':')?.1;
    let mut parts = tag.split(['.', '-']);
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// Decides the generation: the chart label (set by Helm, rarely overridden), then what only
/// chart ≤ 10 renders (its preStop script, `ETCD_INITIAL_CLUSTER_STATE`), then a stored
/// `member_id`, then the image's etcd minor, then `ETCDCTL_API` (gone in chart 12).
pub fn detect(f: &PodFacts) -> Detected {
    let found = |generation, by: String| Detected { generation, by };
    if !f.bitnami {
        return found(Generation::Plain, "not the Bitnami image (no bitnami/etcd image, no ETCD_ON_K8S or BITNAMI_ variables)".into());
    }
    if let Some((label, major)) = f.chart_label.as_deref().and_then(|l| Some((l, chart_major(l)?))) {
        let g = match major {
            ..=10 => Generation::Bitnami10,
            11 => Generation::Bitnami11,
            _ => Generation::Bitnami12,
        };
        return found(g, format!("label helm.sh/chart={label}"));
    }
    if f.pre_stop_script {
        return found(Generation::Bitnami10, "preStop runs the image's prestop.sh (charts ≤ 10)".into());
    }
    if f.env.iter().any(|e| e == "ETCD_INITIAL_CLUSTER_STATE") {
        return found(Generation::Bitnami10, "env ETCD_INITIAL_CLUSTER_STATE (charts ≤ 10)".into());
    }
    if f.has_member_id == Some(true) {
        return found(Generation::Bitnami10, "data/member_id on the volume (charts ≤ 10)".into());
    }
    match image_minor(&f.image) {
        Some((3, minor)) if minor >= 6 => return found(Generation::Bitnami12, format!("image {} (etcd 3.6+: chart 12)", f.image)),
        Some((3, 5)) if f.env.iter().any(|e| e == "ETCDCTL_API") => {
            return found(Generation::Bitnami11, format!("image {} with ETCDCTL_API and no chart-10 signs (chart 11)", f.image));
        }
        _ => {}
    }
    if f.env.iter().any(|e| e == "ETCDCTL_API") {
        found(Generation::Bitnami11, "no preStop, no ETCD_INITIAL_CLUSTER_STATE, ETCDCTL_API set (chart 11)".into())
    } else {
        found(Generation::Bitnami12, "no preStop, no ETCD_INITIAL_CLUSTER_STATE, no ETCDCTL_API (chart 12)".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bitnami(image: &str, env: &[&str]) -> PodFacts {
        PodFacts { bitnami: true, image: image.into(), env: env.iter().map(|s| s.to_string()).collect(), ..Default::default() }
    }

    #[test]
    fn the_chart_label_decides_first() {
        for (label, g) in [
            ("etcd-9.7.3", Generation::Bitnami10),
            ("etcd-10.2.1", Generation::Bitnami10),
            ("etcd-11.0.2", Generation::Bitnami11),
            ("etcd-12.0.18", Generation::Bitnami12),
        ] {
            let f = PodFacts { chart_label: Some(label.into()), ..bitnami("bitnami/etcd:3.6.4-debian-12-r3", &[]) };
            let d = detect(&f);
            assert_eq!(d.generation, g, "{label}");
            assert!(d.by.contains(label), "{}", d.by);
        }
    }

    #[test]
    fn chart_10_signs_without_a_label() {
        let mut f = bitnami("mirror.example/etcd:3.5.10", &["ETCDCTL_API"]);
        f.pre_stop_script = true;
        assert_eq!(detect(&f).generation, Generation::Bitnami10);
        let f = bitnami("mirror.example/etcd:3.5.10", &["ETCD_INITIAL_CLUSTER_STATE", "ETCDCTL_API"]);
        assert_eq!(detect(&f).generation, Generation::Bitnami10);
        let f = PodFacts { has_member_id: Some(true), ..bitnami("bitnami/etcd:3.5.10", &[]) };
        assert_eq!(detect(&f).generation, Generation::Bitnami10);
    }

    #[test]
    fn images_and_etcdctl_api_tell_11_from_12() {
        assert_eq!(detect(&bitnami("bitnami/etcd:3.5.17-debian-12-r3", &["ETCDCTL_API"])).generation, Generation::Bitnami11);
        assert_eq!(detect(&bitnami("bitnami/etcd:3.6.4-debian-12-r3", &["ETCDCTL_API"])).generation, Generation::Bitnami12);
        assert_eq!(detect(&bitnami("bitnami/etcd@sha256:abc", &[])).generation, Generation::Bitnami12);
        assert_eq!(detect(&bitnami("bitnami/etcd:latest", &["ETCDCTL_API"])).generation, Generation::Bitnami11);
        assert_eq!(image_minor("registry:5000/bitnami/etcd:3.6.4-debian-12-r3@sha256:00"), Some((3, 6)));
    }

    #[test]
    fn plain_pods_and_profiles() {
        let d = detect(&PodFacts { image: "registry.k8s.io/etcd:3.5.21-0".into(), ..Default::default() });
        assert_eq!(d.generation, Generation::Plain);
        assert_eq!(Generation::Bitnami10.profile(), Profile::BitnamiMemberId);
        assert_eq!(Generation::Bitnami12.profile(), Profile::Bitnami);
        assert!(Generation::Bitnami11.heals_removed_member_itself() && !Generation::Bitnami10.heals_removed_member_itself());
        assert_eq!(serde_json::to_value(Generation::Bitnami10).unwrap(), "bitnami-10");
    }
}
