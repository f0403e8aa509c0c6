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

use k8s_openapi::api::core::v1::Pod;

use etcd_medic_core::Result;
use etcd_medic_core::recover::{Choice, Evidence, Facts, choose};

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
    /// read again at approval), `Fencing` (the controller found the facts unchanged once
    /// more, and stops every member: the StatefulSet at 0), `Fenced` (no member's pod is
    /// left), `Rebuilding` (every member's data moved into a quarantine on its volume, the
    /// survivor's copied back and rebuilt into a one-member cluster, then the set scaled to
    /// 1: the survivor serves), `Rebuilt` (the survivor serves alone, Ready; the others
    /// rejoin by a person's steps, `message`), or `Refused` (no plan can be made, the facts
    /// changed before the fence, or a step cannot be taken: `code` says why).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// The refusal's stable code (`SplitBrain`, `NoSurvivor`, `CorruptData`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<Plan>,
    /// When the plan was last read from the members' data (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proposed_at: Option<String>,
    /// When the approval was checked against the facts read again (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approved_at: Option<String>,
    /// The fence: the StatefulSet's replicas before it was scaled to 0 (to scale it back).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence: Option<Fence>,
    /// What the rebuild made of the survivor's data, once made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebuilt: Option<RebuiltState>,
    /// One line for a person: what happens next.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// The rebuilt cluster, and where each member's old data is kept.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RebuiltState {
    /// The survivor's member id and its cluster's id (kept), 16 hex digits.
    pub member_id: String,
    #[serde(rename = "clusterID")]
    pub cluster_id: String,
    /// The survivor's revision before, and the one the rebuilt cluster started at.
    pub revision_before: u64,
    pub revision: u64,
    /// The quarantine, on every member's volume (`.etcd-medic/quarantine/<name>`), that holds
    /// its data as it was at the fence: the survivor's original too.
    pub quarantine: String,
    /// Members whose data was moved there (the survivor's was copied back and rebuilt).
    pub quarantined: Vec<String>,
    /// When the rebuild ended (RFC 3339): the undo point, before the first write reached
    /// the new cluster.
    pub at: String,
}

/// What the fence changed, recorded before it is changed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Fence {
    /// The StatefulSet's replicas before the fence.
    pub replicas: i32,
    /// When the fence began (RFC 3339).
    pub at: String,
    /// Whether the controller carries the recovery on from the fence (the rebuild, the
    /// survivor started); else the rebuild is a person's (`message`).
    #[serde(default)]
    pub rebuild: bool,
}

/// What a quorum recovery proposes: the survivor and why, every member's facts, what is lost,
/// and what the rebuild is given.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Plan {
    /// The StatefulSet's UID: the facts' digest is bound to it.
    #[serde(rename = "statefulSetUID", default)]
    pub stateful_set_uid: String,
    pub replicas: i32,
    /// Pods Ready when asked: a majority Ready means the cluster may well have quorum.
    pub ready: i32,
    pub choice: Choice,
    /// Every member's pod as it was seen when the plan was made, in ordinal order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<MemberState>,
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

/// One member's pod as a plan saw it: the evidence beside its files' facts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MemberState {
    pub pod: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// `Ready`, `Running` (not Ready), the container's waiting reason (`CrashLoopBackOff`),
    /// `Terminated`, `Pending`, or `Gone` (no such pod).
    pub state: String,
    pub ready: bool,
    pub restarts: i32,
    /// The last crash's signature, read from its termination message (`None`: none known).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

/// What a plan is made from, for one member.
#[derive(Clone, Debug, Default)]
pub struct Member {
    pub state: MemberState,
    /// The client URLs its pod advertises.
    pub client_urls: Vec<String>,
    /// Its files' facts as the agent on its node read them (`None`: not read).
    pub facts: Option<Facts>,
    /// Why its files were not read.
    pub note: Option<String>,
}

