//! What a member's files say (its WAL and db, read offline: see [`crate::wal`] and
//! [`crate::bolt`]) judged against the live cluster, before anything moves: data written
//! for another cluster is a split brain, data that is another listed member's is not this
//! pod's to move. Pure.

use serde::{Deserialize, Serialize};

use crate::bolt::{DbFacts, DbVerdict};
use crate::error::{Code, Error, Result};
use crate::signature::{Diagnosis, Signature, Source, decide};
use crate::wal::{Verdict, WalFacts};

/// What the member's files say; `None` for a file that is not there.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DataFacts {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wal: Option<WalFacts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub db: Option<DbFacts>,
}

impl DataFacts {
    /// One line for the plan's message and the log.
    pub fn summary(&self) -> String {
        let wal = match &self.wal {
            Some(w) => format!(
                "WAL of member {} in cluster {}, term {}, commit {}, entries to {} ({})",
                w.node_id.map_or("?".into(), |n| format!("{n:x}")),
                w.cluster_id.map_or("?".into(), |c| format!("{c:016x}")),
                w.term,
                w.commit,
                w.last_index.map_or("-".into(), |i| i.to_string()),
                verdict(&w.verdict)
            ),
            None => "no WAL".into(),
        };
        let db = match &self.db {
            Some(d) => format!(
                "db of {} bytes at revision {}, consistent index {} ({})",
                d.size,
                d.revision.map_or("-".into(), |r| r.to_string()),
                d.consistent_index.map_or("-".into(), |i| i.to_string()),
                db_verdict(&d.verdict)
            ),
            None => "no db".into(),
        };
        format!("{wal}; {db}")
    }

    /// What etcd would fail on in these files (a record whose CRC does not match, a db it
    /// cannot open): the reason, else `None`. A torn last record is not damage: etcd
    /// repairs it at start.
    pub fn corruption(&self) -> Option<String> {
        let wal = self.wal.as_ref().and_then(|w| match &w.verdict {
            Some(Verdict::Corrupt { segment, offset, why }) => {
                Some(format!("the WAL is corrupt in segment {segment} at byte {offset}: {why}"))
            }
            _ => None,
        });
        let db = self.db.as_ref().and_then(|d| match &d.verdict {
            DbVerdict::Corrupt { why } => Some(format!("the db is corrupt: {why}")),
            DbVerdict::Sane => None,
        });
        match (wal, db) {
            (Some(w), Some(d)) => Some(format!("{w}; {d}")),
            (w, d) => w.or(d),
        }
    }

    /// Rows for a person, beside the plan's.
    pub fn render_table(&self) -> String {
        let mut s = String::new();
        let mut row = |k: &str, v: String| s.push_str(&format!("{k:<14} {v}\n"));
        let hex = |id: Option<u64>| id.map_or("-".into(), |i| format!("{i:x}"));
        match &self.wal {
            Some(w) => {
                let cluster = w.cluster_id.map_or("-".into(), |c| format!("{c:016x}"));
                row("WAL", format!("member {} of cluster {cluster}", hex(w.node_id)));
                row("  hard state", format!("term {}, vote {:x}, commit {}", w.term, w.vote, w.commit));
                let range = match (w.first_index, w.last_index) {
                    (Some(a), Some(b)) => format!("{a}..={b} (last term {})", w.last_entry_term),
                    _ => "none".into(),
                };
                row("  entries", format!("{range}, {} records read", w.records));
                row("  snapshot", format!("index {}, term {}", w.snapshot_index, w.snapshot_term));
                row("  verdict", verdict(&w.verdict));
            }
            None => row("WAL", "none".into()),
        }
        match &self.db {
            Some(d) => {
                let opt = |v: Option<u64>| v.map_or("-".into(), |v| v.to_string());
                row("db", format!("{} bytes, page size {}, txid {}", d.size, d.page_size, d.txid));
                row("  revision", opt(d.revision));
                row("  consistent", format!("index {}, term {}", opt(d.consistent_index), opt(d.term)));
                row("  verdict", db_verdict(&d.verdict));
            }
            None => row("db", "none".into()),
        }
        s
    }

    /// The cluster the WAL was written in, when it names one.
    pub fn cluster_id(&self) -> Option<u64> {
        self.wal.as_ref().and_then(|w| w.cluster_id).filter(|c| *c != 0)
    }
}

fn verdict(v: &Option<Verdict>) -> String {
    match v {
        Some(Verdict::Whole) | None => "whole".to_string(),
        Some(Verdict::TornTail { segment, offset }) => format!("torn tail in segment {segment} at {offset} (etcd repairs it)"),
        Some(Verdict::Corrupt { segment, offset, why }) => format!("corrupt in segment {segment} at {offset}: {why}"),
        Some(Verdict::TooLong { records }) => format!("over {records} records, not all read"),
    }
}

