//! A hostile tenant: the etcd pod's owner controls the volume and changes it while the agent
//! works. A canary tree outside the volume is the target of every link the tenant plants: a
//! write, a read or a removal that followed a link would show in it. For each attack: the canary is byte-identical afterwards, no byte of it
//! was read into the volume, and the remediation ends (healed, or refused or failed with a
//! code that says why) within its timeouts.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Result;
use etcd_medic::Code;
use etcd_medic::engine::{Engine, Options, Phase, Remediation};
use etcd_medic::locate::{Locator, NodeLayout};
use etcd_medic_lab::objects::SetShape;
use etcd_medic_lab::{Lab, NODE_NAME};

const SECRET: &str = "CANARY-node-credential-0f3c9a";

/// A tree outside the volume shaped like what the agent looks for, and a secret file.
fn make_canary(dir: &Path) -> Result<()> {
    for d in ["member/snap", "member/wal", "data/member/snap", "quarantine/q", "etcd-medic/quarantine"] {
        std::fs::create_dir_all(dir.join(d))?;
    }
    std::fs::write(dir.join("member/snap/db"), SECRET)?;
    std::fs::write(dir.join("member/wal/0000000000000000-0000000000000000.wal"), SECRET)?;
    std::fs::write(dir.join("data/member/snap/db"), SECRET)?;
    std::fs::write(dir.join("quarantine/q/keep"), SECRET)?;
    std::fs::write(dir.join("secret.pem"), SECRET)?;
    Ok(())
}

/// Every path with its bytes (links described, not followed).
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out: Vec<(PathBuf, Vec<u8>)> = walkdir::WalkDir::new(dir)
        .follow_links(false)
        .into_iter()
        .flatten()
        .map(|e| {
            let bytes = if e.file_type().is_file() { std::fs::read(e.path()).unwrap_or_default() } else { Vec::new() };
            (e.path().to_path_buf(), bytes)
        })
        .collect();
    out.sort();
    out
}

/// No regular file on the volume holds the canary's secret (nothing read into it).
fn assert_no_secret_in(volume: &Path) {
    for e in walkdir::WalkDir::new(volume).follow_links(false).into_iter().flatten().filter(|e| e.file_type().is_file()) {
        if e.metadata().map(|m| m.len()).unwrap_or(0) > 1 << 20 {
            continue;
        }
        let bytes = std::fs::read(e.path()).unwrap_or_default();
        assert!(!String::from_utf8_lossy(&bytes).contains(SECRET), "{} holds bytes from outside the volume", e.path().display());
    }
}

/// What the tenant swaps, relative to the volume root. `Quarantine` is the newest entry
/// under `.etcd-medic/quarantine` (its name is known only once the agent made it).
#[derive(Clone, Copy, Debug)]
enum Target {
    Path(&'static str),
    Quarantine,
}

/// A tenant that exchanges `target` with a symlink to the canary (`renameat2(RENAME_EXCHANGE)`)
/// in a tight loop from the moment `go` is set until stopped, then puts the real entry back.
/// The thread runs from the start, spinning on `go`, so that it strikes within microseconds
/// of the step that sets it.
struct Swapper {
    go: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

fn quarantines(volume: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(volume.join(".etcd-medic/quarantine"))
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| !n.ends_with(".evil")).collect())
        .unwrap_or_default();
    names.sort();
    names
}

