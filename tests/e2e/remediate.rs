//! The agent heals the reference failure: `etcd-medic remediate` on the node, against the
//! lab's API server and real etcd, with a dry run first that changes nothing.

use std::time::Duration;

use anyhow::Result;
use etcd_medic_lab::{NODE_NAME, etcd};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remediate_heals_member_not_found_with_every_key_and_a_restorable_quarantine() -> Result<()> {
    let (lab, old_id) = crate::reference_failure::broken_lab().await?;
    if !lab.node.real_mounts {
        eprintln!("no mounts: the agent refuses unmounted CSI paths, so the heal needs root");
        return Ok(());
    }
    let state = tempfile::tempdir()?;
    let run = |extra: &[&str]| {
        let mut cmd = std::process::Command::new(crate::locate::agent_binary());
        cmd.args(["remediate", "apisix/apisix-etcd-1", "--node-name", NODE_NAME, "--verify-timeout", "120s"])
            .args(extra)
            .arg("--host-root")
            .arg(&lab.node.root)
            .arg("--state-dir")
            .arg(state.path())
            .env("KUBECONFIG", &lab.api.kubeconfig);
        tokio::task::block_in_place(|| cmd.output())
    };
    let data = lab.set.data_dir(1)?;

    let dry = run(&["--dry-run"])?;
    let out = String::from_utf8_lossy(&dry.stdout);
    assert!(dry.status.success(), "{out}\n{}", String::from_utf8_lossy(&dry.stderr));
    assert!(out.contains("nothing changed") && out.contains("member_id"), "{out}");
    assert!(data.join("member/snap/db").is_file() && data.join("member_id").is_file(), "a dry run moves nothing");

    let heal = run(&[])?;
    let out = String::from_utf8_lossy(&heal.stdout);
    assert!(heal.status.success(), "{out}\n{}", String::from_utf8_lossy(&heal.stderr));
    assert!(out.contains("Succeeded"), "{out}");
    for step in ["Check", "Lock", "Quarantine", "Membership", "Restart", "Verify"] {
        assert!(out.contains(&format!("{step:<11} Done")), "{step} missing in:\n{out}");
    }

    // Rejoined under a new id, every key on every member.
    let members = etcd::member_list(&lab.set.endpoints()).await?;
    assert_eq!(members.len(), 3);
    let new = members.iter().find(|m| m.name == "apisix-etcd-1").expect("rejoined");
    assert_ne!(new.id, old_id);
    let c = etcd::check_consistency(&lab.set.endpoints()).await?;
    assert!(c.consistent && c.members.iter().all(|(_, n, _)| *n == crate::reference_failure::KEYS), "{c:?}");

    // The old data sits in a quarantine on the volume (the volume moved with the pod), with
    // its manifest; the journal says Succeeded.
    let volume = lab.set.volume_path(1)?;
    let q: Vec<_> = std::fs::read_dir(volume.join(".etcd-medic/quarantine"))?.flatten().collect();
    assert_eq!(q.len(), 1);
    assert!(q[0].path().join("data/member/snap/db").is_file() && q[0].path().join("data/member_id").is_file());
    let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(q[0].path().join("manifest.json"))?)?;
    assert_eq!(manifest["state"], "Quarantined");
    assert_eq!(manifest["memberId"].as_str(), Some(format!("{old_id:x}").as_str()));
    let journals: Vec<_> = std::fs::read_dir(state.path().join("remediations"))?.flatten().collect();
    let last: serde_json::Value = journals
        .iter()
        .map(|j| serde_json::from_slice::<serde_json::Value>(&std::fs::read(j.path()).unwrap()).unwrap())
        .find(|j| j["phase"] == "Succeeded")
        .expect("a Succeeded journal");
    assert_eq!(last["steps"].as_array().unwrap().len(), 6);
    assert!(lab.set.data_dir(1)?.join(".etcd-medic").is_file(), "the dot-file keeps data/ from looking empty");

    // Restoring while the rejoined member runs on that volume is refused, and changes nothing.
    let id = last["id"].as_str().unwrap();
    let restore = tokio::task::block_in_place(|| {
        std::process::Command::new(crate::locate::agent_binary())
            .args(["restore", id, "--node-name", NODE_NAME])
            .arg("--host-root")
            .arg(&lab.node.root)
            .arg("--state-dir")
            .arg(state.path())
            .env("KUBECONFIG", &lab.api.kubeconfig)
            .output()
    })?;
    let stderr = String::from_utf8_lossy(&restore.stderr);
    assert!(!restore.status.success() && stderr.contains("(PodRunning)"), "{stderr}");
    assert!(q[0].path().join("data/member/snap/db").is_file());
    tokio::time::sleep(Duration::from_millis(10)).await;
    lab.shutdown().await;
    Ok(())
}
