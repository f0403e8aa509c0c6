//! Moving a member's stale files aside: renamed (never copied, never deleted) into
//! `<volume root>/.etcd-medic/quarantine/<timestamp>-<id>/` on the same filesystem, with a
//! manifest written before anything moves, and every directory touched fsynced. A move that
//! was interrupted is finished, never repeated; a quarantine can be put back byte for byte.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Code, Error, Result};

pub const QUARANTINE_DIR: &str = ".etcd-medic/quarantine";
const MANIFEST: &str = "manifest.json";

/// What a quarantine holds and where it came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub id: String,
    pub created_at: String,
    pub namespace: String,
    pub pod: String,
    #[serde(rename = "podUID")]
    pub pod_uid: String,
    pub member_id: Option<String>,
    pub profile: String,
    /// The data dir the items came from (host path).
    pub data_dir: PathBuf,
    pub items: Vec<Item>,
    pub state: State,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Item {
    /// Relative to the data dir.
    pub path: String,
    pub bytes: u64,
    /// Still in the data dir when the quarantine was made? (absent files are recorded too)
    pub present: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum State {
    /// The manifest is written; items are being moved.
    Moving,
    Quarantined,
    Restored,
}

/// Who and what a quarantine is for.
#[derive(Clone, Debug)]
pub struct Request<'a> {
    pub id: &'a str,
    pub namespace: &'a str,
    pub pod: &'a str,
    pub pod_uid: &'a str,
    pub member_id: Option<&'a str>,
    pub profile: &'a str,
    /// Relative to the data dir.
    pub items: &'a [(String, u64)],
}

fn io(what: impl std::fmt::Display, e: std::io::Error) -> Error {
    Error::new(Code::UnsafePath, format!("{what}: {e}"))
}

fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|f| f.sync_all()).map_err(|e| io(format!("fsync {}", dir.display()), e))
}

fn write_manifest(dir: &Path, m: &Manifest) -> Result<()> {
    let tmp = dir.join(format!("{MANIFEST}.tmp"));
    let text = serde_json::to_vec_pretty(m).expect("manifest serializes");
    std::fs::write(&tmp, text).map_err(|e| io(format!("write {}", tmp.display()), e))?;
    File::open(&tmp).and_then(|f| f.sync_all()).map_err(|e| io("fsync manifest", e))?;
    std::fs::rename(&tmp, dir.join(MANIFEST)).map_err(|e| io("rename manifest", e))?;
    fsync_dir(dir)
}

pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    let text = std::fs::read(dir.join(MANIFEST)).map_err(|e| io(format!("read {}", dir.join(MANIFEST).display()), e))?;
    serde_json::from_slice(&text).map_err(|e| Error::new(Code::NotEtcdData, format!("{} is not a quarantine manifest: {e}", dir.display())))
}

/// `<timestamp>-<id>`: sorts by time, names the remediation.
pub fn dir_name(created_at: &jiff::Timestamp, id: &str) -> String {
    format!("{}-{id}", created_at.strftime("%Y%m%dT%H%M%SZ"))
}

