//! The agent on the lab's node: its locator and engine built as `etcd-medic` builds them,
//! for the end-to-end suites, the benchmarks and the demo.

use std::path::PathBuf;
use std::time::Duration;

use crate::{Lab, NODE_NAME};
use etcd_medic::kubeapi::KubeApi;
use etcd_medic::locate::{Locator, NodeLayout};

/// No kubelet process runs here, so an empty `/proc` (kept alive by the returned dir) makes
/// discovery fall back to the distribution defaults.
pub async fn locator(lab: &Lab, kubelet_root: Option<PathBuf>, timeout: Duration) -> anyhow::Result<(Locator, tempfile::TempDir)> {
    let proc = tempfile::tempdir()?;
    let layout = NodeLayout {
        node_name: NODE_NAME.into(),
        host_root: lab.node.root.clone(),
        kubelet_root,
        proc_root: proc.path().to_path_buf(),
        container: None,
        pod_log_root: lab.node.pod_log_root(),
    };
    Ok((Locator { api: KubeApi::new(lab.api.client().await?, timeout), layout }, proc))
}

/// Runs the agent's engine as `etcd-medic remediate` does, on the lab's node.
pub async fn remediate(lab: &Lab, pod: &str, force: bool) -> anyhow::Result<etcd_medic::engine::Remediation> {
    remediate_with(lab, pod, force, &|_| {}).await
}

/// [`remediate`], reporting every step to `progress`.
pub async fn remediate_with(
    lab: &Lab,
    pod: &str,
    force: bool,
    progress: &(dyn Fn(&etcd_medic::engine::Remediation) + Send + Sync),
) -> anyhow::Result<etcd_medic::engine::Remediation> {
    use etcd_medic::engine::{Engine, Options};
    let (l, proc) = locator(lab, None, Duration::from_secs(5)).await?;
    // The real /proc: the holder check must see the lab's etcd processes.
    let l = Locator { layout: NodeLayout { proc_root: "/proc".into(), ..l.layout }, api: l.api };
    drop(proc);
    let opts = Options {
        dry_run: false,
        force,
        etcd_endpoints: vec![],
        state_dir: lab.dir.path().join("agent-state"),
        verify_timeout: Duration::from_secs(120),
        keep_quarantines: 3,
        lease_namespace: None,
        settle: etcd_medic::engine::SETTLE,
        etcd: etcd_medic::etcd::Etcd::default(),
        failpoint: etcd_medic::failpoint::Failpoint::default(),
    };
    let stop = std::sync::atomic::AtomicBool::new(false);
    let follow = |u: etcd_medic_core::progress::Update| progress(&u.remediation);
    // On the heap: a test that joins two remediations would hold both on its thread's stack.
    Ok(Box::pin(Engine { locator: &l, opts, progress: &follow, stop: &stop }.run("apisix", pod, None)).await)
}

/// Every path under `dir` with its size: what "nothing changed on disk" compares.
pub fn tree(dir: &std::path::Path) -> Vec<(PathBuf, u64)> {
    let mut v: Vec<(PathBuf, u64)> = walk(dir);
    v.sort();
    v
}

fn walk(dir: &std::path::Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let m = e.path().symlink_metadata().map(|m| if m.is_file() { m.len() } else { 0 }).unwrap_or(0);
            out.push((e.path(), m));
            if e.path().is_dir() && !e.path().is_symlink() {
                out.extend(walk(&e.path()));
            }
        }
    }
    out
}

/// The path of the `etcd-medic` binary: `ETCD_MEDIC_AGENT_BIN` (the benchmarks run the
/// release build), else the one built beside the running test or lab binary.
pub fn agent_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("ETCD_MEDIC_AGENT_BIN") {
        return bin.into();
    }
    workspace_binary("etcd-medic")
}

/// The kubectl plugin, `kubectl-etcd_medic`, as the workspace built it.
pub fn plugin_binary() -> PathBuf {
    workspace_binary("kubectl-etcd_medic")
}

fn workspace_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the running binary's path");
    exe.ancestors()
        .skip(1)
        .take(2)
        .map(|d| d.join(name))
        .find(|b| b.exists())
        .unwrap_or_else(|| panic!("no {name} binary beside {}: build it with `cargo build --workspace --bins`", exe.display()))
}

/// The real agent, `etcd-medic serve`, as a process on the lab's node, on loopback.
pub struct ServedAgent {
    child: tokio::process::Child,
    pub addr: std::net::SocketAddr,
    pub state_dir: PathBuf,
    pub log: PathBuf,
}

