//! The one error type of etcd-medic. Every refusal and failure has a stable `code` that
//! controllers match on, an HTTP status, and a message that says what to do next. The CLI
//! and the HTTP API both render it from here.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Stable error codes of the contract (DESIGN.md). Never rename one: controllers match on them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
pub enum Code {
    InvalidRequest,
    Unauthenticated,
    Forbidden,
    PodNotFound,
    PVCNotFound,
    PVNotFound,
    PodUIDMismatch,
    ClusterLocked,
    PayloadTooLarge,
    WrongNode,
    PodHealthy,
    PodRunning,
    QuorumAtRisk,
    SoleMember,
    DataDirNotFound,
    NotEtcdData,
    UnsafePath,
    NotAMount,
    InsufficientSpace,
    UnsupportedProfile,
    /// Peers disagree on the cluster's id: a split brain; a person decides, never forced.
    SplitBrain,
    /// The crash matches no known signature: nothing is done unless forced.
    UnknownFailure,
    /// The image heals this failure itself on its next start: the agent stands down.
    SelfHealing,
    /// The etcd cluster that answered lists a member that is not a pod of the failing pod's
    /// StatefulSet: it is not provably this set's cluster, and nothing of it is told back.
    ForeignMember,
    /// The member data on the volume is another member's, one the cluster lists: not this
    /// pod's to move, and moving it would not heal the pod.
    NotThisMember,
    /// Quorum lost: the member with the most data cannot be used (its WAL or db is corrupt);
    /// the message names the next best and what choosing it loses.
    CorruptData,
    /// Quorum lost and no member has data the cluster can be rebuilt from: restore a backup.
    NoSurvivor,
    /// Quorum lost: a process still uses a member's data of the cluster being rebuilt (an old
    /// member alive, which `--force-new-cluster` must never meet); fence it first.
    NotFenced,
    /// Quorum lost: the approval names facts other than those the members' data gives now
    /// (a member came back, wrote, or lost its volume since the plan was shown); the new plan
    /// is shown and must be approved again.
    PlanChanged,
    TooManyRequests,
    NotReady,
    /// No remediation with that id on this node.
    RemediationNotFound,
    /// No such path in the API.
    NotFound,
    MethodNotAllowed,
    /// A bug in the agent; the request did nothing. Please report it.
    Internal,
}

impl Code {
    pub const ALL: [Code; 35] = [
        Code::InvalidRequest,
        Code::Unauthenticated,
        Code::Forbidden,
        Code::PodNotFound,
        Code::PVCNotFound,
        Code::PVNotFound,
        Code::PodUIDMismatch,
        Code::ClusterLocked,
        Code::PayloadTooLarge,
        Code::WrongNode,
        Code::PodHealthy,
        Code::PodRunning,
        Code::QuorumAtRisk,
        Code::SoleMember,
        Code::DataDirNotFound,
        Code::NotEtcdData,
        Code::UnsafePath,
        Code::NotAMount,
        Code::InsufficientSpace,
        Code::UnsupportedProfile,
        Code::SplitBrain,
        Code::UnknownFailure,
        Code::SelfHealing,
        Code::ForeignMember,
        Code::NotThisMember,
        Code::CorruptData,
        Code::NoSurvivor,
        Code::NotFenced,
        Code::PlanChanged,
        Code::TooManyRequests,
        Code::NotReady,
        Code::RemediationNotFound,
        Code::NotFound,
        Code::MethodNotAllowed,
        Code::Internal,
    ];