/// Moves `req.items` from `data_dir` into a new (or the interrupted) quarantine under
/// `volume_root`. Idempotent: an item already in the quarantine is not moved again.
pub fn quarantine(volume_root: &Path, data_dir: &Path, req: &Request, now: jiff::Timestamp) -> Result<(PathBuf, Manifest)> {
    let base = volume_root.join(QUARANTINE_DIR);
    // The workload controls the volume: `.etcd-medic` or `quarantine` planted as links would
    // lead the moves elsewhere. Refuse them; create what is missing, then prove the result.
    for rel in [".etcd-medic", QUARANTINE_DIR] {
        if crate::pathsafe::entry_beneath(volume_root, Path::new(rel))?.is_some_and(|m| !m.file_type().is_dir()) {
            return Err(Error::new(Code::UnsafePath, format!("{} is not a directory (a link?)", volume_root.join(rel).display())));
        }
    }
    let existing = find(volume_root, req.id)?;
    let dir = existing.clone().unwrap_or_else(|| base.join(dir_name(&now, req.id)));
    let mut manifest = match &existing {
        Some(d) => read_manifest(d)?,
        None => {
            std::fs::create_dir_all(&dir).map_err(|e| io(format!("create {}", dir.display()), e))?;
            crate::pathsafe::check_dir_beneath(volume_root, dir.strip_prefix(volume_root).unwrap_or(&dir))?;
            let same_fs = std::fs::metadata(&dir).map(|m| m.dev()).ok() == std::fs::metadata(data_dir).map(|m| m.dev()).ok();
            if !same_fs {
                return Err(Error::new(
                    Code::UnsafePath,
                    format!("{} and {} are on different filesystems: a rename would copy", dir.display(), data_dir.display()),
                ));
            }
            let m = Manifest {
                id: req.id.to_string(),
                created_at: now.to_string(),
                namespace: req.namespace.to_string(),
                pod: req.pod.to_string(),
                pod_uid: req.pod_uid.to_string(),
                member_id: req.member_id.map(String::from),
                profile: req.profile.to_string(),
                data_dir: data_dir.to_path_buf(),
                items: req
                    .items
                    .iter()
                    .map(|(p, b)| Item { path: p.clone(), bytes: *b, present: data_dir.join(p).symlink_metadata().is_ok() })
                    .collect(),
                state: State::Moving,
            };
            // The manifest is durable before the first rename: a crash leaves a record.
            write_manifest(&dir, &m)?;
            fsync_dir(&base)?;
            m
        }
    };
    if manifest.state == State::Restored {
        return Err(Error::new(Code::InvalidRequest, format!("quarantine {} was restored; start a new remediation", req.id)));
    }
    let mut touched = vec![data_dir.to_path_buf()];
    for item in manifest.items.iter().filter(|i| i.present) {
        let from = data_dir.join(&item.path);
        let to = dir.join("data").join(&item.path);
        match (from.symlink_metadata().is_ok(), to.symlink_metadata().is_ok()) {
            (true, false) => {
                let parent = to.parent().expect("item has a parent");
                std::fs::create_dir_all(parent).map_err(|e| io(format!("create {}", parent.display()), e))?;
                std::fs::rename(&from, &to).map_err(|e| io(format!("move {} to {}", from.display(), to.display()), e))?;
                touched.push(from.parent().unwrap().to_path_buf());
                touched.push(parent.to_path_buf());
            }
            (false, true) => {} // moved before an interruption
            (true, true) => {
                return Err(Error::new(
                    Code::UnsafePath,
                    format!("{} exists both in the data dir and in the quarantine; refusing to guess", item.path),
                ));
            }
            (false, false) => return Err(Error::new(Code::DataDirNotFound, format!("{} vanished during the remediation", from.display()))),
        }
    }
    touched.sort();
    touched.dedup();
    for d in &touched {
        fsync_dir(d)?;
    }
    manifest.state = State::Quarantined;
    write_manifest(&dir, &manifest)?;
    Ok((dir, manifest))
}

/// The quarantine of remediation `id` under `volume_root`, if any.
pub fn find(volume_root: &Path, id: &str) -> Result<Option<PathBuf>> {
    let base = volume_root.join(QUARANTINE_DIR);
    let Ok(entries) = std::fs::read_dir(&base) else { return Ok(None) };
    let suffix = format!("-{id}");
    Ok(entries
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy() == id || n.to_string_lossy().ends_with(&suffix))))
}

