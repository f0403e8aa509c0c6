//! Moving a member's stale files aside: renamed (never copied, never deleted) into
//! `<volume root>/.etcd-medic/quarantine/<timestamp>-<id>/` on the same filesystem, every
//! directory touched fsynced. A move that was interrupted is finished, never repeated; a
//! quarantine can be put back byte for byte.
//!
//! What a quarantine is called and what it holds come from the node's journal, never from
//! the volume: the manifest written beside the data is for people, and nothing reads it.
//! Every operation goes through [`Volume`], below the proven volume root.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Code, Error, Result};
use crate::host::volume::{Kind, Volume};

pub const QUARANTINE_DIR: &str = ".etcd-medic/quarantine";
const MANIFEST: &str = "manifest.json";

/// What a quarantine holds and where it came from, for a person reading the volume.
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

pub use etcd_medic_core::contract::QuarantineState as State;

/// Who and what a quarantine is for: all of it from the journal.
#[derive(Clone, Debug)]
pub struct Request<'a> {
    pub id: &'a str,
    /// `<timestamp>-<id>`, see [`dir_name`].
    pub name: &'a str,
    pub namespace: &'a str,
    pub pod: &'a str,
    pub pod_uid: &'a str,
    pub member_id: Option<&'a str>,
    pub profile: &'a str,
    /// The data dir, relative to the volume root.
    pub data: &'a Path,
    /// Relative to the data dir, with their sizes at check time.
    pub items: &'a [(String, u64)],
    /// The test hook `in:Quarantine` (between two moves).
    pub failpoint: &'a crate::failpoint::Failpoint,
}

pub use etcd_medic_core::retention::{dir_name, is_dir_name, to_prune};

/// The quarantine `name`, relative to the volume root.
pub fn rel_dir(name: &str) -> PathBuf {
    Path::new(QUARANTINE_DIR).join(name)
}

fn write_manifest(vol: &Volume, dir: &Path, m: &Manifest) -> Result<()> {
    let text = serde_json::to_vec_pretty(m).map_err(|e| Error::new(Code::Internal, format!("manifest: {e}")))?;
    vol.write_file(&dir.join(MANIFEST), &text)
}

/// Moves `req.items` from the data dir into the quarantine `req.name` (new, or the one an
/// interruption left). Idempotent: an item already in the quarantine is not moved again.
pub fn quarantine(vol: &Volume, req: &Request, now: jiff::Timestamp) -> Result<Manifest> {
    let dir = rel_dir(req.name);
    // Each component is created or proven a real directory on the volume, one name at a time.
    vol.mkdir_all(&dir.join("data"))?;
    let mut manifest = Manifest {
        id: req.id.to_string(),
        created_at: now.to_string(),
        namespace: req.namespace.to_string(),
        pod: req.pod.to_string(),
        pod_uid: req.pod_uid.to_string(),
        member_id: req.member_id.map(String::from),
        profile: req.profile.to_string(),
        data_dir: vol.shown(req.data),
        items: Vec::new(),
        state: State::Moving,
    };
    for (path, bytes) in req.items {
        let from = req.data.join(path);
        let to = dir.join("data").join(path);
        let present = match (vol.entry(&from)?.is_some(), vol.entry(&to)?.is_some()) {
            (true, false) => {
                vol.mkdir_all(to.parent().unwrap_or(&dir))?;
                vol.rename(&from, &to)?;
                for d in [from.parent(), to.parent()].into_iter().flatten() {
                    vol.sync_dir(d)?;
                }
                req.failpoint.hold("in:Quarantine");
                true
            }
            (false, true) => true, // moved before an interruption
            (true, true) => {
                return Err(Error::new(
                    Code::UnsafePath,
                    format!("{path} exists both in the data dir and in the quarantine; refusing to guess"),
                ));
            }
            (false, false) => false,
        };
        manifest.items.push(Item { path: path.clone(), bytes: *bytes, present });
    }
    vol.sync_dir(req.data)?;
    manifest.state = State::Quarantined;
    write_manifest(vol, &dir, &manifest)?;
    vol.sync_dir(Path::new(QUARANTINE_DIR))?;
    Ok(manifest)
}

