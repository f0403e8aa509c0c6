//! Does any process on the node still use the data? Read from the host's `/proc` (the
//! agent runs with `hostPID`): each process's cwd, root, open files and maps, compared by
//! device and inode with the volume's tree. Each refusal is a code.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::error::{Code, Error, Result};
use crate::host::volume::{Limits, Volume};

/// A process on the node that uses the volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    pub command: String,
    /// What ties it to the volume: `cwd`, `fd 7`, `data dir`.
    pub how: String,
}

/// What the process scan found: the processes that use the volume, and those the agent
/// was not allowed to look into (it cannot prove they do not).
#[derive(Debug, Default)]
pub struct Scan {
    pub holders: Vec<Holder>,
    /// etcd processes (by name or command line) the agent may not look into.
    pub hidden: Vec<Holder>,
    /// Other processes it may not look into (a sandbox's init, say).
    pub uninspected: usize,
    /// Processes looked into.
    pub inspected: usize,
}

/// The processes under `proc_root` (the host's `/proc`, with `hostPID`) whose cwd or open
/// files are inside the tree whose (device, inode) pairs are `tree` (device and inode
/// together: the device alone proves nothing on hostPath volumes that share the node's
/// filesystem), or whose etcd data dir (flag or `ETCD_DATA_DIR`, seen through the
/// process's own root) is the directory `data_id`. A process that
/// exits meanwhile is skipped. One the agent may not inspect (no `SYS_PTRACE`, or an LSM
/// such as AppArmor confining the agent) is reported as hidden when its name or command
/// line says etcd, never taken as harmless; others are counted.
pub fn holders(proc_root: &Path, tree: &HashSet<(u64, u64)>, data_id: Option<(u64, u64)>) -> Scan {
    let me = std::process::id();
    let mut scan = Scan::default();
    let Ok(entries) = std::fs::read_dir(proc_root) else { return scan };
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        if pid == me {
            continue;
        }
        let dir = e.path();
        let command = std::fs::read_to_string(dir.join("comm")).unwrap_or_default().trim().to_string();
        scan.inspected += 1;
        let denied = std::cell::RefCell::new(None::<String>);
        let id_of = |p: PathBuf| match std::fs::metadata(&p) {
            Ok(m) => Some((m.dev(), m.ino())),
            Err(e) => {
                if matches!(e.kind(), std::io::ErrorKind::PermissionDenied) {
                    denied.borrow_mut().get_or_insert_with(|| format!("{}: {e}", p.display()));
                }
                None
            }
        };
        let mut how = None;
        if id_of(dir.join("cwd")).is_some_and(|i| tree.contains(&i)) {
            how = Some("cwd".to_string());
        }
        if how.is_none() {
            match std::fs::read_dir(dir.join("fd")) {
                Ok(fds) => {
                    how = fds
                        .flatten()
                        .find(|fd| id_of(fd.path()).is_some_and(|i| tree.contains(&i)))
                        .map(|fd| format!("fd {}", fd.file_name().to_string_lossy()));
                }
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                    denied.borrow_mut().get_or_insert_with(|| format!("{}/fd: {e}", dir.display()));
                }
                Err(_) => {}
            }
        }
        if how.is_none()
            && let Some(dd) = declared_data_dir(&dir)
            && data_id.is_some()
            && id_of(dir.join("root").join(dd.trim_start_matches('/'))) == data_id
        {
            how = Some(format!("data dir {dd}"));
        }
        match (how, denied.into_inner()) {
            (Some(how), _) => scan.holders.push(Holder { pid, command, how }),
            // Its name and command line stay readable: one that may be etcd is a refusal.
            (None, Some(why)) if command.contains("etcd") || cmdline(&dir).iter().any(|a| a.contains("etcd")) => {
                scan.hidden.push(Holder { pid, command, how: why })
            }
            (None, Some(_)) => scan.uninspected += 1,
            (None, None) => {}
        }
    }
    scan
}

