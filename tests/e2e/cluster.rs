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
