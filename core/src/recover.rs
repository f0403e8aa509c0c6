//! Quorum lost: which member's data the cluster is rebuilt from, and what the others held
//! that it lacks, from each member's files read offline (see [`crate::data`]). Pure.
//!
//! The field's safe protocol (etcd's docs, vmware's etcd-recovery, OpenShift's
//! quorum-restore): the member with the highest commit index (the WAL's last `HardState`),
//! then the highest consistent index (the db's `meta` bucket), then the highest term, is the
//! one whose data holds the most of what the cluster agreed on. Data that is corrupt is never
//! chosen silently: the person is told the next best and what choosing it loses.

use serde::{Deserialize, Serialize};

use crate::data::DataFacts;
use crate::error::{Code, Error, Result};

/// What is known of one member of the set when quorum is lost.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Evidence {
    pub pod: String,
    /// What its files say, as the agent on its node read them; `None` when no WAL could be
    /// read (its volume or node is gone, or it holds no data).
    pub facts: Option<Facts>,
}

/// The facts of a member's files that the choice rests on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Facts {
    pub cluster_id: Option<u64>,
    /// The WAL's last `HardState`.
    pub commit: u64,
    pub term: u64,
    /// The db's `meta` bucket and latest revision.
    pub consistent_index: Option<u64>,
    pub revision: Option<u64>,
    /// Why etcd could not use the files (a CRC that fails, a db it cannot open).
    pub corrupt: Option<String>,
}

impl Facts {
    /// The facts of `d`; `None` without a WAL.
    pub fn of(d: &DataFacts) -> Option<Facts> {
        let w = d.wal.as_ref()?;
        Some(Facts {
            cluster_id: d.cluster_id(),
            commit: w.commit,
            term: w.term,
            consistent_index: d.db.as_ref().and_then(|db| db.consistent_index),
            revision: d.db.as_ref().and_then(|db| db.revision),
            corrupt: d.corruption(),
        })
    }
}

/// One member as the choice saw it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Candidate {
    pub pod: String,
    /// The cluster its WAL was written in (16 hex digits).
    #[serde(rename = "clusterID", default, skip_serializing_if = "Option::is_none")]
    pub cluster_id: Option<String>,
    pub commit: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistent_index: Option<u64>,
    pub term: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<u64>,
    /// Why it cannot be the survivor (no data, corrupt data), else `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unusable: Option<String>,
}

/// What a member holds that the survivor lacks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Loss {
    pub pod: String,
    /// Raft entries it committed past the survivor's commit index.
    pub entries: u64,
    /// Revisions its db holds past the survivor's (when both dbs were read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revisions: Option<u64>,
}

/// The member the cluster is rebuilt from, and why.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Choice {
    pub survivor: String,
    pub why: String,
    /// Every member, best first.
    pub ranked: Vec<Candidate>,
    /// What the others hold that the survivor lacks (empty: nothing is lost, as far as the
    /// data tells).
    pub lost: Vec<Loss>,
    /// A digest of the facts the choice was made from: an approval names it, and the plan is
    /// refused at approval when the facts read again give another.
    pub facts: String,
}

fn candidate(e: &Evidence) -> Candidate {
    let f = e.facts.as_ref();
    Candidate {
        pod: e.pod.clone(),
        cluster_id: f.and_then(|f| f.cluster_id).map(|c| format!("{c:016x}")),
        commit: f.map_or(0, |f| f.commit),
        consistent_index: f.and_then(|f| f.consistent_index),
        term: f.map_or(0, |f| f.term),
        revision: f.and_then(|f| f.revision),
        unusable: match f {
            None => Some("no data could be read (its volume, its node, or its WAL is gone)".to_string()),
            Some(f) => f.corrupt.clone(),
        },
    }
}

/// The order of the field's protocol: commit, then consistent index, then term; a tie goes
/// to the lower ordinal (the order the evidence comes in).
fn rank(c: &Candidate) -> (u64, u64, u64) {
    (c.commit, c.consistent_index.unwrap_or(0), c.term)
}

