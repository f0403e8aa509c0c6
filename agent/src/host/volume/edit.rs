//! Editing a tenant's file in place: a few bytes at an offset of a regular file, only where
//! they still are what the caller read there (the rebuild's compaction marks in a fenced
//! member's db).

use std::os::unix::fs::FileExt;
use std::path::Path;

use rustix::fs::OFlags;

use super::{Kind, Volume};
use crate::error::{Code, Error, Result};

impl Volume {
    /// Writes `new` over the bytes at `offset` of the regular file `rel` (the same length as
    /// `expect`), once they are read to be `expect`, then fsyncs the file. A link, FIFO,
    /// device or directory is `UnsafePath`; other bytes there (the file changed since it
    /// was read) are `UnsafePath`, and nothing is written.
    pub fn rewrite_at(&self, rel: &Path, offset: u64, expect: &[u8], new: &[u8]) -> Result<()> {
        if expect.len() != new.len() {
            return Err(Error::new(Code::Internal, "an edit in place keeps the length of what it replaces"));
        }
        let unsafe_path = |why: String| Error::new(Code::UnsafePath, format!("{}: {why}", self.shown(rel).display()));
        let h = self.handle(rel)?;
        let e = self.stat_fd(&h, rel)?;
        if e.kind != Kind::File {
            return Err(unsafe_path(format!("not a regular file ({:?}); not written", e.kind)));
        }
        let end = offset.checked_add(expect.len() as u64).filter(|end| *end <= e.len);
        if end.is_none() {
            return Err(unsafe_path(format!("{} bytes at {offset} are past its end ({} bytes)", expect.len(), e.len)));
        }
        let f = self.reopen(&h, rel, OFlags::RDWR)?;
        let mut have = vec![0u8; expect.len()];
        f.read_exact_at(&mut have, offset).map_err(|err| unsafe_path(format!("read at {offset}: {err}")))?;
        if have != expect {
            return Err(unsafe_path(format!("the bytes at {offset} are not those read before; not written")));
        }
        f.write_all_at(new, offset).and_then(|_| f.sync_all()).map_err(|err| unsafe_path(format!("write at {offset}: {err}")))
    }
}