    /// The HTTP status the API answers with.
    pub fn http_status(self) -> u16 {
        use Code::*;
        match self {
            InvalidRequest => 400,
            Unauthenticated => 401,
            Forbidden => 403,
            PodNotFound | PVCNotFound | PVNotFound | RemediationNotFound | NotFound => 404,
            MethodNotAllowed => 405,
            PodUIDMismatch | ClusterLocked | PlanChanged => 409,
            PayloadTooLarge => 413,
            WrongNode => 421,
            PodHealthy | PodRunning | QuorumAtRisk | SoleMember | DataDirNotFound | NotEtcdData | UnsafePath | NotAMount
            | InsufficientSpace | UnsupportedProfile | SplitBrain | UnknownFailure | SelfHealing | ForeignMember | NotThisMember
            | CorruptData | NoSurvivor | NotFenced => 422,
            TooManyRequests => 429,
            NotReady => 503,
            Internal => 500,
        }
    }

    pub fn as_str(self) -> &'static str {
        use Code::*;
        match self {
            InvalidRequest => "InvalidRequest",
            Unauthenticated => "Unauthenticated",
            Forbidden => "Forbidden",
            PodNotFound => "PodNotFound",
            PVCNotFound => "PVCNotFound",
            PVNotFound => "PVNotFound",
            PodUIDMismatch => "PodUIDMismatch",
            ClusterLocked => "ClusterLocked",
            PayloadTooLarge => "PayloadTooLarge",
            WrongNode => "WrongNode",
            PodHealthy => "PodHealthy",
            PodRunning => "PodRunning",
            QuorumAtRisk => "QuorumAtRisk",
            SoleMember => "SoleMember",
            DataDirNotFound => "DataDirNotFound",
            NotEtcdData => "NotEtcdData",
            UnsafePath => "UnsafePath",
            NotAMount => "NotAMount",
            InsufficientSpace => "InsufficientSpace",
            UnsupportedProfile => "UnsupportedProfile",
            SplitBrain => "SplitBrain",
            UnknownFailure => "UnknownFailure",
            SelfHealing => "SelfHealing",
            ForeignMember => "ForeignMember",
            NotThisMember => "NotThisMember",
            CorruptData => "CorruptData",
            NoSurvivor => "NoSurvivor",
            NotFenced => "NotFenced",
            PlanChanged => "PlanChanged",
            TooManyRequests => "TooManyRequests",
            NotReady => "NotReady",
            RemediationNotFound => "RemediationNotFound",
            NotFound => "NotFound",
            MethodNotAllowed => "MethodNotAllowed",
            Internal => "Internal",
        }
    }

    /// A short human title for problem+json.
    pub fn title(self) -> &'static str {
        use Code::*;
        match self {
            InvalidRequest => "The request is not valid",
            Unauthenticated => "No valid bearer token",
            Forbidden => "The caller may not do this",
            PodNotFound => "The pod does not exist",
            PVCNotFound => "The pod's PersistentVolumeClaim does not exist",
            PVNotFound => "The claim's PersistentVolume does not exist",
            PodUIDMismatch => "The pod has another UID than requested",
            ClusterLocked => "Another remediation holds this etcd cluster",
            PayloadTooLarge => "The request body is too large",
            WrongNode => "The pod runs on another node",
            PodHealthy => "The pod is not failing",
            PodRunning => "etcd still runs on this data dir",
            QuorumAtRisk => "The cluster would lose quorum",
            SoleMember => "The member is the cluster's only member",
            DataDirNotFound => "The etcd data dir was not found",
            NotEtcdData => "The directory does not hold etcd member data",
            UnsafePath => "The path is not safe to act on",
            NotAMount => "The volume path is not a mount",
            InsufficientSpace => "Not enough free space",
            UnsupportedProfile => "This etcd deployment cannot be healed this way",
            SplitBrain => "The member's peers disagree on the cluster's id",
            UnknownFailure => "The crash matches no known failure",
            SelfHealing => "The image heals this failure itself",
            ForeignMember => "The etcd cluster that answered is not the StatefulSet's",
            NotThisMember => "The data on the volume is another member's",
            CorruptData => "The member with the most data is corrupt",
            NoSurvivor => "No member has data to rebuild the cluster from",
            NotFenced => "A member of the cluster being rebuilt still runs",
            PlanChanged => "The members' data changed since the plan was shown",
            TooManyRequests => "Too many requests",
            NotReady => "The agent is not ready",
            RemediationNotFound => "No such remediation on this node",
            NotFound => "No such path",
            MethodNotAllowed => "The path does not take this method",
            Internal => "Internal error in the agent",
        }
    }
}

