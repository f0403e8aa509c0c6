//! The demo: a real 3-member etcd cluster deployed like the APISIX chart's Bitnami etcd,
//! broken the way users see it (`etcdserver: member not found`), then healed.
//!
//! A person with kubectl meets it: `kubectl etcd-medic diagnose` names the crash signature,
//! `kubectl etcd-medic heal --wait` writes an `EtcdRemediation` and follows it step by step.
//! Nobody calls the agent by hand: the real controller (`etcd-medic controller`, which would
//! also have acted by itself a minute later) carries the record out by asking the real
//! agent on the pod's node (`etcd-medic serve`, a bearer token checked by TokenReview and
//! SubjectAccessReview against the lab's API server). The agent locates the pod's volume,
//! checks every gate, takes the cluster's lease, moves the stale `member/snap`,
//! `member/wal` and `member_id` into a quarantine on the volume, restarts the pod with a UID
//! precondition, and verifies that the member rejoined.

use std::time::Instant;

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

/// Runs `kubectl etcd-medic ARGS` (the plugin binary, as kubectl would) with the lab's
/// kubeconfig, shows what it printed, and returns its stdout; a non-zero exit is an error.
async fn kubectl_etcd_medic(lab: &Lab, args: &[&str]) -> Result<String> {
    let shown: Vec<String> = args.iter().map(|a| if a.contains(' ') { format!("{a:?}") } else { a.to_string() }).collect();
    println!("         $ kubectl etcd-medic {}", shown.join(" "));
    let out = tokio::process::Command::new(etcd_medic_lab::agent::plugin_binary())
        .args(args)
        .env("KUBECONFIG", &lab.api.kubeconfig)
        .output()
        .await?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stderr), String::from_utf8_lossy(&out.stdout));
    for line in text.lines() {
        println!("           | {line}");
    }
    ensure!(out.status.success(), "kubectl etcd-medic {} exited {}", args.join(" "), out.status);
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
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
    let controller = ControllerProcess::start(&lab, &token, "demo", &[]).await?;
    p.step("etcd-medic controller is ready, with its production defaults (it acts after 3 restarts and 60 s not Ready)");

    // Before the controller would act, a person with kubectl asks: the plugin writes an
    // EtcdRemediation with the person's kubeconfig; the controller carries it out through
    // the agent on the pod's node.
    p.step("a person with kubectl, before the controller would act:");
    kubectl_etcd_medic(&lab, &["diagnose", "apisix-etcd-1", "-n", "apisix"]).await?;
    let heal = Instant::now();
    let out =
        kubectl_etcd_medic(&lab, &["heal", "apisix-etcd-1", "-n", "apisix", "--wait", "--reason", "member not found after a drain"]).await;
    let out = out.with_context(|| format!("controller log:\n{}\nagent log:\n{}", controller.log_text(), agent.log_text()))?;
    let record =
        remediations(&lab, "apisix").into_iter().find(|r| r.spec.pod == "apisix-etcd-1" && !r.spec.dry_run).context("the heal's record")?;
    let name = record.metadata.name.clone().unwrap_or_default();
    let id = record.status.and_then(|s| s.remediation_id).context("the record names the agent's remediation")?;
    ensure!(out.starts_with("Succeeded"), "the heal did not succeed: {out}");
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
        println!("           old data kept on the PVC at .etcd-medic/quarantine/{q} (kubectl etcd-medic restore {name} -n apisix)");
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
    kubectl_etcd_medic(&lab, &["list", "-n", "apisix"]).await?;
    p.step(&format!("done in {:.1}s", p.0.elapsed().as_secs_f64()));
    drop(controller);
    drop(agent);
    lab.shutdown().await;
    Ok(())
}
