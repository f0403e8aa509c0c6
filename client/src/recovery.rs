//! `EtcdRecovery` (`etcd-medic.io/v1alpha1`): the record of one quorum recovery of a
//! StatefulSet's etcd cluster. It holds the plan (the survivor, why, what each member's data
//! holds and what is lost) and a person's approval of it. Nothing acts on a quorum loss
//! without one: the approval names the digest of the facts the person saw, and the plan is
//! read again and refused (`PlanChanged`) when the facts give another digest.
//!
//! Who approved is the API server's word, not the writer's: the chart's admission policy
//! `etcd-medic-recovery-approval` admits `spec.approval.by` only when it is the requesting
//! user's own name, and the CRD's rules keep an approval, once made, as it was made.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use etcd_medic_core::recover::Choice;

/// What is asked: recover the cluster of this StatefulSet (in the resource's namespace).
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, KubeSchema)]
#[kube(
    group = "etcd-medic.io",
    version = "v1alpha1",
    kind = "EtcdRecovery",
    namespaced,
    status = "EtcdRecoveryStatus",
    shortname = "etcdrec",
    category = "etcd-medic",
    printcolumn = r#"{"name":"StatefulSet","type":"string","jsonPath":".spec.statefulSet"}"#,
    printcolumn = r#"{"name":"Survivor","type":"string","jsonPath":".status.plan.choice.survivor"}"#,
    printcolumn = r#"{"name":"Facts","type":"string","jsonPath":".status.plan.choice.facts"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Approved-By","type":"string","jsonPath":".spec.approval.by","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(validation = Rule::new(SAME_SET).message("statefulSet is what was asked: it cannot change"))]
#[x_kube(validation = Rule::new(APPROVAL_KEPT).message("an approval, once made, stays as made (with the survivor it approved): a new recovery is a new record"))]
#[serde(rename_all = "camelCase")]
pub struct EtcdRecoverySpec {
    /// The StatefulSet whose etcd cluster lost quorum.
    #[schemars(length(min = 1, max = 253))]
    pub stateful_set: String,
    /// The member a person chooses instead of the best (the plan says what it loses).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub survivor: Option<String>,
    /// A person's approval of the plan whose facts have this digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<Approval>,
}

/// The spec's transition rules: the set never changes; an approval is never changed or
/// taken back, and the survivor it approved stays.
const SAME_SET: &str = "self.statefulSet == oldSelf.statefulSet";
const APPROVAL_KEPT: &str = "!has(oldSelf.approval) || (has(self.approval) && self.approval == oldSelf.approval \
    && (has(self.survivor) ? self.survivor : '') == (has(oldSelf.survivor) ? oldSelf.survivor : ''))";

/// Who approved which facts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Approval {
    /// The approving user's name as the API server authenticated the request (the admission
    /// policy refuses any other).
    #[schemars(length(min = 1, max = 512))]
    pub by: String,
    /// The digest of the facts approved (`status.plan.choice.facts` as the person saw it).
    #[schemars(regex(pattern = "^[0-9a-f]{16}$"))]
    pub facts: String,
}

/// The plan and where the recovery stands.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EtcdRecoveryStatus {
    /// `AwaitingApproval` (a plan, no approval), `Approved` (the approval names the facts
    /// read again at approval).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<Plan>,
    /// When the plan was last read from the members' data (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proposed_at: Option<String>,
    /// When the approval was checked against the facts read again (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approved_at: Option<String>,
    /// One line for a person: what happens next.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// What a quorum recovery proposes: the survivor and why, every member's facts, what is lost,
/// and what the rebuild is given.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Plan {
    pub replicas: i32,
    /// Pods Ready when asked: a majority Ready means the cluster may well have quorum.
    pub ready: i32,
    pub choice: Choice,
    /// Members whose files could not be read, and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    /// The survivor's node and the client URLs its pod advertises, and the highest revision
    /// another member's db held: what `etcd-medic rebuild` is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub survivor_node: Option<String>,
    #[serde(rename = "survivorClientURLs", default, skip_serializing_if = "Vec::is_empty")]
    pub survivor_client_urls: Vec<String>,
    pub held_revision: u64,
}

