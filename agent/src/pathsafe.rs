//! Reaching a path without trusting it: one component at a time with `O_NOFOLLOW`, so no
//! symlink and no `..` anywhere can lead outside the root; and the mount table, because a
//! bind mount on the same filesystem cannot be told from its parent by `st_dev`.

use std::os::fd::OwnedFd;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{OFlag, open, openat};
use nix::sys::stat::Mode;

use crate::error::{Code, Error, Result};

/// Opens the directory `root/rel`, refusing any symlink or `..` on the way.
/// A missing component is `DataDirNotFound`; a symlink or non-directory is `UnsafePath`.
pub fn open_dir_beneath(root: &Path, rel: &Path) -> Result<OwnedFd> {
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let mut fd = open(root, flags, Mode::empty()).map_err(|e| walk_error(e, root))?;
    let mut at = root.to_path_buf();
    for comp in rel.components() {
        let name = match comp {
            Component::Normal(n) => n,
            Component::CurDir => continue,
            _ => return Err(Error::new(Code::UnsafePath, format!("{} has a '..' or absolute component", rel.display()))),
        };
        at.push(name);
        fd = openat(&fd, name, flags, Mode::empty()).map_err(|e| walk_error(e, &at))?;
    }
    Ok(fd)
}

fn walk_error(e: Errno, at: &Path) -> Error {
    match e {
        Errno::ENOENT => Error::new(Code::DataDirNotFound, format!("{} does not exist (is the pod being deleted?)", at.display())),
        Errno::ELOOP | Errno::ENOTDIR => {
            let what = if at.is_symlink() { "a symlink" } else { "not a directory" };
            Error::new(Code::UnsafePath, format!("{} is {what}; the agent never follows links on a volume path", at.display()))
        }
        other => Error::new(Code::UnsafePath, format!("cannot open {}: {other}", at.display())),
    }
}

/// `rel` below `root` is a real directory reached without links.
pub fn check_dir_beneath(root: &Path, rel: &Path) -> Result<PathBuf> {
    open_dir_beneath(root, rel)?;
    Ok(root.join(rel))
}

/// The entry `root/rel` without following any link: its parents must be real directories
/// (a link among them is `UnsafePath`), and the entry itself is described, not followed.
/// `None` when it, or a parent, does not exist.
pub fn entry_beneath(root: &Path, rel: &Path) -> Result<Option<std::fs::Metadata>> {
    if let Some(parent) = rel.parent().filter(|p| !p.as_os_str().is_empty()) {
        match open_dir_beneath(root, parent) {
            Ok(_) => {}
            Err(e) if e.code == Code::DataDirNotFound => return Ok(None),
            Err(e) => return Err(e),
        }
    }
    Ok(root.join(rel).symlink_metadata().ok())
}

/// Mount points of this process's mount namespace, from `/proc/self/mountinfo` text.
pub fn mount_points(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo.lines().filter_map(|l| l.split(' ').nth(4)).map(|p| PathBuf::from(unescape(p))).collect()
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    let mut out = Vec::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn is_mount_point(path: &Path) -> bool {
    let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    mount_points(&table).iter().any(|m| m == path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walks_plain_directories() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("a/b/c")).unwrap();
        assert!(check_dir_beneath(d.path(), Path::new("a/b/c")).is_ok());
    }

    #[test]
    fn refuses_symlinks_anywhere_on_the_way() {
        let d = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("a")).unwrap();
        std::os::unix::fs::symlink(outside.path(), d.path().join("a/link")).unwrap();
        std::fs::create_dir_all(outside.path().join("x")).unwrap();
        for rel in ["a/link", "a/link/x"] {
            let e = check_dir_beneath(d.path(), Path::new(rel)).unwrap_err();
            assert_eq!(e.code, Code::UnsafePath, "{rel}: {e}");
            assert!(e.message.contains("symlink"), "{e}");
        }
    }

    #[test]
    fn refuses_dot_dot_and_reports_missing() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("a")).unwrap();
        assert_eq!(check_dir_beneath(d.path(), Path::new("a/../a")).unwrap_err().code, Code::UnsafePath);
        assert_eq!(check_dir_beneath(d.path(), Path::new("a/gone")).unwrap_err().code, Code::DataDirNotFound);
        std::fs::write(d.path().join("a/file"), "").unwrap();
        assert_eq!(check_dir_beneath(d.path(), Path::new("a/file")).unwrap_err().code, Code::UnsafePath);
    }

    #[test]
    fn entries_are_described_not_followed() {
        let d = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(outside.path().join("snap")).unwrap();
        std::fs::write(outside.path().join("snap/db"), "x").unwrap();
        std::fs::create_dir_all(d.path().join("data")).unwrap();
        std::os::unix::fs::symlink(outside.path(), d.path().join("data/member")).unwrap();
        assert_eq!(entry_beneath(d.path(), Path::new("data/member/snap/db")).unwrap_err().code, Code::UnsafePath);
        assert!(entry_beneath(d.path(), Path::new("data/member")).unwrap().unwrap().file_type().is_symlink());
        assert!(entry_beneath(d.path(), Path::new("data/none/x")).unwrap().is_none());
    }

    #[test]
    fn parses_mountinfo_with_escapes() {
        let text = "36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 - ext3 /dev/root rw\n\
                    37 35 0:20 / /var/lib/kubelet/pods/u/volumes/kubernetes.io~csi/pv/mount rw - tmpfs tmpfs rw\n";
        let mps = mount_points(text);
        assert_eq!(mps[0], PathBuf::from("/mnt/with space"));
        assert_eq!(mps[1], PathBuf::from("/var/lib/kubelet/pods/u/volumes/kubernetes.io~csi/pv/mount"));
    }
}
