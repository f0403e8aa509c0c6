//! A typed client of the etcd-medic agents' `/v1` API, for controllers, the kubectl plugin
//! and people's scripts: the contract's types (from `etcd-medic-core`), its one error type
//! with stable codes, and discovery of the agent that runs on a given node.
//!
//! ```no_run
//! # async fn heal() -> Result<(), etcd_medic_core::Error> {
//! use etcd_medic_client::{AgentClient, discover};
//! use etcd_medic_core::request::CreateRequest;
//! let kube = kube::Client::try_default().await.map_err(|e| etcd_medic_core::Error::new(etcd_medic_core::Code::NotReady, e.to_string()))?;
//! let url = discover::agent_on_node(&kube, "etcd-medic", "etcd-medic", "node-b").await?;
//! let agent = AgentClient::new(&url)?.with_token(std::fs::read_to_string("/var/run/secrets/kubernetes.io/serviceaccount/token").unwrap_or_default());
//! let req = CreateRequest { namespace: "apisix".into(), pod: "apisix-etcd-1".into(), ..Default::default() };
//! let started = agent.create(&req).await?;
//! let done = agent.wait(&started.remediation.id, std::time::Duration::from_secs(600)).await?;
//! println!("{:?}", done.phase);
//! # Ok(()) }
//! ```

pub mod crd;
pub mod discover;
pub mod recovery;
pub mod retry;

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;

use etcd_medic_core::contract::{Remediation, RemediationList};
use etcd_medic_core::request::CreateRequest;
use etcd_medic_core::{Code, Error, Problem, Result};

/// Answers larger than this are refused (a list of 1000 remediations is a few MiB).
const MAX_ANSWER: usize = 16 << 20;

/// One agent's API.
#[derive(Clone)]
pub struct AgentClient {
    base: String,
    token: Option<String>,
    timeout: Duration,
    http: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
}

/// What `create` answered: a new remediation (202), or the one this pod instance already has
/// (or a dry run's plan) (200).
#[derive(Clone, Debug)]
pub struct Created {
    pub remediation: Remediation,
    /// 202: a new one runs in the background.
    pub accepted: bool,
}

impl AgentClient {
    /// `base` is `http(s)://host:port`; an `https://` agent needs [`AgentClient::with_ca`]
    /// (agents serve certificates of the cluster's own CA, never a public one).
    pub fn new(base: &str) -> Result<Self> {
        Self::build(base, None, None)
    }

    /// Trusts only the CA certificates in `pem` for HTTPS (the agents' serving CA).
    pub fn with_ca(base: &str, pem: &[u8]) -> Result<Self> {
        Self::build(base, Some(pem), None)
    }

    /// [`AgentClient::with_ca`], verifying the certificate for `server_name` (when given)
    /// instead of the URL's host: agents are reached by pod IP, but one certificate for the
    /// agents' Service name (`etcd-medic.<namespace>.svc`) serves them all.
    pub fn with_ca_for(base: &str, pem: &[u8], server_name: Option<&str>) -> Result<Self> {
        Self::build(base, Some(pem), server_name)
    }

