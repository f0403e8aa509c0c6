//! Quorum lost: a one-member cluster made from the survivor's data dir, offline, where no
//! process uses the data (the process guard proves it first: `NotFenced`).
//!
//! etcd itself does the raft part: started once with `--force-new-cluster`, it removes every
//! other member by conf changes it commits alone, on loopback ports no peer can reach. The
//! revision is then moved past every revision any member held, and everything before it
//! marked compacted, as `etcdutl snapshot restore --bump-revision --mark-compacted` does
//! (etcdutl is not in the image; etcd is): etcd compacts its current revision, which writes
//! its two compaction marks into the db's `meta` bucket; stopped, those 17 bytes each are
//! rewritten in place to the bumped revision (the same length: no page of the db changes
//! shape), and at its next start etcd takes the finished compaction's revision as its
//! current one. Watchers and caches of the old cluster then see time move forward, and a
//! read or watch at an older revision is told it was compacted, never given other data.
//! The rebuild starts etcd a last time to verify all of it, and stops it: the pod's own etcd
//! starts the member afterwards, with its own flags.

use std::path::{Path, PathBuf};
use std::time::Duration;

use etcd_client::{Client, CompactionOptions, GetOptions};
use etcd_medic_core::recover::{COMPACTION_MARKS, revision_bytes};

use crate::error::{Code, Error, Result};
use crate::host::processes as guard;
use crate::host::volume::{Limits, Volume};

/// What a rebuild needs.
#[derive(Clone, Debug)]
pub struct Spec {
    /// The etcd binary (the image's; the same minor as the cluster's or newer by one).
    pub etcd: PathBuf,
    /// The survivor's data dir on this node.
    pub data: PathBuf,
    /// The member's name and the client URLs it advertises (as its pod starts it): etcd
    /// publishes them into the member list while it runs.
    pub name: String,
    pub client_urls: Vec<String>,
    /// The revision the rebuilt cluster starts at ([`etcd_medic_core::recover::bumped_revision`]).
    pub revision: u64,
    /// The host's `/proc`, for the process guard.
    pub proc_root: PathBuf,
    /// Each start of etcd may take this long to serve.
    pub timeout: Duration,
}

/// What the rebuild made.
pub use etcd_medic_core::step::Rebuilt;

fn hex(id: u64) -> String {
    format!("{id:016x}")
}

/// Rebuilds the one-member cluster in `spec.data` (see the module's docs).
pub async fn rebuild(spec: &Spec) -> Result<Rebuilt> {
    // etcd's revisions are signed: a revision past half their range (what a member's db, which
    // its tenant wrote, might claim) is refused before anything changes.
    if spec.revision > (i64::MAX / 2) as u64 {
        return Err(Error::invalid(format!("revision {} is past what etcd can count from", spec.revision)));
    }
    let (vol, data) = (Volume::open(&spec.data, Path::new(""))?, Path::new(""));
    for must in ["member/wal", "member/snap/db"] {
        if vol.entry(&data.join(must))?.is_none() {
            return Err(Error::new(Code::NotEtcdData, format!("{} has no {must}: no member data to rebuild from", spec.data.display())));
        }
    }
    fenced(&spec.proc_root, &vol)?;
    // etcd follows links; a data dir etcd is started on holds none.
    vol.plain_tree(data, Limits::default())?;
    let members = members_in_db(&vol)?;
    if auth_enabled(&vol)? {
        return Err(Error::new(
            Code::UnsupportedProfile,
            "the survivor's etcd has authentication enabled: the rebuild's compaction would be refused after --force-new-cluster ran; not rebuilt",
        ));
    }

    let mut etcd = Etcd::start(spec, true).await?;
    let first = async {
        let mut c = etcd.client(spec.timeout).await?;
        let rev = etcd.one_member(&mut c, spec.timeout).await?;
        let status = c.status().await.map_err(|e| etcd.failed(&format!("status: {e}")))?;
        let (cluster_id, member_id) = status.header().map(|h| (h.cluster_id(), h.member_id())).unwrap_or_default();
        // The compaction writes both marks; `physical` waits until it has run. "Compacted"
        // means the last compaction was at this very revision: the marks hold it already.
        match c.compact(rev, Some(CompactionOptions::new().with_physical())).await {
            Ok(_) => {}
            Err(e) if e.to_string().contains("compacted") => {}
            Err(e) => return Err(etcd.failed(&format!("compact {rev}: {e}"))),
        }
        Ok::<_, Error>((member_id, cluster_id, rev))
    }
    .await;
    etcd.stop().await?;
    let (member_id, cluster_id, before) = first?;
    let removed: Vec<u64> = members.into_iter().filter(|m| *m != member_id).collect();
    if spec.revision <= before as u64 {
        return Err(Error::new(Code::Internal, format!("the rebuilt revision {} is not past the survivor's {before}", spec.revision)));
    }
    // Between the starts: still nothing else on the data, still no link in it, and etcd's
    // own locks held while its db is edited.
    fenced(&spec.proc_root, &vol)?;
    vol.plain_tree(data, Limits::default())?;
    let locks = vol.lock(&vol.etcd_lock_files(data)?)?;
    bump_marks(&vol, before as u64, spec.revision)?;
    drop(locks);
    let applied = crate::data::facts(&vol, data, crate::data::Depth::Heads)?.db.and_then(|d| d.consistent_index).unwrap_or(0);

    // Started once more as its pod will start it (no --force-new-cluster): one member, at
    // the bumped revision, older revisions compacted.
    let mut etcd = Etcd::start(spec, false).await?;
    let verified = async {
        let mut c = etcd.client(spec.timeout).await?;
        let rev = etcd.one_member(&mut c, spec.timeout).await?;
        if rev as u64 != spec.revision {
            return Err(etcd.failed(&format!("etcd started at revision {rev}, not the {} written", spec.revision)));
        }
        match c.get("etcd-medic/rebuilt", Some(GetOptions::new().with_revision(before))).await {
            Err(e) if e.to_string().contains("compacted") => Ok(()),
            other => Err(etcd.failed(&format!("a read at the old revision {before} was not refused as compacted: {other:?}"))),
        }
    }
    .await;
    etcd.stop().await?;
    verified?;
    // The bump is in the db only, not in the raft log: a member added later must get the db
    // (a raft snapshot), never a replay of the old entries, which would give it the old
    // revisions. The last start snapshots at once (see `Etcd::start`), so the log etcd
    // serves from now on begins after the bump.
    let snapshot = crate::data::facts(&vol, data, crate::data::Depth::Heads)?.wal.map(|w| w.snapshot_index).unwrap_or(0);
    if snapshot <= applied {
        return Err(Error::new(
            Code::Internal,
            format!(
                "etcd took no snapshot past index {applied} (its last is at {snapshot}): a member added later would replay the old revisions"
            ),
        ));
    }
    Ok(Rebuilt {
        member_id: hex(member_id),
        cluster_id: hex(cluster_id),
        removed: removed.into_iter().map(hex).collect(),
        revision_before: before as u64,
        revision: spec.revision,
    })
}

