//! The node's record of every remediation: `<state dir>/remediations/<id>.json`, written
//! whole and fsynced before each step. It is the agent's own state (trusted, unlike a
//! volume), yet a journal is validated on load: one that does not name itself, or whose
//! fields are out of bounds, is set aside as `<id>.json.bad`, never resumed.

use std::path::{Path, PathBuf};

use crate::engine::{Phase, Remediation};
use crate::error::{Code, Error, Result};
pub use etcd_medic_core::resume::{MAX_RESUMES, needs_resume};

/// Journals larger than this are not read (a journal is a few KiB).
const MAX_JOURNAL_BYTES: u64 = 1 << 20;

pub fn path(state_dir: &Path, id: &str) -> PathBuf {
    state_dir.join("remediations").join(format!("{id}.json"))
}

/// Writes the journal of `r` whole: a temporary file, fsynced, renamed, the dir fsynced.
pub fn write(state_dir: &Path, r: &Remediation) -> Result<()> {
    let path = path(state_dir, &r.id);
    let dir = path.parent().unwrap_or(state_dir);
    let io = |e: std::io::Error| Error::new(Code::NotReady, format!("state dir {}: {e}", dir.display()));
    std::fs::create_dir_all(dir).map_err(io)?;
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_vec_pretty(r).map_err(|e| Error::new(Code::Internal, format!("journal {}: {e}", r.id)))?;
    std::fs::write(&tmp, text).map_err(io)?;
    std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(io)?;
    std::fs::File::open(dir).and_then(|f| f.sync_all()).map_err(io)
}

pub use etcd_medic_core::names::{validate, validate_id};

/// Reads the journal of `id` (an unknown id is `InvalidRequest`).
pub fn read(state_dir: &Path, id: &str) -> Result<Remediation> {
    validate_id(id)?;
    load(&path(state_dir, id)).map_err(|why| Error::new(Code::InvalidRequest, format!("no usable remediation {id}: {why}")))
}

fn load(path: &Path) -> std::result::Result<Remediation, String> {
    let id = path.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
    let len = std::fs::metadata(path).map_err(|e| e.to_string())?.len();
    if len > MAX_JOURNAL_BYTES {
        return Err(format!("{len} bytes"));
    }
    let text = std::fs::read(path).map_err(|e| e.to_string())?;
    let r: Remediation = serde_json::from_slice(&text).map_err(|e| format!("not a journal: {e}"))?;
    validate(&r, id)?;
    Ok(r)
}

/// Every valid journal, newest first. A journal that fails validation is renamed to
/// `.json.bad` (kept for a person, never loaded again); a torn temporary file never
/// replaces a journal (see [`write`]).
pub fn list(state_dir: &Path) -> Vec<Remediation> {
    let Ok(dir) = std::fs::read_dir(state_dir.join("remediations")) else { return Vec::new() };
    let mut all = Vec::new();
    for e in dir.flatten() {
        let p = e.path();
        if p.extension().is_none_or(|x| x != "json") {
            continue;
        }
        match load(&p) {
            Ok(r) => all.push(r),
            Err(why) => {
                tracing::warn!(journal = %p.display(), "setting an invalid journal aside: {why}");
                let _ = std::fs::rename(&p, p.with_extension("json.bad"));
            }
        }
    }
    all.sort_by(|a, b| b.created_at.cmp(&a.created_at).then_with(|| b.id.cmp(&a.id)));
    all
}

/// Keeps the newest `keep` finished journals; journals still Running are never removed.
pub fn prune(state_dir: &Path, keep: usize) {
    // Counting names is cheap; reading and parsing every journal is not worth it below `keep`.
    let count = std::fs::read_dir(state_dir.join("remediations")).map(|d| d.count()).unwrap_or(0);
    if count <= keep {
        return;
    }
    for r in list(state_dir).into_iter().filter(|r| r.finished_at.is_some()).skip(keep) {
        let _ = std::fs::remove_file(path(state_dir, &r.id));
    }
}

/// Held while a remediation runs in some process on this node: an exclusive `flock` on
/// `<state dir>/running/<id>.lock`, which the kernel releases when that process dies, so a
/// Running journal whose lock is free belongs to an agent that is gone.
pub struct RunLock {
    _file: std::fs::File,
}

