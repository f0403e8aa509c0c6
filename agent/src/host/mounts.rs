//! The mount table: a bind mount on the same filesystem cannot be told from its parent by
//! `st_dev`, so where the kernel cannot say of a descriptor whether it is a mount root
//! (`crate::host::volume::Volume::is_mount_root`), the agent's own mountinfo decides.

use std::path::{Path, PathBuf};

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

/// `path` is a mount point in the agent's own mount namespace (`<proc>/self/mountinfo`).
pub fn is_mount_point(proc_root: &Path, path: &Path) -> bool {
    let table = std::fs::read_to_string(proc_root.join("self/mountinfo")).unwrap_or_default();
    mount_points(&table).iter().any(|m| m == path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo_with_escapes() {
        let text = "36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 - ext3 /dev/root rw\n\
                    37 35 0:20 / /var/lib/kubelet/pods/u/volumes/kubernetes.io~csi/pv/mount rw - tmpfs tmpfs rw\n";
        let mps = mount_points(text);
        assert_eq!(mps[0], PathBuf::from("/mnt/with space"));
        assert_eq!(mps[1], PathBuf::from("/var/lib/kubelet/pods/u/volumes/kubernetes.io~csi/pv/mount"));
    }
}