/// The survivor's db, read at offsets: `f(size, read_at)`.
fn with_db<T>(vol: &Volume, f: impl FnOnce(u64, &mut dyn FnMut(u64, usize) -> Option<Vec<u8>>) -> Result<T>) -> Result<T> {
    use std::os::unix::fs::FileExt;
    let (file, size) =
        vol.open_file(Path::new("member/snap/db"), 64 << 30)?.ok_or_else(|| Error::new(Code::NotEtcdData, "the survivor has no db"))?;
    f(size, &mut |off: u64, len: usize| {
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, off).ok().map(|_| buf)
    })
}

/// Whether etcd's authentication is on in the survivor's db (bucket `auth`, `authEnabled` 1).
fn auth_enabled(vol: &Volume) -> Result<bool> {
    with_db(vol, |size, read_at| {
        let at = etcd_medic_core::bolt::locate(size, read_at, b"auth", b"authEnabled")
            .map_err(|why| Error::new(Code::CorruptData, format!("the survivor's db: {why}")))?;
        Ok(at.is_some_and(|(at, len)| len == 1 && read_at(at, 1).as_deref() == Some(&[1u8][..])))
    })
}

/// The members the survivor's db lists (bucket `members`, keyed by id in hex).
fn members_in_db(vol: &Volume) -> Result<Vec<u64>> {
    with_db(vol, |size, read_at| {
        let keys = etcd_medic_core::bolt::keys(size, read_at, b"members", 1000)
            .map_err(|why| Error::new(Code::CorruptData, format!("the survivor's db: {why}")))?;
        Ok(keys.iter().filter_map(|k| u64::from_str_radix(std::str::from_utf8(k).ok()?, 16).ok()).collect())
    })
}

/// No process on the node uses the data (`NotFenced` names them).
fn fenced(proc_root: &Path, vol: &Volume) -> Result<()> {
    guard::no_holders(proc_root, vol, Path::new("")).map_err(|e| {
        if e.code == Code::PodRunning {
            Error::new(Code::NotFenced, format!("{}; fence every member before a rebuild", e.message))
        } else {
            e
        }
    })
}

