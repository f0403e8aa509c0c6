//! What a member's WAL says, read offline from its bytes: who wrote it (node id, cluster
//! id), how far it got (last term, vote, commit, the index range of its entries, the last
//! snapshot it recorded) and whether its bytes are whole (a CRC verdict). etcd's format
//! (`server/storage/wal`): each record is an 8-byte little-endian length whose top byte
//! carries the padding to 8 bytes, then a `walpb.Record{type, crc, data}`; the CRC is
//! CRC-32C rolled over every record's data since the first segment, a `Crc` record carrying
//! it from one segment to the next. Pure: the caller hands the segments' bytes in order.
//! Hostile bytes are expected (a tenant writes the volume): every length is bounded by what
//! is left, nothing allocates more than the input, and nothing panics.

use serde::{Deserialize, Serialize};

/// Record types of `walpb.Record`.
const METADATA: u64 = 1;
const ENTRY: u64 = 2;
const STATE: u64 = 3;
const CRC: u64 = 4;
const SNAPSHOT: u64 = 5;

/// The most records one read decodes (a 64 MB segment of the smallest records is ~4 M):
/// beyond, the rest is not looked at and the verdict says so.
pub const MAX_RECORDS: usize = 8 << 20;

/// Whether the WAL's bytes are whole.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "verdict", rename_all = "camelCase", rename_all_fields = "camelCase")]
pub enum Verdict {
    /// Every record decodes and its CRC matches.
    Whole,
    /// The last record was cut short by a crash mid-write (what etcd repairs at start):
    /// everything before it is whole.
    TornTail { segment: usize, offset: u64 },
    /// A record that does not decode or whose CRC does not match, with records (or non-zero
    /// bytes) after it: the data is damaged.
    Corrupt { segment: usize, offset: u64, why: String },
    /// More records than this reader looks at ([`MAX_RECORDS`]).
    TooLong { records: usize },
}

/// What a member's WAL says.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WalFacts {
    /// The member's id in hex as etcd prints it, the cluster's as the plan's `clusterID`.
    #[serde(default, with = "hex_id", skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub node_id: Option<u64>,
    #[serde(rename = "clusterID", default, with = "hex_cluster", skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub cluster_id: Option<u64>,
    /// The last `HardState`.
    pub term: u64,
    pub vote: u64,
    pub commit: u64,
    /// The first and last index of the entries read.
    pub first_index: Option<u64>,
    pub last_index: Option<u64>,
    /// The last term of an entry.
    pub last_entry_term: u64,
    /// The last snapshot the WAL recorded (index, term).
    pub snapshot_index: u64,
    pub snapshot_term: u64,
    pub records: usize,
    pub verdict: Option<Verdict>,
}

/// An etcd id as etcd prints it (`%x`): a number past 2^53 does not survive JSON readers.
mod hex_id {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(id: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
        match id {
            Some(id) => s.serialize_str(&format!("{id:x}")),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|t| u64::from_str_radix(&t, 16).map_err(|e| serde::de::Error::custom(format!("not a hex id: {e}"))))
            .transpose()
    }
}

/// A cluster id as the plan's `clusterID` shows it: 16 hex digits.
mod hex_cluster {
    pub use super::hex_id::deserialize;
    use serde::Serializer;

    pub fn serialize<S: Serializer>(id: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
        match id {
            Some(id) => s.serialize_str(&format!("{id:016x}")),
            None => s.serialize_none(),
        }
    }
}

/// The largest record read (etcd's requests are at most a few MiB; a segment is 64 MiB):
/// a larger length is damage, never an allocation.
pub const MAX_RECORD: u64 = 64 << 20;

/// Reads the segments (their bytes, in name order) of one WAL.
pub fn read(segments: &[&[u8]]) -> WalFacts {
    let mut r = Reader::default();
    for (i, seg) in segments.iter().enumerate() {
        if !r.segment(*seg, seg.len() as u64, i + 1 == segments.len()) {
            break;
        }
    }
    r.finish()
}

/// Reads a WAL one segment at a time, one record at a time: memory stays at one record
/// whatever the segments' sizes.
#[derive(Default)]
pub struct Reader {
    f: WalFacts,
    crc: u32,
    seen_crc_record: bool,
    segment: usize,
    ended: bool,
}

/// What a segment's stream ran into.
enum Stop {
    /// Read to its end (or its zero-filled rest).
    End,
    /// A verdict other than whole.
    Verdict(Verdict),
}

