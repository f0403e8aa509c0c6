//! The crashed container's own words, read on the node without the API server. The kubelet
//! writes each start of a container to
//! `<pod-log-root>/<namespace>_<pod>_<uid>/<container>/<restart count>.log` (CRI format),
//! and keeps the previous start's file beside the current one. Their bytes are the tenant's
//! (etcd's and its scripts' output), so they are read by the volume module's rules: the
//! directory opened without following a link, a file read only if it is a regular file on
//! that directory's device, and only its tail.

use std::path::{Path, PathBuf};

use crate::error::Result;
use crate::host::volume::{Kind, Volume};

/// Bytes read from the end of a log file: etcd's last lines with a goroutine dump after a
/// panic fit many times over.
pub const TAIL_BYTES: u64 = 256 * 1024;

/// Entries a container's log dir may hold before the agent stops reading it.
const MAX_ENTRIES: usize = 4096;

/// The last start's output, as lines (oldest first), and the file it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LastAttempt {
    pub file: PathBuf,
    pub lines: Vec<String>,
}

/// The directory of one container's logs, relative to the log root.
pub fn container_dir(namespace: &str, pod: &str, uid: &str, container: &str) -> PathBuf {
    PathBuf::from(format!("{namespace}_{pod}_{uid}")).join(container)
}

/// The container's last start, read from its tail: `<restarts>.log` when the pod's status
/// gives the restart count and that file is there, else the newest `<n>.log`. `Ok(None)`
/// when the node has no log of it (another runtime layout, the pod just created); a log
/// that is a link (cri-dockerd links Docker's files here) is `UnsafePath`, never followed.
pub fn last_attempt(
    log_root: &Path,
    namespace: &str,
    pod: &str,
    uid: &str,
    container: &str,
    restarts: Option<u32>,
) -> Result<Option<LastAttempt>> {
    let rel = container_dir(namespace, pod, uid, container);
    let dir = match Volume::open(log_root, &rel) {
        Ok(d) => d,
        Err(e) if e.code == crate::error::Code::DataDirNotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let starts: Vec<(u64, std::ffi::OsString, Kind)> = dir
        .list(Path::new(""), MAX_ENTRIES)?
        .into_iter()
        .filter_map(|(name, kind)| restart_number(name.to_str()?).map(|n| (n, name, kind)))
        .collect();
    let wanted = restarts.and_then(|r| starts.iter().find(|(n, _, _)| *n == u64::from(r)));
    let Some((_, name, kind)) = wanted.or_else(|| starts.iter().max_by_key(|(n, _, _)| *n)) else { return Ok(None) };
    if *kind != Kind::File {
        return Err(crate::error::Error::new(
            crate::error::Code::UnsafePath,
            format!("{} is not a regular file ({kind:?}; a cri-dockerd link?): not followed", dir.shown(Path::new(name)).display()),
        ));
    }
    let Some((bytes, whole)) = dir.read_tail(Path::new(name), TAIL_BYTES)? else { return Ok(None) };
    let text = String::from_utf8_lossy(&bytes);
    // A tail that starts mid-line drops that partial line.
    let text = if whole { &text[..] } else { text.split_once('\n').map_or("", |(_, rest)| rest) };
    Ok(Some(LastAttempt { file: dir.shown(Path::new(name)), lines: etcd_medic_core::signature::cri_lines(text) }))
}

/// `3.log` → 3; rotated (`3.log.20261204-101010`, `.gz`) and other files are not a start.
fn restart_number(name: &str) -> Option<u64> {
    let n = name.strip_suffix(".log")?;
    (!n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())).then(|| n.parse().ok()).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_numbers() {
        assert_eq!(restart_number("0.log"), Some(0));
        assert_eq!(restart_number("12.log"), Some(12));
        assert_eq!(restart_number("3.log.20261204-101010"), None);
        assert_eq!(restart_number(".log"), None);
        assert_eq!(restart_number("x.log"), None);
    }

    #[test]
    fn reads_the_newest_start_from_its_tail() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join(container_dir("apisix", "apisix-etcd-1", "u1", "etcd"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("1.log"), "2026-12-04T10:00:00Z stderr F Error: etcdserver: member not found\n").unwrap();
        std::fs::write(dir.join("9.log"), "2026-12-04T10:00:00Z stderr F newest\n").unwrap();
        std::fs::write(dir.join("10.log.20261204-100000"), "rotated\n").unwrap();
        let a = last_attempt(root.path(), "apisix", "apisix-etcd-1", "u1", "etcd", None).unwrap().unwrap();
        assert_eq!(a.lines, ["newest"]);
        assert!(a.file.ends_with("etcd/9.log"));
        // The status says the crash was start 1: a newer file is a start it does not show yet.
        let a = last_attempt(root.path(), "apisix", "apisix-etcd-1", "u1", "etcd", Some(1)).unwrap().unwrap();
        assert_eq!(a.lines, ["Error: etcdserver: member not found"]);
        // A long log is read from its tail only, its first (cut) line dropped.
        let long: String = (0..20000).map(|i| format!("2026-12-04T10:00:00Z stderr F line {i}\n")).collect();
        std::fs::write(dir.join("11.log"), &long).unwrap();
        let a = last_attempt(root.path(), "apisix", "apisix-etcd-1", "u1", "etcd", Some(11)).unwrap().unwrap();
        assert_eq!(a.lines.last().map(String::as_str), Some("line 19999"));
        assert!(a.lines.len() < 20000 && a.lines[0].starts_with("line "), "{:?}", &a.lines[..2]);
        assert_eq!(last_attempt(root.path(), "apisix", "other", "u2", "etcd", None).unwrap(), None);
    }

    #[test]
    fn links_and_fifos_are_not_read() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join(container_dir("ns", "p", "u", "etcd"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(root.path().join("secret"), "2026-12-04T10:00:00Z stderr F secret\n").unwrap();
        std::os::unix::fs::symlink(root.path().join("secret"), dir.join("5.log")).unwrap();
        // A link is refused, never followed (cri-dockerd's layout says so instead of "no log").
        let e = last_attempt(root.path(), "ns", "p", "u", "etcd", None).unwrap_err();
        assert!(e.message.contains("not followed"), "{}", e.message);
        nix::unistd::mkfifo(&dir.join("6.log"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert_eq!(
            last_attempt(root.path(), "ns", "p", "u", "etcd", Some(6)).unwrap_err().code,
            crate::error::Code::UnsafePath,
            "a FIFO is never opened"
        );
        // A linked container dir is refused, not followed.
        let other = root.path().join(container_dir("ns", "q", "u", "x"));
        std::fs::create_dir_all(other.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(&dir, &other).unwrap();
        let e = last_attempt(root.path(), "ns", "q", "u", "x", None).unwrap_err();
        assert_eq!(e.code, crate::error::Code::UnsafePath);
    }
}
