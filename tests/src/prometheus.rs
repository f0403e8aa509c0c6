//! A real Prometheus server (Debian's `prometheus`) started by a test as etcd is: it scrapes
//! the served agent and the controller every second under the jobs the chart's
//! ServiceMonitors give them, evaluates the chart's rule file every second, and answers its
//! HTTP API (`/api/v1/query`, `/api/v1/alerts`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::process::{free_port, kill_now, spawn_tied};

/// The environment variable naming the `prometheus` binary (scripts/test sets it; CI installs
/// Debian's package). Without it a test is skipped, except under CI, where it fails.
pub const BIN_ENV: &str = "ETCD_MEDIC_PROMETHEUS";

/// The binary: `$ETCD_MEDIC_PROMETHEUS`, else `None`.
pub fn binary() -> Option<PathBuf> {
    std::env::var_os(BIN_ENV).filter(|p| !p.is_empty()).map(PathBuf::from)
}

/// The chart's rule file (alerts and recording rules).
pub fn rules_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/etcd-medic/files/prometheus-rules.yaml")
}

pub struct Prometheus {
    child: tokio::process::Child,
    pub addr: SocketAddr,
    pub log: PathBuf,
}

impl Prometheus {
    /// Starts it in `dir` scraping the agent at `agent` (as node `node`) and the controller's
    /// admin port at `controller`, and waits until it is ready.
    pub async fn start(bin: &Path, dir: &Path, agent: SocketAddr, node: &str, controller: SocketAddr) -> Result<Self> {
        let port = free_port();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {rules}\n\
                 scrape_configs:\n\
                 \x20 - job_name: etcd-medic-agent\n    static_configs:\n      - targets: ['{agent}']\n        labels: {{node: '{node}'}}\n\
                 \x20 - job_name: etcd-medic-controller\n    static_configs:\n      - targets: ['{controller}']\n",
                rules = rules_file().display()
            ),
        )?;
        let log = dir.join("prometheus.log");
        let out = std::fs::File::create(&log)?;
        let mut cmd = tokio::process::Command::new(bin);
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("prometheus-data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdout(out.try_clone()?)
            .stderr(out);
        let child = spawn_tied(cmd).with_context(|| format!("start {}", bin.display()))?;
        let p = Prometheus { child, addr: SocketAddr::from(([127, 0, 0, 1], port)), log };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = crate::http::request(p.addr, "GET", "/-/ready", &[], None).await
                && r.status == 200
            {
                return Ok(p);
            }
            if tokio::time::Instant::now() > deadline {
                bail!("prometheus was not ready within 60 s:\n{}", p.log_text());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn api(&self, path_and_query: &str) -> Result<Value> {
        let r = crate::http::request(self.addr, "GET", path_and_query, &[], None).await?;
        let v: Value =
            serde_json::from_slice(&r.body).with_context(|| format!("{path_and_query}: {}", String::from_utf8_lossy(&r.body)))?;
        if v["status"] != "success" {
            bail!("{path_and_query}: {v}");
        }
        Ok(v["data"].clone())
    }

    /// An instant query: the result vector (an error when the expression does not parse).
    pub async fn query(&self, expr: &str) -> Result<Vec<Value>> {
        let data = self.api(&format!("/api/v1/query?query={}", encode(expr))).await?;
        Ok(data["result"].as_array().cloned().unwrap_or_default())
    }

    /// The value of the first sample `expr` gives, if any.
    pub async fn value(&self, expr: &str) -> Result<Option<f64>> {
        Ok(self.query(expr).await?.first().and_then(|s| s["value"][1].as_str()).and_then(|v| v.parse().ok()))
    }

    /// The alerts now (pending and firing), each with its labels and state.
    pub async fn alerts(&self) -> Result<Vec<Value>> {
        Ok(self.api("/api/v1/alerts").await?["alerts"].as_array().cloned().unwrap_or_default())
    }

    /// Waits until an alert named `name` is in `state` (`pending` or `firing`) with `labels`.
    pub async fn wait_alert(&self, name: &str, state: &str, labels: &[(&str, &str)], timeout: Duration) -> Result<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let alerts = self.alerts().await?;
            if let Some(a) = alerts
                .iter()
                .find(|a| a["labels"]["alertname"] == name && a["state"] == state && labels.iter().all(|(k, v)| a["labels"][*k] == *v))
            {
                return Ok(a.clone());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("no {state} alert {name} {labels:?} within {timeout:?}; alerts now: {alerts:#?}");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Waits until `expr` gives a sample whose value satisfies `ok`.
    pub async fn wait_value(&self, expr: &str, timeout: Duration, ok: impl Fn(f64) -> bool) -> Result<f64> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(v) = self.value(expr).await?.filter(|v| ok(*v)) {
                return Ok(v);
            }
            if tokio::time::Instant::now() > deadline {
                bail!("{expr} never gave the value expected within {timeout:?} (now {:?})", self.value(expr).await?);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        kill_now(&mut self.child);
    }
}

/// Percent-encoding of a query parameter.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Every query of the chart's Grafana dashboard, with Grafana's range variables given
/// `window` (`$__rate_interval`, `$__interval`, `$__range`), and the panel's title.
pub fn dashboard_queries(window: &str) -> Result<Vec<(String, String)>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/etcd-medic/files/grafana-dashboard.json");
    let dash: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    let mut out = Vec::new();
    for p in dash["panels"].as_array().context("panels")? {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().context("a target without expr")?;
            let expr = expr.replace("$__rate_interval", window).replace("$__interval", window).replace("$__range", window);
            out.push((p["title"].as_str().unwrap_or_default().to_string(), expr));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn queries_are_encoded() {
        assert_eq!(super::encode(r#"up{job="a"}"#), "up%7Bjob%3D%22a%22%7D");
    }
}