impl Member {
    /// Member `name` of the set as `pod` shows it (`None`: no such pod).
    pub fn of(name: &str, pod: Option<&Pod>) -> Member {
        let Some(p) = pod else {
            return Member { state: MemberState { pod: name.into(), state: "Gone".into(), ..Default::default() }, ..Default::default() };
        };
        let containers = p.spec.as_ref().map(|s| s.containers.as_slice()).unwrap_or_default();
        let etcd = containers.iter().find(|c| c.name == "etcd").or(containers.first());
        let status = p.status.as_ref();
        let cs = status
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|all| all.iter().find(|c| Some(c.name.as_str()) == etcd.map(|e| e.name.as_str())));
        let ready = status.and_then(|s| s.conditions.as_ref()).is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        let now = cs.and_then(|c| c.state.as_ref());
        let state = if ready {
            "Ready".to_string()
        } else if let Some(w) = now.and_then(|s| s.waiting.as_ref()) {
            w.reason.clone().unwrap_or_else(|| "Waiting".into())
        } else if now.is_some_and(|s| s.running.is_some()) {
            "Running".into()
        } else if now.is_some_and(|s| s.terminated.is_some()) {
            "Terminated".into()
        } else {
            "Pending".into()
        };
        let crashed =
            cs.and_then(|c| c.last_state.as_ref()).and_then(|s| s.terminated.as_ref()).or(now.and_then(|s| s.terminated.as_ref()));
        let signature = crashed.and_then(|t| t.message.as_deref()).and_then(|m| {
            let (sig, evidence) = etcd_medic_core::signature::of_text(m);
            evidence.map(|_| sig.as_str().to_string())
        });
        Member {
            state: MemberState {
                pod: name.into(),
                node: p.spec.as_ref().and_then(|s| s.node_name.clone()),
                state,
                ready,
                restarts: cs.map_or(0, |c| c.restart_count),
                signature,
            },
            client_urls: etcd.map(advertised_client_urls).unwrap_or_default(),
            facts: None,
            note: None,
        }
    }
}

/// The client URLs an etcd container advertises (`--advertise-client-urls` or
/// `ETCD_ADVERTISE_CLIENT_URLS`, as Bitnami sets it), `$(VAR)` references left as written.
fn advertised_client_urls(c: &k8s_openapi::api::core::v1::Container) -> Vec<String> {
    let args = c.command.iter().flatten().chain(c.args.iter().flatten());
    let mut it = args.clone();
    while let Some(a) = it.next() {
        if let Some(v) = a.strip_prefix("--advertise-client-urls=") {
            return v.split(',').map(String::from).collect();
        }
        if a == "--advertise-client-urls" {
            return it.next().map(|v| v.split(',').map(String::from).collect()).unwrap_or_default();
        }
    }
    let env = c.env.iter().flatten().find(|e| e.name == "ETCD_ADVERTISE_CLIENT_URLS").and_then(|e| e.value.clone());
    env.map(|v| v.split(',').map(String::from).collect()).unwrap_or_default()
}

/// The plan for a set (UID `uid`) of `replicas` members (in ordinal order), the survivor
/// chosen from their files (`etcd_medic_core::recover::choose`, with its refusals), or the one
/// a person `picked`; its facts' digest bound to the set's UID.
pub fn plan(replicas: i32, uid: &str, members: Vec<Member>, picked: Option<&str>) -> Result<Plan> {
    let evidence: Vec<Evidence> = members.iter().map(|m| Evidence { pod: m.state.pod.clone(), facts: m.facts.clone() }).collect();
    let mut choice = choose(&evidence, picked)?;
    choice.facts = etcd_medic_core::recover::bound(&choice.facts, uid);
    let held_revision = choice.ranked.iter().filter(|m| m.pod != choice.survivor).filter_map(|m| m.revision).max().unwrap_or(0);
    let survivor = members.iter().find(|m| m.state.pod == choice.survivor);
    Ok(Plan {
        stateful_set_uid: uid.into(),
        replicas,
        ready: members.iter().filter(|m| m.state.ready).count() as i32,
        survivor_node: survivor.and_then(|m| m.state.node.clone()),
        survivor_client_urls: survivor.map(|m| m.client_urls.clone()).unwrap_or_default(),
        held_revision,
        notes: members.iter().filter_map(|m| m.note.as_ref().map(|n| format!("{}: {n}", m.state.pod))).collect(),
        members: members.into_iter().map(|m| m.state).collect(),
        choice,
    })
}

