//! Safety gates that are decided from facts: is the pod failing, does any process on the
//! node still use the data, would the cluster keep quorum. Each refusal is a code.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Pod;

use crate::error::{Code, Error, Result};
use crate::volume::{Limits, Volume};

/// What the pod's status says about its etcd container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// `CrashLoopBackOff`, `Error`, …
    pub reason: String,
    /// The last termination message, as a person would want to read it.
    pub message: String,
}

/// The pod is failing: its etcd container waits in `CrashLoopBackOff` or its last run ended
/// in an error, and it is not running now. A running container is `PodRunning` even with
/// `force`; a container that is neither failing nor running is `PodHealthy` unless `force`.
pub fn pod_failure(pod: &Pod, container: &str, force: bool) -> Result<Option<Failure>> {
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    let status = pod.status.as_ref().and_then(|s| s.container_statuses.as_ref()).and_then(|cs| cs.iter().find(|c| c.name == container));
    let Some(cs) = status else {
        return if force {
            Ok(None)
        } else {
            Err(Error::new(Code::PodHealthy, format!("pod {name} reports no status for container {container:?} yet")))
        };
    };
    let state = cs.state.as_ref();
    if state.and_then(|s| s.running.as_ref()).is_some() {
        let what = if cs.ready { "running and ready" } else { "running" };
        return Err(Error::new(
            Code::PodRunning,
            format!("container {container:?} of pod {name} is {what}; the agent acts only while etcd is stopped"),
        ));
    }
    let last = cs.last_state.as_ref().and_then(|s| s.terminated.as_ref()).or(state.and_then(|s| s.terminated.as_ref()));
    let waiting = state.and_then(|s| s.waiting.as_ref()).and_then(|w| w.reason.clone());
    let failed_last = last.is_some_and(|t| t.exit_code != 0);
    let message = last.and_then(|t| t.message.clone()).unwrap_or_default();
    match waiting.as_deref() {
        Some("CrashLoopBackOff") => Ok(Some(Failure { reason: "CrashLoopBackOff".into(), message })),
        _ if failed_last => Ok(Some(Failure { reason: last.and_then(|t| t.reason.clone()).unwrap_or_else(|| "Error".into()), message })),
        _ if force => Ok(None),
        other => Err(Error::new(
            Code::PodHealthy,
            format!("pod {name} is not failing (container {container:?}: {}); pass force to act anyway", other.unwrap_or("no error")),
        )),
    }
}

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

/// One voting or learning member as the agent sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberView {
    pub id: u64,
    pub is_learner: bool,
    /// Answered a status request just now.
    pub healthy: bool,
}

/// What the remediation will do to membership.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// Remove the stale entry (if still listed), then one member is added back.
    ReplaceMember,
}

/// Majority of `n` voters.
pub fn quorum(n: usize) -> usize {
    n / 2 + 1
}