/// Puts every item back into `data_dir` (the data dir's path now: the pod, and so the host
/// path, may have changed since). Refuses when the data dir already has an item of the same
/// name (etcd has written new data since; move that aside first).
pub fn restore(dir: &Path, data_dir: &Path) -> Result<Manifest> {
    let mut m = read_manifest(dir)?;
    m.data_dir = data_dir.to_path_buf();
    if m.state == State::Restored {
        return Ok(m);
    }
    for item in m.items.iter().filter(|i| i.present) {
        let back = m.data_dir.join(&item.path);
        if back.symlink_metadata().is_ok() && dir.join("data").join(&item.path).symlink_metadata().is_ok() {
            return Err(Error::new(
                Code::UnsafePath,
                format!("{} exists again (etcd wrote new data); move it aside before restoring quarantine {}", back.display(), m.id),
            ));
        }
    }
    let mut touched = vec![m.data_dir.clone()];
    for item in m.items.iter().filter(|i| i.present) {
        let from = dir.join("data").join(&item.path);
        let back = m.data_dir.join(&item.path);
        if from.symlink_metadata().is_err() {
            continue; // put back before an interruption
        }
        if let Some(parent) = back.parent() {
            std::fs::create_dir_all(parent).map_err(|e| io(format!("create {}", parent.display()), e))?;
            touched.push(parent.to_path_buf());
        }
        std::fs::rename(&from, &back).map_err(|e| io(format!("restore {}", back.display()), e))?;
    }
    touched.sort();
    touched.dedup();
    for d in &touched {
        fsync_dir(d)?;
    }
    m.state = State::Restored;
    write_manifest(dir, &m)?;
    Ok(m)
}

