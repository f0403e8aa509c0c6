//! Quorum lost, with real etcd: two of three members' volumes destroyed, the survivor chosen
//! from the files, its data made a one-member cluster offline (fenced), then the others
//! added back on empty data.

use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use etcd_medic::Code;
use etcd_medic::data::{Depth, facts};
use etcd_medic::host::volume::Volume;
use etcd_medic::rebuild::{Spec, rebuild};
use etcd_medic_core::recover::{BUMP, Evidence, Facts, bumped_revision, choose};
use etcd_medic_lab::etcd::{EtcdCluster, etcd_binary};

const KEYS: usize = 200;

fn spec(c: &EtcdCluster, i: usize, revision: u64) -> Spec {
    Spec {
        etcd: etcd_binary(),
        data: c.data_dir(i),
        name: c.specs[i].name.clone(),
        client_urls: vec![c.specs[i].client_url()],
        revision,
        proc_root: "/proc".into(),
        timeout: Duration::from_secs(60),
    }
}

/// The survivor's data is rebuilt into a one-member cluster that holds every key, starts
/// past every revision held (older ones compacted), and takes the others back one at a time.
/// While a member still runs, nothing is done (`NotFenced`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_volumes_lost_the_survivor_rebuilds_the_cluster_with_every_key_and_time_moving_forward() -> Result<()> {
    let mut c = EtcdCluster::start(3).await?;
    for k in 0..KEYS {
        c.put(&format!("/apisix/routes/{k:04}"), &format!("route-{k}")).await?;
    }
    // A member still runs: a rebuild would meet it (force-new-cluster must never).
    let running = rebuild(&spec(&c, 0, BUMP)).await.unwrap_err();
    assert_eq!(running.code, Code::NotFenced, "{running}");
    assert_eq!(c.members().await?.len(), 3, "nothing changed");

    // Quorum lost for good: every member stopped, two volumes gone with their nodes.
    for i in 0..3 {
        c.stop(i).await;
    }
    for i in [1, 2] {
        std::fs::remove_dir_all(c.data_dir(i))?;
    }
    let evidence: Vec<Evidence> = (0..3)
        .map(|i| {
            let dir = c.data_dir(i);
            let facts = dir.is_dir().then(|| {
                let vol = Volume::open(&dir, Path::new("")).expect("the survivor's data dir");
                facts(&vol, Path::new(""), Depth::Heads).expect("its files")
            });
            Evidence { pod: c.specs[i].name.clone(), facts: facts.as_ref().and_then(Facts::of) }
        })
        .collect();
    let choice = choose(&evidence, None)?;
    assert_eq!(choice.survivor, "etcd-0", "{choice:?}");
    let held = choice.ranked[0].revision.expect("the survivor's revision");
    let target = bumped_revision(held, [], BUMP);
    let rebuilt = rebuild(&spec(&c, 0, target)).await?;
    assert_eq!((rebuilt.revision_before, rebuilt.revision), (held, target), "{rebuilt:?}");
    assert_eq!(rebuilt.removed.len(), 2, "the two lost members are removed: {rebuilt:?}");

    // The pod's etcd starts it with its own flags: one member, every key, the new revision.
    c.restart(0)?;
    c.wait_healthy(0).await?;
    let members = c.members().await?;
    assert_eq!(members.len(), 1, "{members:?}");
    assert_eq!(u64::from_str_radix(&rebuilt.member_id, 16)?, members[0].id, "{rebuilt:?}");
    let mut client = c.client().await?;
    let all = client.get("/apisix/routes/", Some(etcd_client::GetOptions::new().with_prefix())).await?;
    assert_eq!(all.kvs().len(), KEYS, "every key the survivor held");
    assert_eq!(all.header().map(|h| h.revision()), Some(target as i64), "the revision moved forward, past every one held");
    let old = client.get("/apisix/routes/0000", Some(etcd_client::GetOptions::new().with_revision(held as i64))).await.unwrap_err();
    assert!(old.to_string().contains("compacted"), "a read at an old revision is told so, never given other data: {old}");
    c.put("/apisix/routes/new", "after").await?;

    // The others come back one at a time on empty data, each healthy before the next.
    for i in [1, 2] {
        c.add_back(i).await?;
    }
    let after = c.consistency().await?;
    assert!(after.consistent && after.members.len() == 3, "{after:?}");
    assert_eq!(after.keys.len(), KEYS + 1);
    assert_eq!(after.revision, target as i64 + 1);
    Ok(())
}

/// etcd follows links: a data dir that holds one (or a FIFO, a device) is refused before etcd
/// is ever started on it, and nothing in it changes.
#[test]
fn a_data_dir_with_a_link_is_never_given_to_etcd() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    std::fs::create_dir_all(data.join("member/wal"))?;
    std::fs::create_dir_all(data.join("member/snap"))?;
    std::fs::write(data.join("member/snap/db"), b"not read")?;
    std::fs::write(dir.path().join("elsewhere.wal"), b"another tenant's")?;
    std::os::unix::fs::symlink(dir.path().join("elsewhere.wal"), data.join("member/wal/0000000000000000-0000000000000000.wal"))?;
    let spec = Spec {
        etcd: "/nonexistent/etcd".into(),
        data: data.clone(),
        name: "etcd-0".into(),
        client_urls: vec!["http://127.0.0.1:2379".into()],
        revision: BUMP,
        proc_root: "/proc".into(),
        timeout: Duration::from_secs(5),
    };
    let e = tokio::runtime::Runtime::new()?.block_on(rebuild(&spec)).unwrap_err();
    assert_eq!(e.code, Code::UnsafePath, "{e}");
    assert!(e.message.contains("Symlink"), "{e}");
    assert_eq!(std::fs::read(dir.path().join("elsewhere.wal"))?, b"another tenant's");
    let empty = tempfile::tempdir()?;
    let e = tokio::runtime::Runtime::new()?.block_on(rebuild(&Spec { data: empty.path().to_path_buf(), ..spec })).unwrap_err();
    assert_eq!(e.code, Code::NotEtcdData, "{e}");
    Ok(())
}

/// A survivor whose etcd has authentication on is told so before etcd is started on it (its
/// db says it), never left rebuilt halfway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_survivor_with_authentication_on_is_refused_before_anything_changes() -> Result<()> {
    let mut c = EtcdCluster::start(1).await?;
    c.put("/apisix/routes/1", "r").await?;
    let mut client = c.client().await?;
    client.user_add("root", "s3cret", None).await?;
    client.user_grant_role("root", "root").await?;
    client.auth_enable().await?;
    c.stop(0).await;
    // Every file's bytes, before and after.
    let bytes = |dir: &Path| -> Vec<(std::path::PathBuf, Vec<u8>)> {
        etcd_medic_lab::agent::tree(dir).into_iter().map(|(p, _)| (p.clone(), std::fs::read(dir.join(&p)).unwrap_or_default())).collect()
    };
    let before = bytes(&c.data_dir(0));
    let e = rebuild(&spec(&c, 0, BUMP)).await.unwrap_err();
    assert_eq!(e.code, Code::UnsupportedProfile, "{e}");
    assert!(e.message.contains("authentication"), "{e}");
    assert!(bytes(&c.data_dir(0)) == before, "nothing changed");
    Ok(())
}
