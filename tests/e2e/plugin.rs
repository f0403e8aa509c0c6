//! `kubectl etcd-medic` against the lab: the user's kubeconfig, the controller and the agent
//! running, real etcd. The plugin only writes and reads EtcdRemediations; the controller
//! carries them out.

use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Result;
use serde_json::Value;

use etcd_medic_client::crd::EtcdRemediation;
use etcd_medic_core::{Code, Error};
use etcd_medic_lab::Lab;
use etcd_medic_lab::agent::plugin_binary;
use etcd_medic_lab::apiserver::{Fault, FaultKind};
use etcd_medic_lab::controller::{ControllerProcess, agent_for_controller, register_agent, remediations, wait_record};

use crate::reference_failure::{KEYS, assert_every_key, broken_lab_with_mounts};

struct Ran {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs the plugin as kubectl would, with the lab's kubeconfig (its context is `lab`).
async fn kubectl_etcd_medic(lab: &Lab, args: &[&str]) -> Result<Ran> {
    let out = tokio::process::Command::new(plugin_binary())
        .args(args)
        .env("KUBECONFIG", &lab.api.kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .await?;
    let ran = Ran {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into(),
        stderr: String::from_utf8_lossy(&out.stderr).into(),
    };
    eprintln!("$ kubectl etcd-medic {}\n{}{}(exit {})", args.join(" "), ran.stdout, ran.stderr, ran.code);
    Ok(ran)
}

/// Member `ordinal`'s etcd killed, and its restarts held: a member down, its data kept.
async fn stop_held(lab: &Lab, ordinal: usize) -> Result<()> {
    lab.set.switches().hold_restarts.store(true, Ordering::SeqCst);
    lab.set.crash_container(ordinal)?;
    lab.set.hold_restarts(ordinal, Duration::from_secs(60)).await
}

fn exit_of(code: Code) -> i32 {
    Error::new(code, "").exit_code().into()
}

/// The reference failure, as a person with kubectl meets it: `diagnose` names the signature,
/// `members` shows the cluster without the pod's entry, `heal --wait` follows the heal step
/// by step to Succeeded (exit 0, every key kept), `list` shows the history newest first,
/// `restore` of the healed member is refused while etcd runs on it (its code's exit), and a
/// heal of a healthy member exits with the refusal's code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_diagnoses_heals_and_reads_the_history_with_kubectl_while_the_controller_detects_nothing() -> Result<()> {
    crate::init_tracing();
    let Some((lab, _)) = broken_lab_with_mounts().await? else { return Ok(()) };
    lab.set.switches().hold_restarts.store(false, Ordering::SeqCst);
    let agent = agent_for_controller(&lab, &[]).await?;
    let token = register_agent(&lab, &agent)?;
    // The controller carries out what is asked but never detects on its own here (no
    // first-crash rule, thresholds never met): every record is the plugin's.
    let c = ControllerProcess::start(&lab, &token, "replica-a", &["--first-crash=false", "--min-restarts", "100000"]).await?;

    let d = kubectl_etcd_medic(&lab, &["diagnose", "apisix-etcd-1", "-n", "apisix", "--context", "lab"]).await?;
    assert_eq!(d.code, 0, "{}{}\n{}", d.stdout, d.stderr, c.log_text());
    assert!(d.stdout.contains("Signature    MemberNotFound") && d.stdout.contains("Action       heal"), "{}", d.stdout);

    let m = kubectl_etcd_medic(&lab, &["members", "apisix-etcd-1", "-n", "apisix", "-o", "json"]).await?;
    assert_eq!(m.code, 0, "{}", m.stderr);
    let members: Value = serde_json::from_str(&m.stdout)?;
    let list = members["members"].as_array().cloned().unwrap_or_default();
    assert_eq!(list.len(), 2, "the removed member has no entry: {members}");
    assert!(list.iter().all(|m| m["healthy"] == true && m["stale"] == false), "{members}");
    assert!(members["clusterID"].as_str().is_some_and(|id| id.len() == 16), "{members}");

    // What the stale member's files say: the live cluster's WAL, whole, of a member the
    // cluster no longer lists, and a sane db that holds the keys written.
    let i = kubectl_etcd_medic(&lab, &["inspect", "apisix-etcd-1", "-n", "apisix", "-o", "json"]).await?;
    assert_eq!(i.code, 0, "{}", i.stderr);
    let inspected: Value = serde_json::from_str(&i.stdout)?;
    let data = &inspected["data"];
    let live = u64::from_str_radix(members["clusterID"].as_str().unwrap(), 16)?;
    assert_eq!(data["clusterID"].as_str().map(|c| u64::from_str_radix(c, 16).ok()), Some(Some(live)), "{inspected}");
    let on_disk = data["memberID"].as_str().unwrap_or_default();
    assert!(!on_disk.is_empty() && list.iter().all(|m| m["id"] != on_disk), "the stale id is no longer listed: {inspected}");
    assert_eq!((data["wal"].as_str(), data["db"].as_str()), (Some("whole"), Some("sane")), "{inspected}");
    assert!(data["revision"].as_i64().is_some_and(|r| r > 1) && data["commit"].as_i64().is_some_and(|c| c > 0), "{inspected}");
    assert_eq!(inspected["diagnosis"]["signature"], "MemberNotFound", "{inspected}");
    let table = kubectl_etcd_medic(&lab, &["inspect", "apisix-etcd-1", "-n", "apisix"]).await?;
    assert!(
        table.stdout.contains(&format!("Member       {on_disk} of cluster")) && table.stdout.contains("WAL          whole"),
        "{}",
        table.stdout
    );

    // A flaky API server on the way: the record's first reads answer 500 twice, then 429
    // (Retry-After 1). Each is asked again; the heal is followed to its end all the same.
    let followed = "/apis/etcd-medic.io/v1alpha1/namespaces/apisix/etcdremediations/";
    lab.api.inject(Fault::new(followed, FaultKind::Status(500)).method("GET").times(2));
    lab.api.inject(Fault::new(followed, FaultKind::Throttle { retry_after_seconds: 1 }).method("GET").times(1));
    let h = kubectl_etcd_medic(&lab, &["heal", "apisix-etcd-1", "-n", "apisix", "--wait", "--timeout", "4m"]).await?;
    assert_eq!(h.code, 0, "{}{}\n{}", h.stdout, h.stderr, c.log_text());
    assert_eq!(lab.api.faults_left(), [Some(0), Some(0)], "every fault struck the plugin");
    lab.api.clear_faults();
    assert!(h.stdout.starts_with("Succeeded (remediation "), "{}", h.stdout);
    for step in ["Check Done", "Quarantine Done", "Restart Done", "Verify Done"] {
        assert_eq!(h.stderr.matches(step).count(), 1, "{step} is told once: {}", h.stderr);
    }
    assert!(h.stderr.trim_end().ends_with("] Succeeded"), "the verdict comes last: {}", h.stderr);
    assert_every_key(&lab, 3, KEYS).await?;

    let l = kubectl_etcd_medic(&lab, &["list", "-n", "apisix", "-o", "json"]).await?;
    let items: Vec<Value> = serde_json::from_str(&l.stdout)?;
    let names: Vec<&str> = items.iter().filter_map(|i| i["metadata"]["name"].as_str()).collect();
    assert_eq!(names.len(), 5, "{names:?}");
    assert!(
        names[0].starts_with("apisix-etcd-1-heal-")
            && names[1].contains("-inspect-")
            && names[3].contains("-members-")
            && names[4].contains("-diagnose-"),
        "{names:?}"
    );
    let table = kubectl_etcd_medic(&lab, &["list", "-A"]).await?;
    assert!(table.stdout.starts_with("NAMESPACE") && table.stdout.contains("Succeeded"), "{}", table.stdout);
    let s = kubectl_etcd_medic(&lab, &["status", "apisix-etcd-1", "-n", "apisix"]).await?;
    assert!(s.stdout.contains(names[0]) && s.stdout.contains("Steps:") && s.stdout.contains("Verify"), "{}", s.stdout);

    // The heal removed the member and added it again: its old data, put back, would be a
    // removed member's. Refused unless forced, whatever runs on the volume.
    let r = kubectl_etcd_medic(&lab, &["restore", names[0], "-n", "apisix"]).await?;
    assert_eq!(r.code, exit_of(Code::QuorumAtRisk), "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("QuorumAtRisk") && r.stdout.contains("removed member"), "{}", r.stdout);
    // Forced: the healed member runs on the data, and its quarantine is not put back.
    let r = kubectl_etcd_medic(&lab, &["restore", names[0], "-n", "apisix", "--force"]).await?;
    assert_eq!(r.code, exit_of(Code::PodRunning), "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("PodRunning"), "{}", r.stdout);
    // Once etcd is stopped on it (the kubelet holding the container in back-off), asking
    // again (a new generation of the spec) is refused for the data the rejoined member
    // wrote; with that moved aside, it puts the old data back.
    lab.set.switches().hold_restarts.store(true, Ordering::SeqCst);
    lab.set.crash_container(1)?;
    lab.set.hold_restarts(1, Duration::from_secs(120)).await?;
    let r = kubectl_etcd_medic(&lab, &["restore", names[0], "-n", "apisix", "--force", "-o", "json"]).await?;
    assert_eq!(r.code, exit_of(Code::UnsafePath), "the rejoined member's own data is never overwritten: {}", r.stdout);
    // The person moves the new member's data aside, and asks a third time.
    let data = lab.set.data_dir(1)?;
    std::fs::rename(data.join("member"), data.join("member.rejoined"))?;
    std::fs::rename(data.join("member_id"), data.join("member_id.rejoined"))?;
    let r = kubectl_etcd_medic(&lab, &["restore", names[0], "-n", "apisix", "--force", "-o", "json"]).await?;
    assert_eq!(r.code, 0, "{}{}\n{}", r.stdout, r.stderr, c.log_text());
    let restore: Value = serde_json::from_str(&r.stdout)?;
    assert_eq!(restore["phase"], "Restored", "{restore}");
    assert!(data.join("member_id").exists() && data.join("member/wal").is_dir(), "the old member's data is back: {restore}");
    let again = kubectl_etcd_medic(&lab, &["restore", names[0], "-n", "apisix"]).await?;
    assert!(again.code == 0 && again.stdout.contains("Restored"), "a restore done is told, never done twice: {}", again.stdout);
    assert_eq!(c.log_text().matches("restore quarantine").count(), 1, "the agent was asked once:\n{}", c.log_text());
    lab.set.release_restarts();

    // A tenant of another namespace, who may write their records' status, names the healed
    // pod's remediation in one of theirs and asks for its restore: refused, nothing moved.
    let res = etcd_medic_lab::apiserver::store::find_resource("etcd-medic.io", "v1alpha1", "etcdremediations").expect("served");
    let store = lab.api.store();
    store
        .create(res, "mallory", serde_json::json!({"metadata": {"name": "steal"}, "spec": {"pod": "apisix-etcd-1"}}))
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let failed = |r: &EtcdRemediation| r.status.as_ref().is_some_and(|s| s.phase.as_deref() == Some("Failed"));
    wait_record(&lab, "mallory", "steal", Duration::from_secs(60), "Failed (no such pod there)", failed, &[&c]).await?;
    let healed = store.get(res, "apisix", names[0]).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let victim = serde_json::json!({"status": {"remediationID": healed["status"]["remediationID"], "node": healed["status"]["node"]}});
    store.patch_part(res, "mallory", "steal", &victim, true).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    store.patch(res, "mallory", "steal", &serde_json::json!({"spec": {"restore": true}})).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let answered = |r: &EtcdRemediation| r.status.as_ref().is_some_and(|s| s.restore.is_some());
    let stolen = wait_record(&lab, "mallory", "steal", Duration::from_secs(60), "answered", answered, &[&c]).await?;
    let answer = stolen.status.and_then(|s| s.restore).unwrap_or_default();
    assert_eq!((answer.phase.as_str(), answer.code.as_deref()), ("Failed", Some("InvalidRequest")), "{answer:?}");
    assert_eq!(c.log_text().matches("restore quarantine").count(), 1, "the agent restored nothing more:\n{}", c.log_text());

    let refused = kubectl_etcd_medic(&lab, &["heal", "apisix-etcd-0", "-n", "apisix", "--wait"]).await?;
    assert_eq!(refused.code, exit_of(Code::PodRunning), "{}{}", refused.stdout, refused.stderr);
    assert!(refused.stdout.starts_with("Refused: PodRunning"), "{}", refused.stdout);
    assert!(refused.stderr.contains("Check PodRunning") && refused.stderr.trim_end().ends_with("Refused"), "{}", refused.stderr);

    // A create whose answer is lost is never sent again (it would be a second heal): the
    // person is told, and exactly one record was made.
    let before = remediations(&lab, "apisix").len();
    let records = "/apis/etcd-medic.io/v1alpha1/namespaces/apisix/etcdremediations";
    lab.api.inject(Fault::new(records, FaultKind::LoseAnswer(500)).method("POST").times(1));
    let lost = kubectl_etcd_medic(&lab, &["heal", "apisix-etcd-0", "-n", "apisix", "--dry-run"]).await?;
    assert_eq!(lost.code, exit_of(Code::NotReady), "{}{}", lost.stdout, lost.stderr);
    assert_eq!(lab.api.faults_left(), [Some(0)]);
    assert_eq!(remediations(&lab, "apisix").len(), before + 1, "one record, never a second");
    lab.api.clear_faults();

    let nothing = kubectl_etcd_medic(&lab, &["heal", "no-such-pod", "-n", "apisix"]).await?;
    assert_eq!(nothing.code, exit_of(Code::PodNotFound), "{}", nothing.stderr);
    let completion = kubectl_etcd_medic(&lab, &["completion", "zsh"]).await?;
    assert!(completion.code == 0 && completion.stdout.contains("#compdef kubectl-etcd_medic"), "{}", completion.stdout);
    lab.shutdown().await;
    Ok(())
}

/// Quorum lost as the field meets it: one member stopped (its data falls behind while the
/// others write), then a second: the last one runs alone with no leader. `recover` reads
/// every member's files through the agents and proposes the member with the most data; the
/// one that fell behind is ranked last, and choosing it says what it would lose. A member
/// whose volume is gone has no data to offer. Nothing is changed by any of it. The controller
/// runs on the chart's defaults: the stopped members, held after one crash, never meet its
/// thresholds, and it carries out the plugin's dry runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recover_proposes_the_member_with_the_most_data_when_quorum_is_lost() -> Result<()> {
    let Some((lab, _agent, c)) = crate::controller::watched_on_defaults().await? else { return Ok(()) };
    let wait = Duration::from_secs(60);
    stop_held(&lab, 2).await?;
    let others = lab.set.other_endpoints(2);
    for e in &others {
        etcd_medic_lab::etcd::wait_healthy(e, wait).await?;
    }
    let mut client = etcd_medic_lab::etcd::live_client(&others).await?;
    for i in 0..50 {
        client.put(format!("/apisix/upstreams/{i:03}"), "after apisix-etcd-2 stopped", None).await?;
    }
    stop_held(&lab, 1).await?;
    let volumes: Vec<_> = (0..3).map(|i| lab.set.volume_path(i)).collect::<Result<_>>()?;
    let before: Vec<_> = volumes.iter().map(|v| etcd_medic_lab::agent::tree(v)).collect();

    let r = kubectl_etcd_medic(&lab, &["recover", "apisix-etcd", "-n", "apisix", "-o", "json"]).await?;
    assert_eq!(r.code, 0, "{}{}\n{}", r.stdout, r.stderr, c.log_text());
    let p: Value = serde_json::from_str(&r.stdout)?;
    let survivor = p["choice"]["survivor"].as_str().unwrap_or_default().to_string();
    assert!(survivor == "apisix-etcd-0" || survivor == "apisix-etcd-1", "{p:#}");
    let ranked = p["choice"]["ranked"].as_array().cloned().unwrap_or_default();
    assert_eq!(ranked.len(), 3, "{p:#}");
    assert_eq!(ranked[2]["pod"], "apisix-etcd-2", "the member that fell behind comes last: {p:#}");
    assert!(ranked[2]["commit"].as_u64() < ranked[0]["commit"].as_u64(), "{p:#}");
    assert!(ranked.iter().all(|m| m["clusterID"] == ranked[0]["clusterID"] && m["unusable"].is_null()), "{p:#}");
    assert_eq!(p["choice"]["lost"], serde_json::json!([]), "the survivor holds the most: {p:#}");
    assert!(p["ready"].as_u64() < Some(2), "{p:#}");
    let table = kubectl_etcd_medic(&lab, &["recover", "apisix-etcd", "-n", "apisix"]).await?;
    assert!(table.stdout.contains(&format!("Survivor     {survivor}: the highest commit index")), "{}", table.stdout);
    assert!(table.stdout.contains("Lost         nothing, as far as the members' data tells"), "{}", table.stdout);
    // What comes next names the survivor's node, its client URL as its pod advertises it,
    // and the highest revision another member held.
    let held = ranked.iter().filter(|m| m["pod"] != survivor.as_str()).filter_map(|m| m["revision"].as_u64()).max().unwrap();
    let node = p["survivorNode"].as_str().unwrap_or_default();
    let url = p["survivorClientURLs"][0].as_str().unwrap_or_default();
    let shown = p["choice"]["facts"].as_str().unwrap_or_default().to_string();
    assert_eq!(p["phase"], "AwaitingApproval", "the plan is recorded, awaiting a person: {p:#}");
    assert!(!node.is_empty() && url.starts_with("http"), "{p:#}");
    let rebuild = format!(
        "the agent on {node}: etcd-medic rebuild --data-dir <the host path> --name {survivor} --client-url {url} --held-revision {held}"
    );
    assert!(table.stdout.contains(&rebuild), "{rebuild}\n{}", table.stdout);

    // A person who would rather start from the member that fell behind sees what is lost.
    let r = kubectl_etcd_medic(&lab, &["recover", "apisix-etcd", "-n", "apisix", "--survivor", "apisix-etcd-2"]).await?;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("Survivor     apisix-etcd-2: picked by a person"), "{}", r.stdout);
    assert!(r.stdout.contains("Lost         ") && r.stdout.contains("committed entries"), "{}", r.stdout);

    // apisix-etcd-1's node is gone with its volume's data: it has nothing to offer.
    std::fs::remove_dir_all(lab.set.data_dir(1)?.join("member"))?;
    let r = kubectl_etcd_medic(&lab, &["recover", "apisix-etcd", "-n", "apisix", "-o", "json"]).await?;
    let p: Value = serde_json::from_str(&r.stdout)?;
    assert_eq!(p["choice"]["survivor"], "apisix-etcd-0", "{p:#}");
    assert!(p["approval"].is_null(), "{p:#}");
    let gone = p["choice"]["ranked"].as_array().unwrap().iter().find(|m| m["pod"] == "apisix-etcd-1").cloned().unwrap();
    assert!(gone["unusable"].as_str().is_some_and(|u| u.contains("no data")), "{gone}");
    let now = p["choice"]["facts"].as_str().unwrap_or_default().to_string();
    assert_ne!(now, shown, "other facts, another digest: {p:#}");

    // The plan the person saw is approved after the facts changed: refused, the new plan is
    // recorded and shown, and nothing is approved.
    let res = etcd_medic_lab::apiserver::store::find_resource("etcd-medic.io", "v1alpha1", "etcdrecoveries").expect("served");
    let store = lab.api.store();
    let r = kubectl_etcd_medic(&lab, &["recover", "apisix-etcd", "-n", "apisix", "--approve", &shown]).await?;
    assert_eq!(r.code, exit_of(Code::PlanChanged), "{}{}", r.stdout, r.stderr);
    assert!(r.stderr.contains(&format!("PlanChanged: the members' data now gives facts {now}, not the {shown} approved")), "{}", r.stderr);
    assert!(r.stdout.contains(&format!("Facts        {now}")), "{}", r.stdout);
    let record = store.get(res, "apisix", "apisix-etcd").map_err(|e| anyhow::anyhow!("{e:?}"))?;
    assert!(record["spec"]["approval"].is_null(), "{record:#}");
    assert_eq!(
        (&record["status"]["phase"], &record["status"]["plan"]["choice"]["facts"]),
        (&serde_json::json!("AwaitingApproval"), &serde_json::json!(now))
    );

    // Nothing changed on the volumes that still hold data (before the approval: an approved
    // recovery is the controller's to fence, `quorum_lost_on_the_defaults_…`).
    for i in [0, 2] {
        assert_eq!(etcd_medic_lab::agent::tree(&volumes[i]).len(), before[i].len(), "member {i}'s volume");
    }

    // The plan as it stands is approved: recorded with the name the API server knows the
    // person by (SelfSubjectReview), never one the client chose.
    let r = kubectl_etcd_medic(&lab, &["recover", "apisix-etcd", "-n", "apisix", "--approve", &now, "-o", "json"]).await?;
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    let p: Value = serde_json::from_str(&r.stdout)?;
    assert_eq!(p["phase"], "Approved", "{p:#}");
    let admin = etcd_medic_lab::apiserver::LAB_ADMIN;
    assert_eq!(p["approval"], serde_json::json!({"by": admin, "facts": now}), "{p:#}");
    let record = store.get(res, "apisix", "apisix-etcd").map_err(|e| anyhow::anyhow!("{e:?}"))?;
    assert_eq!(record["spec"]["approval"]["by"], admin, "{record:#}");
    assert!(record["status"]["approvedAt"].is_string(), "{record:#}");
    // Shown again as approved, never rewritten; another digest is not this record's.
    let version = record["metadata"]["resourceVersion"].clone();
    let r = kubectl_etcd_medic(&lab, &["recover", "apisix-etcd", "-n", "apisix"]).await?;
    assert!(r.code == 0 && r.stdout.contains(&format!("Approved     by {admin} for facts {now}")), "{}{}", r.stdout, r.stderr);
    let again = store.get(res, "apisix", "apisix-etcd").map_err(|e| anyhow::anyhow!("{e:?}"))?;
    assert_eq!(again["metadata"]["resourceVersion"], version, "the approved record is not rewritten");
    let r = kubectl_etcd_medic(&lab, &["recover", "apisix-etcd", "-n", "apisix", "--approve", &shown]).await?;
    assert_eq!(r.code, exit_of(Code::PlanChanged), "{}{}", r.stdout, r.stderr);
    // Whoever may write the record cannot rewrite who approved, nor take the approval back
    // (the CRD's rules, as the API server enforces them).
    for forged in
        [serde_json::json!({"spec": {"approval": {"by": "mallory", "facts": now}}}), serde_json::json!({"spec": {"approval": null}})]
    {
        let e = store.patch(res, "apisix", "apisix-etcd", &forged).expect_err("refused");
        assert_eq!(e.code, 422, "{e:?}");
    }

    lab.set.release_restarts();
    lab.shutdown().await;
    Ok(())
}

/// Quorum lost, on the chart's defaults (`--quorum-lost-for 2m`): the controller proposes the
/// recovery by itself, an `EtcdRecovery` awaiting approval with every member's pod state and
/// files' facts, tells it as a `QuorumLost` Event on the StatefulSet and counts it; nothing
/// changes on any volume. A person approves the facts it shows, and the approval is recorded
/// under the name the API server knows them by; the controller fences the set, the agent
/// rebuilds the survivor's data through a holder pod, every member's data kept in a
/// quarantine, and the survivor serves again alone with every key, time moved forward; the
/// API server meanwhile loses the answers of the fence's scale and of a holder's create and
/// fails a holder's delete once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_lost_on_the_defaults_is_proposed_by_the_controller_approved_by_a_person_and_rebuilt() -> Result<()> {
    let Some((lab, _agent, c)) = crate::controller::watched_on_defaults().await? else { return Ok(()) };
    stop_held(&lab, 2).await?;
    stop_held(&lab, 1).await?;
    let lost_at = std::time::Instant::now();
    // A member's data files by name: its WAL segments, snapshots, db and member id (etcd,
    // stopped by the fence, may still write into them and drops its preallocated `0.tmp`;
    // Bitnami's preStop hook writes `member_removal.log`, here an error: no quorum).
    let files = |dir: &std::path::Path| -> Vec<std::path::PathBuf> {
        let data = |p: &std::path::Path| {
            p.extension().is_some_and(|x| x == "wal" || x == "snap") || p.ends_with("snap/db") || p.ends_with("member_id")
        };
        etcd_medic_lab::agent::tree(dir)
            .into_iter()
            .filter_map(|(p, _)| p.strip_prefix(dir).ok().map(|p| p.to_path_buf()))
            .filter(|p| data(p))
            .collect()
    };
    let before: Vec<_> = (0..3).map(|i| Ok(files(&lab.set.volume_path(i)?))).collect::<Result<_>>()?;