/// Records a segment's head holds at most: etcd starts each one with its CRC, metadata and
/// hard state records (the first also with an empty snapshot record).
const HEAD_RECORDS: usize = 8;

impl Reader {
    /// Reads the next segment: `len` bytes from `r`, `last` when no segment follows. `false`
    /// once a verdict other than whole is reached (the rest is not read).
    pub fn segment(&mut self, r: impl std::io::Read, len: u64, last: bool) -> bool {
        self.read(r, len, last, false)
    }

    /// Reads only the head of the next segment (its records before the first entry): whose
    /// it is and its hard state at the cut, checked by their CRCs, never its entries. The CRC
    /// chain starts again at the next segment's CRC record, as etcd's decoder starts it at
    /// the first segment it reads.
    pub fn head(&mut self, r: impl std::io::Read, len: u64) -> bool {
        let read = self.read(r, len, false, true);
        (self.crc, self.seen_crc_record) = (0, false);
        read
    }

    fn read(&mut self, r: impl std::io::Read, len: u64, last: bool, head: bool) -> bool {
        if self.ended {
            return false;
        }
        let mut src = Src { r, len, left: len, buf: Vec::new() };
        let si = self.segment;
        self.segment += 1;
        match self.read_segment(&mut src, si, last, head) {
            Stop::End => true,
            Stop::Verdict(v) => {
                self.f.verdict = Some(v);
                self.ended = true;
                false
            }
        }
    }

    pub fn finish(mut self) -> WalFacts {
        if self.f.verdict.is_none() {
            self.f.verdict = Some(Verdict::Whole);
        }
        self.f
    }

    fn read_segment(&mut self, src: &mut Src<impl std::io::Read>, si: usize, last: bool, head: bool) -> Stop {
        let corrupt = |off: u64, why: String| Stop::Verdict(Verdict::Corrupt { segment: si, offset: off, why });
        // A record cut short: torn when it is the last segment's and nothing but zeros
        // follows (etcd's own `isTornEntry` looks at sectors the same way).
        let torn_or_corrupt = |src: &mut Src<_>, off: u64, why: String| {
            if last && src.rest_is_zero() { Stop::Verdict(Verdict::TornTail { segment: si, offset: off }) } else { corrupt(off, why) }
        };
        // The segment ends inside a record: a torn write when it is the last segment.
        let cut_short = |off: u64, why: &str| {
            if last { Stop::Verdict(Verdict::TornTail { segment: si, offset: off }) } else { corrupt(off, why.to_string()) }
        };
        let mut in_segment = 0;
        loop {
            if head && in_segment == HEAD_RECORDS {
                return Stop::End;
            }
            in_segment += 1;
            if self.f.records >= MAX_RECORDS {
                return Stop::Verdict(Verdict::TooLong { records: self.f.records });
            }
            let off = src.offset();
            if src.left < 8 {
                return if src.rest_is_zero() { Stop::End } else { cut_short(off, "a length cut short") };
            }
            if src.fill(8).is_none() {
                return corrupt(off, "unreadable".into());
            }
            let len_field = u64::from_le_bytes(src.buf[..8].try_into().expect("8 bytes"));
            if len_field == 0 {
                // The preallocated rest of the segment: the end of what was written.
                return if !last || src.rest_is_zero() { Stop::End } else { corrupt(off, "a zero length with data after it".into()) };
            }
            let (rec_len, pad) = frame_size(len_field);
            if rec_len.saturating_add(pad) > src.left {
                return cut_short(off, "a record past the segment's end");
            }
            if rec_len > MAX_RECORD {
                return corrupt(off, format!("a record of {rec_len} bytes"));
            }
            if src.fill(rec_len as usize).is_none() || src.skip(pad as usize).is_none() {
                return corrupt(off, "unreadable".into());
            }
            let Some(rec) = Record::decode(&src.buf[..rec_len as usize]) else {
                return torn_or_corrupt(src, off, "the record does not decode".into());
            };
            if head && rec.kind == ENTRY {
                return Stop::End;
            }
            if rec.kind == CRC {
                // Carries the CRC of everything before this segment (0 at the very start).
                if self.seen_crc_record && self.crc != 0 && rec.crc != self.crc {
                    return corrupt(off, format!("segment CRC {:08x}, expected {:08x}", rec.crc, self.crc));
                }
                self.crc = rec.crc;
                self.seen_crc_record = true;
            } else {
                let crc = crc32c_append(self.crc, rec.data);
                if rec.crc != crc {
                    return torn_or_corrupt(src, off, format!("CRC {:08x}, expected {crc:08x}", rec.crc));
                }
                self.crc = crc;
                if let Some(other) = another_members(&self.f, &rec) {
                    return corrupt(off, other);
                }
                apply(&mut self.f, &rec);
            }
            self.f.records += 1;
        }
    }
}

