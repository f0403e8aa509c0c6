//! Walks of a tenant's directory trees by descriptor: each entry's kind from the directory
//! itself, subdirectories opened beneath their parent, bounded by entries, depth and time.

use std::ffi::OsStr;
use std::os::fd::OwnedFd;
use std::time::Instant;

use rustix::fs::{AtFlags, FileType, Mode, OFlags};

use std::os::unix::ffi::OsStrExt;

use super::{Entry, Kind, Limits, entry_of, kind_of, mount_id};

/// Opens the directory `name` in `d`, checking it is still the inode `e` described.
pub(super) fn open_subdir(d: &OwnedFd, name: &OsStr, e: &Entry) -> rustix::io::Result<OwnedFd> {
    let sub = rustix::fs::openat(d, name, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())?;
    let st = rustix::fs::fstat(&sub)?;
    if (st.st_dev, st.st_ino) != (e.dev, e.ino) {
        return Err(rustix::io::Errno::AGAIN);
    }
    // A bind mount of the same filesystem keeps the device: the mount tells it.
    if let (Some(parent), Some(here)) = (mount_id(d), mount_id(&sub))
        && parent != here
    {
        return Err(rustix::io::Errno::XDEV);
    }
    Ok(sub)
}

pub(super) fn for_each_entry(d: &OwnedFd, mut f: impl FnMut(&OsStr, Kind) -> bool) -> rustix::io::Result<()> {
    for ent in rustix::fs::Dir::read_from(d)? {
        let ent = ent?;
        let name = OsStr::from_bytes(ent.file_name().to_bytes());
        if name == "." || name == ".." {
            continue;
        }
        let kind = match ent.file_type() {
            FileType::Directory => Kind::Dir,
            FileType::RegularFile => Kind::File,
            FileType::Symlink => Kind::Symlink,
            // Filesystems that do not fill in d_type: asked of the entry (not followed).
            FileType::Unknown => match rustix::fs::statat(d, name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => kind_of(st.st_mode),
                Err(rustix::io::Errno::NOENT) => continue,
                Err(e) => return Err(e),
            },
            _ => Kind::Other,
        };
        if !f(name, kind) {
            break;
        }
    }
    Ok(())
}

pub(super) enum Walk {
    Os(rustix::io::Errno),
    Bound,
}

impl From<rustix::io::Errno> for Walk {
    fn from(e: rustix::io::Errno) -> Self {
        Walk::Os(e)
    }
}

/// Empties the directory `d` (a descriptor): subdirectories on the same device are emptied
/// and removed, everything else (links included) is unlinked by name.
pub(super) fn empty_dir(
    d: &OwnedFd,
    dev: u64,
    depth: usize,
    limits: Limits,
    start: Instant,
    removed: &mut u64,
) -> std::result::Result<(), Walk> {
    if depth > limits.depth {
        return Err(Walk::Bound);
    }
    loop {
        let mut names = Vec::new();
        for_each_entry(d, |n, _| {
            names.push(n.to_os_string());
            names.len() < 4096
        })?;
        if names.is_empty() {
            return Ok(());
        }
        for n in names {
            *removed += 1;
            if *removed > limits.entries || start.elapsed() > limits.time {
                return Err(Walk::Bound);
            }
            let st = match rustix::fs::statat(d, n.as_os_str(), AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => st,
                Err(rustix::io::Errno::NOENT) => continue,
                Err(e) => return Err(e.into()),
            };
            let e = entry_of(&st);
            if e.kind == Kind::Dir {
                if e.dev != dev {
                    return Err(Walk::Os(rustix::io::Errno::XDEV));
                }
                let sub = open_subdir(d, &n, &e)?;
                empty_dir(&sub, dev, depth + 1, limits, start, removed)?;
                rustix::fs::unlinkat(d, n.as_os_str(), AtFlags::REMOVEDIR)?;
            } else {
                match rustix::fs::unlinkat(d, n.as_os_str(), AtFlags::empty()) {
                    Ok(()) | Err(rustix::io::Errno::NOENT) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }
}