    let res = etcd_medic_lab::apiserver::store::find_resource("etcd-medic.io", "v1alpha1", "etcdrecoveries").expect("served");
    let store = lab.api.store();
    let proposed = |v: &Value| v["status"]["phase"] == "AwaitingApproval";
    let mut record = Value::Null;
    while lost_at.elapsed() < Duration::from_secs(120 + 90) {
        if let Ok(v) = store.get(res, "apisix", "apisix-etcd")
            && proposed(&v)
        {
            record = v;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(proposed(&record), "no proposal after {:?}\n{}", lost_at.elapsed(), c.log_text());
    let took = lost_at.elapsed();
    eprintln!("quorum lost → recovery proposed: {took:?}");
    assert!(took >= Duration::from_secs(115), "proposed before --quorum-lost-for (2m) passed: {took:?}");
    assert_eq!(record["metadata"]["labels"]["etcd-medic.io/proposed-by"], "controller", "{record:#}");
    assert!(record["spec"]["approval"].is_null(), "{record:#}");
    let plan = &record["status"]["plan"];
    let survivor = plan["choice"]["survivor"].as_str().unwrap_or_default().to_string();
    assert!(survivor == "apisix-etcd-0" || survivor == "apisix-etcd-1", "{plan:#}");
    assert_eq!(plan["choice"]["ranked"].as_array().map(Vec::len), Some(3), "every member's facts: {plan:#}");
    // Each member's pod as it was: the two stopped ones not Ready, held after their crash.
    let members = plan["members"].as_array().cloned().unwrap_or_default();
    let pods: Vec<&str> = members.iter().filter_map(|m| m["pod"].as_str()).collect();
    assert_eq!(pods, ["apisix-etcd-0", "apisix-etcd-1", "apisix-etcd-2"], "{plan:#}");
    assert!(members[1..].iter().all(|m| m["ready"] == false && m["node"] == etcd_medic_lab::NODE_NAME), "{plan:#}");
    let facts = plan["choice"]["facts"].as_str().unwrap_or_default().to_string();
    let approve = format!("kubectl etcd-medic recover apisix-etcd -n apisix --approve {facts}");
    assert_eq!(record["status"]["message"], format!("approve with: {approve}"), "{record:#}");
    // The Event follows the record's status: waited for, not raced.
    let quorum_lost_event = || {
        lab.api.list::<k8s_openapi::api::events::v1::Event>(Some("apisix")).into_iter().find(|e| e.reason.as_deref() == Some("QuorumLost"))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while quorum_lost_event().is_none() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let told = quorum_lost_event().expect("a QuorumLost Event");
    assert_eq!(told.regarding.as_ref().and_then(|r| r.name.as_deref()), Some("apisix-etcd"));
    assert!(told.note.as_deref().is_some_and(|n| n.contains(&approve)), "{told:?}");
    assert_eq!(c.metric("etcd_medic_controller_recoveries_proposed_total").await, Some(1.0));
    assert_eq!(c.metric("etcd_medic_controller_quorum_lost_sets").await, Some(1.0));

    // The person approves what the controller proposed (ordinal 0 picked when another
    // ranks first: a StatefulSet starts ordinal 0 first, so the rebuild is automated from
    // it), and follows it: the controller reads the facts once more, scales the set to 0 and
    // waits every member's pod out; through a holder pod per member the agent moves every
    // member's data into the recovery's quarantine and rebuilds a copy of the survivor's; the
    // set is scaled to 1 and the survivor serves every key it held, time moved forward.
    // The API server loses the answers of the fence's scale and of the first holder's create
    // (both carried out), and fails a holder's delete once: each is settled by what is there.
    lab.api.inject(
        Fault::new("/apis/apps/v1/namespaces/apisix/statefulsets/apisix-etcd", FaultKind::LoseAnswer(500)).method("PATCH").times(1),
    );
    lab.api.inject(Fault::new("/api/v1/namespaces/apisix/pods", FaultKind::LoseAnswer(500)).method("POST").times(1));
    lab.api.inject(Fault::new("/api/v1/namespaces/apisix/pods/apisix-etcd-1-hold", FaultKind::Status(500)).method("DELETE").times(1));
    let mut approve = vec!["recover", "apisix-etcd", "-n", "apisix", "--approve", &facts, "--wait"];
    if survivor != "apisix-etcd-0" {
        approve.extend(["--survivor", "apisix-etcd-0"]);
    }
    let r = kubectl_etcd_medic(&lab, &approve).await?;
    assert_eq!(r.code, 0, "{}{}\n{}", r.stdout, r.stderr, c.log_text());
    assert!(r.stdout.contains(&format!("Approved     by {} for facts {facts}", etcd_medic_lab::apiserver::LAB_ADMIN)), "{}", r.stdout);
    for said in [
        "Fencing: the facts are as approved by",
        "Rebuilding: rebuilding: every member's data",
        "Rebuilt: rebuilt: apisix-etcd-0 serves alone",
    ] {
        assert!(r.stderr.contains(said), "{said}: {}{}", r.stdout, r.stderr);
    }
    assert!(r.stdout.contains("Phase        Rebuilt"), "{}{}", r.stdout, r.stderr);
    assert_eq!(lab.api.faults_left(), [Some(0), Some(0), Some(0)], "every fault struck the recovery");
    let record = store.get(res, "apisix", "apisix-etcd").map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let status = &record["status"];
    assert_eq!(
        (&status["phase"], &status["fence"]["replicas"], &status["fence"]["rebuild"]),
        (&serde_json::json!("Rebuilt"), &serde_json::json!(3), &serde_json::json!(true)),
        "{record:#}"
    );
    let rebuilt = &status["rebuilt"];
    let (before_rev, revision) = (rebuilt["revisionBefore"].as_u64().unwrap_or_default(), rebuilt["revision"].as_u64().unwrap_or_default());
    assert!(revision > before_rev + 1_000_000 && before_rev > KEYS as u64, "time moves forward: {rebuilt:#}");
    assert_eq!(rebuilt["quarantined"], serde_json::json!(["apisix-etcd-1", "apisix-etcd-2"]), "{rebuilt:#}");
    let quarantine = rebuilt["quarantine"].as_str().unwrap_or_default().to_string();
    assert!(
        quarantine.ends_with(&etcd_medic_core::step::quarantine_id(record["metadata"]["uid"].as_str().unwrap_or_default())),
        "{rebuilt:#}"
    );
    // The set at 1: the survivor alone, Ready, a one-member cluster with every key it held,
    // at the bumped revision.
    let sts: k8s_openapi::api::apps::v1::StatefulSet = lab.api.get("apisix", "apisix-etcd").expect("the set");
    assert_eq!(sts.spec.and_then(|s| s.replicas), Some(1));
    assert!(lab.set.has_pod(0) && !lab.set.has_pod(1) && !lab.set.has_pod(2), "the survivor alone");
    let mut client = etcd_medic_lab::etcd::live_client(&[lab.set.members()[0].client_url()]).await?;
    let got = client.get("/apisix/routes/", Some(etcd_client::GetOptions::new().with_prefix().with_count_only())).await?;
    assert_eq!(got.count(), KEYS as i64, "every key the survivor held");
    assert!(got.header().map_or(0, |h| h.revision()) as u64 >= revision, "the revision the rebuild started at");
    assert_eq!(client.member_list().await?.members().len(), 1, "a one-member cluster");
    // No holder left; every member's data as it was at the fence, in the quarantine on its
    // volume (the survivor's original too: its copy was rebuilt).
    let holders = lab.api.list::<k8s_openapi::api::core::v1::Pod>(Some("apisix"));
    assert!(holders.iter().all(|p| !p.metadata.name.as_deref().unwrap_or_default().ends_with("-hold")), "holders are gone");
    for (i, was) in before.iter().enumerate() {
        let kept = lab.set.pv_path(i).join(".etcd-medic/quarantine").join(&quarantine);
        let want: Vec<_> = was.iter().filter(|p| i > 0 || !p.ends_with("member_id")).cloned().collect();
        assert!(
            !want.is_empty() && files(&kept) == want,
            "member {i}'s data is kept in {}: {want:?} vs {:?}",
            kept.display(),
            files(&kept)
        );
    }
    lab.shutdown().await;
    Ok(())
}
