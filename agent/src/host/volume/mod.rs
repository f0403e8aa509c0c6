//! The only way the agent touches a tenant's volume. The pod's owner controls every name,
//! link, type, size and byte on it, and may change them at any moment, so:
//! - the volume root is opened once, from the kubelet (or host) root without following a
//!   link, and its identity (device, inode, mount root) is proven on the descriptor;
//! - every later operation resolves through `pathrs` below that descriptor with
//!   `RESOLVE_NO_SYMLINKS` (and its `RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS`, with a
//!   procfs-checked fallback on kernels without `openat2`), then acts with one `*at` call on
//!   one plain name relative to a directory descriptor proven to be on the volume's device;
//! - nothing is opened for reading or writing unless `fstat` on an `O_PATH` handle says it
//!   is a regular file, and then through that handle (the same inode, never a name again);
//!   files are created only with `O_EXCL` under a fresh name and renamed into place, so a
//!   planted FIFO or device node is replaced, never opened;
//! - walks are bounded in entries, depth and time, so a tenant's tree cannot stall the agent.
//!
//! No other module calls `std::fs` on a path under a volume (`scripts/check-volume-access`).

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use pathrs::flags::ResolverFlags;
use rustix::fs::{AtFlags, FileType, Mode, OFlags};

use crate::error::{Code, Error, Result};

mod edit;
mod read;
mod walk;
use walk::{Walk, empty_dir, for_each_entry, open_subdir};

/// How far a walk of a tenant's tree may go before the agent refuses to vouch for it.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub entries: u64,
    pub depth: usize,
    pub time: Duration,
}

impl Default for Limits {
    /// A member dir holds a few dozen files; a million entries or 30 s is an attack or a
    /// volume that is not an etcd member's.
    fn default() -> Self {
        Limits { entries: 1_000_000, depth: 64, time: Duration::from_secs(30) }
    }
}

/// What an entry is, described without following it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
    Symlink,
    /// FIFO, socket, device node: never opened.
    Other,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub kind: Kind,
    pub len: u64,
    pub dev: u64,
    pub ino: u64,
}

fn kind_of(mode: u32) -> Kind {
    match FileType::from_raw_mode(mode) {
        FileType::Directory => Kind::Dir,
        FileType::RegularFile => Kind::File,
        FileType::Symlink => Kind::Symlink,
        _ => Kind::Other,
    }
}

/// The id of the mount `fd` is on (statx `STATX_MNT_ID`, Linux 5.8+); `None` where the
/// kernel cannot say. What `RESOLVE_NO_XDEV` would prove, which pathrs does not offer: a
/// bind mount of the same filesystem keeps the device number, never the mount.
pub(super) fn mount_id(fd: impl AsFd) -> Option<u64> {
    let r = rustix::fs::statx(fd, "", AtFlags::EMPTY_PATH, rustix::fs::StatxFlags::MNT_ID).ok()?;
    (r.stx_mask & rustix::fs::StatxFlags::MNT_ID.bits() != 0).then_some(r.stx_mnt_id)
}

fn entry_of(st: &rustix::fs::Stat) -> Entry {
    Entry { kind: kind_of(st.st_mode), len: st.st_size.max(0) as u64, dev: st.st_dev, ino: st.st_ino }
}

/// A proven volume root: every operation is relative to it.
pub struct Volume {
    root: pathrs::Root,
    dev: u64,
    ino: u64,
    /// The root's mount id: every entry acted on must be on that mount, not only device.
    mnt: Option<u64>,
    shown: PathBuf,
}

impl std::fmt::Debug for Volume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Volume({}, dev {}, ino {})", self.shown.display(), self.dev, self.ino)
    }
}