    fn build(base: &str, ca: Option<&[u8]>, server_name: Option<&str>) -> Result<Self> {
        let base = base.trim_end_matches('/').to_string();
        let uri: Uri = base.parse().map_err(|e| Error::invalid(format!("{base:?} is not an agent URL: {e}")))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
            return Err(Error::invalid(format!("{base:?} is not an agent URL like https://10.0.0.7:9464")));
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::new(Code::Internal, format!("TLS: {e}")))?;
        let mut roots = rustls::RootCertStore::empty();
        if let Some(pem) = ca {
            use rustls::pki_types::CertificateDer;
            use rustls::pki_types::pem::PemObject;
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|e| Error::invalid(format!("the agents' CA is not PEM: {e}")))?;
                roots.add(cert).map_err(|e| Error::invalid(format!("the agents' CA: {e}")))?;
            }
        }
        let tls = builder.with_root_certificates(roots).with_no_client_auth();
        let https = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_or_http();
        let https = match server_name {
            Some(name) => {
                let name = rustls::pki_types::ServerName::try_from(name.to_string())
                    .map_err(|e| Error::invalid(format!("{name:?} is not a server name: {e}")))?;
                https.with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(name))
            }
            None => https,
        };
        let https = https.enable_http1().build();
        Ok(AgentClient { base, token: None, timeout: Duration::from_secs(70), http: Client::builder(TokioExecutor::new()).build(https) })
    }

    /// The bearer token the agent authenticates (TokenReview) and authorizes
    /// (SubjectAccessReview on `etcdremediations`) the caller by.
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        let t = token.into().trim().to_string();
        self.token = (!t.is_empty()).then_some(t);
        self
    }

    /// How long one call may take (the agent answers a dry run within 60 s).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// `POST /v1/remediations`. The request is checked as the agent checks it first.
    pub async fn create(&self, req: &CreateRequest) -> Result<Created> {
        self.create_raw(req).await.map_err(|(e, _)| e)
    }

    /// [`AgentClient::create`], where a refused dry run answers the remediation it was
    /// recorded as (phase Refused, with the diagnosis) instead of the refusal: what a
    /// controller mirrors into its record.
    pub async fn create_recorded(&self, req: &CreateRequest) -> Result<Created> {
        match self.create_raw(req).await {
            Ok(c) => Ok(c),
            Err((_, Some(id))) => Ok(Created { remediation: self.get(&id).await?, accepted: false }),
            Err((e, None)) => Err(e),
        }
    }

    async fn create_raw(&self, req: &CreateRequest) -> std::result::Result<Created, (Error, Option<String>)> {
        req.validate().map_err(|e| (e, None))?;
        let body = serde_json::to_vec(req).map_err(|e| (Error::new(Code::Internal, format!("request: {e}")), None))?;
        let (status, bytes) = self.call_raw(Method::POST, "/v1/remediations", Some(body)).await?;
        Ok(Created { remediation: decode(&bytes).map_err(|e| (e, None))?, accepted: status == StatusCode::ACCEPTED })
    }

    /// `GET /v1/remediations/{id}`.
    pub async fn get(&self, id: &str) -> Result<Remediation> {
        etcd_medic_core::names::validate_id(id)?;
        decode(&self.call(Method::GET, &format!("/v1/remediations/{id}"), None).await?.1)
    }

    /// `GET /v1/remediations`: this node's, newest first.
    pub async fn list(&self, namespace: Option<&str>, limit: Option<u32>) -> Result<RemediationList> {
        let mut q = Vec::new();
        if let Some(ns) = namespace {
            etcd_medic_core::names::validate_namespace(ns)?;
            q.push(format!("namespace={ns}"));
        }
        if let Some(l) = limit {
            q.push(format!("limit={l}"));
        }
        let path = if q.is_empty() { "/v1/remediations".to_string() } else { format!("/v1/remediations?{}", q.join("&")) };
        decode(&self.call(Method::GET, &path, None).await?.1)
    }

    /// `POST /v1/remediations/{id}/restore[?force=true]`: puts the quarantine back (`force`:
    /// even after the remediation changed membership).
    pub async fn restore(&self, id: &str, force: bool) -> Result<Remediation> {
        etcd_medic_core::names::validate_id(id)?;
        let query = if force { "?force=true" } else { "" };
        decode(&self.call(Method::POST, &format!("/v1/remediations/{id}/restore{query}"), None).await?.1)
    }

    /// `POST /v1/recovery-steps`: a quorum recovery's step on a member's volume. Asked
    /// again, the agent answers the same; while one runs (`ClusterLocked`) or outlasts the
    /// request (`NotReady`), the caller asks again later.
    pub async fn recovery_step(&self, req: &etcd_medic_core::step::StepRequest) -> Result<etcd_medic_core::step::StepDone> {
        req.validate()?;
        let body = serde_json::to_vec(req).map_err(|e| Error::new(Code::Internal, format!("request: {e}")))?;
        decode(&self.call(Method::POST, "/v1/recovery-steps", Some(body)).await?.1)
    }

    /// Polls remediation `id` until it ends (Succeeded, Failed, Refused, Planned), or
    /// `timeout` passes (`NotReady`). A blip of the agent (a restart resumes the remediation
    /// from its journal) is waited out.
    pub async fn wait(&self, id: &str, timeout: Duration) -> Result<Remediation> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let last = match self.get(id).await {
                Ok(r) if r.phase.is_final() => return Ok(r),
                Ok(r) => format!("{:?} at {}", r.phase, r.step.map_or("-", |s| s.as_str())),
                Err(e) if e.code == Code::NotReady || e.code == Code::TooManyRequests => e.message,
                Err(e) => return Err(e),
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::new(Code::NotReady, format!("remediation {id} did not end within {timeout:?} ({last})")));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// One request; an error answer becomes the contract's error (its code and detail).
    async fn call(&self, method: Method, path: &str, body: Option<Vec<u8>>) -> Result<(StatusCode, Bytes)> {
        self.call_raw(method, path, body).await.map_err(|(e, _)| e)
    }

    /// [`AgentClient::call`], keeping the id of the remediation a refusal was recorded as.
    async fn call_raw(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> std::result::Result<(StatusCode, Bytes), (Error, Option<String>)> {
        let url = format!("{}{path}", self.base);
        let mut req = Request::builder().method(method).uri(&url).header(header::ACCEPT, "application/json");
        if body.is_some() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        if let Some(t) = &self.token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = req.body(Full::new(Bytes::from(body.unwrap_or_default()))).map_err(|e| (Error::invalid(format!("{url}: {e}")), None))?;
        let unreachable = |e: String| (Error::new(Code::NotReady, format!("the agent at {} did not answer: {e}", self.base)), None);
        let resp = tokio::time::timeout(self.timeout, self.http.request(req))
            .await
            .map_err(|_| unreachable(format!("no answer within {:?}", self.timeout)))?
            .map_err(|e| unreachable(e.to_string()))?;
        let status = resp.status();
        let limited = http_body_util::Limited::new(resp.into_body(), MAX_ANSWER);
        let bytes = tokio::time::timeout(self.timeout, limited.collect())
            .await
            .map_err(|_| unreachable("the answer stalled".into()))?
            .map_err(|e| unreachable(format!("the answer was cut: {e}")))?
            .to_bytes();
        if status.is_success() {
            return Ok((status, bytes));
        }
        Err(match serde_json::from_slice::<Problem>(&bytes) {
            Ok(p) => (Error::new(p.code, p.detail), p.id),
            Err(_) => (
                Error::new(
                    if status.is_server_error() { Code::NotReady } else { Code::InvalidRequest },
                    format!("the agent at {} answered {status} without a problem document", self.base),
                ),
                None,
            ),
        })
    }
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| Error::new(Code::Internal, format!("the agent's answer is not the contract's: {e}")))
}