/// Chooses the survivor among `members` (in ordinal order), or the one a person `picked`.
/// `SplitBrain` when members' data was written in different clusters; `CorruptData` when
/// the member with the most data cannot be used and nobody picked (the message names the
/// next best and what choosing it loses); `NoSurvivor` when no member's data can be used.
pub fn choose(members: &[Evidence], picked: Option<&str>) -> Result<Choice> {
    let mut ranked: Vec<Candidate> = members.iter().map(candidate).collect();
    let mut clusters: Vec<&str> = ranked.iter().filter_map(|c| c.cluster_id.as_deref()).collect();
    clusters.sort_unstable();
    clusters.dedup();
    if clusters.len() > 1 {
        let by: Vec<String> = ranked.iter().filter_map(|c| c.cluster_id.as_ref().map(|id| format!("{} in {id}", c.pod))).collect();
        return Err(Error::new(
            Code::SplitBrain,
            format!(
                "the members' data was written in {} clusters ({}): a person decides which is the cluster",
                clusters.len(),
                by.join(", ")
            ),
        ));
    }
    // Stable: equal ranks keep the ordinal order.
    ranked.sort_by_key(|c| std::cmp::Reverse(rank(c)));
    let facts = digest(&ranked);
    let usable: Vec<&Candidate> = ranked.iter().filter(|c| c.unusable.is_none()).collect();
    let Some(best_usable) = usable.first() else {
        return Err(Error::new(
            Code::NoSurvivor,
            "no member has data the cluster can be rebuilt from: restore it from a backup (etcdutl snapshot restore), then let the members rejoin",
        ));
    };
    let survivor = match picked {
        Some(p) => match ranked.iter().find(|c| c.pod == p) {
            None => return Err(Error::new(Code::InvalidRequest, format!("{p} is not a member of the set"))),
            Some(c) if c.unusable.is_some() => {
                return Err(Error::new(
                    Code::CorruptData,
                    format!("{p} cannot be the survivor: {}", c.unusable.as_deref().unwrap_or_default()),
                ));
            }
            Some(c) => c,
        },
        None => {
            let best = &ranked[0];
            if best.unusable.is_some() && best.commit > best_usable.commit {
                let lose = loss(best, best_usable);
                return Err(Error::new(
                    Code::CorruptData,
                    format!(
                        "{}, the member with the most data (commit {}), cannot be used: {}; the next best is {} (commit {}): choosing it loses {}",
                        best.pod,
                        best.commit,
                        best.unusable.as_deref().unwrap_or_default(),
                        best_usable.pod,
                        best_usable.commit,
                        lose.describe()
                    ),
                ));
            }
            best_usable
        }
    };
    let lost: Vec<Loss> = ranked
        .iter()
        .filter(|c| c.pod != survivor.pod)
        .map(|c| loss(c, survivor))
        .filter(|l| l.entries > 0 || l.revisions.is_some_and(|r| r > 0))
        .collect();
    let why = match picked {
        Some(_) => format!(
            "picked by a person: commit {}, consistent index {}, term {}",
            survivor.commit,
            opt(survivor.consistent_index),
            survivor.term
        ),
        None => {
            let next = ranked.iter().find(|c| c.pod != survivor.pod);
            let against = next.map_or("the only member with data".to_string(), |n| {
                format!("against {}'s commit {}, consistent index {}, term {}", n.pod, n.commit, opt(n.consistent_index), n.term)
            });
            format!(
                "the highest commit index ({}), then consistent index ({}), then term ({}) of a member whose data is whole, {against}",
                survivor.commit,
                opt(survivor.consistent_index),
                survivor.term
            )
        }
    };
    let survivor = survivor.pod.clone();
    Ok(Choice { survivor, why, ranked, lost, facts })
}

fn loss(member: &Candidate, survivor: &Candidate) -> Loss {
    Loss {
        pod: member.pod.clone(),
        entries: member.commit.saturating_sub(survivor.commit),
        revisions: member.revision.zip(survivor.revision).map(|(m, s)| m.saturating_sub(s)),
    }
}

impl Loss {
    pub fn describe(&self) -> String {
        let revisions = self.revisions.map(|r| format!(" and {r} revisions")).unwrap_or_default();
        format!("{} committed entries{revisions} that {} holds", self.entries, self.pod)
    }
}

fn opt(v: Option<u64>) -> String {
    v.map_or("-".into(), |v| v.to_string())
}

/// The digest an approval names: the facts' digest bound to the StatefulSet's UID, so that
/// a set made anew under the same name (its PVCs, and so its facts, kept) is another plan.
pub fn bound(facts: &str, set_uid: &str) -> String {
    format!("{:016x}", fnv(format!("{facts}|{set_uid}").bytes(), 0xcbf2_9ce4_8422_2325))
}