impl Swapper {
    fn start(volume: PathBuf, target: Target, canary: PathBuf) -> Swapper {
        let (go, stop) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
        let (go_flag, stop_flag) = (go.clone(), stop.clone());
        // A `<timestamp>-<id>` target is the quarantine this remediation makes, not an older one.
        let before = quarantines(&volume);
        let thread = std::thread::spawn(move || {
            let mut swaps = 0u64;
            let mut armed: Option<(PathBuf, PathBuf)> = None;
            while !stop_flag.load(Ordering::SeqCst) {
                if armed.is_none() {
                    let real = match target {
                        Target::Path(p) => Some(volume.join(p)),
                        Target::Quarantine => quarantines(&volume)
                            .into_iter()
                            .find(|n| !before.contains(n))
                            .map(|n| volume.join(".etcd-medic/quarantine").join(n)),
                    };
                    if let Some(real) = real.filter(|r| r.symlink_metadata().is_ok()) {
                        let evil = PathBuf::from(format!("{}.evil", real.display()));
                        let to = if real.symlink_metadata().is_ok_and(|m| m.is_file()) {
                            canary.join("secret.pem")
                        } else {
                            canary.join("member")
                        };
                        let _ = std::fs::remove_file(&evil);
                        if std::os::unix::fs::symlink(&to, &evil).is_ok() {
                            armed = Some((real, evil));
                        }
                    }
                }
                match &armed {
                    Some((real, evil)) if go_flag.load(Ordering::SeqCst) => {
                        let flags = nix::fcntl::RenameFlags::RENAME_EXCHANGE;
                        if nix::fcntl::renameat2(nix::fcntl::AT_FDCWD, real, nix::fcntl::AT_FDCWD, evil, flags).is_ok() {
                            swaps += 1;
                        }
                    }
                    _ => std::hint::spin_loop(),
                }
            }
            // Put the real entry back where it was.
            if let Some((real, evil)) = armed {
                if real.symlink_metadata().is_ok_and(|m| m.file_type().is_symlink()) {
                    let _ = nix::fcntl::renameat2(
                        nix::fcntl::AT_FDCWD,
                        &real,
                        nix::fcntl::AT_FDCWD,
                        &evil,
                        nix::fcntl::RenameFlags::RENAME_EXCHANGE,
                    );
                }
                let _ = std::fs::remove_file(&evil);
            }
            swaps
        });
        Swapper { go, stop, thread: Some(thread) }
    }

    fn strike(&self) {
        self.go.store(true, Ordering::SeqCst);
    }

    fn stop(&mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().map(|t| t.join().unwrap_or(0)).unwrap_or(0)
    }
}

impl Drop for Swapper {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Bench {
    lab: Lab,
    locator: Locator,
    state: tempfile::TempDir,
    canary: PathBuf,
}

impl Bench {
    async fn start() -> Result<Option<Bench>> {
        crate::init_tracing();
        let lab = Lab::start(SetShape::apisix(3, NODE_NAME)).await?;
        if !etcd_medic_lab::kubelet::running_as_root() {
            eprintln!("SKIPPED: the hostile-tenant suite needs root (real locks, device nodes, other users' files)");
            assert!(std::env::var_os("ETCD_MEDIC_LAB_REQUIRE_MOUNTS").is_none(), "CI runs as root: this suite must not be skipped");
            return Ok(None);
        }
        lab.write_keys(100).await?;
        lab.break_member(1).await?;
        let (l, _proc) = etcd_medic_lab::agent::locator(&lab, None, Duration::from_secs(5)).await?;
        let locator = Locator { layout: NodeLayout { proc_root: "/proc".into(), ..l.layout }, api: l.api };
        let canary = lab.dir.path().join("canary");
        make_canary(&canary)?;
        Ok(Some(Bench { lab, locator, state: tempfile::tempdir()?, canary }))
    }

    /// The member's volume where the CSI driver stages it: the same filesystem as every pod's
    /// mount of it, and it stays while the agent replaces the pod (a tenant in the new pod
    /// goes on where it left off).
    fn backing(&self) -> PathBuf {
        let shape = self.lab.set.shape();
        self.lab.node.backing_path(&shape.pv_name(1), &shape.volume_source(1))
    }

    /// The member's volume as the kubelet exposes it now (the path names the pod's UID,
    /// which every heal changes).
    fn volume(&self) -> PathBuf {
        self.lab.set.volume_path(1).expect("the member's volume")
    }

    /// Runs one remediation of the broken member; `on_step(name)` is called when a step
    /// starts. Restarts of the crashed container are held while the tenant attacks, so
    /// that only the agent touches the volume.
    async fn remediate(&self, keep: usize, on_step: &(dyn Fn(&str) + Send + Sync)) -> Remediation {
        let opts = Options {
            dry_run: false,
            force: false,
            etcd_endpoints: vec![],
            state_dir: self.state.path().to_path_buf(),
            verify_timeout: Duration::from_secs(120),
            keep_quarantines: keep,
            lease_namespace: None,
            settle: etcd_medic::engine::SETTLE,
            etcd: etcd_medic::etcd::Etcd::default(),
            failpoint: etcd_medic::failpoint::Failpoint::default(),
        };
        let started = std::sync::Mutex::new(0usize);
        let progress = |u: etcd_medic_core::progress::Update| {
            let r = &u.remediation;
            let mut n = started.lock().unwrap();
            for s in &r.steps[(*n).min(r.steps.len())..] {
                on_step(s.name.as_str());
            }
            *n = r.steps.len();
        };
        let stop = AtomicBool::new(false);
        let engine = Engine { locator: &self.locator, opts, progress: &progress, stop: &stop };
        tokio::time::timeout(Duration::from_secs(180), engine.run("apisix", "apisix-etcd-1", None))
            .await
            .expect("the remediation ends within its timeouts")
    }

