//! `EtcdRemediation` (`etcd-medic.io/v1alpha1`): the Kubernetes-native record of one
//! remediation. The controller makes one for every remediation it dispatches; a person or
//! GitOps may make one to ask for a heal, and it is carried out exactly as the controller's
//! own. Its status mirrors the agent's remediation, with `Processing` and `Succeeded`
//! conditions as node-remediation controllers report them (`Succeeded=False` when it failed
//! or was refused).
//!
//! The CRD (structural schema, printer columns, status subresource) is generated from these
//! types: `etcd-medic crd` prints it, and `charts/etcd-medic/crds/etcdremediations.yaml` is checked to be it.

use kube::{CustomResource, KubeSchema, ResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use etcd_medic_core::contract::{Outcome, Phase, Remediation};

/// What is asked: heal this pod (in the resource's namespace). What was asked does not
/// change once made: only `reason` and `restore` may (a CEL transition rule, checked by the
/// API server), so that a record's pod, instance, dry run and force are those carried out.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, KubeSchema)]
#[kube(
    group = "etcd-medic.io",
    version = "v1alpha1",
    kind = "EtcdRemediation",
    namespaced,
    status = "EtcdRemediationStatus",
    shortname = "etcdrem",
    category = "etcd-medic",
    printcolumn = r#"{"name":"Pod","type":"string","jsonPath":".spec.pod"}"#,
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".status.node"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Signature","type":"string","jsonPath":".status.diagnosis.signature","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(validation = Rule::new(IMMUTABLE_ASK).message("pod, podUID, dryRun and force are what was asked: they cannot change (only reason and restore can)"))]
#[serde(rename_all = "camelCase")]
pub struct EtcdRemediationSpec {
    /// The etcd pod's name.
    #[schemars(length(min = 1, max = 253))]
    pub pod: String,
    /// The pod instance meant: a replacement with another UID is never acted on.
    #[serde(rename = "podUID", default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    pub pod_uid: Option<String>,
    /// Why it is asked (the signature the controller detected, or a person's words).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub reason: Option<String>,
    /// Check every gate and plan; change nothing.
    #[serde(default)]
    pub dry_run: bool,
    /// Act on a pod that does not look failing, or whose failure the agent does not know.
    #[serde(default)]
    pub force: bool,
    /// Put the member's quarantined data back where it was (the agent's restore), once the
    /// remediation has ended. A person's decision: whoever may patch this resource may ask.
    /// Carried out once; a failed restore is asked again by setting it false, then true.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub restore: bool,
    /// Restore even though the heal removed the member and added it again under a new id:
    /// the data put back is then a removed member's (etcd refuses it) and the new entry a
    /// voter down until a person mends membership. Asked with `restore`; may change.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub restore_force: bool,
}

/// The spec's transition rule: what was asked stays as asked (absent booleans are false, an
/// absent podUID is empty).
const IMMUTABLE_ASK: &str = "self.pod == oldSelf.pod \
    && (has(self.podUID) ? self.podUID : '') == (has(oldSelf.podUID) ? oldSelf.podUID : '') \
    && (has(self.dryRun) && self.dryRun) == (has(oldSelf.dryRun) && oldSelf.dryRun) \
    && (has(self.force) && self.force) == (has(oldSelf.force) && oldSelf.force)";

/// The remediation as the agent on the pod's node reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EtcdRemediationStatus {
    /// `Planned`, `Pending`, `Running`, `Succeeded`, `Failed` or `Refused`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The agent's remediation id (`GET /v1/remediations/{id}` on that node).
    #[serde(rename = "remediationID", default, skip_serializing_if = "Option::is_none")]
    pub remediation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diagnosis: Option<DiagnosisStatus>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<StepStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorStatus>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The spec's generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The etcd cluster's id (hex), once the agent's check asked etcd.
    #[serde(rename = "clusterID", default, skip_serializing_if = "Option::is_none")]
    pub cluster_id: Option<String>,
    /// The member list as the agent's check saw it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<MemberStatus>,
    /// The restore asked for with `spec.restore`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<RestoreStatus>,
    /// What the member's own files said when the agent's check read them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<DataStatus>,
}

