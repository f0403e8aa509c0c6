//! Editing a tenant's files: a few bytes at an offset of a regular file, only where they
//! still are what the caller read there (the rebuild's compaction marks in a fenced
//! member's db), and a tree copied within the volume (the survivor's data, from its
//! quarantine back to where etcd reads it).

use std::os::unix::fs::FileExt;
use std::path::Path;

use rustix::fs::{Mode, OFlags};

use super::{Kind, Limits, Volume, os_error};
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

    /// Copies the tree `from` to `to` (which must not exist), both below the volume: only
    /// directories and regular files (anything else is `UnsafePath` and nothing is copied),
    /// every file created anew (`O_EXCL`, never through a link), its bytes and then every
    /// directory fsynced. Returns the bytes and files copied.
    pub fn copy_tree(&self, from: &Path, to: &Path, limits: Limits) -> Result<(u64, u64)> {
        self.plain_tree(from, limits)?;
        if self.entry(to)?.is_some() {
            return Err(Error::new(Code::UnsafePath, format!("{} exists already; not copied over", self.shown(to).display())));
        }
        let mut items = Vec::new();
        self.walk(from, limits, &mut |p, e| items.push((p.to_path_buf(), e.kind)))?;
        // Parents before their children.
        items.sort_by(|a, b| a.0.cmp(&b.0));
        self.mkdir_all(to)?;
        let (mut bytes, mut files) = (0u64, 0u64);
        for (p, kind) in &items {
            match kind {
                Kind::Dir => self.mkdir_all(&to.join(p))?,
                Kind::File => {
                    bytes += self.copy_file(&from.join(p), &to.join(p))?;
                    files += 1;
                }
                other => {
                    return Err(Error::new(
                        Code::UnsafePath,
                        format!("{} became a {other:?} while it was copied", self.shown(&from.join(p)).display()),
                    ));
                }
            }
        }
        for (p, kind) in items.iter().rev() {
            if *kind == Kind::Dir {
                self.sync_dir(&to.join(p))?;
            }
        }
        self.sync_dir(to)?;
        self.sync_dir(to.parent().unwrap_or(Path::new("")))?;
        Ok((bytes, files))
    }

    fn copy_file(&self, from: &Path, to: &Path) -> Result<u64> {
        let (mut src, _) = self
            .open_file(from, u64::MAX)?
            .ok_or_else(|| Error::new(Code::UnsafePath, format!("{} went away while it was copied", self.shown(from).display())))?;
        let (dir, name) = self.parent(to)?;
        let fd = rustix::fs::openat(
            &dir,
            name.as_os_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| os_error(e.raw_os_error(), &self.shown(to), "create"))?;
        let mut dst = std::fs::File::from(fd);
        let n = std::io::copy(&mut src, &mut dst).and_then(|n| dst.sync_all().map(|_| n));
        n.map_err(|e| os_error(e.raw_os_error().unwrap_or(libc::EIO), &self.shown(to), "copy"))
    }
}