    /// Breaks the healed member again, once etcd accepts the next membership change (5 s
    /// after the last one, as the preStop hook's single `member remove` needs).
    async fn break_again(&self) -> Result<()> {
        tokio::time::sleep(Duration::from_secs(6)).await;
        self.lab.break_member(1).await?;
        Ok(())
    }

    /// Puts back what a remediation that did not succeed moved, so the next attack meets
    /// the same broken member.
    async fn undo(&self, r: &Remediation) -> Result<()> {
        if r.quarantine.is_some() {
            match etcd_medic::engine::restore(&self.locator, self.state.path(), &r.id, true, &etcd_medic::failpoint::Failpoint::NONE).await
            {
                // Refused before the quarantine was made: nothing to put back.
                Err(e) if e.code == Code::DataDirNotFound => {}
                other => {
                    other?;
                }
            }
        }
        let _ = std::fs::remove_file(self.lab.set.data_dir(1)?.join(".etcd-medic-keep"));
        Ok(())
    }

    fn assert_canary(&self, before: &[(PathBuf, Vec<u8>)], what: &str) {
        assert_eq!(snapshot(&self.canary), before, "{what}: the canary outside the volume changed");
        assert_no_secret_in(&self.volume());
    }
}

/// The codes an attack may end in: the agent refuses what it cannot vouch for.
fn refused_for_a_reason(r: &Remediation) -> bool {
    matches!(r.error.as_ref().map(|e| e.code), Some(Code::UnsafePath | Code::DataDirNotFound | Code::NotEtcdData))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_swapped_in_at_every_step_never_lead_outside_the_volume() -> Result<()> {
    let Some(b) = Bench::start().await? else { return Ok(()) };
    let before = snapshot(&b.canary);
    let targets = [
        Target::Path("data"),
        Target::Path("data/member"),
        Target::Path("data/member_id"),
        // What the check reads of the member's files: the WAL's directory and the db.
        Target::Path("data/member/wal"),
        Target::Path("data/member/snap/db"),
        Target::Path(".etcd-medic"),
        Target::Path(".etcd-medic/quarantine"),
        Target::Quarantine,
    ];
    let mut outcomes = Vec::new();
    let only = std::env::var("HOSTILE_ONLY").ok();
    for target in targets.into_iter().filter(|t| only.as_ref().is_none_or(|o| format!("{t:?}").contains(o.as_str()))) {
        // The tenant strikes when a step starts, with a tight RENAME_EXCHANGE loop until the
        // data has moved or the remediation ended: from Lock it is in full swing when the
        // Quarantine step moves the data; from Verify, when Retention removes old quarantines.
        let triggers: &[&str] = match target {
            Target::Path(p) if p.starts_with(".etcd-medic") => &["Check", "Lock", "Verify"],
            Target::Quarantine => &["Lock", "Verify"],
            Target::Path(_) => &["Check", "Lock"],
        };
        for &trigger in triggers {
            b.lab.set.hold_restarts(1, Duration::from_secs(60)).await?;
            let swapper = std::sync::Mutex::new(Some(Swapper::start(b.backing(), target, b.canary.clone())));
            let swapped = std::sync::atomic::AtomicU64::new(0);
            let on_step = |step: &str| {
                let mut s = swapper.lock().unwrap();
                if step == trigger
                    && let Some(sw) = s.as_ref()
                {
                    sw.strike();
                }
                if step == "Membership" {
                    // The data has moved: a tenant striking the data stops and its entries
                    // are put back; the member may start again to rejoin.
                    if trigger != "Verify"
                        && let Some(mut sw) = s.take()
                    {
                        swapped.fetch_add(sw.stop(), Ordering::SeqCst);
                    }
                    b.lab.set.release_restarts();
                }
            };
            // Retention prunes only when there is an older quarantine beyond the one kept.
            let keep = if trigger == "Verify" { 1 } else { 3 };
            let r = b.remediate(keep, &on_step).await;
            let swaps = swapper.lock().unwrap().take().map(|mut s| s.stop()).unwrap_or(0) + swapped.load(Ordering::SeqCst);
            let retention =
                r.steps.iter().find(|s| s.name == "Retention").map(|s| format!(" (Retention: {})", s.message)).unwrap_or_default();
            let what =
                format!("{target:?} from {trigger}: {:?} {:?} after {swaps} swaps{retention}", r.phase, r.error.as_ref().map(|e| e.code));
            b.assert_canary(&before, &what);
            // The canary's `.wal` and `db` hold its secret, not etcd's format: had the check
            // read them through a link, their verdict would be corrupt.
            if let Some(data) = r.plan.as_ref().and_then(|p| p.data.as_ref()) {
                let wal_corrupt =
                    data.wal.as_ref().is_some_and(|w| matches!(w.verdict, Some(etcd_medic::core::wal::Verdict::Corrupt { .. })));
                let db_corrupt = data.db.as_ref().is_some_and(|d| d.verdict != etcd_medic::core::bolt::DbVerdict::Sane);
                assert!(!wal_corrupt && !db_corrupt, "{what}: the check read something else than the member's files: {}", data.summary());
            }
            outcomes.push(what.clone());
            match r.phase {
                Phase::Succeeded => {
                    b.lab.set.release_restarts();
                    crate::reference_failure::assert_every_key(&b.lab, 3, 100).await?;
                    b.break_again().await?;
                }
                Phase::Refused | Phase::Failed => {
                    assert!(refused_for_a_reason(&r), "{what}: {:?}", r.error);
                    // `restore` under attack: the quarantine, `data/member` and `data/` swapped
                    // in a loop while it puts the data back.
                    if let Some(q) = r.quarantine.as_ref().filter(|_| r.phase == Phase::Failed) {
                        let qdir: &'static str = Box::leak(format!(".etcd-medic/quarantine/{}", q.name).into_boxed_str());
                        for t in [Target::Path(qdir), Target::Path("data/member"), Target::Path("data")] {
                            let mut sw = Swapper::start(b.backing(), t, b.canary.clone());
                            sw.strike();
                            tokio::time::sleep(Duration::from_millis(5)).await;
                            let res = etcd_medic::engine::restore(
                                &b.locator,
                                b.state.path(),
                                &r.id,
                                true,
                                &etcd_medic::failpoint::Failpoint::NONE,
                            )
                            .await;
                            let n = sw.stop();
                            let what = format!("restore under {t:?}: {:?} after {n} swaps", res.as_ref().map_err(|e| e.code));
                            b.assert_canary(&before, &what);
                            outcomes.push(what);
                        }
                    }
                    // Put back (restarts still held) what it moved, then let it crash-loop on.
                    b.undo(&r).await?;
                    b.lab.set.release_restarts();
                }
                other => panic!("{what}: ended {other:?}"),
            }
        }
    }
    eprintln!("attacks and outcomes:\n{}", outcomes.join("\n"));
    // After every attack, an honest remediation still heals the member.
    let r = b.remediate(3, &|_| {}).await;
    assert_eq!(r.phase, Phase::Succeeded, "{r:?}");
    crate::reference_failure::assert_every_key(&b.lab, 3, 100).await?;
    b.assert_canary(&before, "final heal");
    b.lab.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planted_fifos_devices_huge_files_and_forged_quarantines_are_never_trusted() -> Result<()> {
    let Some(b) = Bench::start().await? else { return Ok(()) };
    let before = snapshot(&b.canary);
    // A first heal leaves a real quarantine; the member is broken again for the second.
    let first = b.remediate(1, &|_| {}).await;
    assert_eq!(first.phase, Phase::Succeeded, "{first:?}");
    b.break_again().await?;
    let (volume, data) = (b.volume(), b.lab.set.data_dir(1)?);
    let first_q = volume.join(".etcd-medic/quarantine").join(&first.quarantine.as_ref().unwrap().name);
    b.lab.set.hold_restarts(1, Duration::from_secs(60)).await?;

    // member_id: a 10 GiB sparse file (read, it would exhaust memory); a FIFO where the
    // keep-file goes (opened, it would hang); /dev/zero's device node; 200,000 entries.
    std::fs::remove_file(data.join("member_id"))?;
    std::fs::File::create(data.join("member_id"))?.set_len(10 << 30)?;
    let fifo_mode = nix::sys::stat::Mode::from_bits_truncate(0o644);
    let _ = std::fs::remove_file(data.join(".etcd-medic-keep")); // left by the first heal
    nix::unistd::mkfifo(&data.join(".etcd-medic-keep"), fifo_mode)?;
    let _ = std::fs::remove_file(data.join("new_member_envs"));
    nix::unistd::mkfifo(&data.join("new_member_envs"), fifo_mode)?;
    nix::sys::stat::mknod(&volume.join("zero"), nix::sys::stat::SFlag::S_IFCHR, fifo_mode, nix::sys::stat::makedev(1, 5))?;
    let junk = volume.join("junk");
    for d in 0..200 {
        std::fs::create_dir_all(junk.join(d.to_string()))?;
        for f in 0..1000 {
            std::fs::File::create(junk.join(d.to_string()).join(f.to_string()))?;
        }
    }
    // Forged quarantines: named as the agent names them, for a remediation id that is public
    // (the first one's), one a link to the canary and one with a manifest that lists items
    // outside; and the real older quarantine's manifest rewritten to point elsewhere.
    let qbase = volume.join(".etcd-medic/quarantine");
    std::os::unix::fs::symlink(b.canary.join("quarantine"), qbase.join(format!("20200101T000000Z-{}", first.id)))?;
    std::fs::create_dir_all(qbase.join("20200101T000001Z-forged"))?;
    std::fs::write(
        qbase.join("20200101T000001Z-forged/manifest.json"),
        serde_json::json!({"id": "forged", "items": [{"path": "../../../../canary", "bytes": 0, "present": true}], "state": "Quarantined"})
            .to_string(),
    )?;
    std::fs::write(first_q.join("manifest.json"), format!(r#"{{"id":"{}","items":[{{"path":"../../canary"}}]}}"#, first.id))?;

    // The served agent answers /healthz throughout while it walks all of it.
    let agent = etcd_medic_lab::agent::ServedAgent::start(
        &b.lab,
        etcd_medic_lab::agent::Serve {
            auth: "none",
            state_dir: b.state.path().to_path_buf(),
            args: vec!["--keep-quarantines".into(), "1".into()],
            ..etcd_medic_lab::agent::Serve::new(&b.lab)
        },
    )
    .await?;
    agent.wait_ready(Duration::from_secs(30)).await?;
    let probing = Arc::new(AtomicBool::new(true));
    let prober = {
        let (probing, addr) = (probing.clone(), agent.addr);
        tokio::spawn(async move {
            let (mut answered, mut worst) = (0u32, Duration::ZERO);
            while probing.load(Ordering::SeqCst) {
                let t = std::time::Instant::now();
                let r =
                    tokio::time::timeout(Duration::from_secs(5), etcd_medic_lab::http::request(addr, "GET", "/healthz", &[], None)).await;
                assert!(matches!(r, Ok(Ok(ref resp)) if resp.status == 200), "/healthz did not answer during the remediation: {r:?}");
                answered += 1;
                worst = worst.max(t.elapsed());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (answered, worst)
        })
    };
    let created = agent.post(None, &serde_json::json!({"namespace": "apisix", "pod": "apisix-etcd-1"})).await?;
    assert_eq!(created.status, 202, "{}", created.text());
    let id = created.json()["id"].as_str().unwrap().to_string();
    // Restarts are released once the data has moved, so the member can rejoin.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let r = agent.get(&format!("/v1/remediations/{id}"), None).await?.json();
        if r["steps"].as_array().is_some_and(|s| s.iter().any(|s| s["name"] == "Membership")) || r["finishedAt"].is_string() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no progress: {r}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    b.lab.set.release_restarts();
    let done = agent.wait_finished(&id, None, Duration::from_secs(180)).await?;
    probing.store(false, Ordering::SeqCst);
    let (answered, worst) = prober.await?;
    eprintln!("/healthz answered {answered} times during the remediation, the slowest in {worst:?}");
    assert_eq!(done["phase"], "Succeeded", "{done}");
    // The same volume, where the kubelet mounts it for the replacement pod.
    let volume = b.volume();
    let qbase = volume.join(".etcd-medic/quarantine");
    let first_q = qbase.join(&first.quarantine.as_ref().unwrap().name);
    // The 10 GiB member_id was never read: no stale id came from it.
    assert!(done["quarantine"]["memberId"].is_null(), "{done}");
    let steps = done["steps"].as_array().unwrap();
    let retention = steps.iter().find(|s| s["name"] == "Retention").expect("a Retention step");
    assert_eq!(retention["outcome"], "Done", "{retention}");
    // Retention removed the older real quarantine (its journal made it), and nothing forged.
    assert!(!first_q.exists(), "the journal's older quarantine is pruned");
    assert!(qbase.join(format!("20200101T000000Z-{}", first.id)).is_symlink(), "a forged link is left alone");
    assert!(qbase.join("20200101T000001Z-forged/manifest.json").is_file(), "a forged dir is left alone");
    assert!(std::os::unix::fs::FileTypeExt::is_char_device(&volume.join("zero").symlink_metadata()?.file_type()));
    b.assert_canary(&before, "plants");
    crate::reference_failure::assert_every_key(&b.lab, 3, 100).await?;

    // Restoring a forged quarantine name, or one that retention removed, is refused.
    let bad =
        etcd_medic::engine::restore(&b.locator, b.state.path(), "forged", true, &etcd_medic::failpoint::Failpoint::NONE).await.unwrap_err();
    assert_eq!(bad.code, Code::InvalidRequest, "{bad}");
    let pruned = etcd_medic::engine::restore(&b.locator, b.state.path(), &first.id, true, &etcd_medic::failpoint::Failpoint::NONE)
        .await
        .unwrap_err();
    assert_eq!(pruned.code, Code::InvalidRequest, "{pruned}");
    b.assert_canary(&before, "restore of forged quarantines");
    drop(agent);
    b.lab.shutdown().await;
    Ok(())
}

/// A bind mount inside a hostPath volume of the node's own filesystem (the same device, so the
/// device check alone passed it): whatever is mounted there is another mount, and the agent
/// neither walks, removes nor stats into it. Another tenant's files behind it stay whole.
#[test]
fn a_bind_mount_of_the_same_filesystem_inside_a_volume_is_never_entered() -> Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        etcd_medic_lab::skip("bind mounts need root");
        return Ok(());
    }
    use etcd_medic::host::volume::{Limits, Volume};
    let dir = tempfile::tempdir()?;
    let (vol, other) = (dir.path().join("pv"), dir.path().join("other-tenant"));
    std::fs::create_dir_all(vol.join("data/member"))?;
    std::fs::create_dir_all(other.join("wal"))?;
    std::fs::write(other.join("wal/0.wal"), SECRET)?;
    let at = vol.join("data/member");
    nix::mount::mount(Some(&other), &at, None::<&str>, nix::mount::MsFlags::MS_BIND, None::<&str>)?;
    let unmount = scopeguard(|| {
        let _ = nix::mount::umount2(&at, nix::mount::MntFlags::MNT_DETACH);
    });
    let v = Volume::open(dir.path(), Path::new("pv"))?;
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&at)?.dev(), std::fs::metadata(&vol)?.dev(), "the same filesystem: the device alone cannot tell");
    let entered = v.entry(Path::new("data/member/wal")).unwrap_err();
    assert_eq!(entered.code, Code::UnsafePath, "{entered}");
    let walked = v.inodes(Limits::default()).unwrap_err();
    assert_eq!(walked.code, Code::UnsafePath, "{walked}");
    let removed = v.remove_tree(Path::new("data"), Limits::default()).unwrap_err();
    assert_eq!(removed.code, Code::UnsafePath, "{removed}");
    assert_eq!(std::fs::read_to_string(other.join("wal/0.wal"))?, SECRET, "the other tenant's files are whole");
    drop(unmount);
    Ok(())
}

/// Runs `f` when dropped (a test's cleanup, also when an assertion fails).
fn scopeguard(f: impl FnOnce()) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f()
            }
        }
    }
    Guard(Some(f))
}
