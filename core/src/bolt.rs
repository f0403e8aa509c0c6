//! What a member's bbolt `db` says, read offline: the consistent index and term etcd applied
//! up to (bucket `meta`), the latest revision (the last key of bucket `key`), its size, and
//! a page-level sanity check. bbolt's format: two meta pages (magic `0xED0CDAED`, version 2,
//! an FNV-1a checksum; the valid one with the higher txid is current), then B+tree pages
//! (branch, leaf) whose leaf elements may be buckets, inline or on pages of their own.
//! Pure: the caller reads bytes at offsets (a volume's file, through its descriptor).
//! Hostile bytes are expected: every page is bounded by the file, every walk by depth and
//! pages visited, and nothing panics.

use serde::{Deserialize, Serialize};

const MAGIC: u32 = 0xED0C_DAED;
const VERSION: u32 = 2;
const PAGE_HEADER: usize = 16;
const ELEMENT: usize = 16;
const BRANCH: u16 = 0x01;
const LEAF: u16 = 0x02;
const BUCKET_LEAF: u32 = 0x01;
/// A walk stops at this depth or after this many pages: a tree that loops is damage.
const MAX_DEPTH: usize = 64;
const MAX_PAGES: usize = 1 << 20;

/// Whether the db's pages make sense.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "verdict", rename_all = "camelCase", rename_all_fields = "camelCase")]
pub enum DbVerdict {
    /// A valid meta page, and every page read is where its header says, of the kind expected.
    Sane,
    /// What etcd would fail to open or read (`failed to open database` in its log), and why.
    Corrupt { why: String },
}

/// What a member's db says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DbFacts {
    pub size: u64,
    pub page_size: u32,
    pub txid: u64,
    pub consistent_index: Option<u64>,
    /// etcd 3.5 and later keep the term beside the consistent index.
    pub term: Option<u64>,
    /// The latest revision among the keys kept (`None`: no key).
    pub revision: Option<u64>,
    pub verdict: DbVerdict,
}

/// Reads the db of `size` bytes through `read_at(offset, len)` (`None` when it cannot).
pub fn read(size: u64, read_at: &mut dyn FnMut(u64, usize) -> Option<Vec<u8>>) -> DbFacts {
    let mut f = DbFacts { size, page_size: 0, txid: 0, consistent_index: None, term: None, revision: None, verdict: DbVerdict::Sane };
    let corrupt = |mut f: DbFacts, why: String| {
        f.verdict = DbVerdict::Corrupt { why };
        f
    };
    let Some(meta) = current_meta(size, read_at) else {
        return corrupt(f, "no valid meta page (bad magic, version or checksum)".into());
    };
    (f.page_size, f.txid) = (meta.page_size, meta.txid);
    let mut db = Db { size, page_size: u64::from(meta.page_size), high_water: meta.pgid, read_at, visited: 0 };
    match etcd_facts(&mut db, meta.root) {
        Ok((consistent_index, term, revision)) => (f.consistent_index, f.term, f.revision) = (consistent_index, term, revision),
        Err(why) => return corrupt(f, why),
    }
    f
}

/// (consistent index, term, latest revision) from etcd's buckets under the root at `root`.
#[allow(clippy::type_complexity)]
fn etcd_facts(db: &mut Db, root: u64) -> Result<(Option<u64>, Option<u64>, Option<u64>), String> {
    // etcd writes its numbers, and a revision's main part, big-endian.
    let be = |v: Option<Vec<u8>>| v.and_then(|v| Some(u64::from_be_bytes(v.get(..8)?.try_into().ok()?)));
    let root = db.bucket_root(BucketRef::Page(root))?;
    let (mut consistent_index, mut term, mut revision) = (None, None, None);
    if let Some((meta_bucket, at)) = db.get_at(&root, b"meta", true)? {
        let b = db.bucket_root(bucket_ref(&meta_bucket, at))?;
        consistent_index = be(db.get(&b, b"consistent_index", false)?);
        term = be(db.get(&b, b"term", false)?);
    }
    if let Some((key_bucket, at)) = db.get_at(&root, b"key", true)? {
        let b = db.bucket_root(bucket_ref(&key_bucket, at))?;
        revision = be(db.last_key(&b)?);
    }
    Ok((consistent_index, term, revision))
}

/// Where the value of `key` in the top-level bucket `bucket` lies in the db: its file offset
/// and length, `None` when there is no such key. What an offline edit of one value in place
/// needs (the rebuild's compaction marks, whose length never changes).
pub fn locate(
    size: u64,
    read_at: &mut dyn FnMut(u64, usize) -> Option<Vec<u8>>,
    bucket: &[u8],
    key: &[u8],
) -> Result<Option<(u64, usize)>, String> {
    let meta = current_meta(size, read_at).ok_or("no valid meta page (bad magic, version or checksum)")?;
    let mut db = Db { size, page_size: u64::from(meta.page_size), high_water: meta.pgid, read_at, visited: 0 };
    let root = db.bucket_root(BucketRef::Page(meta.root))?;
    let Some((b, at)) = db.get_at(&root, bucket, true)? else { return Ok(None) };
    let b = db.bucket_root(bucket_ref(&b, at))?;
    Ok(db.get_at(&b, key, false)?.map(|(v, at)| (at, v.len())))
}

