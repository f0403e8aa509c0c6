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

    /// Copies the tree `from` (below this volume) to `to` below `dest` (which must not exist
    /// there): only directories and regular files (anything else is `UnsafePath` and nothing
    /// is copied), each file at most the length it had when the tree was walked, the whole
    /// only if `dest` has room for it (`InsufficientSpace`), every entry created anew
    /// (`O_EXCL`, never through a link) and given `owner` (the etcd process's user: the pod
    /// must read what the agent, as root, wrote), its bytes and then every directory fsynced.
    /// Returns the bytes and files copied.
    pub fn copy_tree_to(&self, from: &Path, dest: &Volume, to: &Path, limits: Limits, owner: (u32, u32)) -> Result<(u64, u64)> {
        self.plain_tree(from, limits)?;
        if dest.entry(to)?.is_some() {
            return Err(Error::new(Code::UnsafePath, format!("{} exists already; not copied over", dest.shown(to).display())));
        }
        let mut items = Vec::new();
        self.walk(from, limits, &mut |p, e| items.push((p.to_path_buf(), e.kind, e.len)))?;
        // Parents before their children.
        items.sort_by(|a, b| a.0.cmp(&b.0));
        let total: u64 = items.iter().filter(|i| i.1 == Kind::File).map(|i| i.2).sum();
        let free = dest.free_bytes()?;
        if free < total.saturating_add(ROOM) {
            return Err(Error::new(
                Code::InsufficientSpace,
                format!("{} needs {total} bytes (and {ROOM} to spare) where {free} are free", dest.shown(to).display()),
            ));
        }
        dest.mkdir_all(to)?;
        dest.chown(to, owner)?;
        let (mut bytes, mut files) = (0u64, 0u64);
        for (p, kind, len) in &items {
            match kind {
                Kind::Dir => {
                    dest.mkdir_all(&to.join(p))?;
                    dest.chown(&to.join(p), owner)?;
                }
                Kind::File => {
                    bytes += self.copy_file(&from.join(p), *len, dest, &to.join(p), owner)?;
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
        for (p, kind, _) in items.iter().rev() {
            if *kind == Kind::Dir {
                dest.sync_dir(&to.join(p))?;
            }
        }
        dest.sync_dir(to)?;
        dest.sync_dir(to.parent().unwrap_or(Path::new("")))?;
        Ok((bytes, files))
    }

    /// The owner (uid, gid) of `rel`, not followed.
    pub fn owner(&self, rel: &Path) -> Result<(u32, u32)> {
        let h = self.handle(rel)?;
        let st = rustix::fs::fstat(&h).map_err(|e| os_error(e.raw_os_error(), &self.shown(rel), "stat"))?;
        Ok((st.st_uid, st.st_gid))
    }

    fn chown(&self, rel: &Path, (uid, gid): (u32, u32)) -> Result<()> {
        let d = self.dir(rel)?;
        rustix::fs::fchown(&d, Some(rustix::fs::Uid::from_raw(uid)), Some(rustix::fs::Gid::from_raw(gid)))
            .map_err(|e| os_error(e.raw_os_error(), &self.shown(rel), "chown"))
    }

    fn copy_file(&self, from: &Path, len: u64, dest: &Volume, to: &Path, (uid, gid): (u32, u32)) -> Result<u64> {
        let (src, _) = self
            .open_file(from, u64::MAX)?
            .ok_or_else(|| Error::new(Code::UnsafePath, format!("{} went away while it was copied", self.shown(from).display())))?;
        let (dir, name) = dest.parent(to)?;
        let fd = rustix::fs::openat(
            &dir,
            name.as_os_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| os_error(e.raw_os_error(), &dest.shown(to), "create"))?;
        rustix::fs::fchown(&fd, Some(rustix::fs::Uid::from_raw(uid)), Some(rustix::fs::Gid::from_raw(gid)))
            .map_err(|e| os_error(e.raw_os_error(), &dest.shown(to), "chown"))?;
        let mut dst = std::fs::File::from(fd);
        // At most what the walk saw: a file that grows while it is copied is not followed.
        let n = std::io::copy(&mut std::io::Read::take(src, len), &mut dst).and_then(|n| dst.sync_all().map(|_| n));
        n.map_err(|e| os_error(e.raw_os_error().unwrap_or(libc::EIO), &dest.shown(to), "copy"))
    }
}

/// Room a copy leaves on its destination: etcd must still be able to write.
const ROOM: u64 = 64 << 20;