/// The agent can look into the node's processes at all (readiness): a DaemonSet without
/// `SYS_PTRACE`, or confined by AppArmor, sees into none but its own.
pub fn can_inspect(proc_root: &Path) -> Result<()> {
    let scan = holders(proc_root, &HashSet::new(), None);
    let others = scan.inspected.saturating_sub(scan.uninspected + scan.hidden.len());
    if scan.inspected > 1 && others == 0 {
        return Err(Error::new(
            Code::NotReady,
            format!(
                "cannot inspect any of the node's {} other processes: the agent needs hostPID, SYS_PTRACE and no AppArmor confinement",
                scan.inspected
            ),
        ));
    }
    Ok(())
}

fn cmdline(proc_dir: &Path) -> Vec<String> {
    nul_separated(&std::fs::read(proc_dir.join("cmdline")).unwrap_or_default())
}

fn nul_separated(raw: &[u8]) -> Vec<String> {
    raw.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect()
}

/// `--data-dir` from a process's command line, else `ETCD_DATA_DIR` from its environment.
fn declared_data_dir(proc_dir: &Path) -> Option<String> {
    let args = cmdline(proc_dir);
    for (i, a) in args.iter().enumerate() {
        if let Some(v) = a.strip_prefix("--data-dir=") {
            return Some(v.to_string());
        }
        if a == "--data-dir" {
            return args.get(i + 1).cloned();
        }
    }
    let env = nul_separated(&std::fs::read(proc_dir.join("environ")).ok()?);
    env.iter().find_map(|kv| kv.strip_prefix("ETCD_DATA_DIR=").map(String::from)).filter(|d| d.starts_with('/'))
}

/// Refuses with `PodRunning` when any process holds the volume (the data dir `data`
/// relative to it); the volume's tree is walked through its proven descriptor, bounded.
pub fn no_holders(proc_root: &Path, vol: &Volume, data: &Path) -> Result<()> {
    let tree = vol.inodes(Limits::default())?;
    let data_id = vol.entry(data)?.map(|e| (e.dev, e.ino));
    let volume_root = vol.path();
    let scan = holders(proc_root, &tree, data_id);
    let list = |v: &[Holder]| v.iter().map(|h| format!("pid {} ({}) by {}", h.pid, h.command, h.how)).collect::<Vec<_>>().join(", ");
    if !scan.holders.is_empty() {
        return Err(Error::new(
            Code::PodRunning,
            format!(
                "processes still use {}: {}; the agent moves nothing while etcd runs on it",
                volume_root.display(),
                list(&scan.holders)
            ),
        ));
    }
    if !scan.hidden.is_empty() {
        let n = scan.hidden.len();
        return Err(Error::new(
            Code::PodRunning,
            format!(
                "cannot prove that no process uses {}: {n} process(es) could not be inspected ({}); the agent needs SYS_PTRACE and no AppArmor confinement",
                volume_root.display(),
                list(&scan.hidden[..n.min(3)])
            ),
        ));
    }
    Ok(())
}

pub use etcd_medic_core::quorum::{Change, MemberView, check_quorum, quorum};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_with_cwd_or_an_open_file_in_the_volume_holds_it() {
        let vol = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(vol.path().join("data/member/wal")).unwrap();
        std::fs::write(vol.path().join("data/member/wal/0.wal"), "x").unwrap();
        let proc = std::path::Path::new("/proc");
        let v = Volume::open(vol.path(), Path::new("")).unwrap();
        let tree = v.inodes(Limits::default()).unwrap();
        assert!(holders(proc, &tree, None).holders.is_empty());
        let mut child = std::process::Command::new("sleep").arg("30").current_dir(vol.path().join("data/member")).spawn().unwrap();
        let found = holders(proc, &tree, None).holders;
        child.kill().unwrap();
        child.wait().unwrap();
        let h = found.iter().find(|h| h.pid == child.id()).expect("the sleeping process holds the volume");
        assert_eq!(h.how, "cwd");
        assert_eq!(no_holders(proc, &v, Path::new("data")).map(|_| ()), Ok(()));
    }
}