/// What the member's WAL and db said, read offline by the agent's check: whose data it is,
/// how far it got, and whether its checksums hold. Every field is written, `null` when
/// absent: a status is written as a merge patch, which would keep an earlier read's value.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DataStatus {
    /// The member id its WAL names (hex).
    #[serde(rename = "memberID", default)]
    pub member_id: Option<String>,
    /// The cluster id its WAL names (16 hex digits, as `clusterID` above).
    #[serde(rename = "clusterID", default)]
    pub cluster_id: Option<String>,
    #[serde(default)]
    pub term: Option<i64>,
    #[serde(default)]
    pub commit: Option<i64>,
    /// The last entry index its WAL holds.
    #[serde(default)]
    pub last_index: Option<i64>,
    /// The db's latest revision and consistent index.
    #[serde(default)]
    pub revision: Option<i64>,
    #[serde(default)]
    pub consistent_index: Option<i64>,
    /// `whole`, `tornTail`, `corrupt`, `tooLong`, or `none` (no WAL).
    pub wal: String,
    /// `sane`, `corrupt` or `none` (no db).
    pub db: String,
    /// One line for a person.
    pub summary: String,
}

impl DataStatus {
    /// The facts a quorum recovery chooses the survivor from (`None`: no WAL was read).
    pub fn facts(&self) -> Option<etcd_medic_core::recover::Facts> {
        if self.wal == "none" {
            return None;
        }
        let n = |v: Option<i64>| v.and_then(|v| u64::try_from(v).ok());
        Some(etcd_medic_core::recover::Facts {
            cluster_id: self.cluster_id.as_deref().and_then(|c| u64::from_str_radix(c, 16).ok()),
            commit: n(self.commit).unwrap_or(0),
            term: n(self.term).unwrap_or(0),
            consistent_index: n(self.consistent_index),
            revision: n(self.revision),
            corrupt: (self.wal == "corrupt" || self.db == "corrupt").then(|| self.summary.clone()),
        })
    }

    pub fn of(f: &etcd_medic_core::data::DataFacts) -> Self {
        use etcd_medic_core::{bolt::DbVerdict, wal::Verdict};
        let w = f.wal.as_ref();
        let d = f.db.as_ref();
        DataStatus {
            member_id: w.and_then(|w| w.node_id).map(|i| format!("{i:x}")),
            cluster_id: w.and_then(|w| w.cluster_id).map(|i| format!("{i:016x}")),
            term: w.and_then(|w| i64::try_from(w.term).ok()),
            commit: w.and_then(|w| i64::try_from(w.commit).ok()),
            last_index: w.and_then(|w| w.last_index).and_then(|i| i64::try_from(i).ok()),
            revision: d.and_then(|d| d.revision).and_then(|i| i64::try_from(i).ok()),
            consistent_index: d.and_then(|d| d.consistent_index).and_then(|i| i64::try_from(i).ok()),
            wal: match w.map(|w| &w.verdict) {
                None => "none",
                Some(Some(Verdict::Whole) | None) => "whole",
                Some(Some(Verdict::TornTail { .. })) => "tornTail",
                Some(Some(Verdict::Corrupt { .. })) => "corrupt",
                Some(Some(Verdict::TooLong { .. })) => "tooLong",
            }
            .into(),
            db: match d.map(|d| &d.verdict) {
                None => "none",
                Some(DbVerdict::Sane) => "sane",
                Some(DbVerdict::Corrupt { .. }) => "corrupt",
            }
            .into(),
            summary: cut(&f.summary()),
        }
    }
}

/// One etcd member as the agent's check saw it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MemberStatus {
    /// Hex, as etcdctl prints it.
    pub id: String,
    #[serde(default)]
    pub name: String,
    #[serde(rename = "peerURLs", default)]
    pub peer_urls: Vec<String>,
    #[serde(rename = "clientURLs", default)]
    pub client_urls: Vec<String>,
    #[serde(default)]
    pub is_learner: bool,
    #[serde(default)]
    pub healthy: bool,
    /// The entry the pod stands for: the one a heal replaces.
    #[serde(default)]
    pub stale: bool,
}

