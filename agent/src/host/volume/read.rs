//! Reading a tenant's files: only regular ones, opened through a handle proven on the
//! volume, non-blocking, without following a link; small ones whole, a log's tail, a large
//! one as a bounded stream.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use pathrs::flags::OpenFlags;
use rustix::fs::OFlags;

use super::{Entry, Kind, Volume, is_enoent, os_error, pathrs_error};
use crate::error::{Code, Error, Result};

impl Volume {
    /// The regular file `rel` opened for reading through its `O_PATH` handle (non-blocking,
    /// the same inode), with its description. `Ok(None)` when it does not exist; a link,
    /// FIFO, device or directory is `UnsafePath`.
    fn open_regular(&self, rel: &Path) -> Result<Option<(File, Entry)>> {
        let h = match self.handle(rel) {
            Ok(h) => h,
            Err(e) if is_enoent(&e) => return Ok(None),
            Err(e) => return Err(e),
        };
        let e = self.stat_fd(&h, rel)?;
        if e.kind != Kind::File {
            return Err(Error::new(
                Code::UnsafePath,
                format!("{} is not a regular file ({:?}); not read", self.shown(rel).display(), e.kind),
            ));
        }
        Ok(Some((self.reopen(&h, rel, OFlags::RDONLY)?, e)))
    }

    /// The bytes of the regular file `rel`, at most `cap` of them. `Ok(None)` when it does not
    /// exist; a link, FIFO, device or directory is `UnsafePath`, a larger file is refused
    /// with its size.
    pub fn read_small(&self, rel: &Path, cap: u64) -> Result<Option<Vec<u8>>> {
        let Some((f, e)) = self.open_regular(rel)? else { return Ok(None) };
        if e.len > cap {
            return Err(Error::new(
                Code::UnsafePath,
                format!("{} is {} bytes, more than the {cap} the agent reads", self.shown(rel).display(), e.len),
            ));
        }
        let mut buf = Vec::with_capacity(e.len as usize);
        f.take(cap + 1)
            .read_to_end(&mut buf)
            .map_err(|err| Error::new(Code::UnsafePath, format!("read {}: {err}", self.shown(rel).display())))?;
        if buf.len() as u64 > cap {
            return Err(Error::new(Code::UnsafePath, format!("{} grew past {cap} bytes while read", self.shown(rel).display())));
        }
        Ok(Some(buf))
    }

    /// The last `cap` bytes (at most) of the regular file `rel`, whatever its size, and
    /// whether that is the whole file. Same rules as `read_small`; a file that grows while it
    /// is read yields no more than `cap` bytes.
    pub fn read_tail(&self, rel: &Path, cap: u64) -> Result<Option<(Vec<u8>, bool)>> {
        use std::io::{Seek, SeekFrom};
        let Some((mut f, e)) = self.open_regular(rel)? else { return Ok(None) };
        let from = e.len.saturating_sub(cap);
        f.seek(SeekFrom::Start(from)).map_err(|err| Error::new(Code::UnsafePath, format!("seek {}: {err}", self.shown(rel).display())))?;
        let mut buf = Vec::with_capacity(cap.min(e.len) as usize);
        f.take(cap)
            .read_to_end(&mut buf)
            .map_err(|err| Error::new(Code::UnsafePath, format!("read {}: {err}", self.shown(rel).display())))?;
        Ok(Some((buf, from == 0)))
    }

    /// The same inode as `h`, opened for I/O (non-blocking, no link followed).
    pub(super) fn reopen(&self, h: &pathrs::Handle, rel: &Path, flags: OFlags) -> Result<File> {
        let flags =
            OpenFlags::from_bits_retain((flags | OFlags::NONBLOCK | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NOCTTY).bits() as _);
        let f = h.reopen(flags).map_err(|e| pathrs_error(e, &self.shown(rel), "open"))?;
        let st = rustix::fs::fstat(&f).map_err(|e| os_error(e.raw_os_error(), &self.shown(rel), "stat"))?;
        let hs = rustix::fs::fstat(h).map_err(|e| os_error(e.raw_os_error(), &self.shown(rel), "stat"))?;
        if (st.st_dev, st.st_ino) != (hs.st_dev, hs.st_ino) {
            return Err(Error::new(Code::UnsafePath, format!("{} changed while it was opened", self.shown(rel).display())));
        }
        Ok(f)
    }

    /// The regular file `rel` opened for reading, and its size, at most `cap` bytes (a larger
    /// one is refused with its size). `Ok(None)` when it does not exist; a link, FIFO, device
    /// or directory is `UnsafePath`. The caller reads it as a stream, never whole.
    pub fn open_file(&self, rel: &Path, cap: u64) -> Result<Option<(File, u64)>> {
        let Some((f, e)) = self.open_regular(rel)? else { return Ok(None) };
        if e.len > cap {
            return Err(Error::new(
                Code::UnsafePath,
                format!("{} is {} bytes, more than the {cap} the agent reads", self.shown(rel).display(), e.len),
            ));
        }
        Ok(Some((f, e.len)))
    }
}