/// `base/rel` opened as a directory without following any link on the way (`base` itself,
/// the agent's configuration, is opened with `O_NOFOLLOW` on its last component only).
/// A missing component is `DataDirNotFound`; a link or a non-directory is `UnsafePath`.
pub fn open_dir_beneath(base: &Path, rel: &Path) -> Result<OwnedFd> {
    let rel = plain(rel)?;
    let fd = rustix::fs::open(base, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())
        .map_err(|e| os_error(e.raw_os_error(), base, "open"))?;
    if rel.as_os_str().is_empty() {
        return Ok(fd);
    }
    let root = pathrs::Root::from_fd(fd).with_resolver_flags(ResolverFlags::NO_SYMLINKS);
    let shown = base.join(&rel);
    let h = root.resolve(&rel).map_err(|e| pathrs_error(e, &shown, "open"))?;
    let st = rustix::fs::fstat(&h).map_err(|e| os_error(e.raw_os_error(), &shown, "stat"))?;
    if kind_of(st.st_mode) != Kind::Dir {
        return Err(Error::new(Code::UnsafePath, format!("{} is not a directory", shown.display())));
    }
    // A directory descriptor that can be read (listed, fsynced), not only an O_PATH one.
    rustix::fs::openat(&h, ".", OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
        .map_err(|e| os_error(e.raw_os_error(), &shown, "open"))
}

/// Relative, with only plain components: what the agent names on a volume.
fn plain(rel: &Path) -> Result<PathBuf> {
    let mut out = PathBuf::new();
    for c in rel.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            _ => return Err(Error::new(Code::UnsafePath, format!("{} has a '..' or absolute component", rel.display()))),
        }
    }
    Ok(out)
}

fn os_error(errno: i32, at: &Path, what: &str) -> Error {
    match errno {
        libc::ENOENT => Error::new(Code::DataDirNotFound, format!("{} does not exist (is the pod being deleted?)", at.display())),
        libc::ELOOP | libc::ENOTDIR => Error::new(
            Code::UnsafePath,
            format!("{} is a symlink or has one on the way (or a non-directory); the agent never follows links on a volume", at.display()),
        ),
        libc::EXDEV => Error::new(Code::UnsafePath, format!("{} crosses into another filesystem or mount", at.display())),
        other => Error::new(Code::UnsafePath, format!("cannot {what} {}: {}", at.display(), std::io::Error::from_raw_os_error(other))),
    }
}

fn pathrs_error(e: pathrs::error::Error, at: &Path, what: &str) -> Error {
    match e.kind() {
        pathrs::error::ErrorKind::OsError(Some(errno)) => os_error(errno, at, what),
        pathrs::error::ErrorKind::SafetyViolation => {
            Error::new(Code::UnsafePath, format!("{what} {}: the path changed under the agent ({e})", at.display()))
        }
        _ => Error::new(Code::UnsafePath, format!("cannot {what} {}: {e}", at.display())),
    }
}

fn is_enoent(e: &Error) -> bool {
    e.code == Code::DataDirNotFound
}

impl Volume {
    /// Opens `base/rel` as a volume root (see `open_dir_beneath`); `shown` names it in messages.
    pub fn open(base: &Path, rel: &Path) -> Result<Volume> {
        let fd = open_dir_beneath(base, rel)?;
        Self::from_fd(fd, base.join(rel))
    }

    fn from_fd(fd: OwnedFd, shown: PathBuf) -> Result<Volume> {
        let st = rustix::fs::fstat(&fd).map_err(|e| os_error(e.raw_os_error(), &shown, "stat"))?;
        if kind_of(st.st_mode) != Kind::Dir {
            return Err(Error::new(Code::UnsafePath, format!("{} is not a directory", shown.display())));
        }
        let mnt = mount_id(&fd);
        let root = pathrs::Root::from_fd(fd).with_resolver_flags(ResolverFlags::NO_SYMLINKS);
        Ok(Volume { root, dev: st.st_dev, ino: st.st_ino, mnt, shown })
    }

    /// The volume root's host path, for messages and records (never reopened by it).
    pub fn path(&self) -> &Path {
        &self.shown
    }

    /// `rel` below the volume as a host path, for messages only.
    pub fn shown(&self, rel: &Path) -> PathBuf {
        self.shown.join(rel)
    }

    /// (device, inode) of the root.
    pub fn identity(&self) -> (u64, u64) {
        (self.dev, self.ino)
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.root.as_fd()
    }

