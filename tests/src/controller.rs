//! The real controller, `etcd-medic controller`, as a process beside the lab, and what it
//! needs around it: the agent's EndpointSlice (as the agents' Service would have it) and a
//! ServiceAccount token the agent accepts.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Result, bail};
use serde_json::json;

use crate::Lab;
use crate::agent::{ServedAgent, agent_binary};
use crate::apiserver::{ApiServer, TokenIdentity};

/// The controller's ServiceAccount, as the agents authorize it.
pub const CONTROLLER_SA: &str = "system:serviceaccount:etcd-medic:etcd-medic-controller";
/// The agent's image, as the chart gives it to the controller for the holder pods.
pub const HOLDER_IMAGE: &str = "etcd-medic/etcd-medic:lab";
/// The audience the agents ask tokens to carry.
pub const AUDIENCE: &str = "etcd-medic";

/// Publishes `agent` as the agents' Service's endpoint on the lab's node (port `http`), and
/// gives the controller a token it accepts. Returns the token file.
pub fn register_agent(lab: &Lab, agent: &ServedAgent) -> Result<PathBuf> {
    lab.api.create(&endpoint_slice(agent)?)?;
    let token = format!("controller-{}", uuid::Uuid::new_v4().simple());
    lab.api.add_identity(&token, TokenIdentity { username: CONTROLLER_SA.into(), groups: vec![], audiences: vec![AUDIENCE.into()] });
    lab.api.allow_remediations(CONTROLLER_SA, None);
    // The controller's ClusterRole: a quorum recovery's steps on the members' volumes.
    lab.api.allow(crate::apiserver::AccessRule {
        subject: CONTROLLER_SA.into(),
        verb: "create".into(),
        group: "etcd-medic.io".into(),
        resource: "recoverysteps".into(),
        namespace: None,
    });
    let file = lab.dir.path().join(format!("{token}.token"));
    std::fs::write(&file, &token)?;
    Ok(file)
}

