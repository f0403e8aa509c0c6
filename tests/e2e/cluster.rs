//! The lab's etcd cluster: real processes, membership, consistency, no leaks.

use std::time::Duration;

use anyhow::Result;
use etcd_medic_lab::etcd::{self, EtcdCluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_serve_keys_and_agree() -> Result<()> {
    crate::init_tracing();
    let mut c = EtcdCluster::start(3).await?;
    let version = etcd::etcd_version()?;
    assert!(version.starts_with("etcd Version: 3."), "{version}");
    for i in 0..50 {
        c.put(&format!("k{i:02}"), &format!("v{i}")).await?;
    }
    assert_eq!(c.get("k07").await?.as_deref(), Some("v7"));
    let members = c.members().await?;
    assert_eq!(members.len(), 3);
    assert!(members.iter().all(|m| m.started()));
    let report = c.consistency().await?;
    assert!(report.consistent, "{report:?}");
    assert_eq!(report.keys.len(), 50);
    assert!(report.members.iter().all(|(_, n, _)| *n == 50));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_member_restarts_on_its_data_and_catches_up() -> Result<()> {
    let mut c = EtcdCluster::start(3).await?;
    c.put("before", "1").await?;
    c.kill(2);
    assert!(!c.is_running(2));
    c.put("while-down", "2").await?;
    c.restart(2)?;
    c.wait_healthy(2).await?;
    let report = c.consistency().await?;
    assert!(report.consistent, "{report:?}");
    assert_eq!(report.members.len(), 3);
    assert_eq!(report.keys.len(), 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_member_refuses_its_old_data_and_the_replacement_procedure_heals_it() -> Result<()> {
    let mut c = EtcdCluster::start(3).await?;
    c.put("k", "v").await?;
    let old = c.remove(1).await?;
    c.stop(1).await;
    // etcd itself refuses to start a removed member on its old data (FIELD-NOTES.md).
    c.restart(1)?;
    let (status, log) = c.wait_exit(1, Duration::from_secs(30)).await?;
    eprintln!("removed member exited with {status}");
    assert!(log.contains("the member has been permanently removed from the cluster"), "{log}");
    // etcd's runtime-reconfiguration guide: empty data dir, member add, start with existing.
    std::fs::remove_dir_all(c.data_dir(1))?;
    let new = c.add_back(1).await?;
    assert_ne!(new, old);
    let report = c.consistency().await?;
    assert!(report.consistent && report.members.len() == 3, "{report:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_test_leaves_no_etcd_behind() -> Result<()> {
    let pids = std::thread::spawn(|| {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            rt.block_on(async {
                let c = EtcdCluster::start(1).await.unwrap();
                tx.send(c.process(0).unwrap().pid().unwrap()).unwrap();
                panic!("a test failing half-way");
            })
        }));
        assert!(result.is_err());
        rx.recv().unwrap()
    })
    .join()
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let alive = std::path::Path::new(&format!("/proc/{pids}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pids}/stat")).unwrap_or_default().contains(") Z ");
    assert!(!alive, "etcd {pids} survived the panic");
    Ok(())
}

/// The agent's etcd client over TLS (`--etcd-tls-dir`, per StatefulSet) against a real etcd
/// that requires client certificates: before the set's files are there the agent cannot
/// reach it; with them, the member list and each member's status answer; a set of another
/// namespace at the same endpoint is never given them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_reaches_an_etcd_that_requires_client_certificates() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let p = |name: &str| dir.path().join(name);
    let openssl = |args: &[&str]| -> Result<()> {
        let out = std::process::Command::new("openssl").args(args).current_dir(dir.path()).output()?;
        anyhow::ensure!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        Ok(())
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
    openssl(&[&["req", "-x509"][..], &ec, &["-days", "1", "-subj", "/CN=lab-ca", "-keyout", "ca.key", "-out", "ca.crt"]].concat())?;
    for (name, usage) in [("server", "serverAuth"), ("client", "clientAuth")] {
        std::fs::write(p(&format!("{name}.ext")), format!("subjectAltName=IP:127.0.0.1\nextendedKeyUsage={usage}\n"))?;
        let (key, csr, crt, ext) = (format!("{name}.key"), format!("{name}.csr"), format!("{name}.crt"), format!("{name}.ext"));
        openssl(&[&["req"][..], &ec, &["-subj", &format!("/CN={name}"), "-keyout", &key, "-out", &csr]].concat())?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-out",
            &crt,
            "-extfile",
            &ext,
        ])?;
    }
    let (client, peer) = (etcd_medic_lab::process::free_port(), etcd_medic_lab::process::free_port());
    let url = format!("https://127.0.0.1:{client}");
    let mut cmd = tokio::process::Command::new(etcd::etcd_binary());
    cmd.arg("--name=tls")
        .arg(format!("--data-dir={}", p("data").display()))
        .arg(format!("--listen-client-urls={url}"))
        .arg(format!("--advertise-client-urls={url}"))
        .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer}"))
        .arg(format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer}"))
        .arg(format!("--initial-cluster=tls=http://127.0.0.1:{peer}"))
        .arg(format!("--cert-file={}", p("server.crt").display()))
        .arg(format!("--key-file={}", p("server.key").display()))
        .arg(format!("--trusted-ca-file={}", p("ca.crt").display()))
        .args(["--client-cert-auth", "--unsafe-no-fsync"])
        .stdout(std::fs::File::create(p("etcd.log"))?)
        .stderr(std::fs::File::create(p("etcd.err"))?);
    let _etcd = etcd_medic_lab::process::spawn_tied(cmd)?;
    let tls_dir = p("etcd-tls");
    let etcd = etcd_medic::etcd::Etcd::with_tls_dir(Some(tls_dir.clone()));
    // Not configured yet: no TLS, no answer.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = etcd_medic_lab::objects::lone_target(&etcd, "lab", "https", client, peer)?;
    assert!(etcd.members(&before).await.is_err(), "an https etcd answered a client without TLS");
    // The set's Secret, as the chart mounts it: <dir>/<namespace>/<statefulset>/.
    let set_dir = tls_dir.join("lab/lone");
    std::fs::create_dir_all(&set_dir)?;
    for (from, to) in [("ca.crt", "ca.crt"), ("client.crt", "tls.crt"), ("client.key", "tls.key")] {
        std::fs::copy(p(from), set_dir.join(to))?;
    }
    let endpoints = etcd_medic_lab::objects::lone_target(&etcd, "lab", "https", client, peer)?;
    // Another namespace's set of the same name, at the same endpoint: no certificate for it.
    let other = etcd_medic_lab::objects::lone_target(&etcd, "tenant", "https", client, peer)?;
    assert!(etcd.members(&other).await.is_err(), "another set was given this set's certificate");
    // A set whose files are half there is an error that names it, not a plain connection.
    std::fs::create_dir_all(tls_dir.join("half/lone"))?;
    std::fs::copy(p("client.crt"), tls_dir.join("half/lone/tls.crt"))?;
    let half = etcd_medic_lab::objects::lone_target(&etcd, "half", "https", client, peer).unwrap_err();
    assert!(half.message.contains("StatefulSet half/lone") && half.message.contains("go together"), "{half}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let (cluster_id, members) = loop {
        match etcd.members(&endpoints).await {
            Ok(m) => break m,
            Err(e) => {
                anyhow::ensure!(tokio::time::Instant::now() < deadline, "{}\n{}", e.message, std::fs::read_to_string(p("etcd.err"))?);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    assert_ne!(cluster_id, 0);
    assert_eq!(members.len(), 1);
    assert!(members[0].healthy && members[0].client_urls == [url], "{members:?}");
    Ok(())
}

/// What a db file says, read at offsets as the agent reads a volume's file.
fn read_db(path: &std::path::Path) -> Result<etcd_medic::core::bolt::DbFacts> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(path)?;
    let size = file.metadata()?.len();
    Ok(etcd_medic::core::bolt::read(size, &mut |off, len| {
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, off).ok().map(|_| buf)
    }))
}

