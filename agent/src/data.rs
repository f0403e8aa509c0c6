//! A member's WAL and db, read from the volume through its proven descriptors (regular files
//! only, never a link, a FIFO or a device) as streams: what `etcd_medic_core::data` judges.
//! The db is read at its meta pages and the pages down to the `meta` and `key` buckets' last
//! entries only, whatever its size.

use std::path::Path;

use crate::error::Result;
use crate::host::volume::{Kind, Volume};
use etcd_medic_core::data::DataFacts;
use etcd_medic_core::{bolt, wal};

/// The newest WAL segments read (etcd keeps 5 by default; each starts with the member's ids
/// and the CRC carried from the one before).
const SEGMENTS_READ: usize = 8;
/// A WAL segment is 64 MiB; a larger file is not one.
const SEGMENT_CAP: u64 = 256 << 20;
/// etcd's backend quota is at most 8 GiB by default; a larger file is not read.
const DB_CAP: u64 = 64 << 30;

/// How much of the WAL is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Depth {
    /// The heads of the older segments (whose they are, checked by their CRCs) and the
    /// newest segment whole: what a start of etcd meets first, in milliseconds whatever the
    /// WAL's size. What the check reads.
    Heads,
    /// The newest segments whole, every record's CRC chained across them (`inspect --full`).
    Full,
}

/// What the member's files under `data` say, the WAL read to `depth`.
pub fn facts(vol: &Volume, data: &Path, depth: Depth) -> Result<DataFacts> {
    let dir = data.join("member/wal");
    let wal = match vol.entry(&dir)? {
        Some(e) if e.kind == Kind::Dir => {
            let mut names: Vec<String> = vol
                .list(&dir, 100_000)?
                .into_iter()
                .filter(|(_, k)| *k == Kind::File)
                .filter_map(|(n, _)| n.into_string().ok())
                .filter(|n| segment_name(n))
                .collect();
            names.sort();
            let newest = &names[names.len().saturating_sub(SEGMENTS_READ)..];
            let mut reader = wal::Reader::default();
            for (i, n) in newest.iter().enumerate() {
                let Some((file, len)) = vol.open_file(&dir.join(n), SEGMENT_CAP)? else { continue };
                let last = i + 1 == newest.len();
                let read = if last || depth == Depth::Full {
                    reader.segment(std::io::BufReader::with_capacity(256 * 1024, file), len, last)
                } else {
                    // A head is a few records: small reads.
                    reader.head(std::io::BufReader::with_capacity(8 * 1024, file), len)
                };
                if !read {
                    break;
                }
            }
            (!newest.is_empty()).then(|| reader.finish())
        }
        _ => None,
    };
    let db = match vol.open_file(&data.join("member/snap/db"), DB_CAP)? {
        Some((file, size)) => {
            use std::os::unix::fs::FileExt;
            Some(bolt::read(size, &mut |off, len| {
                let mut buf = vec![0u8; len];
                file.read_exact_at(&mut buf, off).ok().map(|_| buf)
            }))
        }
        None => None,
    };
    Ok(DataFacts { wal, db })
}

/// `%016x-%016x.wal`, as etcd names its segments.
fn segment_name(n: &str) -> bool {
    let b = n.as_bytes();
    b.len() == 37 && n.ends_with(".wal") && b[16] == b'-' && b[..16].iter().chain(&b[17..33]).all(u8::is_ascii_hexdigit)
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_etcds_segment_names_are_read() {
        assert!(super::segment_name("0000000000000000-0000000000000000.wal"));
        assert!(super::segment_name("000000000000000a-00000000000f4240.wal"));
        for bad in ["0.wal", "0000000000000000-0000000000000000.wal.tmp", "0.tmp", "000000000000000g-0000000000000000.wal", "../x.wal"] {
            assert!(!super::segment_name(bad), "{bad}");
        }
    }
}
