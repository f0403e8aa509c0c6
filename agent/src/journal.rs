//! The node's record of every remediation: `<state dir>/remediations/<id>.json`, written
//! whole and fsynced before each step. It is the agent's own state (trusted, unlike a
//! volume), yet a journal is validated on load: one that does not name itself, or whose
//! fields are out of bounds, is set aside as `<id>.json.bad`, never resumed.

use std::path::{Path, PathBuf};

use crate::engine::{Phase, Remediation};
use crate::error::{Code, Error, Result};
use etcd_medic_core::contract::QuarantineState;
pub use etcd_medic_core::resume::{MAX_RESUMES, needs_resume};

/// Journals larger than this are not read (a journal is a few KiB).
const MAX_JOURNAL_BYTES: u64 = 1 << 20;

pub fn path(state_dir: &Path, id: &str) -> PathBuf {
    state_dir.join("remediations").join(format!("{id}.json"))
}

/// Journal writes that failed since the process started (`/metrics`: a full, read-only or
/// vanished state dir).
static WRITE_ERRORS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

pub fn write_errors() -> u64 {
    WRITE_ERRORS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Writes the journal of `r` whole: a temporary file, fsynced, renamed, the dir fsynced.
pub fn write(state_dir: &Path, r: &Remediation) -> Result<()> {
    let written = write_whole(state_dir, r);
    if written.is_err() {
        WRITE_ERRORS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    written
}

fn write_whole(state_dir: &Path, r: &Remediation) -> Result<()> {
    let path = path(state_dir, &r.id);
    let dir = path.parent().unwrap_or(state_dir);
    let io = |e: std::io::Error| Error::new(Code::NotReady, format!("state dir {}: {e}", dir.display()));
    std::fs::create_dir_all(dir).map_err(io)?;
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_vec_pretty(r).map_err(|e| Error::new(Code::Internal, format!("journal {}: {e}", r.id)))?;
    // What could not be read back is not written (every field it holds is bounded well below).
    if text.len() as u64 > MAX_JOURNAL_BYTES {
        return Err(Error::new(Code::Internal, format!("journal {} would be {} bytes, over {MAX_JOURNAL_BYTES}", r.id, text.len())));
    }
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

/// The journals' files, each loaded and validated in turn (one in memory at a time): a
/// journal that fails validation is renamed to `.json.bad` (kept for a person, never loaded
/// again, pruned with the oldest); a torn temporary file never replaces a journal (see
/// [`write`]).
fn each(state_dir: &Path, mut f: impl FnMut(Remediation, u64)) {
    let Ok(dir) = std::fs::read_dir(state_dir.join("remediations")) else { return };
    for e in dir.flatten() {
        let p = e.path();
        if p.extension().is_none_or(|x| x != "json") {
            continue;
        }
        match load(&p) {
            Ok(r) => f(r, e.metadata().map(|m| m.len()).unwrap_or(0)),
            Err(why) => {
                tracing::warn!(journal = %p.display(), "setting an invalid journal aside: {why}");
                let _ = std::fs::rename(&p, p.with_extension("json.bad"));
            }
        }
    }
}

fn newest_first(all: &mut [Remediation]) {
    all.sort_by(|a, b| b.created_at.cmp(&a.created_at).then_with(|| b.id.cmp(&a.id)));
}

/// The valid journals that `keep` picks, newest first. Only those are held in memory.
pub fn list_where(state_dir: &Path, keep: impl Fn(&Remediation) -> bool) -> Vec<Remediation> {
    let mut all = Vec::new();
    each(state_dir, |r, _| {
        if keep(&r) {
            all.push(r)
        }
    });
    newest_first(&mut all);
    all
}

/// What the scans of every journal need of one (not its plan, diagnosis or steps).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub id: String,
    pub namespace: String,
    pub created_at: String,
    pub finished: bool,
    pub dry_run: bool,
    /// Its quarantine is still on the volume (or being moved): a restore needs the journal.
    pub holds_quarantine: bool,
    pub bytes: u64,
}

/// Every valid journal as an [`Entry`], newest first.
pub fn index(state_dir: &Path) -> Vec<Entry> {
    let mut all = Vec::new();
    each(state_dir, |r, bytes| {
        all.push(Entry {
            holds_quarantine: r
                .quarantine
                .as_ref()
                .is_some_and(|q| matches!(q.state, QuarantineState::Moving | QuarantineState::Quarantined)),
            finished: r.finished_at.is_some(),
            dry_run: r.dry_run,
            id: r.id,
            namespace: r.namespace,
            created_at: r.created_at,
            bytes,
        })
    });
    all.sort_by(|a, b| b.created_at.cmp(&a.created_at).then_with(|| b.id.cmp(&a.id)));
    all
}

/// Journals kept, newest first: every one still running or holding a quarantine; of the
/// rest, [`DRY_RUNS_KEPT`] dry runs and [`KEPT_PER_NAMESPACE`] others per namespace, and
/// [`KEPT`] others on the node. One tenant's flood of requests then pushes out only its own
/// journals, never another's restores or the record that makes a repeated POST idempotent.
pub const KEPT: usize = 1000;
pub const KEPT_PER_NAMESPACE: usize = 100;
pub const DRY_RUNS_KEPT: usize = 20;
/// `.bad` journals kept for a person (the newest).
const BAD_KEPT: usize = 20;

/// The ids [`prune`] removes from `newest_first` entries. Pure.
pub fn to_prune(newest_first: &[Entry]) -> Vec<String> {
    let mut dry: std::collections::HashMap<&str, usize> = Default::default();
    let mut others: std::collections::HashMap<&str, usize> = Default::default();
    let mut all = 0;
    let mut gone = Vec::new();
    for e in newest_first.iter().filter(|e| e.finished && !e.holds_quarantine) {
        let keep = if e.dry_run {
            let n = dry.entry(&e.namespace).or_default();
            *n += 1;
            *n <= DRY_RUNS_KEPT
        } else {
            let n = others.entry(&e.namespace).or_default();
            *n += 1;
            // Only what a namespace may keep counts toward the node's bound.
            *n <= KEPT_PER_NAMESPACE && {
                all += 1;
                all <= KEPT
            }
        };
        if !keep {
            gone.push(e.id.clone());
        }
    }
    gone
}

/// Prunes journals (see [`to_prune`]), `.bad` ones beyond the newest [`BAD_KEPT`], and
/// temporary files a crash left.
pub fn prune(state_dir: &Path) {
    // First: reading every journal sets the invalid ones aside as `.bad`.
    for id in to_prune(&index(state_dir)) {
        let _ = std::fs::remove_file(path(state_dir, &id));
    }
    let dir = state_dir.join("remediations");
    let mut bad = Vec::new();
    if let Ok(d) = std::fs::read_dir(&dir) {
        for e in d.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let modified = e.metadata().and_then(|m| m.modified()).ok();
            if name.ends_with(".json.bad") {
                bad.push((modified, e.path()));
            } else if name.ends_with(".json.tmp") && modified.and_then(|m| m.elapsed().ok()).is_some_and(|age| age.as_secs() > 60) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    bad.sort_by_key(|b| std::cmp::Reverse(b.0));
    for (_, p) in bad.into_iter().skip(BAD_KEPT) {
        let _ = std::fs::remove_file(p);
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
    list_where(state_dir, |r| needs_resume(r) && r.namespace == namespace && r.pod == pod && !is_running(state_dir, &r.id))
        .into_iter()
        .next()
}

/// Journals of `namespace/pod` left Running before anything was changed by a process that
/// is gone (killed during its checks): closed as Refused, saying so.
pub fn close_abandoned_of(state_dir: &Path, namespace: &str, pod: &str) {
    for mut r in list_where(state_dir, |r| {
        r.phase == Phase::Running
            && !r.dry_run
            && !needs_resume(r)
            && r.namespace == namespace
            && r.pod == pod
            && !is_running(state_dir, &r.id)
    }) {
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
        let all = list_where(d.path(), |_| true);
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].id, "good1");
        assert!(d.path().join("remediations/liar1.json.bad").exists() && d.path().join("remediations/junk1.json.bad").exists());
        assert_eq!(read(d.path(), "junk1").unwrap_err().code, Code::InvalidRequest);
    }

    fn entry(id: &str, ns: &str, at: i64, dry_run: bool, holds: bool) -> Entry {
        Entry {
            id: id.into(),
            namespace: ns.into(),
            created_at: jiff::Timestamp::from_second(at).unwrap().to_string(),
            finished: true,
            dry_run,
            holds_quarantine: holds,
            bytes: 1,
        }
    }

    #[test]
    fn one_namespaces_flood_prunes_only_its_own_journals() {
        // The victim's heal (its quarantine held) and an older refusal, then a tenant's 2,000
        // dry runs and 2,000 real refusals, newest first.
        let mut all = vec![entry("victim-heal", "apisix", 10, false, true), entry("victim-refused", "apisix", 9, false, false)];
        for i in 0..2000 {
            all.push(entry(&format!("dry{i}"), "tenant", 100 + i, true, false));
            all.push(entry(&format!("real{i}"), "tenant", 100 + i, false, false));
        }
        all.sort_by(|a, b| b.created_at.cmp(&a.created_at).then_with(|| b.id.cmp(&a.id)));
        let gone = to_prune(&all);
        assert!(!gone.iter().any(|g| g.starts_with("victim")), "{:?}", &gone[..3]);
        assert_eq!(gone.iter().filter(|g| g.starts_with("dry")).count(), 2000 - DRY_RUNS_KEPT);
        assert_eq!(gone.iter().filter(|g| g.starts_with("real")).count(), 2000 - KEPT_PER_NAMESPACE);
        assert!(gone.contains(&"dry0".to_string()) && !gone.contains(&"dry1999".to_string()), "the oldest go");
        // Unfinished and quarantine-holding journals are never pruned, however many.
        let mut held: Vec<Entry> = (0..3000).map(|i| entry(&format!("h{i}"), "tenant", i, false, true)).collect();
        held.push(Entry { finished: false, ..entry("running", "tenant", 0, false, false) });
        assert!(to_prune(&held).is_empty());
    }

    #[test]
    fn bad_and_torn_files_are_pruned_and_oversized_journals_never_written() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), &journal("good1")).unwrap();
        let dir = d.path().join("remediations");
        for i in 0..(BAD_KEPT + 5) {
            std::fs::write(dir.join(format!("bad{i}.json")), b"junk").unwrap();
        }
        let old_tmp = dir.join("x.json.tmp");
        std::fs::write(&old_tmp, b"torn").unwrap();
        let past = std::time::SystemTime::now() - std::time::Duration::from_secs(120);
        std::fs::File::options().write(true).open(&old_tmp).unwrap().set_modified(past).unwrap();
        prune(d.path());
        let names: Vec<String> = std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        assert_eq!(names.iter().filter(|n| n.ends_with(".bad")).count(), BAD_KEPT, "{names:?}");
        assert!(!names.iter().any(|n| n.ends_with(".tmp")) && names.contains(&"good1.json".to_string()), "{names:?}");
        let mut huge = journal("huge1");
        huge.reason = Some("x".repeat(MAX_JOURNAL_BYTES as usize));
        assert_eq!(write(d.path(), &huge).unwrap_err().code, Code::Internal);
        assert!(!path(d.path(), "huge1").exists());
    }
}
