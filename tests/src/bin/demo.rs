//! The demo: a real 3-member etcd cluster deployed like the APISIX chart's Bitnami etcd,
//! broken the way users see it (`etcdserver: member not found`), then healed.
//!
//! The heal is the real agent, `etcd-medic serve`, asked over HTTP as a controller asks it
//! (a bearer token checked by TokenReview and SubjectAccessReview against the lab's API
//! server): it locates the pod's volume, checks every gate, takes the cluster's lease,
//! moves the stale `member/snap`, `member/wal` and `member_id` into a quarantine on the
//! volume, restarts the pod with a UID precondition, and verifies that the member rejoined.
//! The demo streams the steps as the agent reports them.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use etcd_medic_lab::agent::{Serve, ServedAgent};
use etcd_medic_lab::apiserver::TokenIdentity;
use etcd_medic_lab::etcd::{self, format_id};
use etcd_medic_lab::objects::SetShape;
use etcd_medic_lab::statefulset::container_state;
use etcd_medic_lab::{Lab, NODE_NAME};
use serde_json::json;

const KEYS: usize = 1000;
/// The controller's ServiceAccount token.
const TOKEN: &str = "etcd-healer-token";

struct Progress(Instant);

impl Progress {
    fn step(&self, what: &str) {
        println!("[{:>6.2}s] {what}", self.0.elapsed().as_secs_f64());
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let p = Progress(Instant::now());
    println!("etcd-medic demo — {}", etcd::etcd_version()?);
    p.step("starting 3 etcd members as the APISIX chart's Bitnami StatefulSet (namespace apisix)");
    let lab = Lab::start(SetShape::apisix(3, NODE_NAME)).await?;
    if lab.node.real_mounts {
        p.step("volumes are real mounts under the lab's kubelet root (running as root)");
    } else {
        p.step("volumes are plain directories (not root: no mounts)");
    }
    lab.write_keys(KEYS).await?;
    p.step(&format!("wrote {KEYS} keys under /apisix/routes/"));

    let old_id = etcd::parse_id(&std::fs::read_to_string(lab.set.data_dir(1)?.join("member_id"))?).context("member_id")?;
    p.step(&format!("draining apisix-etcd-1 (member {}): the preStop hook removes it; its removal log is lost", format_id(old_id)));
    lab.break_member(1).await?;
    let message = etcd_medic_lab::statefulset::termination_message(&lab.set.pod(1)?);
    let pod = lab.set.pod(1)?;
    p.step(&format!("apisix-etcd-1 is {}; last termination message:", container_state(&pod)));
    for line in message.lines() {
        println!("           | {line}");
    }

    // The controller's identity, as the API server's TokenReview and RBAC would know it.
    lab.api.add_identity(TOKEN, TokenIdentity { username: "system:serviceaccount:apisix:etcd-healer".into(), ..Default::default() });
    lab.api.allow_remediations("system:serviceaccount:apisix:etcd-healer", Some("apisix"));
    let agent = ServedAgent::start(&lab, Serve::new(&lab)).await?;
    agent.wait_ready(Duration::from_secs(30)).await?;
    p.step(&format!("etcd-medic serve is ready on http://{} (auth: TokenReview + SubjectAccessReview)", agent.addr));

    let heal = Instant::now();
    let uid = lab.set.pod_uid(1)?;
    let ask = json!({"namespace": "apisix", "pod": "apisix-etcd-1", "podUID": uid, "reason": "demo: member not found"});
    p.step(&format!("POST /v1/remediations {ask}"));
    let accepted = agent.post(Some(TOKEN), &ask).await?;
    ensure!(accepted.status == 202, "the agent answered {}: {}", accepted.status, accepted.text());
    let id = accepted.json()["id"].as_str().context("an id")?.to_string();
    p.step(&format!("  → 202 Accepted, Location: {}", accepted.header("location").unwrap_or_default()));

    // Follow it as a controller does: GET the Location until it has finished.
    let mut shown = 0;
    let r = loop {
        let r = agent.get(&format!("/v1/remediations/{id}"), Some(TOKEN)).await?.json();
        let lines: Vec<String> = r["steps"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|s| {
                let mut v = vec![format!("{:<10} ...", s["name"].as_str().unwrap_or_default())];
                if let Some(o) = s["outcome"].as_str() {
                    v.push(format!("{:<10} {o}: {}", s["name"].as_str().unwrap_or_default(), s["message"].as_str().unwrap_or_default()));
                }
                v
            })
            .collect();
        for line in &lines[shown.min(lines.len())..] {
            p.step(&format!("  agent: {line}"));
        }
        shown = lines.len();
        if !r["finishedAt"].is_null() {
            break r;
        }
        ensure!(heal.elapsed() < Duration::from_secs(300), "no end after 300 s: {r}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    ensure!(r["phase"] == "Succeeded", "the remediation ended {}: {}\nagent log:\n{}", r["phase"], r["error"], agent.log_text());
    let members = etcd::member_list(&lab.set.endpoints()).await?;
    let new = members.iter().find(|m| m.name == "apisix-etcd-1").context("member rejoined")?;
    p.step(&format!(
        "apisix-etcd-1 rejoined as member {} (was {}) — remediation {id} Succeeded in {:.2}s",
        format_id(new.id),
        format_id(old_id),
        heal.elapsed().as_secs_f64()
    ));
    if let Some(q) = r["quarantinePath"].as_str().and_then(|q| q.rsplit('/').next()) {
        println!("           old data kept on the PVC at .etcd-medic/quarantine/{q} (etcd-medic restore {id})");
    }
    let events: Vec<String> = etcd_medic_lab::agent::events(&lab, "apisix").into_iter().filter_map(|e| e.reason).collect();
    println!("           Events on the pod: {}", events.join(", "));

    let c = etcd::check_consistency(&lab.set.endpoints()).await?;
    for (endpoint, keys, hash) in &c.members {
        println!("           {endpoint}: {keys} keys, hashkv {hash:#010x} at revision {}", c.revision);
    }
    ensure!(c.consistent && c.members.len() == 3 && c.members.iter().all(|(_, n, _)| *n == KEYS), "members disagree: {c:?}");
    p.step(&format!(
        "healed: {} started voting members, {KEYS} keys equal on all members",
        members.iter().filter(|m| m.started() && !m.is_learner).count()
    ));
    p.step(&format!("done in {:.1}s", p.0.elapsed().as_secs_f64()));
    drop(agent);
    lab.shutdown().await;
    Ok(())
}