fn db_verdict(v: &DbVerdict) -> String {
    match v {
        DbVerdict::Sane => "sane".to_string(),
        DbVerdict::Corrupt { why } => format!("corrupt: {why}"),
    }
}

/// The diagnosis once the files have spoken, before the cluster is asked: lines that said
/// nothing known (a goroutine dump that pushed etcd's own lines out, a rotated log) while
/// the WAL's or the db's checksums fail are `CorruptData`, from the data.
pub fn reconsider(d: Diagnosis, f: &DataFacts) -> Diagnosis {
    match (d.signature, f.corruption()) {
        (Signature::Unknown, Some(why)) => {
            let (action, code, what) = decide(Signature::CorruptData, d.generation);
            Diagnosis {
                signature: Signature::CorruptData,
                action,
                code,
                why: format!("the log says nothing known, the member's files do: {what}"),
                evidence: vec![why],
                source: Source::Data,
                ..d
            }
        }
        _ => d,
    }
}

/// Whether `cluster ID mismatch` lines wait for the live cluster's id to be answered by the
/// data ([`answer_split`]) rather than refused at once: only when the WAL names a cluster.
pub fn split_question(d: &Diagnosis, f: &DataFacts) -> bool {
    d.signature == Signature::ClusterIdMismatch && f.cluster_id().is_some()
}

/// The data's answer to `cluster ID mismatch` lines, once the live cluster `live` is known:
/// a WAL written in another cluster is a split brain (both ids told); a WAL of the live
/// cluster means the lines were not about this member's data (anyone reaching its peer
/// port can make it print them), and what the rest of the lines say is the diagnosis.
/// With no WAL to ask, the lines are taken at their word.
pub fn answer_split(d: Diagnosis, f: &DataFacts, live: u64) -> Result<Diagnosis> {
    if d.signature != Signature::ClusterIdMismatch {
        return Ok(d);
    }
    match f.cluster_id() {
        Some(c) if c == live => {
            let mut rest = match d.unless_split {
                Some(rest) => *rest,
                // Not kept (a journal read back): nothing else known.
                None => {
                    let (action, code, why) = decide(Signature::Unknown, d.generation);
                    Diagnosis { signature: Signature::Unknown, action, code, why, unless_split: None, ..d }
                }
            };
            rest.why = format!(
                "`cluster ID mismatch` was printed, but the member's WAL is the live cluster's ({live:016x}): the lines were not about its data; {}",
                rest.why
            );
            Ok(rest)
        }
        Some(c) => Err(split_brain(c, live)),
        None => Err(Error::new(Code::SplitBrain, format!("{}; the member has no WAL that could say otherwise", d.why))),
    }
}

fn split_brain(on_disk: u64, live: u64) -> Error {
    Error::new(
        Code::SplitBrain,
        format!(
            "the member's WAL was written in cluster {on_disk:016x}, but the cluster of its StatefulSet's pods is {live:016x}: the data is another cluster's (a split brain, or a volume restored from elsewhere); a person decides which data is right"
        ),
    )
}