/// The keys of the top-level bucket `bucket`, in order, at most `max` of them (more is an
/// error: a bucket that large is not what the caller reads). etcd keeps its members in
/// bucket `members`, each keyed by its id in hex.
pub fn keys(size: u64, read_at: &mut dyn FnMut(u64, usize) -> Option<Vec<u8>>, bucket: &[u8], max: usize) -> Result<Vec<Vec<u8>>, String> {
    let meta = current_meta(size, read_at).ok_or("no valid meta page (bad magic, version or checksum)")?;
    let mut db = Db { size, page_size: u64::from(meta.page_size), high_water: meta.pgid, read_at, visited: 0 };
    let root = db.bucket_root(BucketRef::Page(meta.root))?;
    let Some((b, at)) = db.get_at(&root, bucket, true)? else { return Ok(Vec::new()) };
    let node = db.bucket_root(bucket_ref(&b, at))?;
    let mut out = Vec::new();
    // Depth first, children in order: a stack of pages still to read, the next on top.
    let mut stack = vec![(node.page, 0usize)];
    while let Some((page, depth)) = stack.pop() {
        if depth > MAX_DEPTH {
            return Err(format!("a tree deeper than {MAX_DEPTH}"));
        }
        let (flags, count) = header(&page)?;
        match flags {
            LEAF => {
                for i in 0..count {
                    if out.len() == max {
                        return Err(format!("bucket {} holds more than {max} keys", String::from_utf8_lossy(bucket)));
                    }
                    out.push(leaf_element(&page, i)?.1.to_vec());
                }
            }
            BRANCH if !node.inline => {
                let children = (0..count).map(|i| branch_element(&page, i).map(|(_, id)| id)).collect::<Result<Vec<_>, _>>()?;
                for id in children.into_iter().rev() {
                    stack.push((db.page(id)?, depth + 1));
                }
            }
            other => return Err(format!("a page of kind {other:#x} where a branch or leaf belongs")),
        }
    }
    Ok(out)
}

struct Meta {
    page_size: u32,
    root: u64,
    pgid: u64,
    txid: u64,
}

/// The valid meta page with the higher txid (page 0's page size locates page 1; a damaged
/// page 0 leaves the usual sizes to try).
fn current_meta(size: u64, read_at: &mut dyn FnMut(u64, usize) -> Option<Vec<u8>>) -> Option<Meta> {
    let mut metas = Vec::new();
    let first = read_at(0, PAGE_HEADER + 64).and_then(|b| meta_of(&b));
    let sizes: Vec<u64> = match &first {
        Some(m) => vec![u64::from(m.page_size)],
        None => vec![4096, 8192, 16384, 65536],
    };
    metas.extend(first);
    for ps in sizes {
        if ps + (PAGE_HEADER + 64) as u64 <= size
            && let Some(m) = read_at(ps, PAGE_HEADER + 64).and_then(|b| meta_of(&b))
        {
            metas.push(m);
            break;
        }
    }
    metas.into_iter().filter(|m| m.pgid.saturating_mul(u64::from(m.page_size)) <= size.max(1)).max_by_key(|m| m.txid)
}

fn meta_of(page: &[u8]) -> Option<Meta> {
    let m = page.get(PAGE_HEADER..PAGE_HEADER + 64)?;
    let u32_at = |o: usize| u32::from_le_bytes(m[o..o + 4].try_into().expect("4 bytes"));
    let u64_at = |o: usize| u64::from_le_bytes(m[o..o + 8].try_into().expect("8 bytes"));
    let page_size = u32_at(8);
    let sane = u32_at(0) == MAGIC
        && u32_at(4) == VERSION
        && page_size.is_power_of_two()
        && (512..=1 << 20).contains(&page_size)
        && fnv1a64(&m[..56]) == u64_at(56);
    sane.then(|| Meta { page_size, root: u64_at(16), pgid: u64_at(40), txid: u64_at(48) })
}

fn fnv1a64(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, x| (h ^ u64::from(*x)).wrapping_mul(0x0000_0100_0000_01b3))
}

/// A bucket: its root page, or its inline page (the bytes after its header in a leaf) with
/// the file offset they start at.
enum BucketRef {
    Page(u64),
    Inline(Vec<u8>, u64),
}