/// The quarantine `name` exists as the agent made it: a real directory on the volume.
pub fn check_exists(vol: &Volume, name: &str) -> Result<()> {
    match vol.entry(&rel_dir(name))? {
        Some(e) if e.kind == Kind::Dir && e.dev == vol.identity().0 => Ok(()),
        Some(e) => Err(Error::new(
            Code::UnsafePath,
            format!("{} is not a directory on the volume ({:?})", vol.shown(&rel_dir(name)).display(), e.kind),
        )),
        None => Err(Error::new(
            Code::DataDirNotFound,
            format!("quarantine {} is not on the volume of the pod", vol.shown(&rel_dir(name)).display()),
        )),
    }
}

/// Puts `items` of quarantine `name` back into the data dir `data` (the pod's volume as it
/// is now). Refuses when the data dir already has an item of the same name (etcd wrote new
/// data since; move that aside first). Items put back before an interruption are skipped.
pub fn restore(vol: &Volume, name: &str, data: &Path, items: &[String]) -> Result<Vec<String>> {
    check_exists(vol, name)?;
    let dir = rel_dir(name);
    for item in items {
        if vol.entry(&data.join(item))?.is_some() && vol.entry(&dir.join("data").join(item))?.is_some() {
            return Err(Error::new(
                Code::UnsafePath,
                format!(
                    "{} exists again (etcd wrote new data); move it aside before restoring quarantine {name}",
                    vol.shown(&data.join(item)).display()
                ),
            ));
        }
    }
    let mut back = Vec::new();
    for item in items {
        let from = dir.join("data").join(item);
        let to = data.join(item);
        if vol.entry(&from)?.is_none() {
            continue;
        }
        if let Some(parent) = to.parent() {
            vol.mkdir_all(parent)?;
        }
        vol.rename(&from, &to)?;
        for d in [from.parent(), to.parent()].into_iter().flatten() {
            vol.sync_dir(d)?;
        }
        back.push(item.clone());
    }
    Ok(back)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    static NO_FAILPOINT: crate::failpoint::Failpoint = crate::failpoint::Failpoint::NONE;

    fn member_volume() -> (tempfile::TempDir, Volume) {
        let root = tempfile::tempdir().unwrap();
        let data = root.path().join("v/data");
        std::fs::create_dir_all(data.join("member/snap")).unwrap();
        std::fs::create_dir_all(data.join("member/wal")).unwrap();
        std::fs::write(data.join("member/snap/db"), vec![7u8; 100_000]).unwrap();
        std::fs::write(data.join("member/wal/0000000000000000-0000000000000000.wal"), b"wal bytes").unwrap();
        std::fs::write(data.join("member_id"), "8e9e05c52164694d").unwrap();
        let v = Volume::open(root.path(), Path::new("v")).unwrap();
        (root, v)
    }

    fn items() -> Vec<(String, u64)> {
        ["member/snap", "member/wal", "member_id", "new_member_envs"].iter().map(|p| (p.to_string(), 0)).collect()
    }

    fn req<'a>(id: &'a str, name: &'a str, items: &'a [(String, u64)]) -> Request<'a> {
        Request {
            id,
            name,
            namespace: "apisix",
            pod: "apisix-etcd-1",
            pod_uid: "u",
            member_id: Some("8e9e05c52164694d"),
            profile: "bitnami-member-id",
            data: Path::new("data"),
            items,
            failpoint: &NO_FAILPOINT,
        }
    }

    fn names(it: &[(String, u64)]) -> Vec<String> {
        it.iter().map(|(p, _)| p.clone()).collect()
    }

    #[test]
    fn moves_by_rename_and_restores_the_exact_bytes() {
        let (root, v) = member_volume();
        let data = root.path().join("v/data");
        let db_ino = std::fs::metadata(data.join("member/snap/db")).unwrap().ino();
        let it = items();
        let name = dir_name(&jiff::Timestamp::now(), "r1");
        assert!(is_dir_name(&name, "r1") && !is_dir_name(&name, "r2") && !is_dir_name("x-r1", "r1"));
        let m = quarantine(&v, &req("r1", &name, &it), jiff::Timestamp::now()).unwrap();
        assert_eq!(m.state, State::Quarantined);
        assert!(!data.join("member/snap").exists() && !data.join("member_id").exists());
        assert!(data.join("member").is_dir(), "data/ never looks empty to the image");
        let dir = root.path().join("v").join(rel_dir(&name));
        assert_eq!(std::fs::metadata(dir.join("data/member/snap/db")).unwrap().ino(), db_ino, "renamed, not copied");
        assert!(!m.items.iter().find(|i| i.path == "new_member_envs").unwrap().present);
        let written: Manifest = serde_json::from_slice(&std::fs::read(dir.join(MANIFEST)).unwrap()).unwrap();
        assert_eq!(written, m);

        let back = restore(&v, &name, Path::new("data"), &names(&it)).unwrap();
        assert_eq!(back.len(), 3);
        assert_eq!(std::fs::read(data.join("member/snap/db")).unwrap(), vec![7u8; 100_000]);
        assert_eq!(std::fs::read_to_string(data.join("member_id")).unwrap(), "8e9e05c52164694d");
        assert_eq!(std::fs::read(data.join("member/wal/0000000000000000-0000000000000000.wal")).unwrap(), b"wal bytes");
    }

    #[test]
    fn an_interrupted_quarantine_is_finished_not_repeated() {
        let (root, v) = member_volume();
        let data = root.path().join("v/data");
        let it = items();
        let name = dir_name(&jiff::Timestamp::now(), "r2");
        quarantine(&v, &req("r2", &name, &it), jiff::Timestamp::now()).unwrap();
        let dir = root.path().join("v").join(rel_dir(&name));
        // As if the agent died after moving snap only: put wal and member_id back.
        std::fs::rename(dir.join("data/member/wal"), data.join("member/wal")).unwrap();
        std::fs::rename(dir.join("data/member_id"), data.join("member_id")).unwrap();
        let m = quarantine(&v, &req("r2", &name, &it), jiff::Timestamp::now()).unwrap();
        assert_eq!(m.state, State::Quarantined);
        assert!(dir.join("data/member/snap/db").is_file() && dir.join("data/member/wal").is_dir());
        assert_eq!(std::fs::read_dir(root.path().join("v").join(QUARANTINE_DIR)).unwrap().count(), 1);
    }

    #[test]
    fn restore_refuses_to_overwrite_new_data_and_forged_quarantines() {
        let (root, v) = member_volume();
        let data = root.path().join("v/data");
        let it = items();
        let name = dir_name(&jiff::Timestamp::now(), "r3");
        quarantine(&v, &req("r3", &name, &it), jiff::Timestamp::now()).unwrap();
        std::fs::create_dir_all(data.join("member/snap")).unwrap();
        let e = restore(&v, &name, Path::new("data"), &names(&it)).unwrap_err();
        assert_eq!(e.code, Code::UnsafePath);
        let dir = root.path().join("v").join(rel_dir(&name));
        assert!(dir.join("data/member/snap/db").is_file(), "nothing moved on refusal");
        assert!(data.join("member/wal").symlink_metadata().is_err());
        // A quarantine the tenant swapped for a link is refused, its target untouched.
        let elsewhere = tempfile::tempdir().unwrap();
        std::fs::rename(&dir, root.path().join("kept")).unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), &dir).unwrap();
        assert_eq!(restore(&v, &name, Path::new("data"), &names(&it)).unwrap_err().code, Code::UnsafePath);
    }

    #[test]
    fn a_planted_link_for_the_quarantine_dir_is_refused() {
        let (root, v) = member_volume();
        let elsewhere = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), root.path().join("v/.etcd-medic")).unwrap();
        let it = items();
        let name = dir_name(&jiff::Timestamp::now(), "r4");
        let e = quarantine(&v, &req("r4", &name, &it), jiff::Timestamp::now()).unwrap_err();
        assert_eq!(e.code, Code::UnsafePath);
        assert!(root.path().join("v/data/member/snap/db").is_file(), "nothing moved");
        assert_eq!(std::fs::read_dir(elsewhere.path()).unwrap().count(), 0);
    }
}
