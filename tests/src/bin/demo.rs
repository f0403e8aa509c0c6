//! The demo: a real 3-member etcd cluster deployed like the APISIX chart's Bitnami etcd,
//! broken the way users see it (`etcdserver: member not found`), then healed.
//!
//! Nobody calls anything by hand: the real controller (`etcd-medic controller`, on the chart's
//! defaults) sees the replacement pod's first crash, reads `member not found` (a failure that
//! can only repeat), records an `EtcdRemediation` and asks the real agent on the pod's node
//! (`etcd-medic serve`, a bearer token checked by TokenReview and SubjectAccessReview against
//! the lab's API server). A person's view comes after: `kubectl etcd-medic list` and `status`
//! with the times from the first crash and from detection. The agent locates the pod's volume,
//! checks every gate, takes the cluster's lease, moves the stale `member/snap`,
//! `member/wal` and `member_id` into a quarantine on the volume, restarts the pod with a UID
//! precondition, and verifies that the member rejoined.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use etcd_medic_lab::controller::{ControllerProcess, remediations};
use etcd_medic_lab::etcd::{self, format_id};
use etcd_medic_lab::objects::SetShape;
use etcd_medic_lab::statefulset::{container_state, termination_message};
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

    // The agent on the node, and the controller beside it, as the chart installs them:
    // nobody calls the agent by hand.
    let agent = etcd_medic_lab::controller::agent_for_controller(&lab, &[]).await?;
    let token = etcd_medic_lab::controller::register_agent(&lab, &agent)?;
    p.step(&format!("etcd-medic serve is ready on http://{} (auth: TokenReview + SubjectAccessReview)", agent.addr));
    let controller = ControllerProcess::start(&lab, &token, "demo", &["--lease-duration", "15s"]).await?;
    p.step("etcd-medic controller is ready, with the chart's defaults");

    let old_id = etcd::parse_id(&std::fs::read_to_string(lab.set.data_dir(1)?.join("member_id"))?).context("member_id")?;
    let old_uid = lab.set.pod_uid(1)?;
    p.step(&format!("draining apisix-etcd-1 (member {}): the preStop hook removes it; its removal log is lost", format_id(old_id)));
    lab.drain_member(1).await?;
    // The replacement's first crash, as the kubelet reports it.
    let crashed = loop {
        // Between the old pod's deletion and its replacement's creation there is no pod.
        let pod = lab.set.pod(1).unwrap_or_default();
        let message = termination_message(&pod);
        if pod["metadata"]["uid"] != old_uid.as_str() && message.contains("member not found") {
            p.step(&format!("apisix-etcd-1 crashed ({}); its termination message:", container_state(&pod)));
            for line in message.lines() {
                println!("           | {line}");
            }
            break Instant::now();
        }
        ensure!(p.0.elapsed() < Duration::from_secs(300), "apisix-etcd-1 never crashed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    // The controller acts on that first crash: `member not found` can only repeat.
    let record = loop {
        let r = remediations(&lab, "apisix").into_iter().find(|r| r.spec.pod == "apisix-etcd-1" && !r.spec.dry_run);
        if let Some(r) = r.filter(|r| etcd_medic_client::crd::is_final(r.status.as_ref())) {
            break r;
        }
        ensure!(
            crashed.elapsed() < Duration::from_secs(300),
            "the controller did not heal it:\n{}\nagent log:\n{}",
            controller.log_text(),
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let name = record.metadata.name.clone().unwrap_or_default();
    let status = record.status.clone().unwrap_or_default();
    ensure!(status.phase.as_deref() == Some("Succeeded"), "the heal did not succeed: {status:?}\n{}", controller.log_text());
    let id = status.remediation_id.clone().context("the record names the agent's remediation")?;
    p.step(&format!("the controller healed it on its own: EtcdRemediation {name} Succeeded"));
    let r = agent.get(&format!("/v1/remediations/{id}"), Some(&std::fs::read_to_string(&token)?)).await?.json();
    let members = etcd::member_list(&lab.set.endpoints()).await?;
    let new = members.iter().find(|m| m.name == "apisix-etcd-1").context("member rejoined")?;
    p.step(&format!("apisix-etcd-1 rejoined as member {} (was {}), remediation {id}", format_id(new.id), format_id(old_id)));
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
        "healed: {} started voting members, {KEYS} keys equal on all members — first crash → healthy in {:.2}s",
        members.iter().filter(|m| m.started() && !m.is_learner).count(),
        crashed.elapsed().as_secs_f64()
    ));
    p.step("a person with kubectl, afterwards:");
    kubectl_etcd_medic(&lab, &["list", "-n", "apisix"]).await?;
    kubectl_etcd_medic(&lab, &["status", "apisix-etcd-1", "-n", "apisix"]).await?;
    p.step(&format!("done in {:.1}s", p.0.elapsed().as_secs_f64()));
    drop(controller);
    drop(agent);
    lab.shutdown().await;
    Ok(())
}
