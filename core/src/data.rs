//! What a member's files say (its WAL and db, read offline: see [`crate::wal`] and
//! [`crate::bolt`]) judged against the live cluster, before anything moves: data written
//! for another cluster is a split brain, data that is another listed member's is not this
//! pod's to move. Pure.

use serde::{Deserialize, Serialize};

use crate::bolt::DbFacts;
use crate::error::{Code, Error, Result};
use crate::wal::{Verdict, WalFacts};

/// What the member's files say; `None` for a file that is not there.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DataFacts {
    pub wal: Option<WalFacts>,
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
                match &w.verdict {
                    Some(Verdict::Whole) | None => "whole".to_string(),
                    Some(Verdict::TornTail { .. }) => "torn tail".to_string(),
                    Some(Verdict::Corrupt { segment, offset, why }) => format!("corrupt in segment {segment} at {offset}: {why}"),
                    Some(Verdict::TooLong { records }) => format!("over {records} records, not all read"),
                }
            ),
            None => "no WAL".into(),
        };
        let db = match &self.db {
            Some(d) => format!(
                "db of {} bytes at revision {}, consistent index {} ({})",
                d.size,
                d.revision.map_or("-".into(), |r| r.to_string()),
                d.consistent_index.map_or("-".into(), |i| i.to_string()),
                match &d.verdict {
                    crate::bolt::DbVerdict::Sane => "sane".to_string(),
                    crate::bolt::DbVerdict::Corrupt { why } => format!("corrupt: {why}"),
                }
            ),
            None => "no db".into(),
        };
        format!("{wal}; {db}")
    }
}

/// May the files be moved as the stale member's of the live cluster `live`, whose members
/// are `listed`, the pod's own (stale) entry being `stale`? `SplitBrain` when the WAL was
/// written for another cluster; `NotThisMember` when it is another listed member's.
pub fn judge(f: &DataFacts, live: u64, listed: &[u64], stale: Option<u64>) -> Result<()> {
    let Some(w) = &f.wal else { return Ok(()) };
    if let Some(c) = w.cluster_id.filter(|c| *c != 0 && *c != live) {
        return Err(Error::new(
            Code::SplitBrain,
            format!(
                "the member's WAL was written in cluster {c:016x}, but the cluster of its StatefulSet's pods is {live:016x}: the data is another cluster's (a split brain, or a volume restored from elsewhere); a person decides which data is right"
            ),
        ));
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
}