/// The remaining voting members must be a majority now and after the change; never act on
/// a sole member. `target` is the failing member's id when it is still listed.
pub fn check_quorum(members: &[MemberView], target: Option<u64>, change: Change) -> Result<()> {
    let voters: Vec<&MemberView> = members.iter().filter(|m| !m.is_learner).collect();
    let others: Vec<&&MemberView> = voters.iter().filter(|m| Some(m.id) != target).collect();
    if others.is_empty() {
        return Err(Error::new(
            Code::SoleMember,
            "the member is the cluster's only voting member: there is nothing to rejoin; restore from a backup instead",
        ));
    }
    let healthy = others.iter().filter(|m| m.healthy).count();
    let now = quorum(voters.len());
    if healthy < now {
        return Err(Error::new(
            Code::QuorumAtRisk,
            format!("only {healthy} of {} voting members answer; the cluster needs {now} for quorum now", voters.len()),
        ));
    }
    let Change::ReplaceMember = change;
    // After the stale entry goes and the member is added back (not yet started), the
    // cluster has others + 1 voters, of which only the healthy others vote.
    let after = quorum(others.len() + 1);
    if healthy < after {
        return Err(Error::new(
            Code::QuorumAtRisk,
            format!(
                "after re-adding the member the cluster would have {} voters and need {after}, but only {healthy} answer",
                others.len() + 1
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(status: serde_json::Value) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": "apisix-etcd-1"}, "spec": {"containers": [{"name": "etcd"}]},
                                      "status": {"containerStatuses": [status]}}))
        .unwrap()
    }

    #[test]
    fn crash_loop_is_failing_running_is_refused() {
        let crash = pod(json!({"name": "etcd", "ready": false, "restartCount": 5, "image": "", "imageID": "",
            "state": {"waiting": {"reason": "CrashLoopBackOff"}},
            "lastState": {"terminated": {"exitCode": 1, "message": "Error: etcdserver: member not found"}}}));
        let f = pod_failure(&crash, "etcd", false).unwrap().unwrap();
        assert_eq!(f.reason, "CrashLoopBackOff");
        assert!(f.message.contains("member not found"));
        let running = pod(json!({"name": "etcd", "ready": true, "restartCount": 0, "image": "", "imageID": "", "state": {"running": {}}}));
        assert_eq!(pod_failure(&running, "etcd", false).unwrap_err().code, Code::PodRunning);
        assert_eq!(pod_failure(&running, "etcd", true).unwrap_err().code, Code::PodRunning, "force never overrides a running etcd");
        let idle = pod(
            json!({"name": "etcd", "ready": false, "restartCount": 0, "image": "", "imageID": "", "state": {"waiting": {"reason": "ContainerCreating"}}}),
        );
        assert_eq!(pod_failure(&idle, "etcd", false).unwrap_err().code, Code::PodHealthy);
        assert_eq!(pod_failure(&idle, "etcd", true).unwrap(), None);
        let errored = pod(json!({"name": "etcd", "ready": false, "restartCount": 1, "image": "", "imageID": "",
            "state": {"waiting": {"reason": "ContainerCreating"}}, "lastState": {"terminated": {"exitCode": 2, "reason": "Error"}}}));
        assert_eq!(pod_failure(&errored, "etcd", false).unwrap().unwrap().reason, "Error");
    }

    fn m(id: u64, healthy: bool) -> MemberView {
        MemberView { id, is_learner: false, healthy }
    }

    #[test]
    fn quorum_before_and_after() {
        // Target already removed: two healthy others.
        assert!(check_quorum(&[m(1, true), m(2, true)], None, Change::ReplaceMember).is_ok());
        // Target still listed (crash-looping, unhealthy) in a 3-member cluster.
        assert!(check_quorum(&[m(1, true), m(2, true), m(3, false)], Some(3), Change::ReplaceMember).is_ok());
        // Two of three down.
        assert_eq!(
            check_quorum(&[m(1, true), m(2, false), m(3, false)], Some(3), Change::ReplaceMember).unwrap_err().code,
            Code::QuorumAtRisk
        );
        // Removed already and one of the two remaining down: adding back would need 2 of 3.
        assert_eq!(check_quorum(&[m(1, true), m(2, false)], None, Change::ReplaceMember).unwrap_err().code, Code::QuorumAtRisk);
        // Five members, target and one other down: 3 healthy of 4 others, after: need 3 of 5.
        assert!(check_quorum(&[m(1, true), m(2, true), m(3, true), m(4, false), m(5, false)], Some(5), Change::ReplaceMember).is_ok());
        // Learners do not vote, so a healthy learner does not make up for a voter.
        let learner = MemberView { id: 9, is_learner: true, healthy: true };
        assert_eq!(
            check_quorum(&[m(1, true), learner.clone(), m(3, false)], Some(3), Change::ReplaceMember).unwrap_err().code,
            Code::QuorumAtRisk
        );
        assert!(check_quorum(&[m(1, true), m(2, true), learner.clone(), m(3, false)], Some(3), Change::ReplaceMember).is_ok());
        assert_eq!(check_quorum(&[learner, m(3, false)], Some(3), Change::ReplaceMember).unwrap_err().code, Code::SoleMember);
    }

    #[test]
    fn sole_member_is_refused() {
        assert_eq!(check_quorum(&[m(1, false)], Some(1), Change::ReplaceMember).unwrap_err().code, Code::SoleMember);
        assert_eq!(check_quorum(&[], None, Change::ReplaceMember).unwrap_err().code, Code::SoleMember);
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