/// A segment's bytes as a stream of known length, read one record at a time into one buffer.
struct Src<R> {
    r: R,
    len: u64,
    left: u64,
    buf: Vec<u8>,
}

impl<R: std::io::Read> Src<R> {
    fn offset(&self) -> u64 {
        self.len - self.left
    }

    /// The next `n` bytes (`n` is at most what is left) into `buf[..n]`.
    fn fill(&mut self, n: usize) -> Option<()> {
        if self.buf.len() < n {
            self.buf.resize(n, 0);
        }
        self.r.read_exact(&mut self.buf[..n]).ok()?;
        self.left -= n as u64;
        Some(())
    }

    /// Past the next `n` bytes (a record's padding: at most 7).
    fn skip(&mut self, n: usize) -> Option<()> {
        let mut pad = [0u8; 8];
        self.r.read_exact(pad.get_mut(..n)?).ok()?;
        self.left -= n as u64;
        Some(())
    }

    /// Whether what is left reads as zeros (read in chunks, never whole).
    fn rest_is_zero(&mut self) -> bool {
        let mut chunk = [0u8; 64 * 1024];
        while self.left > 0 {
            let n = self.left.min(chunk.len() as u64) as usize;
            if self.r.read_exact(&mut chunk[..n]).is_err() {
                return false;
            }
            self.left -= n as u64;
            if chunk[..n].iter().any(|b| *b != 0) {
                return false;
            }
        }
        true
    }
}

/// The record length and padding of a length field.
fn frame_size(len_field: u64) -> (u64, u64) {
    let rec = len_field & !(0xffu64 << 56);
    let pad = if len_field & (0x80u64 << 56) != 0 { (len_field >> 56) & 0x7 } else { 0 };
    (rec, pad)
}

/// A metadata record that names another member or cluster than the segments before it: a
/// segment that is not this WAL's.
fn another_members(f: &WalFacts, rec: &Record) -> Option<String> {
    if rec.kind != METADATA {
        return None;
    }
    let m = fields(rec.data);
    let (node, cluster) = (m.varint(1), m.varint(2));
    let differs = |now: Option<u64>, before: Option<u64>| now.is_some() && before.is_some() && now != before;
    (differs(node, f.node_id) || differs(cluster, f.cluster_id)).then(|| {
        let hex = |v: Option<u64>| v.map_or("-".into(), |v| format!("{v:x}"));
        format!(
            "a segment of member {} in cluster {} after segments of member {} in cluster {}",
            hex(node),
            hex(cluster),
            hex(f.node_id),
            hex(f.cluster_id)
        )
    })
}

fn apply(f: &mut WalFacts, rec: &Record) {
    match rec.kind {
        METADATA => {
            let m = fields(rec.data);
            f.node_id = m.varint(1).or(f.node_id);
            f.cluster_id = m.varint(2).or(f.cluster_id);
        }
        STATE => {
            let s = fields(rec.data);
            f.term = s.varint(1).unwrap_or(0);
            f.vote = s.varint(2).unwrap_or(0);
            f.commit = s.varint(3).unwrap_or(0);
        }
        SNAPSHOT => {
            let s = fields(rec.data);
            f.snapshot_index = s.varint(1).unwrap_or(0);
            f.snapshot_term = s.varint(2).unwrap_or(0);
        }
        ENTRY => {
            let e = fields(rec.data);
            let (term, index) = (e.varint(2).unwrap_or(0), e.varint(3).unwrap_or(0));
            f.first_index.get_or_insert(index);
            // A later entry of a lower index overwrites (a new leader's log).
            f.last_index = Some(index);
            f.last_entry_term = term;
        }
        _ => {}
    }
}

/// A `walpb.Record`.
struct Record<'a> {
    kind: u64,
    crc: u32,
    data: &'a [u8],
}