pub const AWAITING_APPROVAL: &str = "AwaitingApproval";
pub const APPROVED: &str = "Approved";

/// The CRD as YAML, as the chart's `crds/etcdrecoveries.yaml` holds it.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    let yaml = serde_yaml::to_string(&EtcdRecovery::crd()).expect("a CRD serializes");
    format!("# Generated by `etcd-medic crd` from client/src/recovery.rs; do not edit.\n{yaml}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;
    use serde_json::{Value, json};

    fn schema() -> Value {
        serde_json::to_value(EtcdRecovery::crd()).unwrap()["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
    }

    fn record(spec: Value) -> Value {
        json!({"apiVersion": "etcd-medic.io/v1alpha1", "kind": "EtcdRecovery", "metadata": {"name": "apisix-etcd"}, "spec": spec})
    }

    #[test]
    fn the_crd_has_a_structural_schema_columns_and_a_status_subresource() {
        let crd = serde_json::to_value(EtcdRecovery::crd()).unwrap();
        assert_eq!(crd["metadata"]["name"], "etcdrecoveries.etcd-medic.io");
        let v = &crd["spec"]["versions"][0];
        assert!(v["subresources"]["status"].is_object());
        let columns: Vec<&str> = v["additionalPrinterColumns"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
        assert_eq!(columns, ["StatefulSet", "Survivor", "Facts", "Phase", "Approved-By", "Age"]);
        let plan = &v["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]["plan"];
        assert_eq!(plan["properties"]["choice"]["properties"]["ranked"]["type"], "array");
    }

    #[test]
    fn an_approval_is_kept_as_made_and_the_set_never_changes() {
        let s = schema();
        let open = record(json!({"statefulSet": "apisix-etcd"}));
        let approved = record(json!({"statefulSet": "apisix-etcd", "approval": {"by": "alice", "facts": "ab92b1ea0ff43f8f"}}));
        assert!(kube_cel::validate(&s, &approved, Some(&open)).is_ok(), "approving an open plan is allowed");
        assert!(kube_cel::validate(&s, &approved, Some(&approved)).is_ok(), "an unchanged approval is allowed");
        let other = record(json!({"statefulSet": "apisix-etcd", "approval": {"by": "mallory", "facts": "ab92b1ea0ff43f8f"}}));
        assert!(kube_cel::validate(&s, &other, Some(&approved)).is_err(), "an approval is never rewritten");
        assert!(kube_cel::validate(&s, &open, Some(&approved)).is_err(), "an approval is never taken back");
        let picked = record(
            json!({"statefulSet": "apisix-etcd", "survivor": "apisix-etcd-2", "approval": {"by": "alice", "facts": "ab92b1ea0ff43f8f"}}),
        );
        assert!(kube_cel::validate(&s, &picked, Some(&approved)).is_err(), "the approved survivor stays");
        let moved = record(json!({"statefulSet": "other"}));
        assert!(kube_cel::validate(&s, &moved, Some(&open)).is_err(), "the set never changes");
        // The API server checks the pattern (OpenAPI validation, not CEL).
        assert_eq!(s["properties"]["spec"]["properties"]["approval"]["properties"]["facts"]["pattern"], "^[0-9a-f]{16}$");
    }

    #[test]
    fn the_committed_crd_is_the_generated_one() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../charts/etcd-medic/crds/etcdrecoveries.yaml");
        let generated = crd_yaml();
        if std::env::var_os("ETCD_MEDIC_UPDATE_CRD").is_some() {
            std::fs::write(path, &generated).unwrap();
        }
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            committed == generated,
            "charts/etcd-medic/crds/etcdrecoveries.yaml is stale: run ETCD_MEDIC_UPDATE_CRD=1 cargo test -p etcd-medic-client crd"
        );
    }
}