/// A member's WAL segments, in name order.
fn wal_segments(data: &std::path::Path) -> Result<Vec<Vec<u8>>> {
    let mut names: Vec<_> = std::fs::read_dir(data.join("member/wal"))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .collect();
    names.sort();
    Ok(names.iter().map(std::fs::read).collect::<std::io::Result<_>>()?)
}

/// The WAL and the db read offline say what etcd said online (the vendored etcd 3.5; CI runs
/// it again on 3.4, 3.6 and 3.7): each member's node id and the cluster id as the member list
/// and status gave them, a term and commit at least as far as the member's status said before
/// it stopped, the last snapshot as etcd named its file, every CRC whole. One flipped byte
/// (where etcd refuses to start: `crc mismatch`) is Corrupt at a named offset; a last record
/// cut short (a crash mid-write) is a torn tail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wal_read_offline_says_what_etcd_said() -> Result<()> {
    use etcd_medic::core::wal::{self, Verdict};
    // A snapshot every 40 entries: snapshot records in the WAL, `.snap` files beside them.
    let mut c = EtcdCluster::start_snapshotting(3, 40).await?;
    for i in 0..100 {
        c.put(&format!("/apisix/routes/{i:05}"), &format!("{{\"id\":\"{i}\"}}")).await?;
    }
    let mut said = Vec::new();
    let mut revision = 0;
    for e in c.endpoints() {
        let mut client = etcd_client::Client::connect([e], None).await?;
        let s = client.status().await?;
        let h = s.header().expect("a header");
        said.push((h.member_id(), h.cluster_id(), s.raft_term(), s.raft_index()));
        revision = client.get("/apisix/routes/", None).await?.header().expect("a header").revision();
    }
    for i in 0..3 {
        c.stop(i).await;
    }
    for (i, (member, cluster, term, index)) in said.iter().enumerate() {
        let segs = wal_segments(&c.data_dir(i))?;
        let f = wal::read(&segs.iter().map(Vec::as_slice).collect::<Vec<_>>());
        assert_eq!(f.verdict, Some(Verdict::Whole), "member {i}: {f:?}");
        assert_eq!((f.node_id, f.cluster_id), (Some(*member), Some(*cluster)), "member {i}: {f:?}");
        assert!(
            f.term >= *term && f.commit >= *index && f.last_index >= Some(f.commit),
            "member {i}: {f:?}, etcd said term {term} index {index}"
        );
        // etcd names each snapshot file `<term>-<index>.snap` as it records the snapshot in
        // the WAL: the newest file is the WAL's last snapshot.
        let mut snaps: Vec<(u64, u64)> = std::fs::read_dir(c.data_dir(i).join("member/snap"))?
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter_map(|n| n.strip_suffix(".snap").and_then(|n| n.split_once('-')).map(|(t, x)| (t.to_string(), x.to_string())))
            .filter_map(|(t, x)| Some((u64::from_str_radix(&t, 16).ok()?, u64::from_str_radix(&x, 16).ok()?)))
            .collect();
        snaps.sort_by_key(|(_, index)| *index);
        assert!(f.snapshot_index >= 40, "member {i}: snapshots taken: {f:?}");
        let newest = snaps.last().copied();
        assert_eq!(Some((f.snapshot_term, f.snapshot_index)), newest, "member {i}: {f:?}");
    }
    // The db read offline: the revision of the last write as etcd answered it, a consistent
    // index and term at least as far as the member's status.
    // etcd 3.4 keeps no term beside the consistent index.
    let keeps_term = !etcd::etcd_version()?.contains("Version: 3.4.");
    for (i, (_, _, term, index)) in said.iter().enumerate() {
        let f = read_db(&c.data_dir(i).join("member/snap/db"))?;
        assert_eq!(f.verdict, etcd_medic::core::bolt::DbVerdict::Sane, "member {i}: {f:?}");
        assert_eq!(f.revision, Some(revision as u64), "member {i}: {f:?}");
        let term_ok = if keeps_term { f.term >= Some(*term) } else { f.term.is_none() };
        assert!(f.consistent_index >= Some(*index) && term_ok, "member {i}: {f:?}, etcd said term {term} index {index}");
    }
    // Cut short, or both meta pages damaged: etcd cannot open it, nor do we read it as sane.
    let db = c.data_dir(2).join("member/snap/db");
    let bytes = std::fs::read(&db)?;
    let page = read_db(&db)?.page_size as usize;
    let mut both = bytes.clone();
    both[16 + 20] ^= 1;
    both[page + 16 + 20] ^= 1;
    for (what, damaged) in [("cut short", bytes[..bytes.len() / 2].to_vec()), ("both meta pages", both.clone())] {
        let f = etcd_medic::core::bolt::read(damaged.len() as u64, &mut |o, l| damaged.get(o as usize..o as usize + l).map(<[u8]>::to_vec));
        assert!(matches!(f.verdict, etcd_medic::core::bolt::DbVerdict::Corrupt { .. }), "{what}: {f:?}");
    }
    std::fs::write(&db, &both)?;
    c.restart(2)?;
    let (status, log) = c.wait_exit(2, Duration::from_secs(30)).await?;
    assert!(!status.success() && log.contains("failed to open database"), "etcd itself refuses it: {log}");
    // Streamed from the files one record at a time, as the agent reads a volume: the same.
    let mut names: Vec<_> = std::fs::read_dir(c.data_dir(2).join("member/wal"))?.flatten().map(|e| e.path()).collect();
    names.retain(|p| p.extension().is_some_and(|x| x == "wal"));
    names.sort();
    let mut reader = wal::Reader::default();
    for (i, n) in names.iter().enumerate() {
        let file = std::fs::File::open(n)?;
        let len = file.metadata()?.len();
        assert!(reader.segment(std::io::BufReader::new(file), len, i + 1 == names.len()));
    }
    let streamed = reader.finish();
    let whole = wal::read(&wal_segments(&c.data_dir(2))?.iter().map(Vec::as_slice).collect::<Vec<_>>());
    assert_eq!(streamed, whole);
    // A crash mid-write: the last record of the last segment cut short.
    let mut segs = wal_segments(&c.data_dir(1))?;
    let last = segs.last_mut().expect("a segment");
    let end = last.iter().rposition(|b| *b != 0).expect("records") + 1;
    last.truncate(end - 3);
    let f = wal::read(&segs.iter().map(Vec::as_slice).collect::<Vec<_>>());
    assert!(matches!(f.verdict, Some(Verdict::TornTail { .. })), "{f:?}");
    // One flipped byte of a key: etcd refuses to start on it.
    etcd::flip_a_byte_in_the_wal(&c.data_dir(0))?;
    let f = wal::read(&wal_segments(&c.data_dir(0))?.iter().map(Vec::as_slice).collect::<Vec<_>>());
    assert!(matches!(f.verdict, Some(Verdict::Corrupt { ref why, .. }) if why.contains("CRC")), "{f:?}");
    c.restart(0)?;
    let (status, log) = c.wait_exit(0, Duration::from_secs(30)).await?;
    assert!(!status.success() && log.contains("crc mismatch"), "etcd itself refuses it: {log}");
    Ok(())
}