/// How the restore asked for went.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreStatus {
    /// `Restored` or `Failed`.
    pub phase: String,
    /// The contract's code when it failed. Written even when absent (`null`): a status is
    /// written as a merge patch, which would keep an earlier failure's code otherwise.
    #[serde(default)]
    pub code: Option<String>,
    #[serde(default)]
    pub message: String,
    /// RFC 3339.
    pub time: String,
    /// The spec's generation asked: a failed restore is asked again by a later generation
    /// (`spec.restore` set to false, then true again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// The crash signature and what it called for.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DiagnosisStatus {
    pub signature: String,
    pub action: String,
    /// Written even when empty: a merge patch would keep an earlier diagnosis' lines.
    #[serde(default)]
    pub evidence: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StepStatus {
    pub name: String,
    /// When the agent started the step (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<String>,
    /// When it ended; absent while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<String>,
    /// `Done`, or the code it failed with; absent while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
pub struct ErrorStatus {
    /// The contract's stable code.
    pub code: String,
    pub message: String,
}

/// A condition as `metav1.Condition` has it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `Processing` or `Succeeded`.
    pub r#type: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    pub reason: String,
    #[serde(default)]
    pub message: String,
    /// RFC 3339.
    pub last_transition_time: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Every field of the status, as written: a status is written as a merge patch, so each
/// absent one is written `null` to clear what an earlier write left.
pub const STATUS_FIELDS: [&str; 12] = [
    "phase",
    "node",
    "remediationID",
    "diagnosis",
    "steps",
    "error",
    "conditions",
    "observedGeneration",
    "clusterID",
    "members",
    "restore",
    "data",
];

/// Label of the controller's own records: the rule by which the pod became a candidate
/// (`firstCrash` or `thresholds`).
pub const CANDIDACY: &str = "etcd-medic.io/candidacy";
/// Annotation of the controller's own records: the pod's restart count when it was recorded.
pub const RESTARTS: &str = "etcd-medic.io/restarts";
/// Annotation of the controller's own records: when the controller first saw the pod failing
/// (RFC 3339).
pub const DETECTED_AT: &str = "etcd-medic.io/detected-at";
/// Annotation of the controller's own records: since when the pod had not been Ready when it
/// was detected (its Ready condition's transition; for a member that served before, its first
/// crash), RFC 3339.
pub const FAILING_SINCE: &str = "etcd-medic.io/failing-since";

/// Phases after which nothing more happens.
pub fn is_final(status: Option<&EtcdRemediationStatus>) -> bool {
    matches!(status.and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed" | "Refused" | "Planned"))
}

impl EtcdRemediation {
    /// A remediation ran for this record and ended (`Succeeded` or `Failed`, not a dry run)
    /// on a known node: the only kind a restore can be asked of.
    pub fn ran_and_ended(&self) -> bool {
        let s = self.status.as_ref();
        !self.spec.dry_run
            && matches!(s.and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed"))
            && s.is_some_and(|s| s.remediation_id.is_some() && s.node.is_some())
    }

    /// `r` is a remediation of this record's pod (and instance, when the record names one).
    pub fn is_of(&self, r: &Remediation) -> bool {
        self.namespace().is_some_and(|ns| r.namespace == ns)
            && r.pod == self.spec.pod
            && (self.spec.pod_uid.is_none() || r.pod_uid == self.spec.pod_uid)
    }
}

/// Steps and messages kept in a status at most: it lives in an etcd object of its own.
const MAX_MESSAGE: usize = 1024;

/// The status that mirrors remediation `r`, for spec generation `generation`. A condition
/// keeps its transition time when its status did not change (`previous`).
pub fn status_of(r: &Remediation, generation: Option<i64>, previous: Option<&EtcdRemediationStatus>, now: &str) -> EtcdRemediationStatus {
    let (processing, succeeded, reason) = match r.phase {
        Phase::Pending | Phase::Running => ("True", "Unknown", "InProgress"),
        Phase::Succeeded => ("False", "True", "Succeeded"),
        Phase::Planned => ("False", "True", "DryRun"),
        Phase::Failed => ("False", "False", "Failed"),
        Phase::Refused => ("False", "False", "Refused"),
    };
    let message = r.error.as_ref().map(|e| format!("{}: {}", e.code, cut(&e.message))).unwrap_or_default();
    let condition = |kind: &str, status: &str| Condition::new(previous, kind, status, reason, &message, generation, now);
    EtcdRemediationStatus {
        phase: Some(format!("{:?}", r.phase)),
        node: Some(r.node.clone()),
        remediation_id: Some(r.id.clone()),
        diagnosis: r.diagnosis.as_ref().map(|d| DiagnosisStatus {
            signature: d.signature.as_str().into(),
            action: format!("{:?}", d.action).to_lowercase(),
            evidence: d.evidence.clone(),
        }),
        steps: r
            .steps
            .iter()
            .map(|s| StepStatus {
                name: s.name.as_str().into(),
                start: Some(s.start.clone()),
                end: s.end.clone(),
                outcome: s.outcome.map(|o| match o {
                    Outcome::Done => "Done".to_string(),
                    Outcome::Failed(code) => code.as_str().to_string(),
                }),
                message: cut(&s.message),
            })
            .collect(),
        error: r.error.as_ref().map(|e| ErrorStatus { code: e.code.as_str().into(), message: cut(&e.message) }),
        conditions: vec![condition("Processing", processing), condition("Succeeded", succeeded)],
        observed_generation: generation,
        cluster_id: r.plan.as_ref().and_then(|p| p.cluster_id.clone()),
        members: r.plan.as_ref().map(|p| p.members.iter().map(MemberStatus::of).collect()).unwrap_or_default(),
        restore: previous.and_then(|p| p.restore.clone()),
        data: r.plan.as_ref().and_then(|p| p.data.as_ref()).map(DataStatus::of),
    }
}

impl MemberStatus {
    pub fn of(m: &etcd_medic_core::contract::PlanMember) -> Self {
        MemberStatus {
            id: m.id.clone(),
            name: m.name.clone(),
            peer_urls: m.peer_urls.clone(),
            client_urls: m.client_urls.clone(),
            is_learner: m.is_learner,
            healthy: m.healthy,
            stale: m.stale,
        }
    }
}

/// `s` cut to what a status keeps ([`MAX_MESSAGE`] bytes).
pub fn cut(s: &str) -> String {
    etcd_medic_core::signature::truncate(s, MAX_MESSAGE)
}

impl Condition {
    /// Condition `kind` with `status`, keeping the transition time `previous` had for it
    /// while its status did not change (`metav1.Condition`'s rule).
    pub fn new(
        previous: Option<&EtcdRemediationStatus>,
        kind: &str,
        status: &str,
        reason: &str,
        message: &str,
        generation: Option<i64>,
        now: &str,
    ) -> Self {
        let kept = previous.and_then(|p| p.conditions.iter().find(|c| c.r#type == kind && c.status == status));
        Condition {
            r#type: kind.into(),
            status: status.into(),
            reason: reason.into(),
            message: message.into(),
            last_transition_time: kept.map_or_else(|| now.to_string(), |c| c.last_transition_time.clone()),
            observed_generation: generation,
        }
    }
}

/// The CRD as YAML, as the chart's `crds/etcdremediations.yaml` holds it.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    let yaml = serde_yaml::to_string(&EtcdRemediation::crd()).expect("a CRD serializes");
    format!("# Generated by `etcd-medic crd` from client/src/crd.rs; do not edit.\n{yaml}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use etcd_medic_core::Code;
    use etcd_medic_core::contract::{ErrorRecord, Step, StepRecord};

    #[test]
    fn the_crd_has_a_structural_schema_columns_and_a_status_subresource() {
        use kube::CustomResourceExt;
        let crd = serde_json::to_value(EtcdRemediation::crd()).unwrap();
        assert_eq!(crd["metadata"]["name"], "etcdremediations.etcd-medic.io");
        assert_eq!(crd["spec"]["scope"], "Namespaced");
        let v = &crd["spec"]["versions"][0];
        assert_eq!(v["name"], "v1alpha1");
        assert!(v["subresources"]["status"].is_object());
        let columns: Vec<&str> = v["additionalPrinterColumns"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
        assert_eq!(columns, ["Pod", "Node", "Phase", "Signature", "Age"]);
        let spec = &v["schema"]["openAPIV3Schema"]["properties"]["spec"];
        assert_eq!(spec["required"], serde_json::json!(["pod"]));
        assert_eq!(spec["properties"]["podUID"]["type"], "string");
    }

    /// The transition rule, run by a CEL evaluator as the API server runs it: what was asked
    /// stays, `reason` and `restore` may change, a create is not judged by it.
    #[test]
    fn what_was_asked_cannot_change_but_a_restore_can_be_asked() {
        use kube::CustomResourceExt;
        let crd = serde_json::to_value(EtcdRemediation::crd()).unwrap();
        let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        let asked = serde_json::json!({"spec": {"pod": "apisix-etcd-1", "podUID": "u-1", "reason": "r"}});
        let with = |patch: serde_json::Value| {
            let mut v = asked.clone();
            for (k, x) in patch.as_object().unwrap() {
                v["spec"][k] = x.clone();
            }
            v
        };
        kube_cel::validate(schema, &asked, None).expect("a create");
        for ok in [serde_json::json!({"restore": true}), serde_json::json!({"reason": "another"}), serde_json::json!({"dryRun": false})] {
            kube_cel::validate(schema, &with(ok.clone()), Some(&asked)).unwrap_or_else(|e| panic!("{ok} is allowed: {e:?}"));
        }
        for refused in [
            serde_json::json!({"pod": "apisix-etcd-0"}),
            serde_json::json!({"podUID": "u-2"}),
            serde_json::json!({"dryRun": true}),
            serde_json::json!({"force": true}),
        ] {
            let e = kube_cel::validate(schema, &with(refused.clone()), Some(&asked)).expect_err(&format!("{refused} is refused"));
            assert!(format!("{e:?}").contains("cannot change"), "{e:?}");
        }
        let mut no_uid = asked.clone();
        no_uid["spec"].as_object_mut().unwrap().remove("podUID");
        assert!(kube_cel::validate(schema, &asked, Some(&no_uid)).is_err(), "a podUID cannot be added later");
    }

    /// A field missing from [`STATUS_FIELDS`] would keep an earlier write's value.
    #[test]
    fn every_status_field_is_cleared_when_absent() {
        use kube::CustomResourceExt;
        let crd = serde_json::to_value(EtcdRemediation::crd()).unwrap();
        let props = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"];
        let mut fields: Vec<&str> = props.as_object().unwrap().keys().map(String::as_str).collect();
        let mut listed = STATUS_FIELDS.to_vec();
        fields.sort();
        listed.sort();
        assert_eq!(fields, listed);
    }

    #[test]
    fn the_committed_crd_is_the_generated_one() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../charts/etcd-medic/crds/etcdremediations.yaml");
        let generated = crd_yaml();
        if std::env::var_os("ETCD_MEDIC_UPDATE_CRD").is_some() {
            std::fs::write(path, &generated).unwrap();
        }
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            committed == generated,
            "charts/etcd-medic/crds/etcdremediations.yaml is stale: run ETCD_MEDIC_UPDATE_CRD=1 cargo test -p etcd-medic-client crd"
        );
        // The YAML reads back as the same object.
        let back: serde_json::Value = serde_yaml::from_str(&committed).unwrap();
        use kube::CustomResourceExt;
        assert_eq!(back, serde_json::to_value(EtcdRemediation::crd()).unwrap());
    }

    #[test]
    fn status_mirrors_the_remediation_with_conditions() {
        let mut r = Remediation::new("node-b", "apisix", "apisix-etcd-1", None);
        r.phase = Phase::Running;
        r.steps.push(StepRecord {
            name: Step::Check,
            start: "t".into(),
            end: Some("t".into()),
            outcome: Some(Outcome::Done),
            message: "ok".into(),
        });
        let running = status_of(&r, Some(1), None, "2026-12-04T10:00:00Z");
        assert_eq!(running.phase.as_deref(), Some("Running"));
        assert_eq!(running.steps[0].outcome.as_deref(), Some("Done"));
        let cond = |s: &EtcdRemediationStatus, t: &str| s.conditions.iter().find(|c| c.r#type == t).unwrap().clone();
        assert_eq!((cond(&running, "Processing").status.as_str(), cond(&running, "Succeeded").status.as_str()), ("True", "Unknown"));
        r.phase = Phase::Refused;
        r.error = Some(ErrorRecord { code: Code::SplitBrain, message: "x".repeat(5000) });
        let refused = status_of(&r, Some(2), Some(&running), "2026-12-04T10:05:00Z");
        assert_eq!(cond(&refused, "Succeeded").status, "False");
        assert_eq!(cond(&refused, "Succeeded").reason, "Refused");
        assert_eq!(refused.error.as_ref().unwrap().code, "SplitBrain");
        assert!(refused.error.as_ref().unwrap().message.len() <= MAX_MESSAGE + 3);
        assert_eq!(cond(&refused, "Processing").last_transition_time, "2026-12-04T10:05:00Z", "Processing turned False");
        let again = status_of(&r, Some(2), Some(&refused), "2026-12-04T10:09:00Z");
        assert_eq!(cond(&again, "Succeeded").last_transition_time, "2026-12-04T10:05:00Z", "unchanged: kept");
        assert_eq!(again.observed_generation, Some(2));
    }
}