impl<'a> Record<'a> {
    fn decode(b: &'a [u8]) -> Option<Record<'a>> {
        let mut r = Record { kind: 0, crc: 0, data: &[] };
        let mut p = Proto { b, off: 0 };
        while let Some((field, value)) = p.next()? {
            match (field, value) {
                (1, Value::Varint(v)) => r.kind = v,
                (2, Value::Varint(v)) => r.crc = u32::try_from(v).ok()?,
                (3, Value::Bytes(d)) => r.data = d,
                _ => {}
            }
        }
        Some(r)
    }
}

/// The fields of a protobuf message, for the few varints read from it.
struct Fields<'a> {
    b: &'a [u8],
}

fn fields(b: &[u8]) -> Fields<'_> {
    Fields { b }
}

impl Fields<'_> {
    /// The last value of varint field `n` (protobuf's rule for a repeated scalar), if the
    /// message decodes.
    fn varint(&self, n: u64) -> Option<u64> {
        let mut p = Proto { b: self.b, off: 0 };
        let mut last = None;
        while let Some((field, value)) = p.next()? {
            if let (true, Value::Varint(v)) = (field == n, value) {
                last = Some(v);
            }
        }
        last
    }
}

enum Value<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed,
}

/// A protobuf wire-format reader: `next` is `None` on malformed input, `Some(None)` at the end.
struct Proto<'a> {
    b: &'a [u8],
    off: usize,
}