/// The bucket whose header is `value`, found at file offset `at`.
fn bucket_ref(value: &[u8], at: u64) -> BucketRef {
    let root = value.get(..8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes"))).unwrap_or(0);
    if root == 0 { BucketRef::Inline(value.get(16..).unwrap_or_default().to_vec(), at + 16) } else { BucketRef::Page(root) }
}

/// A bucket's root, read: a page, with where it came from and its file offset.
struct Node {
    page: Vec<u8>,
    inline: bool,
    base: u64,
}

struct Db<'a> {
    size: u64,
    page_size: u64,
    high_water: u64,
    read_at: &'a mut dyn FnMut(u64, usize) -> Option<Vec<u8>>,
    visited: usize,
}

impl Db<'_> {
    fn bucket_root(&mut self, r: BucketRef) -> Result<Node, String> {
        match r {
            BucketRef::Page(id) => Ok(Node { page: self.page(id)?, inline: false, base: id * self.page_size }),
            BucketRef::Inline(bytes, base) => {
                if bytes.len() < PAGE_HEADER {
                    return Err("an inline bucket shorter than a page header".into());
                }
                Ok(Node { page: bytes, inline: true, base })
            }
        }
    }

    /// Page `id`, whole (with its overflow), checked to be where its header says.
    fn page(&mut self, id: u64) -> Result<Vec<u8>, String> {
        self.visited += 1;
        if self.visited > MAX_PAGES {
            return Err(format!("more than {MAX_PAGES} pages visited: the tree loops"));
        }
        if id < 2 || id >= self.high_water {
            return Err(format!("page {id} is outside the db's pages (2 to {})", self.high_water));
        }
        let off = id
            .checked_mul(self.page_size)
            .filter(|o| o + self.page_size <= self.size)
            .ok_or(format!("page {id} is past the end of the file"))?;
        let head = (self.read_at)(off, PAGE_HEADER).ok_or(format!("page {id} cannot be read"))?;
        let header_id = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
        let overflow = u64::from(u32::from_le_bytes(head[12..16].try_into().expect("4 bytes")));
        if header_id != id {
            return Err(format!("page {id} says it is page {header_id}"));
        }
        let len = (overflow + 1)
            .checked_mul(self.page_size)
            .filter(|l| off + l <= self.size)
            .ok_or(format!("page {id} overflows past the end"))?;
        (self.read_at)(off, len as usize).ok_or(format!("page {id} cannot be read"))
    }

    /// The value of `key` in the tree under `node` (a bucket when `bucket`).
    fn get(&mut self, node: &Node, key: &[u8], bucket: bool) -> Result<Option<Vec<u8>>, String> {
        Ok(self.get_at(node, key, bucket)?.map(|(v, _)| v))
    }

    /// The value of `key` in the tree under `node` (a bucket when `bucket`), and the file
    /// offset its bytes start at.
    fn get_at(&mut self, node: &Node, key: &[u8], bucket: bool) -> Result<Option<(Vec<u8>, u64)>, String> {
        let (mut page, mut base) = (node.page.clone(), node.base);
        for _ in 0..MAX_DEPTH {
            let (flags, count) = header(&page)?;
            match flags {
                LEAF => {
                    for i in 0..count {
                        let (eflags, k, v) = leaf_element(&page, i)?;
                        if k == key {
                            let at = base + (v.as_ptr() as usize - page.as_ptr() as usize) as u64;
                            return Ok(((eflags & BUCKET_LEAF != 0) == bucket).then(|| (v.to_vec(), at)));
                        }
                    }
                    return Ok(None);
                }
                BRANCH if !node.inline => {
                    // The last element whose key is at most `key`.
                    let mut child = None;
                    for i in 0..count {
                        let (k, pgid) = branch_element(&page, i)?;
                        if k <= key || child.is_none() {
                            child = Some(pgid);
                        }
                        if k > key {
                            break;
                        }
                    }
                    let child = child.ok_or("an empty branch page")?;
                    (page, base) = (self.page(child)?, child * self.page_size);
                }
                other => return Err(format!("a page of kind {other:#x} where a branch or leaf belongs")),
            }
        }
        Err(format!("a tree deeper than {MAX_DEPTH}"))
    }

    /// The last key of the tree under `node`.
    fn last_key(&mut self, node: &Node) -> Result<Option<Vec<u8>>, String> {
        let mut page = node.page.clone();
        for _ in 0..MAX_DEPTH {
            let (flags, count) = header(&page)?;
            if count == 0 {
                return Ok(None);
            }
            match flags {
                LEAF => return Ok(Some(leaf_element(&page, count - 1)?.1.to_vec())),
                BRANCH if !node.inline => {
                    let (_, pgid) = branch_element(&page, count - 1)?;
                    page = self.page(pgid)?;
                }
                other => return Err(format!("a page of kind {other:#x} where a branch or leaf belongs")),
            }
        }
        Err(format!("a tree deeper than {MAX_DEPTH}"))
    }
}