/// Rewrites both compaction marks of the db from `from` to `to`, each only where it holds
/// `from` (what the compaction just wrote).
fn bump_marks(vol: &Volume, from: u64, to: u64) -> Result<()> {
    let db = Path::new("member/snap/db");
    let (old, new) = (revision_bytes(from, 0), revision_bytes(to, 0));
    // Both found, and both holding `from`, before either is written: never one mark moved
    // and the other not.
    let places = with_db(vol, |size, read_at| {
        let mut places = Vec::new();
        for mark in COMPACTION_MARKS {
            let (at, len) = etcd_medic_core::bolt::locate(size, read_at, b"meta", mark.as_bytes())
                .map_err(|why| Error::new(Code::CorruptData, format!("the survivor's db after its compaction: {why}")))?
                .ok_or_else(|| Error::new(Code::Internal, format!("the compaction wrote no {mark}")))?;
            if len != old.len() || read_at(at, len).as_deref() != Some(&old[..]) {
                return Err(Error::new(Code::Internal, format!("{mark} does not hold the compacted revision {from}")));
            }
            places.push(at);
        }
        Ok(places)
    })?;
    for at in places {
        vol.rewrite_at(db, at, &old, &new)?;
    }
    Ok(())
}

/// etcd on the survivor's data, on loopback ports of its own.
struct Etcd {
    child: tokio::process::Child,
    url: String,
    /// The end of what etcd logged (its stderr), for the errors that quote it.
    log: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

/// How much of etcd's log an error quotes.
const LOG_TAIL: usize = 4096;

impl Etcd {
    async fn start(spec: &Spec, force: bool) -> Result<Etcd> {
        let port = || -> Result<u16> {
            let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| Error::new(Code::Internal, format!("no free port: {e}")))?;
            Ok(l.local_addr().map_err(|e| Error::new(Code::Internal, e.to_string()))?.port())
        };
        let (client, peer) = (format!("http://127.0.0.1:{}", port()?), format!("http://127.0.0.1:{}", port()?));
        let mut cmd = tokio::process::Command::new(&spec.etcd);
        cmd.arg(format!("--name={}", spec.name))
            .arg(format!("--data-dir={}", spec.data.display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={}", spec.client_urls.join(",")))
            .arg(format!("--listen-peer-urls={peer}"))
            // The first start: every other member removed. The second: a raft snapshot at the
            // first entries applied (its publish), so that the log starts past the bump.
            .arg(if force { "--force-new-cluster" } else { "--snapshot-count=1" })
            .env_clear()
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        // etcd (with --force-new-cluster, as root) never outlives the agent, however it ends.
        // SAFETY: prctl only, between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|e| Error::new(Code::Internal, format!("cannot start {}: {e}", spec.etcd.display())))?;
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        if let Some(mut stderr) = child.stderr.take() {
            let tail = log.clone();
            tokio::spawn(async move {
                use tokio::io::AsyncReadExt;
                let mut buf = [0u8; 8192];
                while let Ok(n @ 1..) = stderr.read(&mut buf).await {
                    let mut t = tail.lock().unwrap();
                    t.extend_from_slice(&buf[..n]);
                    let over = t.len().saturating_sub(LOG_TAIL);
                    t.drain(..over);
                }
            });
        }
        Ok(Etcd { child, url: client, log })
    }

    /// An error that carries the end of etcd's log.
    fn failed(&self, what: &str) -> Error {
        let tail = String::from_utf8_lossy(&self.log.lock().unwrap()).into_owned();
        Error::new(Code::Internal, format!("rebuilding with etcd: {what}; its log ends: {tail}"))
    }

    async fn client(&mut self, timeout: Duration) -> Result<Client> {
        // A physical compaction of a large history takes as long as it takes, within the
        // rebuild's own bound.
        let opts = etcd_client::ConnectOptions::new().with_connect_timeout(Duration::from_secs(2)).with_timeout(timeout);
        Client::connect([self.url.as_str()], Some(opts)).await.map_err(|e| self.failed(&format!("connect: {e}")))
    }

    /// Waits until etcd serves as the only member (what `--force-new-cluster` leaves), and
    /// answers its revision.
    async fn one_member(&mut self, c: &mut Client, timeout: Duration) -> Result<i64> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(self.failed(&format!("etcd exited ({status})")));
            }
            if let (Ok(list), Ok(st)) = (c.member_list().await, c.status().await) {
                let me = st.header().map(|h| h.member_id()).unwrap_or_default();
                if list.members().len() == 1 && list.members()[0].id() == me {
                    return Ok(st.header().map(|h| h.revision()).unwrap_or_default());
                }
            }
            if tokio::time::Instant::now() > deadline {
                return Err(self.failed(&format!("not serving as the only member within {timeout:?}")));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops etcd as its pod would be stopped (SIGTERM: it saves its state), waiting 30 s.
    async fn stop(mut self) -> Result<()> {
        if let Some(pid) = self.child.id() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGTERM);
        }
        match tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await {
            Ok(_) => Ok(()),
            Err(_) => {
                let _ = self.child.kill().await;
                Err(self.failed("it did not stop within 30 s of SIGTERM"))
            }
        }
    }
}