    /// Whether the root descriptor is the root of a mount, asked of the descriptor itself
    /// (statx `STATX_ATTR_MOUNT_ROOT`, Linux 5.8+); `None` where the kernel cannot say.
    pub fn is_mount_root(&self) -> Option<bool> {
        let r = rustix::fs::statx(self.fd(), "", AtFlags::EMPTY_PATH, rustix::fs::StatxFlags::BASIC_STATS).ok()?;
        let mask = rustix::fs::StatxAttributes::MOUNT_ROOT;
        r.stx_attributes_mask.contains(mask).then(|| r.stx_attributes.contains(mask))
    }

    /// An `O_PATH` handle of `rel` that is not followed if it is a link; links on the way
    /// are `UnsafePath`.
    fn handle(&self, rel: &Path) -> Result<pathrs::Handle> {
        let rel = plain(rel)?;
        if rel.as_os_str().is_empty() {
            let fd = rustix::fs::openat(self.fd(), ".", OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
                .map_err(|e| os_error(e.raw_os_error(), &self.shown, "open"))?;
            return Ok(pathrs::Handle::from_fd(fd));
        }
        self.root.resolve_nofollow(&rel).map_err(|e| pathrs_error(e, &self.shown(&rel), "open"))
    }

    /// A directory of the volume, as a descriptor proven to be a directory on its device.
    fn dir(&self, rel: &Path) -> Result<OwnedFd> {
        let h = self.handle(rel)?;
        let e = self.stat_fd(&h, rel)?;
        if e.kind != Kind::Dir {
            return Err(Error::new(Code::UnsafePath, format!("{} is not a directory (a link?)", self.shown(rel).display())));
        }
        // The same directory, readable (listed, fsynced): "." of the proven handle.
        rustix::fs::openat(&h, ".", OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
            .map_err(|e| os_error(e.raw_os_error(), &self.shown(rel), "open"))
    }

    fn stat_fd(&self, fd: impl AsFd, rel: &Path) -> Result<Entry> {
        let fd = fd.as_fd();
        let st = rustix::fs::fstat(fd).map_err(|e| os_error(e.raw_os_error(), &self.shown(rel), "stat"))?;
        let e = entry_of(&st);
        if e.dev != self.dev {
            return Err(Error::new(
                Code::UnsafePath,
                format!("{} is on another filesystem than the volume (device {} vs {})", self.shown(rel).display(), e.dev, self.dev),
            ));
        }
        self.same_mount(fd, rel)?;
        Ok(e)
    }

    /// `fd` is on the volume root's mount: a bind mount of the same filesystem inside the
    /// volume keeps the device, never the mount.
    fn same_mount(&self, fd: impl AsFd, rel: &Path) -> Result<()> {
        if let (Some(root), Some(here)) = (self.mnt, mount_id(fd))
            && root != here
        {
            return Err(Error::new(
                Code::UnsafePath,
                format!("{} is on another mount than the volume (a bind mount inside it?)", self.shown(rel).display()),
            ));
        }
        Ok(())
    }

    /// The parent directory descriptor of `rel` and its last name.
    fn parent(&self, rel: &Path) -> Result<(OwnedFd, OsString)> {
        let rel = plain(rel)?;
        let name = rel.file_name().ok_or_else(|| Error::new(Code::UnsafePath, "the volume root itself is never acted on"))?;
        Ok((self.dir(rel.parent().unwrap_or(Path::new("")))?, name.to_os_string()))
    }

    /// `rel` described without following it. `None` when it, or a parent, does not exist;
    /// a link among the parents is `UnsafePath`.
    pub fn entry(&self, rel: &Path) -> Result<Option<Entry>> {
        match self.handle(rel) {
            Ok(h) => {
                let st = rustix::fs::fstat(&h).map_err(|e| os_error(e.raw_os_error(), &self.shown(rel), "stat"))?;
                self.same_mount(&h, rel)?;
                Ok(Some(entry_of(&st)))
            }
            Err(e) if is_enoent(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes `rel` whole: a fresh name created with `O_EXCL`, written, fsynced, renamed over
    /// `rel` (which replaces whatever the tenant put there, a FIFO or a device node included,
    /// without opening it), and the directory fsynced.
    pub fn write_file(&self, rel: &Path, bytes: &[u8]) -> Result<()> {
        let (dir, name) = self.parent(rel)?;
        let mut tmp = name.clone();
        tmp.push(format!(".{}.tmp", uuid::Uuid::new_v4().simple()));
        let fd = rustix::fs::openat(
            &dir,
            tmp.as_os_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o644),
        )
        .map_err(|e| os_error(e.raw_os_error(), &self.shown(rel), "create"))?;
        let mut f = File::from(fd);
        let written = std::io::Write::write_all(&mut f, bytes).and_then(|_| f.sync_all());
        let renamed = written
            .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))
            .and_then(|_| rustix::fs::renameat(&dir, tmp.as_os_str(), &dir, name.as_os_str()).map_err(|e| e.raw_os_error()));
        if let Err(errno) = renamed {
            let _ = rustix::fs::unlinkat(&dir, tmp.as_os_str(), AtFlags::empty());
            if errno == libc::EISDIR || errno == libc::ENOTEMPTY || errno == libc::EEXIST {
                return Err(Error::new(Code::UnsafePath, format!("{} is a directory; not replaced", self.shown(rel).display())));
            }
            return Err(os_error(errno, &self.shown(rel), "write"));
        }
        self.sync_fd(&dir, rel)
    }

    fn sync_fd(&self, dir: &OwnedFd, rel: &Path) -> Result<()> {
        rustix::fs::fsync(dir).map_err(|e| os_error(e.raw_os_error(), &self.shown(rel), "fsync"))
    }

    /// fsyncs the directory `rel`.
    pub fn sync_dir(&self, rel: &Path) -> Result<()> {
        let d = self.dir(rel)?;
        self.sync_fd(&d, rel)
    }

    /// Creates the directories of `rel` that are missing, one plain name at a time; an
    /// existing component must be a real directory on the volume.
    pub fn mkdir_all(&self, rel: &Path) -> Result<()> {
        let rel = plain(rel)?;
        let mut at = PathBuf::new();
        for c in rel.components() {
            let parent = self.dir(&at)?;
            at.push(c);
            match rustix::fs::mkdirat(&parent, c.as_os_str(), Mode::from_raw_mode(0o700)) {
                Ok(()) => self.sync_fd(&parent, &at)?,
                Err(e) if e == rustix::io::Errno::EXIST => {}
                Err(e) => return Err(os_error(e.raw_os_error(), &self.shown(&at), "create")),
            }
            self.dir(&at)?;
        }
        Ok(())
    }

    /// Renames `from` to `to` (both below the volume), never replacing an existing `to`.
    /// Each side is one name in a directory descriptor proven on the volume: a rename on the
    /// same filesystem, so O(1) whatever the size.
    pub fn rename(&self, from: &Path, to: &Path) -> Result<()> {
        let (fd, fname) = self.parent(from)?;
        let (td, tname) = self.parent(to)?;
        rustix::fs::renameat_with(&fd, fname.as_os_str(), &td, tname.as_os_str(), rustix::fs::RenameFlags::NOREPLACE).map_err(|e| {
            if e == rustix::io::Errno::EXIST || e == rustix::io::Errno::NOTEMPTY {
                Error::new(Code::UnsafePath, format!("{} exists already; refusing to replace it", self.shown(to).display()))
            } else {
                os_error(e.raw_os_error(), &self.shown(from), &format!("move to {}", self.shown(to).display()))
            }
        })
    }

    /// Names and kinds in the directory `rel`, at most `limit` of them (more is `UnsafePath`).
    pub fn list(&self, rel: &Path, limit: usize) -> Result<Vec<(OsString, Kind)>> {
        let d = self.dir(rel)?;
        let mut out = Vec::new();
        let mut err = None;
        for_each_entry(&d, |name, kind| {
            if out.len() >= limit {
                err = Some(Error::new(Code::UnsafePath, format!("{} has more than {limit} entries", self.shown(rel).display())));
                return false;
            }
            out.push((name.to_os_string(), kind));
            true
        })
        .map_err(|e| os_error(e.raw_os_error(), &self.shown(rel), "list"))?;
        err.map_or(Ok(out), Err)
    }

    /// Walks the tree at `rel` (not following links, not leaving the volume's device) within
    /// `limits`, calling `visit` with each entry's path relative to `rel` and its description.
    fn walk(&self, rel: &Path, limits: Limits, visit: &mut dyn FnMut(&Path, &Entry)) -> Result<()> {
        let start = Instant::now();
        let mut seen = 0u64;
        let too_much = || {
            Error::new(
                Code::UnsafePath,
                format!(
                    "{} holds more than the agent walks ({} entries or {:?}); not an etcd member's data",
                    self.shown(rel).display(),
                    limits.entries,
                    limits.time
                ),
            )
        };
        // Pending directories are names with the inode they had when listed, not open
        // descriptors: a tree of a million directories costs memory for names, never the
        // process's descriptor table. Each is resolved again below the root when its turn
        // comes, and must still be that inode.
        let mut stack: Vec<(PathBuf, Option<(u64, u64)>)> = vec![(PathBuf::new(), None)];
        while let Some((at, expect)) = stack.pop() {
            let here = rel.join(&at);
            let d = match self.dir(&here) {
                Ok(d) => d,
                // Removed since it was listed: nothing left to see there.
                Err(e) if is_enoent(&e) && expect.is_some() => continue,
                Err(e) => return Err(e),
            };
            if let Some(id) = expect {
                let st = rustix::fs::fstat(&d).map_err(|e| os_error(e.raw_os_error(), &self.shown(&here), "stat"))?;
                if (st.st_dev, st.st_ino) != id {
                    return Err(Error::new(Code::UnsafePath, format!("{} changed while the agent walked it", self.shown(&here).display())));
                }
            }
            // The bounds count while the directory is read, not after: a directory of ten
            // million names is refused at the limit, never held in memory whole.
            let mut names = Vec::new();
            let mut over = false;
            for_each_entry(&d, |n, _| {
                seen += 1;
                if seen > limits.entries || start.elapsed() > limits.time {
                    over = true;
                    return false;
                }
                names.push(n.to_os_string());
                true
            })
            .map_err(|e| os_error(e.raw_os_error(), &self.shown(&here), "list"))?;
            if over {
                return Err(too_much());
            }
            for n in names {
                let path = at.join(&n);
                let st = match rustix::fs::statat(&d, n.as_os_str(), AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(st) => st,
                    Err(rustix::io::Errno::NOENT) => continue,
                    Err(e) => return Err(os_error(e.raw_os_error(), &self.shown(&rel.join(&path)), "stat")),
                };
                let e = entry_of(&st);
                visit(&path, &e);
                if e.kind == Kind::Dir && e.dev == self.dev {
                    if path.components().count() > limits.depth {
                        return Err(Error::new(
                            Code::UnsafePath,
                            format!("{} is nested deeper than {} levels", self.shown(&rel.join(&path)).display(), limits.depth),
                        ));
                    }
                    stack.push((path, Some((e.dev, e.ino))));
                }
                if start.elapsed() > limits.time {
                    return Err(too_much());
                }
            }
        }
        Ok(())
    }

    /// Bytes and regular files in the tree at `rel` (a file counts as itself).
    pub fn tree_size(&self, rel: &Path, limits: Limits) -> Result<(u64, u64)> {
        match self.entry(rel)? {
            None => Ok((0, 0)),
            Some(e) if e.kind == Kind::File => Ok((e.len, 1)),
            Some(e) if e.kind != Kind::Dir => Ok((0, 0)),
            Some(_) => {
                let (mut bytes, mut files) = (0, 0);
                self.walk(rel, limits, &mut |_, e| {
                    if e.kind == Kind::File {
                        bytes += e.len;
                        files += 1;
                    }
                })?;
                Ok((bytes, files))
            }
        }
    }

    /// Refuses (`UnsafePath`) a tree under `rel` that holds anything but directories and
    /// regular files (a link, a FIFO, a device node, a socket): what a process the agent
    /// starts on the data (etcd, which follows links) must never meet.
    pub fn plain_tree(&self, rel: &Path, limits: Limits) -> Result<()> {
        let mut odd = None;
        self.walk(rel, limits, &mut |p, e| {
            if odd.is_none() && !matches!(e.kind, Kind::Dir | Kind::File) {
                odd = Some((p.to_path_buf(), e.kind));
            }
        })?;
        match odd {
            None => Ok(()),
            Some((p, kind)) => Err(Error::new(
                Code::UnsafePath,
                format!(
                    "{} is a {kind:?}: only directories and regular files may be in a data dir etcd is run on",
                    self.shown(&rel.join(p)).display()
                ),
            )),
        }
    }

    /// (device, inode) of every entry of the volume, the root included: what the holder
    /// check compares processes' open files with.
    pub fn inodes(&self, limits: Limits) -> Result<HashSet<(u64, u64)>> {
        let mut out = HashSet::from([(self.dev, self.ino)]);
        self.walk(Path::new(""), limits, &mut |_, e| {
            out.insert((e.dev, e.ino));
        })?;
        Ok(out)
    }

    /// Removes the directory tree `rel`, bounded by `limits`: every unlink is one name in a
    /// directory descriptor of the tree, so a link swapped in anywhere is removed as a link,
    /// never followed. Returns the entries removed.
    pub fn remove_tree(&self, rel: &Path, limits: Limits) -> Result<u64> {
        let (parent, name) = self.parent(rel)?;
        let st = rustix::fs::statat(&parent, name.as_os_str(), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| os_error(e.raw_os_error(), &self.shown(rel), "stat"))?;
        let e = entry_of(&st);
        if e.kind != Kind::Dir || e.dev != self.dev {
            return Err(Error::new(
                Code::UnsafePath,
                format!("{} is not a directory on the volume; not removed", self.shown(rel).display()),
            ));
        }
        let start = Instant::now();
        let mut removed = 0u64;
        let top = open_subdir(&parent, &name, &e).map_err(|e| os_error(e.raw_os_error(), &self.shown(rel), "open"))?;
        empty_dir(&top, self.dev, 0, limits, start, &mut removed).map_err(|e| match e {
            Walk::Os(errno) => os_error(errno.raw_os_error(), &self.shown(rel), "remove"),
            Walk::Bound => Error::new(
                Code::UnsafePath,
                format!("{} holds more than the agent removes ({:?}); left in place", self.shown(rel).display(), limits),
            ),
        })?;
        rustix::fs::unlinkat(&parent, name.as_os_str(), AtFlags::REMOVEDIR)
            .map_err(|e| os_error(e.raw_os_error(), &self.shown(rel), "remove"))?;
        self.sync_fd(&parent, rel)?;
        Ok(removed + 1)
    }

    /// Free bytes on the volume's filesystem.
    pub fn free_bytes(&self) -> Result<u64> {
        let st = rustix::fs::fstatvfs(self.fd()).map_err(|e| os_error(e.raw_os_error(), &self.shown, "statvfs"))?;
        Ok(st.f_bavail.saturating_mul(st.f_frsize))
    }

    /// Takes etcd's locks on `files` (regular files only; missing ones are skipped): a
    /// shared `flock` (bbolt locks `member/snap/db` with `flock`) and a shared
    /// open-file-description lock (etcd locks its WAL files with `fcntl`). While held, no
    /// etcd can open that data; one that holds it already makes this `PodRunning`.
    pub fn lock(&self, files: &[PathBuf]) -> Result<Locks> {
        let mut held = Vec::new();
        for rel in files {
            let h = match self.handle(rel) {
                Ok(h) => h,
                Err(e) if is_enoent(&e) => continue,
                Err(e) => return Err(e),
            };
            let e = self.stat_fd(&h, rel)?;
            if e.kind != Kind::File {
                return Err(Error::new(Code::UnsafePath, format!("{} is not a regular file ({:?})", self.shown(rel).display(), e.kind)));
            }
            let f = self.reopen(&h, rel, OFlags::RDONLY)?;
            let busy = |how: &str| {
                Error::new(
                    Code::PodRunning,
                    format!("{} is locked ({how}) by a running etcd; the agent acts only while etcd is stopped", self.shown(rel).display()),
                )
            };
            rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockShared).map_err(|_| busy("flock"))?;
            ofd_lock_shared(&f).map_err(|_| busy("fcntl"))?;
            held.push(f);
        }
        Ok(Locks { _files: held })
    }

    /// The files etcd locks in the data dir `data`: its WAL segments and its bbolt db.
    pub fn etcd_lock_files(&self, data: &Path) -> Result<Vec<PathBuf>> {
        let wal = data.join("member/wal");
        let mut files = vec![data.join("member/snap/db")];
        if self.entry(&wal)?.is_some_and(|e| e.kind == Kind::Dir) {
            for (name, kind) in self.list(&wal, 10_000)? {
                if kind == Kind::File && name.as_bytes().ends_with(b".wal") {
                    files.push(wal.join(name));
                }
            }
        }
        Ok(files)
    }
}

/// Locks taken by [`Volume::lock`], released when dropped.
pub struct Locks {
    _files: Vec<File>,
}

impl Locks {
    pub fn count(&self) -> usize {
        self._files.len()
    }
}

fn ofd_lock_shared(f: &File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: a zeroed `flock` is a valid value; the descriptor is open for the call.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_RDLCK as _;
    fl.l_whence = libc::SEEK_SET as _;
    // SAFETY: F_OFD_SETLK reads the struct we own and does not keep it.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    if r == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

pub use etcd_medic_core::member::parse_member_id;

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn vol() -> (tempfile::TempDir, Volume) {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("v/data/member/snap")).unwrap();
        std::fs::create_dir_all(d.path().join("v/data/member/wal")).unwrap();
        std::fs::write(d.path().join("v/data/member/snap/db"), vec![1u8; 1000]).unwrap();
        std::fs::write(d.path().join("v/data/member_id"), "8e9e05c52164694d\n").unwrap();
        let v = Volume::open(d.path(), Path::new("v")).unwrap();
        (d, v)
    }