fn header(page: &[u8]) -> Result<(u16, usize), String> {
    let h = page.get(..PAGE_HEADER).ok_or("a page shorter than its header")?;
    let flags = u16::from_le_bytes(h[8..10].try_into().expect("2 bytes"));
    let count = usize::from(u16::from_le_bytes(h[10..12].try_into().expect("2 bytes")));
    if PAGE_HEADER + count * ELEMENT > page.len() {
        return Err(format!("a page of {count} elements does not hold them"));
    }
    Ok((flags, count))
}

fn leaf_element(page: &[u8], i: usize) -> Result<(u32, &[u8], &[u8]), String> {
    let at = PAGE_HEADER + i * ELEMENT;
    let e = &page[at..at + ELEMENT];
    let u = |o: usize| u32::from_le_bytes(e[o..o + 4].try_into().expect("4 bytes")) as usize;
    let (flags, pos, ksize, vsize) = (u(0) as u32, u(4), u(8), u(12));
    let k0 = at.checked_add(pos).ok_or("an element past its page")?;
    let k1 = k0.checked_add(ksize).ok_or("an element past its page")?;
    let v1 = k1.checked_add(vsize).ok_or("an element past its page")?;
    let key = page.get(k0..k1).ok_or("a key past its page")?;
    let value = page.get(k1..v1).ok_or("a value past its page")?;
    Ok((flags, key, value))
}

fn branch_element(page: &[u8], i: usize) -> Result<(&[u8], u64), String> {
    let at = PAGE_HEADER + i * ELEMENT;
    let e = &page[at..at + ELEMENT];
    let pos = u32::from_le_bytes(e[0..4].try_into().expect("4 bytes")) as usize;
    let ksize = u32::from_le_bytes(e[4..8].try_into().expect("4 bytes")) as usize;
    let pgid = u64::from_le_bytes(e[8..16].try_into().expect("8 bytes"));
    let k0 = at.checked_add(pos).ok_or("an element past its page")?;
    let key = page.get(k0..k0.checked_add(ksize).ok_or("an element past its page")?).ok_or("a key past its page")?;
    Ok((key, pgid))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader(b: &[u8]) -> impl FnMut(u64, usize) -> Option<Vec<u8>> + '_ {
        move |off, len| b.get(off as usize..(off as usize).checked_add(len)?).map(<[u8]>::to_vec)
    }

    #[test]
    fn fnv_is_gos() {
        // fnv.New64a() over "hello"
        assert_eq!(fnv1a64(b"hello"), 0xa430_d846_80aa_bd0b);
    }

    #[test]
    fn hostile_bytes_never_panic() {
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        for n in 0..3000 {
            let len = (seed % 20000) as usize;
            let mut junk = crate::testing::junk(&mut seed, len);
            // Half of them with a valid meta page in front, pointing anywhere.
            if n % 2 == 0 && junk.len() >= 4096 + 80 {
                let mut m = Vec::new();
                m.extend_from_slice(&MAGIC.to_le_bytes());
                m.extend_from_slice(&VERSION.to_le_bytes());
                m.extend_from_slice(&4096u32.to_le_bytes());
                m.extend_from_slice(&0u32.to_le_bytes());
                m.extend_from_slice(&(seed % 8).to_le_bytes());
                m.extend_from_slice(&0u64.to_le_bytes());
                m.extend_from_slice(&2u64.to_le_bytes());
                m.extend_from_slice(&(seed % 16).to_le_bytes());
                m.extend_from_slice(&7u64.to_le_bytes());
                let sum = fnv1a64(&m);
                m.extend_from_slice(&sum.to_le_bytes());
                junk[PAGE_HEADER..PAGE_HEADER + 64].copy_from_slice(&m);
            }
            let f = read(junk.len() as u64, &mut reader(&junk));
            assert!(f.revision.is_none() || f.verdict == DbVerdict::Sane, "run {n}: {f:?}");
            // The rebuild's reads: an answer or an error, never past the file.
            if let Ok(Some((at, len))) = locate(junk.len() as u64, &mut reader(&junk), b"meta", b"finishedCompactRev") {
                assert!(at as usize + len <= junk.len(), "run {n}: {at}+{len}");
            }
            let _ = keys(junk.len() as u64, &mut reader(&junk), b"members", 1000);
        }
        let f = read(0, &mut reader(&[]));
        assert!(matches!(f.verdict, DbVerdict::Corrupt { .. }));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// Any bytes: an answer, never a panic.
        #[test]
        fn any_bytes_get_an_answer(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..20000)) {
            let f = read(bytes.len() as u64, &mut reader(&bytes));
            proptest::prop_assert!(f.revision.is_none() || f.verdict == DbVerdict::Sane);
        }
    }
}