/// May the files be moved as the stale member's of the live cluster `live`, whose members
/// are `listed`, the pod's own (stale) entry being `stale`? `SplitBrain` when the WAL was
/// written for another cluster; `NotThisMember` when it is another listed member's.
pub fn judge(f: &DataFacts, live: u64, listed: &[u64], stale: Option<u64>) -> Result<()> {
    let Some(w) = &f.wal else { return Ok(()) };
    if let Some(c) = f.cluster_id().filter(|c| *c != live) {
        return Err(split_brain(c, live));
    }
    if let Some(n) = w.node_id.filter(|n| *n != 0 && listed.contains(n) && Some(*n) != stale) {
        return Err(Error::new(
            Code::NotThisMember,
            format!(
                "the data on the volume is member {n:x}'s, a member the cluster lists that is not this pod's: it is not this pod's to move, and moving it would not heal the pod"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wal(node: u64, cluster: u64) -> DataFacts {
        DataFacts { wal: Some(WalFacts { node_id: Some(node), cluster_id: Some(cluster), ..Default::default() }), db: None }
    }

    #[test]
    fn the_data_says_whose_it_is() {
        let (live, listed) = (0xc1, [0xa, 0xb]);
        // The stale member's own data: its id no longer listed (Bitnami's preStop removed it),
        // or listed as the pod's stale entry.
        judge(&wal(0xd, live), live, &listed, None).unwrap();
        judge(&wal(0xb, live), live, &listed, Some(0xb)).unwrap();
        // Another listed member's data on this pod's volume.
        assert_eq!(judge(&wal(0xa, live), live, &listed, Some(0xb)).unwrap_err().code, Code::NotThisMember);
        assert_eq!(judge(&wal(0xa, live), live, &listed, None).unwrap_err().code, Code::NotThisMember);
        // Another cluster's data, whoever's.
        assert_eq!(judge(&wal(0xd, 0xc2), live, &listed, None).unwrap_err().code, Code::SplitBrain);
        // No WAL, or one that names nobody: nothing to judge.
        judge(&DataFacts::default(), live, &listed, None).unwrap();
        judge(&wal(0, 0), live, &listed, None).unwrap();
    }

    fn diagnosed(lines: &[&str]) -> Diagnosis {
        crate::signature::diagnose(lines, Source::ContainerLog, None)
    }

    fn corrupt_wal() -> DataFacts {
        let mut f = wal(0xd, 0xc1);
        f.wal.as_mut().unwrap().verdict = Some(Verdict::Corrupt { segment: 1, offset: 4096, why: "crc mismatch".into() });
        f
    }

    #[test]
    fn checksums_that_fail_are_corrupt_data_when_the_log_says_nothing() {
        let dump = ["fatal error: concurrent map writes", "goroutine 1 [running]:", "main.main()"];
        let d = reconsider(diagnosed(&dump), &corrupt_wal());
        assert_eq!((d.signature, d.action, d.source), (Signature::CorruptData, crate::signature::Action::Replace, Source::Data));
        assert!(d.evidence[0].contains("segment 1 at byte 4096"), "{:?}", d.evidence);
        // A whole WAL, or a torn last record (etcd repairs it), leaves the log's verdict.
        assert_eq!(reconsider(diagnosed(&dump), &wal(0xd, 0xc1)).signature, Signature::Unknown);
        let mut torn = wal(0xd, 0xc1);
        torn.wal.as_mut().unwrap().verdict = Some(Verdict::TornTail { segment: 1, offset: 9 });
        assert_eq!(reconsider(diagnosed(&dump), &torn).signature, Signature::Unknown);
        // A db etcd cannot open.
        let db = DataFacts {
            wal: None,
            db: Some(DbFacts {
                size: 4096,
                page_size: 4096,
                txid: 0,
                consistent_index: None,
                term: None,
                revision: None,
                verdict: DbVerdict::Corrupt { why: "no valid meta page".into() },
            }),
        };
        assert_eq!(reconsider(diagnosed(&dump), &db).signature, Signature::CorruptData);
        // What the log knows stays what it knows.
        assert_eq!(reconsider(diagnosed(&["Error: etcdserver: member not found"]), &corrupt_wal()).signature, Signature::MemberNotFound);
    }

    #[test]
    fn cluster_id_mismatch_lines_raise_the_question_and_the_wal_answers_it() {
        let live = 0xc1;
        let lines = [
            r#"{"level":"warn","msg":"failed to process raft message","error":"request cluster ID mismatch"}"#,
            "Error: etcdserver: member not found",
        ];
        let d = diagnosed(&lines);
        assert_eq!(d.signature, Signature::ClusterIdMismatch);
        // The WAL is the live cluster's: the lines were not about its data.
        assert!(split_question(&d, &wal(0xd, live)));
        let answered = answer_split(d.clone(), &wal(0xd, live), live).unwrap();
        assert_eq!((answered.signature, answered.action), (Signature::MemberNotFound, crate::signature::Action::Heal));
        assert!(answered.why.contains("not about its data"), "{}", answered.why);
        // Another cluster's WAL: a split brain, both ids told.
        let e = answer_split(d.clone(), &wal(0xd, 0xc2), live).unwrap_err();
        assert_eq!(e.code, Code::SplitBrain);
        assert!(e.message.contains("00000000000000c2") && e.message.contains("00000000000000c1"), "{}", e.message);
        // No WAL to ask: the lines are taken at their word, at once.
        assert!(!split_question(&d, &DataFacts::default()));
        assert_eq!(answer_split(d.clone(), &DataFacts::default(), live).unwrap_err().code, Code::SplitBrain);
        // Only the mismatch in the lines: the rest says nothing known.
        let only = diagnosed(&lines[..1]);
        assert_eq!(answer_split(only, &wal(0xd, live), live).unwrap().signature, Signature::Unknown);
        // Kept diagnoses (a journal read back) have no alternative: nothing else known.
        let kept: Diagnosis = serde_json::from_value(serde_json::to_value(&d).unwrap()).unwrap();
        assert_eq!(answer_split(kept, &wal(0xd, live), live).unwrap().signature, Signature::Unknown);
        // Other signatures are not questioned.
        let other = diagnosed(&lines[1..]);
        assert_eq!(answer_split(other.clone(), &wal(0xd, 0xc2), live).unwrap(), other);
    }
}
