//! What a given etcd deployment needs: which start-up rules its pods follow, so which files
//! a remediation moves and how membership is repaired. Detecting it from a pod is the
//! agent's (it reads Kubernetes objects); the rules themselves are here.

use serde::{Deserialize, Serialize};

/// The start-up rules a pod follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub enum Profile {
    /// Bitnami chart < 11 (APISIX's 9.7.3): stores `member_id`; its start script re-adds the
    /// member once `member_id`, `snap` and `wal` are gone.
    #[serde(rename = "bitnami-member-id")]
    BitnamiMemberId,
    /// Bitnami chart 11+: no `member_id`; the script removes an old entry by peer URL.
    #[serde(rename = "bitnami")]
    Bitnami,
    /// etcd started with fixed flags.
    #[serde(rename = "plain")]
    Plain,
}

impl Profile {
    pub fn as_str(self) -> &'static str {
        match self {
            Profile::BitnamiMemberId => "bitnami-member-id",
            Profile::Bitnami => "bitnami",
            Profile::Plain => "plain",
        }
    }

    /// The data dir when the pod names none.
    pub fn default_data_dir(self) -> Option<&'static str> {
        match self {
            Profile::BitnamiMemberId | Profile::Bitnami => Some("/bitnami/etcd/data"),
            Profile::Plain => None,
        }
    }

    /// What a remediation moves, relative to the data dir. `member_id` and
    /// `new_member_envs` must go for Bitnami: with them the script keeps calling
    /// `member update` with the stale id (FIELD-NOTES.md). Charts 11/12 take their clean
    /// join path only on an empty data dir (a data dir without a WAL would make etcd
    /// bootstrap a new member under the old id), so their whole `member` dir moves.
    pub fn files_to_move(self) -> &'static [&'static str] {
        match self {
            Profile::BitnamiMemberId => &["member/snap", "member/wal", "member_id", "new_member_envs"],
            Profile::Bitnami => &["member", "new_member_envs"],
            Profile::Plain => &["member/snap", "member/wal"],
        }
    }
}

/// Every path any profile moves (relative to the data dir): what a journal may name.
pub const ALL_MOVED: &[&str] = &["member/snap", "member/wal", "member_id", "new_member_envs", "member"];