pub const AWAITING_APPROVAL: &str = "AwaitingApproval";
pub const APPROVED: &str = "Approved";
pub const REFUSED: &str = "Refused";
pub const FENCING: &str = "Fencing";
pub const FENCED: &str = "Fenced";
pub const REBUILDING: &str = "Rebuilding";
pub const REBUILT: &str = "Rebuilt";

/// Whether `ready` of a set's `members` (its pods) are too few to elect a leader: fewer than
/// a majority, in a set of two or more (a single member is no quorum to lose).
pub fn quorum_lost(members: usize, ready: usize) -> bool {
    members >= 2 && ready < members / 2 + 1
}

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
    fn quorum_is_lost_below_a_majority_ready() {
        assert!(quorum_lost(3, 1) && quorum_lost(3, 0) && quorum_lost(2, 1) && quorum_lost(5, 2));
        assert!(!quorum_lost(3, 2) && !quorum_lost(5, 3) && !quorum_lost(1, 0) && !quorum_lost(0, 0));
    }

    #[test]
    fn a_plan_carries_each_pods_state_and_what_the_rebuild_is_given() {
        let pod = |v: Value| -> Pod { serde_json::from_value(v).unwrap() };
        let crashing = pod(json!({
            "metadata": {"name": "e-1"},
            "spec": {"nodeName": "node-b", "containers": [{"name": "etcd", "env": [{"name": "ETCD_ADVERTISE_CLIENT_URLS", "value": "http://e-1.h:2379"}]}]},
            "status": {"conditions": [{"type": "Ready", "status": "False"}],
                       "containerStatuses": [{"name": "etcd", "ready": false, "restartCount": 4, "image": "x", "imageID": "",
                         "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                         "lastState": {"terminated": {"exitCode": 1, "message": "Error: etcdserver: member not found"}}}]}
        }));
        let running = pod(json!({
            "metadata": {"name": "e-0"},
            "spec": {"nodeName": "node-a", "containers": [{"name": "etcd", "args": ["--advertise-client-urls=http://e-0.h:2379"]}]},
            "status": {"conditions": [{"type": "Ready", "status": "False"}],
                       "containerStatuses": [{"name": "etcd", "ready": false, "restartCount": 0, "image": "x", "imageID": "", "state": {"running": {}}}]}
        }));
        let facts = |commit, revision| {
            Some(Facts { cluster_id: Some(7), commit, term: 2, consistent_index: Some(commit), revision: Some(revision), corrupt: None })
        };
        let mut m0 = Member::of("e-0", Some(&running));
        m0.facts = facts(300, 290);
        let mut m1 = Member::of("e-1", Some(&crashing));
        m1.facts = facts(250, 240);
        let mut m2 = Member::of("e-2", None);
        m2.note = Some("no such pod".into());
        let p = plan(3, "set-uid", vec![m0.clone(), m1.clone(), m2.clone()], None).unwrap();
        let again = plan(3, "other-uid", vec![m0, m1, m2], None).unwrap();
        assert_ne!(p.choice.facts, again.choice.facts, "a set made anew under the name is another plan");
        assert_eq!((p.choice.survivor.as_str(), p.survivor_node.as_deref(), p.held_revision), ("e-0", Some("node-a"), 240));
        assert_eq!(p.survivor_client_urls, ["http://e-0.h:2379"]);
        let states: Vec<(&str, &str, i32, Option<&str>)> =
            p.members.iter().map(|m| (m.pod.as_str(), m.state.as_str(), m.restarts, m.signature.as_deref())).collect();
        assert_eq!(states, [("e-0", "Running", 0, None), ("e-1", "CrashLoopBackOff", 4, Some("MemberNotFound")), ("e-2", "Gone", 0, None)]);
        assert_eq!((p.ready, p.notes.as_slice()), (0, ["e-2: no such pod".to_string()].as_slice()));
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