/// How to start a [`ServedAgent`].
#[derive(Clone, Debug)]
pub struct Serve {
    /// `kubernetes` or `none`.
    pub auth: &'static str,
    pub state_dir: PathBuf,
    /// A kubeconfig other than the lab's (an API server that is not there yet).
    pub kubeconfig: Option<PathBuf>,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

impl Serve {
    pub fn new(lab: &Lab) -> Self {
        Serve { auth: "kubernetes", state_dir: lab.dir.path().join("agent-state"), kubeconfig: None, args: vec![], env: vec![] }
    }
}

impl ServedAgent {
    pub async fn start(lab: &Lab, how: Serve) -> anyhow::Result<Self> {
        let port = crate::process::free_port();
        let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
        let log = lab.dir.path().join(format!("agent-{port}.log"));
        let mut cmd = tokio::process::Command::new(agent_binary());
        cmd.arg("serve")
            .args(["--listen", &addr.to_string(), "--auth", how.auth, "--node-name", NODE_NAME, "--log-format", "json"])
            .arg("--host-root")
            .arg(&lab.node.root)
            // The real /proc: the holder check must see the lab's etcd processes.
            .args(["--proc-root", "/proc", "--verify-timeout", "120s"])
            // The image's etcd, for a quorum recovery's rebuild: the lab's.
            .arg("--etcd")
            .arg(crate::etcd::etcd_binary())
            .arg("--state-dir")
            .arg(&how.state_dir)
            .args(&how.args)
            .env("KUBECONFIG", how.kubeconfig.as_ref().unwrap_or(&lab.api.kubeconfig))
            .env("RUST_LOG", "info,etcd_medic=debug")
            .envs(how.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(std::fs::File::create(&log)?)
            .stderr(std::fs::OpenOptions::new().append(true).open(&log)?);
        let tls = how.args.iter().any(|a| a == "--tls-cert-file");
        let child = crate::process::spawn_tied(cmd)?;
        let agent = ServedAgent { child, addr, state_dir: how.state_dir, log };
        agent.wait_serving(tls).await?;
        Ok(agent)
    }

    /// Until `/healthz` answers (over TLS: until the port takes connections).
    async fn wait_serving(&self, tls: bool) -> anyhow::Result<()> {
        for _ in 0..200 {
            let up = if tls {
                tokio::net::TcpStream::connect(self.addr).await.is_ok()
            } else {
                self.get("/healthz", None).await.is_ok_and(|r| r.status == 200)
            };
            if up {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::bail!("the agent did not serve /healthz; its log:\n{}", self.log_text())
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        while tokio::time::Instant::now() < deadline {
            if self.get("/readyz", None).await.is_ok_and(|r| r.status == 200) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::bail!("the agent was not ready within {timeout:?}; its log:\n{}", self.log_text())
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("the agent runs")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> anyhow::Result<crate::http::Response> {
        let auth = token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = auth.as_deref().map(|a| vec![("Authorization", a)]).unwrap_or_default();
        crate::http::request(self.addr, "GET", path, &headers, None).await
    }

    pub async fn post(&self, token: Option<&str>, body: &serde_json::Value) -> anyhow::Result<crate::http::Response> {
        let auth = token.map(|t| format!("Bearer {t}"));
        let mut headers = vec![("Content-Type", "application/json")];
        if let Some(a) = auth.as_deref() {
            headers.push(("Authorization", a));
        }
        crate::http::request(self.addr, "POST", "/v1/remediations", &headers, Some(body.to_string().as_bytes())).await
    }

    /// Polls `GET /v1/remediations/{id}` until the remediation has finished (or stays
    /// `Running` after a stop) and returns it.
    pub async fn wait_finished(&self, id: &str, token: Option<&str>, timeout: Duration) -> anyhow::Result<serde_json::Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last = serde_json::Value::Null;
        while tokio::time::Instant::now() < deadline {
            let r = self.get(&format!("/v1/remediations/{id}"), token).await?;
            last = r.json();
            if r.status == 200 && !last["finishedAt"].is_null() {
                return Ok(last);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        anyhow::bail!("remediation {id} did not finish within {timeout:?}: {last}\nagent log:\n{}", self.log_text())
    }

    /// SIGTERM, as the kubelet stops a pod; the exit status (SIGKILL after `grace`).
    pub async fn terminate(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        crate::process::terminate(&mut self.child, grace).await
    }
}

/// The Events etcd-medic's agent recorded in `namespace` (reporting controller
/// `etcd-medic.io/agent`), as `kubectl get events` would list them.
pub fn events(lab: &Lab, namespace: &str) -> Vec<k8s_openapi::api::events::v1::Event> {
    lab.api
        .list::<k8s_openapi::api::events::v1::Event>(Some(namespace))
        .into_iter()
        .filter(|e| e.reporting_controller.as_deref() == Some("etcd-medic.io/agent"))
        .collect()
}

/// The arguments of `etcd-medic remediate apisix/apisix-etcd-1` on the lab's node, with the
/// journal in `state_dir` (set `KUBECONFIG` to the lab's too).
pub fn remediate_args(lab: &Lab, state_dir: &std::path::Path) -> Vec<std::ffi::OsString> {
    let mut v: Vec<std::ffi::OsString> =
        ["remediate", "apisix/apisix-etcd-1", "--node-name", NODE_NAME, "--verify-timeout", "120s", "--host-root"].map(Into::into).to_vec();
    v.push(lab.node.root.clone().into());
    v.push("--state-dir".into());
    v.push(state_dir.into());
    v
}