fn fnv(bytes: impl Iterator<Item = u8>, mut h: u64) -> u64 {
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// FNV-1a over the facts that decide, in the ranked order: another reading that would
/// choose differently (or lose differently) gives another digest.
fn digest(ranked: &[Candidate]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for c in ranked {
        let line = format!(
            "{}|{}|{}|{}|{}|{}|{}\n",
            c.pod,
            c.cluster_id.as_deref().unwrap_or("-"),
            c.commit,
            opt(c.consistent_index),
            c.term,
            opt(c.revision),
            c.unusable.is_some()
        );
        h = fnv(line.bytes(), h);
    }
    format!("{h:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bolt::{DbFacts, DbVerdict};
    use crate::wal::{Verdict, WalFacts};

    fn member(pod: &str, cluster: u64, commit: u64, ci: u64, term: u64, revision: u64) -> Evidence {
        let f = Facts { cluster_id: Some(cluster), commit, term, consistent_index: Some(ci), revision: Some(revision), corrupt: None };
        Evidence { pod: pod.into(), facts: Some(f) }
    }

    fn gone(pod: &str) -> Evidence {
        Evidence { pod: pod.into(), facts: None }
    }

    fn corrupt(mut e: Evidence) -> Evidence {
        e.facts.as_mut().unwrap().corrupt = Some("the WAL is corrupt in segment 0 at byte 64: CRC".into());
        e
    }

    #[test]
    fn the_facts_are_the_files_hard_state_and_db() {
        let d = DataFacts {
            wal: Some(WalFacts {
                node_id: Some(1),
                cluster_id: Some(7),
                term: 3,
                commit: 100,
                verdict: Some(Verdict::Whole),
                ..Default::default()
            }),
            db: Some(DbFacts {
                size: 1 << 20,
                page_size: 4096,
                txid: 9,
                consistent_index: Some(99),
                term: Some(3),
                revision: Some(50),
                verdict: DbVerdict::Corrupt { why: "a branch page where a leaf was expected".into() },
            }),
        };
        let f = Facts::of(&d).unwrap();
        assert_eq!((f.cluster_id, f.commit, f.term, f.consistent_index, f.revision), (Some(7), 100, 3, Some(99), Some(50)));
        assert!(f.corrupt.is_some_and(|c| c.contains("the db is corrupt")));
        assert_eq!(Facts::of(&DataFacts { wal: None, db: d.db }), None, "no WAL: no facts");
    }

    #[test]
    fn the_highest_commit_then_consistent_index_then_term() {
        let c = choose(&[member("e-0", 7, 100, 90, 3, 50), member("e-1", 7, 120, 80, 3, 60), gone("e-2")], None).unwrap();
        assert_eq!(c.survivor, "e-1");
        assert!(c.why.contains("against e-0's commit 100"), "{}", c.why);
        assert_eq!(c.ranked.iter().map(|r| r.pod.as_str()).collect::<Vec<_>>(), ["e-1", "e-0", "e-2"]);
        assert!(c.lost.is_empty(), "the survivor holds the most: {:?}", c.lost);
        // Equal commits: the consistent index decides, then the term.
        assert_eq!(choose(&[member("e-0", 7, 100, 90, 3, 50), member("e-1", 7, 100, 95, 2, 50)], None).unwrap().survivor, "e-1");
        assert_eq!(choose(&[member("e-0", 7, 100, 95, 4, 50), member("e-1", 7, 100, 95, 3, 50)], None).unwrap().survivor, "e-0");
        // All equal: the lower ordinal.
        assert_eq!(choose(&[member("e-0", 7, 100, 95, 3, 50), member("e-1", 7, 100, 95, 3, 50)], None).unwrap().survivor, "e-0");
    }

    #[test]
    fn corrupt_data_is_never_chosen_silently() {
        let members = [corrupt(member("e-0", 7, 130, 120, 3, 70)), member("e-1", 7, 120, 110, 3, 60), gone("e-2")];
        let e = choose(&members, None).unwrap_err();
        assert_eq!(e.code, Code::CorruptData);
        assert!(
            e.message.contains("the next best is e-1 (commit 120)") && e.message.contains("loses 10 committed entries and 10 revisions"),
            "{}",
            e.message
        );
        // A person picks the next best: what it loses is in the plan.
        let c = choose(&members, Some("e-1")).unwrap();
        assert_eq!(c.survivor, "e-1");
        assert_eq!(c.lost, [Loss { pod: "e-0".into(), entries: 10, revisions: Some(10) }]);
        assert!(c.why.starts_with("picked by a person"), "{}", c.why);
        // Never the corrupt one, nor a stranger.
        assert_eq!(choose(&members, Some("e-0")).unwrap_err().code, Code::CorruptData);
        assert_eq!(choose(&members, Some("e-2")).unwrap_err().code, Code::CorruptData);
        assert_eq!(choose(&members, Some("x")).unwrap_err().code, Code::InvalidRequest);
        // A corrupt member behind the best is simply not chosen.
        let c = choose(&[member("e-0", 7, 130, 120, 3, 70), corrupt(member("e-1", 7, 120, 110, 3, 60))], None).unwrap();
        assert_eq!(c.survivor, "e-0");
    }

    #[test]
    fn survivors_of_different_ages_say_what_the_older_lacks() {
        // e-2's volume is older (restored from elsewhere, same cluster): e-0 is chosen and
        // nothing is lost; had e-0 been unusable, the plan would say what e-2 lacks.
        let members = [member("e-0", 7, 500, 480, 5, 300), gone("e-1"), member("e-2", 7, 200, 190, 4, 120)];
        let c = choose(&members, None).unwrap();
        assert_eq!((c.survivor.as_str(), c.lost.len()), ("e-0", 0));
        let c = choose(&members, Some("e-2")).unwrap();
        assert_eq!(c.lost, [Loss { pod: "e-0".into(), entries: 300, revisions: Some(180) }]);
    }

    #[test]
    fn refusals_split_brain_and_no_survivor() {
        let e = choose(&[member("e-0", 7, 100, 90, 3, 50), member("e-1", 8, 120, 80, 3, 60)], None).unwrap_err();
        assert_eq!(e.code, Code::SplitBrain);
        assert!(e.message.contains("e-0 in 0000000000000007") && e.message.contains("e-1 in 0000000000000008"), "{}", e.message);
        assert_eq!(choose(&[gone("e-0"), gone("e-1"), gone("e-2")], None).unwrap_err().code, Code::NoSurvivor);
        assert_eq!(choose(&[corrupt(member("e-0", 7, 1, 1, 1, 1)), gone("e-1")], None).unwrap_err().code, Code::NoSurvivor);
    }

    #[test]
    fn the_digest_moves_with_the_facts_that_decide() {
        let a = choose(&[member("e-0", 7, 100, 90, 3, 50), gone("e-1")], None).unwrap();
        let same = choose(&[member("e-0", 7, 100, 90, 3, 50), gone("e-1")], None).unwrap();
        let moved = choose(&[member("e-0", 7, 101, 90, 3, 51), gone("e-1")], None).unwrap();
        assert_eq!(a.facts, same.facts);
        assert_ne!(a.facts, moved.facts);
    }
}

/// How far past every revision the members' dbs held the rebuilt cluster starts (etcd's
/// docs: `etcdutl snapshot restore --bump-revision 1000000000 --mark-compacted`): past what
/// any member wrote, read or not, so that watchers and caches see time move forward.
pub const BUMP: u64 = 1_000_000_000;

/// The revision the rebuilt cluster starts at: `bump` past the highest of the survivor's
/// `current` revision and every revision a member's db was read to hold.
pub fn bumped_revision(current: u64, held: impl IntoIterator<Item = u64>, bump: u64) -> u64 {
    held.into_iter().fold(current, u64::max).saturating_add(bump)
}

/// A revision as etcd keys it in its db (mvcc's `RevToBytes`): the main revision
/// big-endian, `_`, the sub revision big-endian. Its compaction marks in bucket `meta`
/// (`scheduledCompactRev`, `finishedCompactRev`) hold one.
pub fn revision_bytes(main: u64, sub: u64) -> [u8; 17] {
    let mut b = [0u8; 17];
    b[..8].copy_from_slice(&main.to_be_bytes());
    b[8] = b'_';
    b[9..].copy_from_slice(&sub.to_be_bytes());
    b
}

/// The db's compaction marks, each rewritten from the compacted revision to the bumped one
/// when a cluster is rebuilt: etcd starts at its finished compaction's revision when that is
/// past its last key's.
pub const COMPACTION_MARKS: [&str; 2] = ["scheduledCompactRev", "finishedCompactRev"];

#[cfg(test)]
mod bump_tests {
    use super::*;

    #[test]
    fn the_rebuilt_revision_is_past_every_revision_held() {
        assert_eq!(bumped_revision(120, [90, 300, 7], BUMP), 300 + BUMP);
        assert_eq!(bumped_revision(120, [], 10), 130);
        assert_eq!(bumped_revision(u64::MAX - 1, [], BUMP), u64::MAX, "never wraps");
    }

    #[test]
    fn a_revision_is_keyed_as_etcd_keys_it() {
        let b = revision_bytes(0x0102, 3);
        assert_eq!(&b[..8], &[0, 0, 0, 0, 0, 0, 1, 2]);
        assert_eq!(b[8], b'_');
        assert_eq!(&b[9..], &[0, 0, 0, 0, 0, 0, 0, 3]);
    }
}
