//! Does any process on the node still use the data? Read from the host's `/proc` (the
//! agent runs with `hostPID`): each process's cwd, root, open files and maps, compared by
//! device and inode with the volume's tree. Each refusal is a code.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags};

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
            && in_root(&dir, &dd, &denied) == data_id
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

/// How long a scan of the node's processes may take: it stats what processes hold open,
/// and a hung filesystem (a stopped NFS or FUSE server in a tenant's pod) blocks a stat.
pub const SCAN_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// Scans that outlived their deadline and still hang in the kernel. Beyond a few, no new
/// scan starts: each would only add a thread stuck on the same filesystem.
static STUCK: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
const MAX_STUCK: usize = 4;

/// [`holders`] on a thread of its own, waited for at most `deadline`: a scan that does not
/// end cannot prove anything, and is a refusal (`PodRunning`), never a pass.
pub fn holders_within(
    proc_root: &Path,
    tree: HashSet<(u64, u64)>,
    data_id: Option<(u64, u64)>,
    deadline: std::time::Duration,
) -> Result<Scan> {
    let proc_root = proc_root.to_path_buf();
    within(deadline, &STUCK, move || holders(&proc_root, &tree, data_id))
}

/// `scan` on a thread of its own, waited for at most `deadline`; `stuck` counts those given up.
fn within(
    deadline: std::time::Duration,
    stuck: &'static std::sync::atomic::AtomicUsize,
    scan: impl FnOnce() -> Scan + Send + 'static,
) -> Result<Scan> {
    use std::sync::atomic::Ordering;
    use std::sync::{Arc, Condvar, Mutex};
    let cannot = |why: String| Error::new(Code::PodRunning, format!("cannot prove that no process uses the volume: {why}"));
    if stuck.load(Ordering::SeqCst) >= MAX_STUCK {
        return Err(cannot(format!("{MAX_STUCK} earlier scans of the node's processes still hang (a hung filesystem?)")));
    }
    // The scan's answer, and whether its waiter gave up: both under one lock, so that a scan
    // ending just as its deadline passes is either taken or counted stuck, never both.
    let shared = Arc::new((Mutex::new((None::<Scan>, false)), Condvar::new()));
    let theirs = shared.clone();
    std::thread::Builder::new()
        .name("process-scan".into())
        .spawn(move || {
            let scan = scan();
            let (lock, ended) = &*theirs;
            let mut s = lock.lock().unwrap_or_else(|p| p.into_inner());
            if s.1 {
                stuck.fetch_sub(1, Ordering::SeqCst);
            } else {
                s.0 = Some(scan);
                ended.notify_one();
            }
        })
        .map_err(|e| Error::new(Code::Internal, format!("cannot start the process scan: {e}")))?;
    let (lock, ended) = &*shared;
    let s = lock.lock().unwrap_or_else(|p| p.into_inner());
    let (mut s, _) = ended.wait_timeout_while(s, deadline, |s| s.0.is_none()).unwrap_or_else(|p| p.into_inner());
    if let Some(scan) = s.0.take() {
        return Ok(scan);
    }
    s.1 = true;
    stuck.fetch_add(1, Ordering::SeqCst);
    Err(cannot(format!("the scan of the node's processes did not end within {deadline:?} (a process's files on a hung filesystem?)")))
}

/// The agent can look into the node's processes at all (readiness): a DaemonSet without
/// `SYS_PTRACE`, or confined by AppArmor, sees into none but its own.
pub fn can_inspect(proc_root: &Path) -> Result<()> {
    let scan = holders_within(proc_root, HashSet::new(), None, SCAN_DEADLINE).map_err(|e| Error::new(Code::NotReady, e.message))?;
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

/// (device, inode) of `path` as the process sees it: resolved inside the process's own root
/// (`/proc/<pid>/root`, links scoped to it by `RESOLVE_IN_ROOT`), so that a data dir the
/// tenant names, or a link in it, never leads the agent to a path of its own or the node's.
fn in_root(proc_dir: &Path, path: &str, denied: &std::cell::RefCell<Option<String>>) -> Option<(u64, u64)> {
    let at = proc_dir.join("root");
    let root = match rustix::fs::open(&at, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty()) {
        Ok(fd) => pathrs::Root::from_fd(fd),
        Err(e) => {
            if e == rustix::io::Errno::ACCESS || e == rustix::io::Errno::PERM {
                denied.borrow_mut().get_or_insert_with(|| format!("{}: {e}", at.display()));
            }
            return None;
        }
    };
    let h = root.resolve(path.trim_start_matches('/')).ok()?;
    let st = rustix::fs::fstat(&h).ok()?;
    Some((st.st_dev, st.st_ino))
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
    let scan = holders_within(proc_root, tree, data_id, SCAN_DEADLINE)?;
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
    fn a_scan_that_does_not_end_in_time_proves_nothing_and_stuck_scans_are_bounded() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static STUCK: AtomicUsize = AtomicUsize::new(0);
        use std::time::Duration;
        let ended = within(Duration::from_secs(5), &STUCK, Scan::default).unwrap();
        assert_eq!(ended.inspected, 0);
        // Scans that hang (a stat on a hung filesystem) until released.
        let (release, held) = std::sync::mpsc::channel::<()>();
        let held = std::sync::Arc::new(std::sync::Mutex::new(held));
        let hung = || {
            let held = held.clone();
            move || {
                let _ = held.lock().unwrap().recv();
                Scan::default()
            }
        };
        for n in 1..=MAX_STUCK {
            let e = within(Duration::from_millis(20), &STUCK, hung()).unwrap_err();
            assert_eq!(e.code, Code::PodRunning, "{e}");
            assert!(e.message.contains("did not end within"), "{e}");
            assert_eq!(STUCK.load(Ordering::SeqCst), n);
        }
        let e = within(Duration::from_secs(5), &STUCK, Scan::default).unwrap_err();
        assert!(e.message.contains("still hang"), "no new thread joins the stuck ones: {e}");
        // Released, the stuck scans end and are counted no more.
        for _ in 0..MAX_STUCK {
            release.send(()).unwrap();
        }
        let t = std::time::Instant::now();
        while STUCK.load(Ordering::SeqCst) > 0 && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(STUCK.load(Ordering::SeqCst), 0);
        assert!(within(Duration::from_secs(5), &STUCK, Scan::default).is_ok());
    }

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