pub fn lock_run(state_dir: &Path, id: &str) -> Result<RunLock> {
    use std::os::fd::AsFd;
    validate_id(id)?;
    let dir = state_dir.join("running");
    let io = |e: std::io::Error| Error::new(Code::NotReady, format!("state dir {}: {e}", dir.display()));
    std::fs::create_dir_all(&dir).map_err(io)?;
    let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(dir.join(format!("{id}.lock"))).map_err(io)?;
    rustix::fs::flock(file.as_fd(), rustix::fs::FlockOperation::NonBlockingLockExclusive)
        .map_err(|_| Error::new(Code::ClusterLocked, format!("remediation {id} is running in another process on this node")))?;
    Ok(RunLock { _file: file })
}

/// Whether remediation `id` runs in some process on this node now.
pub fn is_running(state_dir: &Path, id: &str) -> bool {
    if validate_id(id).is_err() {
        return false;
    }
    let path = state_dir.join("running").join(format!("{id}.lock"));
    let Ok(file) = std::fs::File::open(&path) else { return false };
    use std::os::fd::AsFd;
    rustix::fs::flock(file.as_fd(), rustix::fs::FlockOperation::NonBlockingLockShared).is_err()
}

/// The newest journal of `namespace/pod` that needs resuming (no process runs it now).
pub fn unfinished(state_dir: &Path, namespace: &str, pod: &str) -> Option<Remediation> {
    list(state_dir).into_iter().find(|r| needs_resume(r) && r.namespace == namespace && r.pod == pod && !is_running(state_dir, &r.id))
}

/// Journals of `namespace/pod` left Running before anything was changed by a process that
/// is gone (killed during its checks): closed as Refused, saying so.
pub fn close_abandoned_of(state_dir: &Path, namespace: &str, pod: &str) {
    for mut r in list(state_dir)
        .into_iter()
        .filter(|r| r.phase == Phase::Running && !r.dry_run && !needs_resume(r) && r.namespace == namespace && r.pod == pod)
        .filter(|r| !is_running(state_dir, &r.id))
    {
        let _ = close_abandoned(state_dir, &mut r);
    }
}

/// A journal left Running before anything was changed (the agent stopped during its
/// checks) is closed as Refused: nothing happened, and it says so.
pub fn close_abandoned(state_dir: &Path, r: &mut Remediation) -> Result<()> {
    etcd_medic_core::resume::close_abandoned(r);
    write(state_dir, r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::QuarantineRecord;

    fn journal(id: &str) -> Remediation {
        let mut r = Remediation::new("n", "apisix", "apisix-etcd-1", None);
        r.id = id.into();
        r
    }

    #[test]
    fn a_journal_must_name_itself_and_stay_in_bounds() {
        let r = journal("abc123");
        assert!(validate(&r, "abc123").is_ok());
        assert!(validate(&r, "other").is_err());
        let mut bad = r.clone();
        bad.pod = "../x".into();
        assert!(validate(&bad, "abc123").is_err());
        let mut q = r.clone();
        q.quarantine = Some(QuarantineRecord {
            name: "20261203T181329Z-abc123".into(),
            items: vec!["member/snap".into()],
            member_id: Some("8e9e05c52164694d".into()),
            state: crate::quarantine::State::Moving,
        });
        assert!(validate(&q, "abc123").is_ok());
        for (name, item) in [("20261203T181329Z-zzz", "member/snap"), ("x-abc123", "member/snap"), ("20261203T181329Z-abc123", "../etc")] {
            let mut b = q.clone();
            b.quarantine.as_mut().unwrap().name = name.into();
            b.quarantine.as_mut().unwrap().items = vec![item.into()];
            assert!(validate(&b, "abc123").is_err(), "{name} {item}");
        }
    }

    #[test]
    fn a_run_lock_says_whether_a_remediation_runs_on_this_node() {
        let d = tempfile::tempdir().unwrap();
        assert!(!is_running(d.path(), "abc"));
        let held = lock_run(d.path(), "abc").unwrap();
        assert!(is_running(d.path(), "abc"));
        assert_eq!(lock_run(d.path(), "abc").err().map(|e| e.code), Some(Code::ClusterLocked));
        drop(held);
        assert!(!is_running(d.path(), "abc"), "released when its holder goes");
    }

    #[test]
    fn invalid_journals_are_set_aside_not_loaded() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), &journal("good1")).unwrap();
        let mut liar = journal("liar1");
        liar.id = "good1".into();
        std::fs::write(path(d.path(), "liar1"), serde_json::to_vec(&liar).unwrap()).unwrap();
        std::fs::write(path(d.path(), "junk1"), b"{not json").unwrap();
        let all = list(d.path());
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].id, "good1");
        assert!(d.path().join("remediations/liar1.json.bad").exists() && d.path().join("remediations/junk1.json.bad").exists());
        assert_eq!(read(d.path(), "junk1").unwrap_err().code, Code::InvalidRequest);
    }
}
