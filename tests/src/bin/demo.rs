//! The demo: a real 3-member etcd cluster deployed like the APISIX chart's Bitnami etcd,
//! broken the way users see it (`etcdserver: member not found`), then healed.
//!
//! Nobody calls the agent: the real controller (`etcd-medic controller`) notices the crash
//! loop and its signature, records an `EtcdRemediation` and asks the real agent on the
//! pod's node (`etcd-medic serve`, a bearer token checked by TokenReview and
//! SubjectAccessReview against the lab's API server). The agent locates the pod's volume,
//! checks every gate, takes the cluster's lease, moves the stale `member/snap`,
//! `member/wal` and `member_id` into a quarantine on the volume, restarts the pod with a UID
//! precondition, and verifies that the member rejoined. The demo streams the steps as the
//! record's status shows them.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use etcd_medic_lab::controller::{ControllerProcess, remediations};
use etcd_medic_lab::etcd::{self, format_id};
use etcd_medic_lab::objects::SetShape;
use etcd_medic_lab::statefulset::container_state;
use etcd_medic_lab::{Lab, NODE_NAME};

const KEYS: usize = 1000;

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

    // The agent on the node, and the controller beside it: nobody calls the agent by hand.
    let agent = etcd_medic_lab::controller::agent_for_controller(&lab, &[]).await?;
    let token = etcd_medic_lab::controller::register_agent(&lab, &agent)?;
    p.step(&format!("etcd-medic serve is ready on http://{} (auth: TokenReview + SubjectAccessReview)", agent.addr));
    let heal = Instant::now();
    let controller =
        ControllerProcess::start(&lab, &token, "demo", &["--min-restarts", "3", "--failing-for", "5s", "--max-failing-percent", "50"])
            .await?;
    p.step("etcd-medic controller is ready (watching pods app.kubernetes.io/name=etcd; --min-restarts 3 --failing-for 5s)");

    // Follow the EtcdRemediation the controller records, as `kubectl get etcdrem -w` would.
    let mut shown = 0;
    let mut said_record = false;
    let id = loop {
        let records: Vec<_> = remediations(&lab, "apisix").into_iter().filter(|r| r.spec.pod == "apisix-etcd-1").collect();
        if let Some(r) = records.first() {
            let status = r.status.clone().unwrap_or_default();
            if !said_record {
                p.step(&format!(
                    "controller recorded EtcdRemediation apisix/{} — reason {:?}",
                    r.metadata.name.as_deref().unwrap_or_default(),
                    r.spec.reason.as_deref().unwrap_or_default()
                ));
                said_record = true;
            }
            let lines: Vec<String> = status
                .steps
                .iter()
                .flat_map(|s| {
                    let mut v = vec![format!("{:<10} ...", s.name)];
                    if let Some(o) = &s.outcome {
                        v.push(format!("{:<10} {o}: {}", s.name, s.message));
                    }
                    v
                })
                .collect();
            for line in &lines[shown.min(lines.len())..] {
                p.step(&format!("  agent on {}: {line}", status.node.as_deref().unwrap_or("?")));
            }
            shown = lines.len();
            match status.phase.as_deref() {
                Some("Succeeded") => {
                    p.step(&format!("EtcdRemediation phase Succeeded (remediation {})", status.remediation_id.clone().unwrap_or_default()));
                    break status.remediation_id.unwrap_or_default();
                }
                Some(ph @ ("Failed" | "Refused")) => {
                    anyhow::bail!(
                        "the remediation ended {ph}: {:?}\ncontroller log:\n{}\nagent log:\n{}",
                        status.error,
                        controller.log_text(),
                        agent.log_text()
                    )
                }
                _ => {}
            }
        }
        ensure!(heal.elapsed() < Duration::from_secs(300), "no end after 300 s:\n{}", controller.log_text());
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let r = agent.get(&format!("/v1/remediations/{id}"), Some(&std::fs::read_to_string(&token)?)).await?.json();
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
    let events: Vec<String> = lab
        .api
        .list::<k8s_openapi::api::events::v1::Event>(Some("apisix"))
        .into_iter()
        .filter_map(|e| Some(format!("{} ({})", e.reason?, e.reporting_controller?.trim_start_matches("etcd-medic.io/"))))
        .collect();
    println!("           Events: {}", events.join(", "));

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
    drop(controller);
    drop(agent);
    lab.shutdown().await;
    Ok(())
}