impl std::fmt::Display for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refusal or failure: its code and a message that says what was seen and what to do.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{code}: {message}")]
pub struct Error {
    pub code: Code,
    pub message: String,
    /// What failed underneath (an I/O or client error), kept for logs; two errors are equal
    /// by code and message alone.
    #[source]
    source: Option<Arc<dyn std::error::Error + Send + Sync>>,
}

impl PartialEq for Error {
    fn eq(&self, other: &Self) -> bool {
        self.code == other.code && self.message == other.message
    }
}

impl Eq for Error {}

impl Error {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Error { code, message: message.into(), source: None }
    }

    /// Keeps `source` as the cause (its text is usually in `message` already).
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Arc::new(source));
        self
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Error::new(Code::InvalidRequest, message)
    }

    /// Says how often the failing call was tried, when more than once.
    pub fn with_tries(mut self, tries: u32) -> Self {
        if tries > 1 {
            self.message.push_str(&format!(" (tried {tries} times)"));
        }
        self
    }

    /// The RFC 9457 problem document the API answers with.
    pub fn problem(&self) -> Problem {
        Problem {
            r#type: format!("https://etcd-medic.io/errors/{}", self.code),
            title: self.code.title().to_string(),
            status: self.code.http_status(),
            detail: self.message.clone(),
            code: self.code,
            id: None,
        }
    }

    /// Process exit status for the CLI: distinct per class so scripts can branch.
    pub fn exit_code(&self) -> u8 {
        match self.code.http_status() {
            400 | 413 => 2,
            401 | 403 => 3,
            404 => 4,
            409 | 429 | 500 | 503 => 5,
            _ => 6,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// `application/problem+json` body (RFC 9457), with the contract's `code`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Problem {
    pub r#type: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    pub code: Code,
    /// The remediation this refusal was recorded as (a refused dry run), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn every_code_is_unique_and_serializes_as_its_name() {
        let names: HashSet<&str> = Code::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(names.len(), Code::ALL.len());
        for c in Code::ALL {
            assert_eq!(serde_json::to_value(c).unwrap(), serde_json::json!(c.as_str()));
        }
    }

    #[test]
    fn statuses_follow_the_contract() {
        let by_status = |s: u16| Code::ALL.iter().filter(|c| c.http_status() == s).map(|c| c.as_str()).collect::<Vec<_>>();
        assert_eq!(by_status(404), ["PodNotFound", "PVCNotFound", "PVNotFound", "RemediationNotFound", "NotFound"]);
        assert_eq!(by_status(409), ["PodUIDMismatch", "ClusterLocked", "PlanChanged"]);
        assert_eq!(by_status(421), ["WrongNode"]);
        assert_eq!(by_status(422).len(), 18);
        assert_eq!(Code::PayloadTooLarge.http_status(), 413);
        assert_eq!(Code::TooManyRequests.http_status(), 429);
        assert_eq!(Code::NotReady.http_status(), 503);
    }

    #[test]
    fn problem_carries_code_status_and_detail() {
        let e = Error::new(Code::WrongNode, "pod apisix/apisix-etcd-1 runs on node-b");
        let p = serde_json::to_value(e.problem()).unwrap();
        assert_eq!(p["status"], 421);
        assert_eq!(p["code"], "WrongNode");
        assert_eq!(p["detail"], "pod apisix/apisix-etcd-1 runs on node-b");
        assert_eq!(p["type"], "https://etcd-medic.io/errors/WrongNode");
        assert_eq!(e.to_string(), "WrongNode: pod apisix/apisix-etcd-1 runs on node-b");
    }
}