    #[test]
    fn links_on_the_way_are_refused_and_entries_described_not_followed() {
        let (d, v) = vol();
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(outside.path().join("snap")).unwrap();
        std::fs::write(outside.path().join("snap/db"), "x").unwrap();
        symlink(outside.path(), d.path().join("v/data/link")).unwrap();
        assert_eq!(v.entry(Path::new("data/link")).unwrap().unwrap().kind, Kind::Symlink);
        assert_eq!(v.entry(Path::new("data/link/snap/db")).unwrap_err().code, Code::UnsafePath);
        assert!(v.entry(Path::new("data/none/x")).unwrap().is_none());
        assert_eq!(v.entry(Path::new("data/../data")).unwrap_err().code, Code::UnsafePath);
        assert_eq!(Volume::open(d.path(), Path::new("v/data/link")).unwrap_err().code, Code::UnsafePath);
        // A rename through a linked parent is refused; nothing arrives outside.
        assert_eq!(v.rename(Path::new("data/member/snap"), Path::new("data/link/moved")).unwrap_err().code, Code::UnsafePath);
        assert!(!outside.path().join("moved").exists());
    }

    #[test]
    fn reads_only_small_regular_files() {
        let (d, v) = vol();
        assert_eq!(parse_member_id(&v.read_small(Path::new("data/member_id"), 64).unwrap().unwrap()), Ok(0x8e9e05c52164694d));
        nix::unistd::mkfifo(&d.path().join("v/data/fifo"), nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        assert_eq!(v.read_small(Path::new("data/fifo"), 64).unwrap_err().code, Code::UnsafePath, "a FIFO is never opened");
        let big = File::create(d.path().join("v/data/big")).unwrap();
        big.set_len(10 << 30).unwrap();
        assert_eq!(v.read_small(Path::new("data/big"), 64).unwrap_err().code, Code::UnsafePath);
        symlink("/etc/hostname", d.path().join("v/data/host")).unwrap();
        assert_eq!(v.read_small(Path::new("data/host"), 64).unwrap_err().code, Code::UnsafePath);
        assert!(v.read_small(Path::new("data/none"), 64).unwrap().is_none());
        assert!(parse_member_id(b"").is_err() && parse_member_id(b"xyz").is_err() && parse_member_id(&[b'a'; 17]).is_err());
    }

    #[test]
    fn writes_replace_planted_entries_without_opening_them() {
        let (d, v) = vol();
        nix::unistd::mkfifo(&d.path().join("v/data/keep"), nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        v.write_file(Path::new("data/keep"), b"hello").unwrap();
        assert_eq!(std::fs::read(d.path().join("v/data/keep")).unwrap(), b"hello");
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("f"), "canary").unwrap();
        symlink(outside.path().join("f"), d.path().join("v/data/keep2")).unwrap();
        v.write_file(Path::new("data/keep2"), b"x").unwrap();
        assert_eq!(std::fs::read_to_string(outside.path().join("f")).unwrap(), "canary");
        assert!(!d.path().join("v/data/keep2").is_symlink());
        std::fs::create_dir(d.path().join("v/data/adir")).unwrap();
        assert_eq!(v.write_file(Path::new("data/adir"), b"x").unwrap_err().code, Code::UnsafePath);
        let leftovers = std::fs::read_dir(d.path().join("v/data"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .count();
        assert_eq!(leftovers, 0);
    }

    #[test]
    fn renames_never_replace_and_trees_are_bounded() {
        let (d, v) = vol();
        v.mkdir_all(Path::new("q/a/b")).unwrap();
        v.rename(Path::new("data/member/snap"), Path::new("q/a/b/snap")).unwrap();
        assert!(d.path().join("v/q/a/b/snap/db").is_file());
        std::fs::create_dir(d.path().join("v/data/member/snap")).unwrap();
        std::fs::write(d.path().join("v/data/member/snap/x"), "x").unwrap();
        assert_eq!(v.rename(Path::new("data/member/snap"), Path::new("q/a/b/snap")).unwrap_err().code, Code::UnsafePath);
        assert_eq!(v.tree_size(Path::new("q"), Limits::default()).unwrap(), (1000, 1));
        for i in 0..50 {
            std::fs::write(d.path().join(format!("v/q/a/f{i}")), "").unwrap();
        }
        let small = Limits { entries: 10, ..Limits::default() };
        assert_eq!(v.tree_size(Path::new("q"), small).unwrap_err().code, Code::UnsafePath);
        assert_eq!(v.remove_tree(Path::new("q"), small).unwrap_err().code, Code::UnsafePath);
        assert!(v.inodes(Limits::default()).unwrap().len() > 50);
    }

    #[test]
    fn removal_unlinks_links_and_never_follows_them() {
        let (d, v) = vol();
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(outside.path().join("keep/deep")).unwrap();
        std::fs::write(outside.path().join("keep/deep/f"), "canary").unwrap();
        v.mkdir_all(Path::new("q/x")).unwrap();
        symlink(outside.path().join("keep"), d.path().join("v/q/x/link")).unwrap();
        assert_eq!(v.remove_tree(Path::new("q"), Limits::default()).unwrap(), 3);
        assert!(!d.path().join("v/q").exists());
        assert_eq!(std::fs::read_to_string(outside.path().join("keep/deep/f")).unwrap(), "canary");
        // The tree itself given as a link is refused.
        symlink(outside.path().join("keep"), d.path().join("v/q")).unwrap();
        assert_eq!(v.remove_tree(Path::new("q"), Limits::default()).unwrap_err().code, Code::UnsafePath);
        assert!(outside.path().join("keep/deep/f").exists());
    }

    #[test]
    fn locks_conflict_with_etcds_own() {
        let (d, v) = vol();
        let db = d.path().join("v/data/member/snap/db");
        let held = File::open(&db).unwrap();
        rustix::fs::flock(&held, rustix::fs::FlockOperation::NonBlockingLockExclusive).unwrap();
        let e = v.lock(&[PathBuf::from("data/member/snap/db")]).err().expect("a held flock refuses");
        assert_eq!(e.code, Code::PodRunning);
        drop(held);
        let locks = v.lock(&v.etcd_lock_files(Path::new("data")).unwrap()).unwrap();
        assert_eq!(locks.count(), 1);
        // While the agent holds them, etcd's exclusive flock cannot be taken.
        let etcd = File::open(&db).unwrap();
        assert!(rustix::fs::flock(&etcd, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err());
    }
}