impl<'a> Proto<'a> {
    fn varint(&mut self) -> Option<u64> {
        let mut v: u64 = 0;
        for i in 0..10 {
            let byte = *self.b.get(self.off)?;
            self.off += 1;
            v |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }

    #[allow(clippy::type_complexity)]
    fn next(&mut self) -> Option<Option<(u64, Value<'a>)>> {
        if self.off >= self.b.len() {
            return Some(None);
        }
        let key = self.varint()?;
        let (field, wire) = (key >> 3, key & 7);
        let value = match wire {
            0 => Value::Varint(self.varint()?),
            1 => {
                self.off = self.off.checked_add(8).filter(|e| *e <= self.b.len())?;
                Value::Fixed
            }
            2 => {
                let len = usize::try_from(self.varint()?).ok()?;
                let end = self.off.checked_add(len).filter(|e| *e <= self.b.len())?;
                let d = &self.b[self.off..end];
                self.off = end;
                Value::Bytes(d)
            }
            5 => {
                self.off = self.off.checked_add(4).filter(|e| *e <= self.b.len())?;
                Value::Fixed
            }
            _ => return None,
        };
        Some(Some((field, value)))
    }
}

/// CRC-32C (Castagnoli) of `data` continued from `crc`, as Go's `crc32.Update` computes it.
/// The CPU's CRC-32C instruction where it has one (SSE 4.2, ARMv8), else tables.
pub fn crc32c_append(crc: u32, data: &[u8]) -> u32 {
    crc32c::crc32c_append(crc, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn varint(mut v: u64, out: &mut Vec<u8>) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    fn msg(fields: &[(u64, u64)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (n, v) in fields {
            varint(n << 3, &mut out);
            varint(*v, &mut out);
        }
        out
    }

    /// A WAL as etcd's encoder writes it: a Crc record, then each record's data rolled in.
    fn encode(records: &[(u64, Vec<u8>)], crc: u32) -> (Vec<u8>, u32) {
        let (out, crc, _) = encode_at(records, crc);
        (out, crc)
    }

    /// [`encode`], with where each record's data (the CRC-covered bytes) landed.
    fn encode_at(records: &[(u64, Vec<u8>)], mut crc: u32) -> (Vec<u8>, u32, Vec<std::ops::Range<usize>>) {
        let mut out = Vec::new();
        let mut data_at = Vec::new();
        for (kind, data) in records {
            let rec_crc = if *kind == CRC {
                crc
            } else {
                crc = crc32c_append(crc, data);
                crc
            };
            let mut rec = Vec::new();
            varint(1 << 3, &mut rec);
            varint(*kind, &mut rec);
            varint(2 << 3, &mut rec);
            varint(u64::from(rec_crc), &mut rec);
            if !data.is_empty() {
                varint((3 << 3) | 2, &mut rec);
                varint(data.len() as u64, &mut rec);
                rec.extend_from_slice(data);
            }
            let pad = (8 - rec.len() % 8) % 8;
            let mut len_field = rec.len() as u64;
            if pad != 0 {
                len_field |= ((0x80 | pad) as u64) << 56;
            }
            out.extend_from_slice(&len_field.to_le_bytes());
            let start = out.len() + rec.len() - data.len();
            out.extend_from_slice(&rec);
            data_at.push(start..start + data.len());
            out.extend(std::iter::repeat_n(0u8, pad));
        }
        (out, crc, data_at)
    }

    fn member_wal() -> (Vec<u8>, Vec<u8>) {
        let entry = |term, index| (ENTRY, msg(&[(2, term), (3, index)]));
        let (first, crc) = encode(
            &[
                (CRC, vec![]),
                (METADATA, msg(&[(1, 0x8e9e05c52164694d), (2, 0xcdf818194e3a8c32)])),
                (SNAPSHOT, msg(&[(1, 0), (2, 0)])),
                entry(2, 1),
                entry(2, 2),
                (STATE, msg(&[(1, 2), (2, 0x8e9e05c52164694d), (3, 2)])),
            ],
            0,
        );
        let (second, _) = encode(&[(CRC, vec![]), entry(3, 3), (STATE, msg(&[(1, 3), (3, 3)]))], crc);
        let mut first = first;
        first.extend(std::iter::repeat_n(0u8, 64));
        (first, second)
    }

    #[test]
    fn the_castagnoli_crc_is_gos() {
        // crc32.Checksum([]byte("123456789"), crc32.MakeTable(crc32.Castagnoli))
        assert_eq!(crc32c_append(0, b"123456789"), 0xe306_9283);
        assert_eq!(crc32c_append(crc32c_append(0, b"1234"), b"56789"), 0xe306_9283, "rolled");
    }

    #[test]
    fn ids_terms_and_indexes_across_segments() {
        let (a, b) = member_wal();
        let f = read(&[&a, &b]);
        assert_eq!(f.verdict, Some(Verdict::Whole), "{f:?}");
        assert_eq!((f.node_id, f.cluster_id), (Some(0x8e9e05c52164694d), Some(0xcdf818194e3a8c32)));
        assert_eq!((f.term, f.commit, f.first_index, f.last_index, f.last_entry_term), (3, 3, Some(1), Some(3), 3));
    }

    #[test]
    fn heads_say_whose_segments_they_are_and_the_last_one_is_read_whole() {
        let (first, second) = member_wal();
        let mut r = Reader::default();
        assert!(r.head(first.as_slice(), first.len() as u64));
        assert!(r.segment(second.as_slice(), second.len() as u64, true));
        let f = r.finish();
        assert_eq!(f.verdict, Some(Verdict::Whole), "the chain starts again at the last segment: {f:?}");
        assert_eq!((f.node_id, f.cluster_id), (Some(0x8e9e05c52164694d), Some(0xcdf818194e3a8c32)));
        // The head's entries are not read: the index range is the last segment's.
        assert_eq!((f.first_index, f.last_index, f.term, f.commit), (Some(3), Some(3), 3, 3));
        // A damaged head is seen.
        let mut bad = first.clone();
        let at = bad.iter().position(|b| *b == 0xcd).expect("the node id's first varint byte");
        bad[at] ^= 1;
        let mut r = Reader::default();
        assert!(!r.head(bad.as_slice(), bad.len() as u64));
        assert!(matches!(r.finish().verdict, Some(Verdict::Corrupt { segment: 0, .. })));
    }

    #[test]
    fn a_segment_of_another_member_is_not_this_wal() {
        let (first, _) = member_wal();
        let (other, _) =
            encode(&[(CRC, vec![]), (METADATA, msg(&[(1, 0xabc), (2, 0xcdf818194e3a8c32)])), (ENTRY, msg(&[(2, 3), (3, 3)]))], 0);
        for head in [false, true] {
            let mut r = Reader::default();
            assert!(r.head(first.as_slice(), first.len() as u64));
            let read =
                if head { r.head(other.as_slice(), other.len() as u64) } else { r.segment(other.as_slice(), other.len() as u64, true) };
            assert!(!read);
            let f = r.finish();
            assert!(matches!(&f.verdict, Some(Verdict::Corrupt { segment: 1, why, .. }) if why.contains("member abc")), "{f:?}");
        }
    }

    #[test]
    fn a_torn_tail_is_told_from_damage() {
        let (a, b) = member_wal();
        // Cut inside the last record: torn, everything before is read.
        let cut = &b[..b.len() - 5];
        let f = read(&[&a, cut]);
        assert!(matches!(f.verdict, Some(Verdict::TornTail { segment: 1, .. })), "{f:?}");
        assert_eq!(f.last_index, Some(3));
        // A flipped byte in an entry of the first segment, with records after it: corrupt.
        let mut bad = a.clone();
        let at = bad.len() - 64 - 20;
        bad[at] ^= 0x40;
        let f = read(&[&bad, &b]);
        assert!(matches!(f.verdict, Some(Verdict::Corrupt { segment: 0, .. })), "{f:?}");
        // A second segment whose Crc record does not carry on from the first (a segment of
        // another WAL put after it).
        let (other, _) = encode(&[(CRC, vec![]), (ENTRY, msg(&[(2, 3), (3, 3)]))], 0x1234);
        assert!(matches!(read(&[&a, &other]).verdict, Some(Verdict::Corrupt { segment: 1, offset: 0, .. })));
    }

    #[test]
    fn hostile_bytes_never_panic_nor_allocate() {
        // A 10 GiB length, a length of all ones, records that loop on nothing, random junk.
        let mut huge = (10u64 << 30).to_le_bytes().to_vec();
        huge.extend_from_slice(&[1, 2, 3]);
        assert!(matches!(read(&[&huge]).verdict, Some(Verdict::TornTail { .. })));
        assert!(read(&[&u64::MAX.to_le_bytes()]).verdict.is_some());
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        for n in 0..2000 {
            let len = (seed % 600) as usize;
            let junk = crate::testing::junk(&mut seed, len);
            let (a, _) = member_wal();
            let mut mixed = a.clone();
            let at = (seed as usize) % mixed.len();
            mixed.splice(at..at, junk.iter().copied());
            assert!(read(&[&junk]).verdict.is_some(), "run {n}");
            assert!(read(&[&mixed, &junk]).verdict.is_some(), "run {n}");
        }
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// Records a member could write: entries and hard states with any values.
        fn records() -> impl Strategy<Value = Vec<(u64, Vec<u8>)>> {
            proptest::collection::vec(
                prop_oneof![
                    (any::<u64>(), any::<u64>()).prop_map(|(t, i)| (ENTRY, msg(&[(2, t), (3, i)]))),
                    (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(t, v, c)| (STATE, msg(&[(1, t), (2, v), (3, c)]))),
                ],
                0..40,
            )
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            /// Any bytes, in any two segments: an answer, never a panic.
            #[test]
            fn any_bytes_get_an_answer(bytes in proptest::collection::vec(any::<u8>(), 0..4096), split in 0usize..4096) {
                let (a, b) = bytes.split_at(split.min(bytes.len()));
                prop_assert!(read(&[a, b]).verdict.is_some());
                // The same bytes as a head, then a last segment.
                let mut r = Reader::default();
                r.head(a, a.len() as u64);
                r.segment(b, b.len() as u64, true);
                prop_assert!(r.finish().verdict.is_some());
            }

            /// What the encoder wrote is read back whole, with its ids and last entry.
            #[test]
            fn what_etcd_writes_reads_back(recs in records(), ids in (any::<u64>(), any::<u64>())) {
                let mut all = vec![(CRC, vec![]), (METADATA, msg(&[(1, ids.0), (2, ids.1)]))];
                all.extend(recs.iter().cloned());
                let (bytes, _) = encode(&all, 0);
                let f = read(&[&bytes]);
                prop_assert_eq!(&f.verdict, &Some(Verdict::Whole));
                prop_assert_eq!((f.node_id, f.cluster_id), (Some(ids.0), Some(ids.1)));
                prop_assert_eq!(f.records, all.len());
                let last_entry = recs.iter().rev().find(|(k, _)| *k == ENTRY).map(|(_, d)| fields(d).varint(3).unwrap_or(0));
                prop_assert_eq!(f.last_index, last_entry);
            }

            /// One flipped bit in what the CRC covers (a record's data) is always seen. (A
            /// record's type is not covered, in etcd's format as here.)
            #[test]
            fn a_flipped_bit_of_data_is_always_seen(recs in records(), at in any::<prop::sample::Index>(), bit in 0u8..8) {
                let mut all = vec![(CRC, vec![]), (METADATA, msg(&[(1, 7), (2, 9)]))];
                all.extend(recs);
                let (mut bytes, _, data_at) = encode_at(&all, 0);
                let covered: Vec<usize> = data_at.into_iter().flatten().collect();
                let i = covered[at.index(covered.len())];
                bytes[i] ^= 1 << bit;
                let flipped = read(&[&bytes]);
                prop_assert!(matches!(flipped.verdict, Some(Verdict::Corrupt { .. } | Verdict::TornTail { .. })), "{:?}", flipped);
            }
        }
    }
}