fn endpoint_slice(agent: &ServedAgent) -> Result<k8s_openapi::api::discovery::v1::EndpointSlice> {
    Ok(serde_json::from_value(json!({
        "metadata": {"name": "etcd-medic-lab", "namespace": "etcd-medic", "labels": {"kubernetes.io/service-name": "etcd-medic"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": agent.addr.port(), "protocol": "TCP"}],
        "endpoints": [{"addresses": [agent.addr.ip().to_string()], "nodeName": crate::NODE_NAME, "conditions": {"ready": true}}],
    }))?)
}

/// The agent's pod was replaced (a new address): its Service's EndpointSlice says so.
pub fn republish_agent(lab: &Lab, agent: &ServedAgent) -> Result<()> {
    let slice = endpoint_slice(agent)?;
    lab.api.modify::<k8s_openapi::api::discovery::v1::EndpointSlice>("etcd-medic", "etcd-medic-lab", |s| {
        s.ports = slice.ports.clone();
        s.endpoints = slice.endpoints.clone();
    })?;
    Ok(())
}

/// The agent as the DaemonSet runs it for a controller: tokens with the agents' audience;
/// `env` arms its test hooks.
pub async fn agent_for_controller(lab: &Lab, env: &[(&str, &str)]) -> Result<ServedAgent> {
    let mut how = crate::agent::Serve::new(lab);
    how.args = vec!["--audience".into(), AUDIENCE.into()];
    how.env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let agent = ServedAgent::start(lab, how).await?;
    agent.wait_ready(Duration::from_secs(30)).await?;
    Ok(agent)
}

pub struct ControllerProcess {
    child: tokio::process::Child,
    pub admin: SocketAddr,
    pub log: PathBuf,
}

impl ControllerProcess {
    /// Starts a replica with the lab's kubeconfig, the given token and `args` (thresholds of
    /// a test's scale), and waits until it is ready (its first lists are in).
    pub async fn start(lab: &Lab, token_file: &std::path::Path, name: &str, args: &[&str]) -> Result<Self> {
        Self::start_with(&lab.api, lab.dir.path(), token_file, name, args).await
    }

    /// [`ControllerProcess::start`] against `api` alone, its log in `dir`.
    pub async fn start_with(api: &ApiServer, dir: &Path, token_file: &Path, name: &str, args: &[&str]) -> Result<Self> {
        let port = crate::process::free_port();
        let admin: SocketAddr = ([127, 0, 0, 1], port).into();
        let log = dir.join(format!("controller-{name}.log"));
        let mut cmd = tokio::process::Command::new(agent_binary());
        cmd.arg("controller")
            .args(["--admin-listen", &admin.to_string(), "--log-format", "json", "--lease-namespace", "etcd-medic"])
            .args(["--identity", name])
            // Quick take-overs in tests, unless the caller sets its own.
            .args(if args.contains(&"--lease-duration") { &[][..] } else { &["--lease-duration", "3s"][..] })
            .arg("--agent-token-file")
            .arg(token_file)
            // As the chart sets it: the holder pods run the agent's image.
            .args(["--holder-image", HOLDER_IMAGE])
            .args(args)
            .env("KUBECONFIG", &api.kubeconfig)
            .env("RUST_LOG", "info,etcd_medic=debug")
            .stdout(std::fs::File::create(&log)?)
            .stderr(std::fs::OpenOptions::new().append(true).open(&log)?);
        let child = crate::process::spawn_tied(cmd)?;
        let c = ControllerProcess { child, admin, log };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        while !c.get("/readyz").await.is_ok_and(|r| r.status == 200) {
            if tokio::time::Instant::now() > deadline {
                bail!("the controller was not ready within 120s; its log:\n{}", c.log_text());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(c)
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("the controller runs")
    }

    pub async fn get(&self, path: &str) -> Result<crate::http::Response> {
        crate::http::request(self.admin, "GET", path, &[], None).await
    }

    /// The value of one sample of `/metrics` (`name{labels}` as printed), if shown.
    pub async fn metric(&self, sample: &str) -> Option<f64> {
        let text = String::from_utf8(self.get("/metrics").await.ok()?.body).ok()?;
        text.lines().find_map(|l| l.strip_prefix(sample).and_then(|v| v.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
    }

    pub async fn leads(&self) -> bool {
        self.metric("etcd_medic_controller_leader").await == Some(1.0)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL: a replica that dies without releasing its lease.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    pub async fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        crate::process::terminate(&mut self.child, Duration::from_secs(10)).await
    }
}

/// The lab's EtcdRemediations in `namespace`.
pub fn remediations(lab: &Lab, namespace: &str) -> Vec<etcd_medic_client::crd::EtcdRemediation> {
    let res = crate::apiserver::store::find_resource("etcd-medic.io", "v1alpha1", "etcdremediations").expect("served");
    let (items, _) = lab.api.store().list(res, Some(namespace), &Default::default(), &Default::default());
    items.into_iter().filter_map(|v| serde_json::from_value(v).ok()).collect()
}

/// Waits until EtcdRemediation `namespace/name` is as `done` wants it (`what` names that
/// state in the error, with the controllers' logs).
pub async fn wait_record(
    lab: &Lab,
    namespace: &str,
    name: &str,
    timeout: Duration,
    what: &str,
    done: impl Fn(&etcd_medic_client::crd::EtcdRemediation) -> bool,
    logs: &[&ControllerProcess],
) -> Result<etcd_medic_client::crd::EtcdRemediation> {
    let res = crate::apiserver::store::find_resource("etcd-medic.io", "v1alpha1", "etcdremediations").expect("served");
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let r = lab.api.store().get(res, namespace, name).ok().and_then(|v| serde_json::from_value(v).ok());
        if let Some(r) = r.as_ref().filter(|r| done(r)) {
            return Ok(r.clone());
        }
        if tokio::time::Instant::now() > deadline {
            let said: Vec<String> = logs.iter().map(|c| c.log_text()).collect();
            bail!("EtcdRemediation {namespace}/{name} not {what} within {timeout:?}: {r:?}\ncontroller logs:\n{}", said.join("\n----\n"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until an EtcdRemediation of `pod` shows a phase for which `done` holds.
pub async fn wait_remediation(
    lab: &Lab,
    pod: &str,
    timeout: Duration,
    done: impl Fn(&str) -> bool,
    logs: &[&ControllerProcess],
) -> Result<etcd_medic_client::crd::EtcdRemediation> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let mine: Vec<_> = remediations(lab, &lab.set.shape().namespace).into_iter().filter(|r| r.spec.pod == pod).collect();
        if let Some(r) = mine.iter().find(|r| r.status.as_ref().and_then(|s| s.phase.as_deref()).is_some_and(&done)) {
            return Ok(r.clone());
        }
        if tokio::time::Instant::now() > deadline {
            let said: Vec<String> = logs.iter().map(|c| c.log_text()).collect();
            bail!("no EtcdRemediation of {pod} as awaited within {timeout:?}: {mine:?}\ncontroller logs:\n{}", said.join("\n----\n"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