/// Quarantines under `volume_root`, oldest first.
pub fn list(volume_root: &Path) -> Vec<(PathBuf, Manifest)> {
    let Ok(entries) = std::fs::read_dir(volume_root.join(QUARANTINE_DIR)) else { return Vec::new() };
    let mut out: Vec<(PathBuf, Manifest)> =
        entries.flatten().filter_map(|e| read_manifest(&e.path()).ok().map(|m| (e.path(), m))).collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Which quarantines retention removes: keeps the newest `keep`, and never the newest one;
/// only those older than `succeeded_id`'s (a later remediation of this member that
/// succeeded) may go. Pure, for the caller to act on.
pub fn to_prune(all: &[(PathBuf, Manifest)], succeeded_id: &str, keep: usize) -> Vec<PathBuf> {
    let Some(pos) = all.iter().position(|(_, m)| m.id == succeeded_id) else { return Vec::new() };
    let keep = keep.max(1);
    let cut = all.len().saturating_sub(keep);
    all[..pos.min(cut)].iter().map(|(p, _)| p.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member_dir(root: &Path) -> PathBuf {
        let data = root.join("data");
        std::fs::create_dir_all(data.join("member/snap")).unwrap();
        std::fs::create_dir_all(data.join("member/wal")).unwrap();
        std::fs::write(data.join("member/snap/db"), vec![7u8; 100_000]).unwrap();
        std::fs::write(data.join("member/wal/0000000000000000-0000000000000000.wal"), b"wal bytes").unwrap();
        std::fs::write(data.join("member_id"), "8e9e05c52164694d").unwrap();
        data
    }

    fn req<'a>(id: &'a str, items: &'a [(String, u64)]) -> Request<'a> {
        Request {
            id,
            namespace: "apisix",
            pod: "apisix-etcd-1",
            pod_uid: "u",
            member_id: Some("8e9e05c52164694d"),
            profile: "bitnami-member-id",
            items,
        }
    }

    fn items() -> Vec<(String, u64)> {
        ["member/snap", "member/wal", "member_id", "new_member_envs"].iter().map(|p| (p.to_string(), 0)).collect()
    }

    #[test]
    fn moves_by_rename_and_restores_the_exact_bytes() {
        let root = tempfile::tempdir().unwrap();
        let data = member_dir(root.path());
        let db_ino = std::fs::metadata(data.join("member/snap/db")).unwrap().ino();
        let it = items();
        let (dir, m) = quarantine(root.path(), &data, &req("r1", &it), jiff::Timestamp::now()).unwrap();
        assert_eq!(m.state, State::Quarantined);
        assert!(!data.join("member/snap").exists() && !data.join("member_id").exists());
        assert!(data.join("member").is_dir(), "data/ never looks empty to the image");
        // Same inode: renamed, not copied.
        assert_eq!(std::fs::metadata(dir.join("data/member/snap/db")).unwrap().ino(), db_ino);
        assert!(!m.items.iter().find(|i| i.path == "new_member_envs").unwrap().present);
        assert_eq!(read_manifest(&dir).unwrap(), m);
        assert!(dir.starts_with(root.path().join(QUARANTINE_DIR)));

        let back = restore(&dir, &data).unwrap();
        assert_eq!(back.state, State::Restored);
        assert_eq!(std::fs::read(data.join("member/snap/db")).unwrap(), vec![7u8; 100_000]);
        assert_eq!(std::fs::read_to_string(data.join("member_id")).unwrap(), "8e9e05c52164694d");
        assert_eq!(std::fs::read(data.join("member/wal/0000000000000000-0000000000000000.wal")).unwrap(), b"wal bytes");
    }

    #[test]
    fn an_interrupted_quarantine_is_finished_not_repeated() {
        let root = tempfile::tempdir().unwrap();
        let data = member_dir(root.path());
        let it = items();
        let (dir, _) = quarantine(root.path(), &data, &req("r2", &it), jiff::Timestamp::now()).unwrap();
        // As if the agent died after moving snap only: put wal and member_id back.
        std::fs::rename(dir.join("data/member/wal"), data.join("member/wal")).unwrap();
        std::fs::rename(dir.join("data/member_id"), data.join("member_id")).unwrap();
        let mut m = read_manifest(&dir).unwrap();
        m.state = State::Moving;
        write_manifest(&dir, &m).unwrap();
        let (again, m) = quarantine(root.path(), &data, &req("r2", &it), jiff::Timestamp::now()).unwrap();
        assert_eq!(again, dir);
        assert_eq!(m.state, State::Quarantined);
        assert!(dir.join("data/member/snap/db").is_file() && dir.join("data/member/wal").is_dir());
        assert_eq!(list(root.path()).len(), 1);
    }

    #[test]
    fn restore_refuses_to_overwrite_new_data() {
        let root = tempfile::tempdir().unwrap();
        let data = member_dir(root.path());
        let it = items();
        let (dir, _) = quarantine(root.path(), &data, &req("r3", &it), jiff::Timestamp::now()).unwrap();
        std::fs::create_dir_all(data.join("member/snap")).unwrap();
        let e = restore(&dir, &data).unwrap_err();
        assert_eq!(e.code, Code::UnsafePath);
        assert!(dir.join("data/member/snap/db").is_file(), "nothing moved on refusal");
        assert!(data.join("member/wal").symlink_metadata().is_err());
    }

    #[test]
    fn a_planted_link_for_the_quarantine_dir_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        let data = member_dir(root.path());
        std::os::unix::fs::symlink(elsewhere.path(), root.path().join(".etcd-medic")).unwrap();
        let it = items();
        let e = quarantine(root.path(), &data, &req("r4", &it), jiff::Timestamp::now()).unwrap_err();
        assert_eq!(e.code, Code::UnsafePath);
        assert!(data.join("member/snap/db").is_file(), "nothing moved");
        assert_eq!(std::fs::read_dir(elsewhere.path()).unwrap().count(), 0);
    }

    #[test]
    fn retention_keeps_the_newest_and_prunes_only_before_a_success() {
        let m = |id: &str| {
            (
                PathBuf::from(format!("/q/2026-{id}")),
                Manifest {
                    id: id.into(),
                    created_at: String::new(),
                    namespace: String::new(),
                    pod: String::new(),
                    pod_uid: String::new(),
                    member_id: None,
                    profile: String::new(),
                    data_dir: PathBuf::new(),
                    items: vec![],
                    state: State::Quarantined,
                },
            )
        };
        let all = vec![m("a"), m("b"), m("c"), m("d"), m("e")];
        assert_eq!(to_prune(&all, "e", 3), vec![PathBuf::from("/q/2026-a"), PathBuf::from("/q/2026-b")]);
        assert_eq!(to_prune(&all, "c", 3), vec![PathBuf::from("/q/2026-a"), PathBuf::from("/q/2026-b")]);
        assert_eq!(to_prune(&all, "b", 1), vec![PathBuf::from("/q/2026-a")]);
        assert!(to_prune(&all, "zzz", 1).is_empty(), "no success, nothing pruned");
        assert_eq!(to_prune(&all, "e", 0).len(), 4, "the newest always stays");
    }
}
