//! A quorum recovery's steps on one member's volume (`POST /v1/recovery-steps`), once the
//! set is fenced: every member's data moved into a quarantine, the survivor's copied back
//! and rebuilt into a one-member cluster. The volume is reached through a holder pod the
//! controller makes (the set's own pods are gone), which mounts the member's claim and runs
//! nothing but a wait. The request names things; the agent reads every fact it acts on from
//! the API server and the volume itself.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::names::{validate_namespace, validate_pod_name};

/// The label on a holder pod: the member (pod name) whose claim it mounts.
pub const HOLDS_LABEL: &str = "etcd-medic.io/holds";

/// The holder pod of member `pod` (a StatefulSet's pod names leave room for it).
pub fn holder_name(pod: &str) -> String {
    format!("{pod}-hold")
}

/// The member a holder pod's name stands for.
pub fn member_of_holder(holder: &str) -> Option<&str> {
    holder.strip_suffix("-hold").filter(|m| !m.is_empty())
}

/// The id of a recovery's quarantines: one per recovery record (its UID), the same on every
/// retry, so a step asked again finds what an interrupted one moved.
pub fn quarantine_id(record_uid: &str) -> String {
    let uid: String = record_uid.chars().filter(char::is_ascii_alphanumeric).map(|c| c.to_ascii_lowercase()).collect();
    format!("recovery{uid}")
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub enum StepAction {
    /// Moves the member's data (as its profile names it) into the recovery's quarantine: the
    /// member joins the new cluster on empty data.
    Quarantine,
    /// The survivor: its data moved into the recovery's quarantine, copied back, and rebuilt
    /// into a one-member cluster (new revision, older revisions compacted); the quarantine
    /// keeps the original byte for byte.
    Rebuild,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StepRequest {
    /// The set's namespace.
    #[schema(example = "apisix", min_length = 1, max_length = 63, pattern = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")]
    pub namespace: String,
    /// The StatefulSet, whose `EtcdRecovery` (of the same name) is approved and fenced.
    #[schema(example = "apisix-etcd", min_length = 1, max_length = 253)]
    pub stateful_set: String,
    /// The holder pod on this node (`<member>-hold`, labelled `etcd-medic.io/holds`).
    #[schema(example = "apisix-etcd-0-hold", min_length = 1, max_length = 253)]
    pub holder: String,
    pub action: StepAction,
}

impl StepRequest {
    pub fn parse(body: &[u8]) -> Result<Self> {
        let req: StepRequest = serde_json::from_slice(body).map_err(|e| Error::invalid(format!("the body is not a recovery step: {e}")))?;
        req.validate()?;
        Ok(req)
    }

    pub fn validate(&self) -> Result<()> {
        validate_namespace(&self.namespace)?;
        validate_pod_name(&self.stateful_set)?;
        validate_pod_name(&self.holder)?;
        let member = member_of_holder(&self.holder)
            .ok_or_else(|| Error::invalid(format!("{:?} is not a holder pod's name (<member>-hold)", self.holder)))?;
        let ordinal = member.strip_prefix(&self.stateful_set).and_then(|s| s.strip_prefix('-'));
        if !ordinal.is_some_and(|o| !o.is_empty() && o.bytes().all(|b| b.is_ascii_digit())) {
            return Err(Error::invalid(format!("holder {:?} holds no member of StatefulSet {:?}", self.holder, self.stateful_set)));
        }
        Ok(())
    }

    /// The member (pod name) the holder stands for.
    pub fn member(&self) -> &str {
        member_of_holder(&self.holder).unwrap_or_default()
    }
}

/// What a rebuild made of the survivor's data.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Rebuilt {
    /// The survivor's member id and its cluster's id (both kept), 16 hex digits.
    pub member_id: String,
    #[serde(rename = "clusterID")]
    pub cluster_id: String,
    /// The members `--force-new-cluster` removed.
    pub removed: Vec<String>,
    /// The survivor's revision before, and the one the cluster starts at.
    pub revision_before: u64,
    pub revision: u64,
}

/// The answer: what the step found and did (asked again, the same).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StepDone {
    pub namespace: String,
    pub stateful_set: String,
    pub member: String,
    /// The quarantine (under `<volume>/.etcd-medic/quarantine/`) that holds the member's data.
    pub quarantine: String,
    /// The member's data dir on this node.
    pub host_path: String,
    /// What is in the quarantine (relative to the data dir).
    pub quarantined: Vec<String>,
    /// The survivor's rebuild, for `Rebuild`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebuilt: Option<Rebuilt>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_names_a_holder_of_its_own_set() {
        let ok = |holder: &str| {
            StepRequest {
                namespace: "apisix".into(),
                stateful_set: "apisix-etcd".into(),
                holder: holder.into(),
                action: StepAction::Quarantine,
            }
            .validate()
        };
        assert!(ok("apisix-etcd-0-hold").is_ok());
        assert!(ok("apisix-etcd-12-hold").is_ok());
        for bad in ["apisix-etcd-0", "other-etcd-0-hold", "apisix-etcd-x-hold", "apisix-etcd--hold", "-hold", "Apisix-etcd-0-hold"] {
            assert!(ok(bad).is_err(), "{bad}");
        }
        let r = StepRequest::parse(br#"{"namespace":"a","statefulSet":"e","holder":"e-1-hold","action":"Rebuild"}"#).unwrap();
        assert_eq!((r.member(), r.action), ("e-1", StepAction::Rebuild));
        assert!(StepRequest::parse(br#"{"namespace":"a","statefulSet":"e","holder":"e-1-hold","action":"Delete"}"#).is_err());
        assert!(StepRequest::parse(br#"{"namespace":"a","statefulSet":"e","holder":"e-1-hold","action":"Rebuild","x":1}"#).is_err());
    }

    #[test]
    fn a_recoverys_quarantine_id_is_its_records_uid_in_lower_case_letters_and_digits() {
        let id = quarantine_id("6F1C2a2e-0b7d-4c3e-9f00-1a2b3c4d5e6f");
        assert_eq!(id, "recovery6f1c2a2e0b7d4c3e9f001a2b3c4d5e6f");
        assert!(crate::names::validate_id(&id).is_ok());
        assert_eq!(holder_name("apisix-etcd-0"), "apisix-etcd-0-hold");
        assert_eq!(member_of_holder("apisix-etcd-0-hold"), Some("apisix-etcd-0"));
    }
}
