//! A stand-in for the Kubernetes API server, for what etcd-medic relies on: pods (get,
//! list and watch with label and field selectors, graceful delete with preconditions),
//! PVCs, PVs, StatefulSets, Events, Leases with optimistic concurrency, TokenReview and
//! SubjectAccessReview answered from tables the test sets, `Status` bodies with the real
//! codes and reasons, and a kubeconfig that `kube::Client` reaches it with.
//!
//! It follows Kubernetes' documented semantics, not the agent's needs: the agent is
//! expected to meet real API servers too.

pub mod selector;
pub mod store;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use selector::{FieldSelector, LabelSelector};
use store::find_resource;
pub use store::{ApiError, Change, ChangeKind, Deleted, ResourceDef, Store};

/// Who a bearer token is, for TokenReview.
#[derive(Clone, Debug, Default)]
pub struct TokenIdentity {
    pub username: String,
    pub groups: Vec<String>,
    /// Audiences the token is valid for; empty means the API server's own audience only.
    pub audiences: Vec<String>,
}

/// One allowed (user or group, verb, group, resource, namespace) for SubjectAccessReview.
#[derive(Clone, Debug)]
pub struct AccessRule {
    pub subject: String,
    pub verb: String,
    pub group: String,
    pub resource: String,
    /// `None` allows every namespace.
    pub namespace: Option<String>,
}

/// A failure the test injects for requests whose path starts with `path_prefix`.
#[derive(Clone, Debug)]
pub enum FaultKind {
    /// Answer with this status code and a `Status` body.
    Status(u16),
    /// `429 TooManyRequests` with `Retry-After` (header and `details.retryAfterSeconds`).
    Throttle { retry_after_seconds: u32 },
    /// Answer after this long (a hung API server).
    Delay(Duration),
    /// Carry the request out, then answer this status instead of its result: an answer lost
    /// on the way back.
    LoseAnswer(u16),
}

#[derive(Clone, Debug)]
pub struct Fault {
    pub path_prefix: String,
    pub kind: FaultKind,
    /// Only requests with this method (`GET`, `PUT`, …); all when `None`.
    pub method: Option<String>,
    /// Only requests whose query string holds this; all when `None`.
    pub query: Option<String>,
    /// Strike every `every`-th matching request (1: every one).
    pub every: u32,
    /// Strike at most this many times; for ever when `None`.
    pub times: Option<u32>,
    matched: u32,
}

impl Fault {
    pub fn new(path_prefix: impl Into<String>, kind: FaultKind) -> Self {
        Fault { path_prefix: path_prefix.into(), kind, method: None, query: None, every: 1, times: None, matched: 0 }
    }

    /// Only requests whose query string holds `part` (e.g. `watch=true`).
    pub fn query(mut self, part: &str) -> Self {
        self.query = Some(part.to_string());
        self
    }

    pub fn method(mut self, m: &str) -> Self {
        self.method = Some(m.to_string());
        self
    }

    pub fn every(mut self, n: u32) -> Self {
        self.every = n.max(1);
        self
    }

    pub fn times(mut self, n: u32) -> Self {
        self.times = Some(n);
        self
    }

    /// Whether this request is struck (counting it).
    fn strikes(&mut self, method: &str, path: &str, query: &str) -> bool {
        if !path.starts_with(&self.path_prefix)
            || self.method.as_deref().is_some_and(|m| m != method)
            || self.query.as_deref().is_some_and(|q| !query.contains(q))
            || self.times == Some(0)
        {
            return false;
        }
        self.matched += 1;
        if !self.matched.is_multiple_of(self.every) {
            return false;
        }
        if let Some(t) = self.times.as_mut() {
            *t -= 1;
        }
        true
    }
}

/// One request as the stand-in saw it, for tests that check how the agent asked.
#[derive(Clone, Debug)]
pub struct SeenRequest {
    pub method: String,
    pub path: String,
    pub query: String,
    pub body: String,
    /// The request's `Content-Type` (empty when none).
    pub content_type: String,
}

struct Shared {
    store: Arc<Store>,
    /// Tokens the API server itself accepts (the agent's ServiceAccount, the lab's own).
    api_tokens: Mutex<Vec<String>>,
    identities: Mutex<HashMap<String, TokenIdentity>>,
    rules: Mutex<Vec<AccessRule>>,
    faults: Mutex<Vec<Fault>>,
    seen: Mutex<Vec<SeenRequest>>,
    logs: Mutex<Option<LogSource>>,
}

/// Where `pods/log` reads a container's output: the kubelet of the pod's node, given the
/// pod, the container's name and whether the previous (terminated) instance is meant.
pub type LogSource = Arc<dyn Fn(&Value, &str, bool) -> Option<String> + Send + Sync>;

/// The running stand-in. Dropping it stops the server.
pub struct ApiServer {
    shared: Arc<Shared>,
    pub addr: SocketAddr,
    pub kubeconfig: PathBuf,
    /// The token written into the kubeconfig.
    pub token: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn def_of<K: k8s_openapi::Resource>() -> &'static ResourceDef {
    find_resource(K::GROUP, K::VERSION, K::URL_PATH_SEGMENT)
        .unwrap_or_else(|| panic!("the stand-in does not serve {}", K::URL_PATH_SEGMENT))
}

impl ApiServer {
    /// Starts on a free loopback port and writes `<dir>/kubeconfig`.
    pub async fn start(dir: &Path) -> Result<Self> {
        let token = format!("lab-agent-{}", uuid::Uuid::new_v4().simple());
        let shared = Arc::new(Shared {
            store: Arc::new(Store::default()),
            api_tokens: Mutex::new(vec![token.clone()]),
            identities: Mutex::new(HashMap::new()),
            rules: Mutex::new(Vec::new()),
            faults: Mutex::new(Vec::new()),
            seen: Mutex::new(Vec::new()),
            logs: Mutex::new(None),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(&kubeconfig, kubeconfig_yaml(addr, &token)).context("write kubeconfig")?;
        Ok(ApiServer { shared, addr, kubeconfig, token, task })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.shared.store
    }

    /// A kube client for this server, without touching the process's environment.
    pub async fn client(&self) -> Result<kube::Client> {
        let kc = kube::config::Kubeconfig::from_yaml(&std::fs::read_to_string(&self.kubeconfig)?)?;
        let cfg = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default()).await?;
        Ok(kube::Client::try_from(cfg)?)
    }

    /// Serves `pods/log` from `source` (the lab's kubelet).
    pub fn serve_logs(&self, source: LogSource) {
        *self.shared.logs.lock().unwrap() = Some(source);
    }

    pub fn add_identity(&self, token: &str, identity: TokenIdentity) {
        self.shared.identities.lock().unwrap().insert(token.to_string(), identity);
    }

    pub fn allow(&self, rule: AccessRule) {
        self.shared.rules.lock().unwrap().push(rule);
    }

    /// Lets `subject` create and get `remediations.etcd-medic.io` (what the
    /// `etcd-medic-caller` ClusterRole grants), in `namespace` or everywhere.
    pub fn allow_remediations(&self, subject: &str, namespace: Option<&str>) {
        for verb in ["create", "get", "update"] {
            self.allow(AccessRule {
                subject: subject.into(),
                verb: verb.into(),
                group: "etcd-medic.io".into(),
                resource: "remediations".into(),
                namespace: namespace.map(String::from),
            });
        }
    }

    pub fn inject(&self, fault: Fault) {
        self.shared.faults.lock().unwrap().push(fault);
    }

    /// How many more times each injected fault would strike (`None`: for ever): a test
    /// proves its faults were met.
    pub fn faults_left(&self) -> Vec<Option<u32>> {
        self.shared.faults.lock().unwrap().iter().map(|f| f.times).collect()
    }

    pub fn clear_faults(&self) {
        self.shared.faults.lock().unwrap().clear();
    }

    pub fn seen(&self) -> Vec<SeenRequest> {
        self.shared.seen.lock().unwrap().clone()
    }

    pub fn create<K: k8s_openapi::Resource + Serialize + DeserializeOwned>(&self, obj: &K) -> Result<K> {
        let v = serde_json::to_value(obj)?;
        let ns = v.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or_default().to_string();
        let created = self.store().create(def_of::<K>(), &ns, v).map_err(|e| anyhow!(e.message))?;
        Ok(serde_json::from_value(created)?)
    }

    pub fn get<K: k8s_openapi::Resource + DeserializeOwned>(&self, ns: &str, name: &str) -> Option<K> {
        self.store().get(def_of::<K>(), ns, name).ok().and_then(|v| serde_json::from_value(v).ok())
    }

    pub fn list<K: k8s_openapi::Resource + DeserializeOwned>(&self, ns: Option<&str>) -> Vec<K> {
        let (items, _) = self.store().list(def_of::<K>(), ns, &LabelSelector::default(), &FieldSelector::default());
        items.into_iter().filter_map(|v| serde_json::from_value(v).ok()).collect()
    }

    /// Changes an object in place as a controller or the kubelet would.
    pub fn modify<K>(&self, ns: &str, name: &str, f: impl FnOnce(&mut K)) -> Result<K>
    where
        K: k8s_openapi::Resource + Serialize + DeserializeOwned,
    {
        let mut err = None;
        let v = self
            .store()
            .modify(def_of::<K>(), ns, name, |v| match serde_json::from_value::<K>(v.clone()) {
                Ok(mut k) => {
                    f(&mut k);
                    match serde_json::to_value(&k) {
                        Ok(nv) => *v = nv,
                        Err(e) => err = Some(e.to_string()),
                    }
                }
                Err(e) => err = Some(e.to_string()),
            })
            .map_err(|e| anyhow!(e.message))?;
        if let Some(e) = err {
            return Err(anyhow!(e));
        }
        Ok(serde_json::from_value(v)?)
    }
}

fn kubeconfig_yaml(addr: SocketAddr, token: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: lab\n  cluster:\n    server: http://{addr}\n\
         contexts:\n- name: lab\n  context:\n    cluster: lab\n    user: agent\n    namespace: default\n\
         current-context: lab\nusers:\n- name: agent\n  user:\n    token: {token}\n"
    )
}

/// What a URL names.
#[derive(Debug, PartialEq)]
pub struct Target {
    pub resource: &'static ResourceDef,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub subresource: Option<String>,
}

/// `/api/v1/namespaces/ns/pods/name[/status]`, `/apis/g/v/…`, cluster-scoped and
/// all-namespace forms. `None` when the path names nothing the stand-in serves.
pub fn parse_path(path: &str) -> Option<Target> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return None,
    };
    let target = |plural: &str, ns: Option<&str>, name: Option<&str>, sub: Option<&str>| {
        let resource = find_resource(group, version, plural)?;
        if ns.is_some() && !resource.namespaced {
            return None;
        }
        Some(Target { resource, namespace: ns.map(String::from), name: name.map(String::from), subresource: sub.map(String::from) })
    };
    match rest {
        ["namespaces", ns, plural] => target(plural, Some(ns), None, None),
        ["namespaces", ns, plural, name] => target(plural, Some(ns), Some(name), None),
        ["namespaces", ns, plural, name, sub] => target(plural, Some(ns), Some(name), Some(sub)),
        [plural] => target(plural, None, None, None),
        [plural, name] => target(plural, None, Some(name), None),
        [plural, name, sub] => target(plural, None, Some(name), Some(sub)),
        _ => None,
    }
}

fn json_response(code: u16, body: &Value) -> Response {
    let mut r = (StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), body.to_string()).into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
    r
}

fn error_response(e: &ApiError) -> Response {
    json_response(e.code, &e.status())
}

fn query_map(q: &str) -> HashMap<String, String> {
    url_decode_pairs(q).into_iter().collect()
}

fn url_decode_pairs(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                match std::str::from_utf8(&bytes[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The API server's side of a bearer token (the agent's own `server::auth::bearer` is the
/// caller-facing side, with its refusals): part of the stand-in, an independent oracle.
fn bearer(headers: &HeaderMap) -> Option<String> {
    headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")).map(|t| t.trim().to_string())
}

async fn handle(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, 8 << 20).await.unwrap_or_default();
    let path = parts.uri.path().to_string();
    let query = parts.uri.query().unwrap_or("").to_string();
    shared.seen.lock().unwrap().push(SeenRequest {
        method: parts.method.to_string(),
        path: path.clone(),
        query: query.clone(),
        body: String::from_utf8_lossy(&body).into_owned(),
        content_type: content_type(&parts.headers),
    });

    let method = parts.method.to_string();
    let fault = shared.faults.lock().unwrap().iter_mut().find_map(|f| f.strikes(&method, &path, &query).then(|| f.kind.clone()));
    match fault {
        Some(FaultKind::Status(code)) => {
            let e = ApiError::new(code, "InternalError", format!("injected fault: {code}"));
            return error_response(&e);
        }
        Some(FaultKind::Throttle { retry_after_seconds }) => {
            let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "code": 429,
                "reason": "TooManyRequests", "message": "injected fault: too many requests",
                "details": {"retryAfterSeconds": retry_after_seconds}});
            let mut r = json_response(429, &body);
            r.headers_mut().insert("retry-after", retry_after_seconds.to_string().parse().unwrap());
            return r;
        }
        Some(FaultKind::Delay(d)) => tokio::time::sleep(d).await,
        Some(FaultKind::LoseAnswer(code)) => {
            let _done = serve(&shared, parts, body).await;
            let e = ApiError::new(code, "InternalError", format!("injected fault: the answer was lost ({code})"));
            return error_response(&e);
        }
        None => {}
    }
    serve(&shared, parts, body).await
}

async fn serve(shared: &Arc<Shared>, parts: axum::http::request::Parts, body: Bytes) -> Response {
    let path = parts.uri.path().to_string();
    let query = parts.uri.query().unwrap_or("").to_string();

    if matches!(path.as_str(), "/healthz" | "/readyz" | "/livez") {
        return "ok".into_response();
    }
    let authed = bearer(&parts.headers).is_some_and(|t| shared.api_tokens.lock().unwrap().contains(&t));
    if !authed {
        return error_response(&ApiError::new(401, "Unauthorized", "Unauthorized"));
    }
    if path == "/version" {
        return json_response(200, &json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-etcd-medic-lab"}));
    }
    if parts.method == Method::POST && path == "/apis/authentication.k8s.io/v1/tokenreviews" {
        return token_review(shared, &body);
    }
    if parts.method == Method::POST && path == "/apis/authentication.k8s.io/v1/selfsubjectreviews" {
        return self_review(shared, bearer(&parts.headers).unwrap_or_default());
    }
    if parts.method == Method::POST && path == "/apis/authorization.k8s.io/v1/subjectaccessreviews" {
        return access_review(shared, &body);
    }
    let Some(target) = parse_path(&path) else {
        return error_response(&ApiError::new(404, "NotFound", "the server could not find the requested resource"));
    };
    let q = query_map(&query);
    if parts.method == Method::PATCH
        && let Err(e) = patch_type(&content_type(&parts.headers), q.get("fieldManager"))
    {
        return error_response(&e);
    }
    match resource_request(shared, &parts.method, &target, &q, &body).await {
        Ok(r) => r,
        Err(e) => error_response(&e),
    }
}

fn content_type(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// The patch types the API server takes and how the stand-in applies them: a JSON merge
/// patch (RFC 7386) and a strategic merge patch (for the objects the lab serves, whose lists
/// a patch never merges by key, the same) are merged; a JSON patch (RFC 6902) is not
/// implemented here and is refused, never misapplied; server-side apply needs a
/// `fieldManager`, as the real one says; anything else is 415.
fn patch_type(ct: &str, field_manager: Option<&String>) -> Result<(), ApiError> {
    match ct {
        "application/merge-patch+json" | "application/strategic-merge-patch+json" => Ok(()),
        "application/apply-patch+yaml" if field_manager.is_none_or(|f| f.is_empty()) => {
            Err(ApiError::bad_request("PATCH with apply-patch+yaml requires fieldManager"))
        }
        "application/json-patch+json" | "application/apply-patch+yaml" => {
            Err(ApiError::new(415, "UnsupportedMediaType", format!("the lab's API server does not implement {ct}")))
        }
        other => Err(ApiError::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml (got {other:?})"
            ),
        )),
    }
}

fn parse_body(body: &Bytes) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("the body of the request could not be decoded: {e}")))
}

async fn resource_request(
    shared: &Arc<Shared>,
    method: &Method,
    t: &Target,
    q: &HashMap<String, String>,
    body: &Bytes,
) -> Result<Response, ApiError> {
    let store = &shared.store;
    let res = t.resource;
    let ns = t.namespace.clone().unwrap_or_default();
    let status = match t.subresource.as_deref() {
        None => false,
        Some("status") => res.status_subresource,
        Some("log") if res.plural == "pods" && *method == Method::GET && t.name.is_some() => {
            return pod_log(shared, &ns, t.name.as_deref().unwrap_or_default(), q);
        }
        Some(sub) => return Err(ApiError::new(404, "NotFound", format!("the server could not find the requested resource ({sub})"))),
    };
    match (method.clone(), &t.name) {
        (Method::GET, None) => {
            let labels = LabelSelector::parse(q.get("labelSelector").map(String::as_str).unwrap_or(""))
                .map_err(|e| ApiError::bad_request(format!("unable to parse requirement: {e}")))?;
            let fields = FieldSelector::parse(q.get("fieldSelector").map(String::as_str).unwrap_or(""), res.fields)
                .map_err(ApiError::bad_request)?;
            let ns_filter = t.namespace.as_deref();
            if q.get("watch").is_some_and(|w| w == "true" || w == "1") {
                return Ok(watch(shared.clone(), res, ns_filter.map(String::from), labels, fields, q));
            }
            let (items, rv) = store.list(res, ns_filter, &labels, &fields);
            // Pages as the API server cuts them (`limit`, then `continue`): the token here is
            // the next item's offset and the list's version, opaque to clients.
            let from = match q.get("continue").filter(|c| !c.is_empty()) {
                None => 0,
                Some(c) => c.split_once(':').and_then(|(o, _)| o.parse::<usize>().ok()).ok_or_else(|| {
                    ApiError::new(410, "Expired", "The provided continue parameter is too old to display a consistent list result.")
                })?,
            };
            let limit = q.get("limit").and_then(|l| l.parse::<usize>().ok()).filter(|l| *l > 0).unwrap_or(usize::MAX);
            let total = items.len();
            let page: Vec<Value> = items.into_iter().skip(from).take(limit).collect();
            let next = from.saturating_add(page.len());
            let mut meta = json!({"resourceVersion": rv.to_string()});
            if next < total {
                meta["continue"] = json!(format!("{next}:{rv}"));
                meta["remainingItemCount"] = json!(total - next);
            }
            Ok(json_response(
                200,
                &json!({"kind": format!("{}List", res.kind), "apiVersion": res.api_version(), "metadata": meta, "items": page}),
            ))
        }
        (Method::GET, Some(name)) => Ok(json_response(200, &store.get(res, &ns, name)?)),
        (Method::POST, None) => Ok(json_response(201, &store.create(res, &ns, parse_body(body)?)?)),
        (Method::PUT, Some(name)) => Ok(json_response(200, &store.update_part(res, &ns, name, parse_body(body)?, status)?)),
        (Method::PATCH, Some(name)) => Ok(json_response(200, &store.patch_part(res, &ns, name, &parse_body(body)?, status)?)),
        (Method::DELETE, Some(name)) => {
            let mut opts = if body.is_empty() { json!({}) } else { parse_body(body)? };
            if let Some(g) = q.get("gracePeriodSeconds").and_then(|g| g.parse::<i64>().ok()) {
                opts["gracePeriodSeconds"] = json!(g);
            }
            match store.delete(res, &ns, name, &opts)? {
                Deleted::Marked(obj) => Ok(json_response(200, &obj)),
                // Pods come back as the object; other kinds as a Success Status with details.
                Deleted::Gone(obj) if res.plural == "pods" => Ok(json_response(200, &obj)),
                Deleted::Gone(obj) => Ok(json_response(
                    200,
                    &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                            "details": {"name": name, "group": res.group, "kind": res.plural,
                                        "uid": obj.pointer("/metadata/uid")}}),
                )),
            }
        }
        _ => Err(ApiError::new(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")),
    }
}

/// `GET pods/{name}/log?container=&previous=&tailLines=`: the container's output as plain
/// text, as the kubelet serves it (400 when that container instance has no log).
fn pod_log(shared: &Arc<Shared>, ns: &str, name: &str, q: &HashMap<String, String>) -> Result<Response, ApiError> {
    let pod = shared.store.get(find_resource("", "v1", "pods").expect("pods are served"), ns, name)?;
    let names: Vec<&str> =
        pod.pointer("/spec/containers").and_then(Value::as_array).into_iter().flatten().filter_map(|c| c["name"].as_str()).collect();
    let container = match q.get("container") {
        Some(c) => c.clone(),
        None if names.len() == 1 => names[0].to_string(),
        None => {
            return Err(ApiError::bad_request(format!("a container name must be specified for pod {name}, choose one of: {names:?}")));
        }
    };
    let previous = q.get("previous").is_some_and(|p| p == "true");
    let source = shared.logs.lock().unwrap().clone();
    let Some(text) = source.and_then(|f| f(&pod, &container, previous)) else {
        let which = if previous { "previous terminated container" } else { "container" };
        return Err(ApiError::bad_request(format!("{which} \"{container}\" in pod \"{name}\" not found")));
    };
    let lines: Vec<&str> = text.lines().collect();
    let tail = q.get("tailLines").and_then(|t| t.parse::<usize>().ok()).unwrap_or(lines.len());
    let body: String = lines[lines.len().saturating_sub(tail)..].iter().map(|l| format!("{l}\n")).collect();
    let mut r = (StatusCode::OK, body).into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, "text/plain".parse().unwrap());
    Ok(r)
}

/// A watch: the initial state (for resourceVersion "" or "0") or the changes since the given
/// version, then live changes, as newline-delimited `{"type","object"}` until timeoutSeconds.
fn watch(
    shared: Arc<Shared>,
    res: &'static ResourceDef,
    ns: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
    q: &HashMap<String, String>,
) -> Response {
    let (tx, rx) = mpsc::channel::<Result<String, std::io::Error>>(256);
    let from = q.get("resourceVersion").and_then(|v| v.parse::<u64>().ok()).filter(|&v| v > 0);
    let timeout = Duration::from_secs(q.get("timeoutSeconds").and_then(|v| v.parse().ok()).unwrap_or(1800));
    let mut live = shared.store.subscribe();
    let matches = move |c: &Change| {
        c.resource == res
            && ns.as_deref().is_none_or(|n| c.object.pointer("/metadata/namespace").and_then(Value::as_str) == Some(n))
            && labels.matches(&c.object)
            && fields.matches(&c.object)
    };
    let line = |kind: &str, obj: &Value| Ok(format!("{}\n", json!({"type": kind, "object": obj})));
    tokio::spawn(async move {
        let mut last;
        let initial: Vec<(String, Value, u64)> = match from {
            None => {
                let (items, rv) = shared.store.list(res, None, &LabelSelector::default(), &FieldSelector::default());
                last = rv;
                items
                    .into_iter()
                    .map(|o| (ChangeKind::Added.as_str().to_string(), o, rv))
                    .filter(|(_, o, rv)| matches(&Change { resource: res, kind: ChangeKind::Added, object: o.clone(), rv: *rv }))
                    .collect()
            }
            Some(rv) => match shared.store.changes_since(rv) {
                Ok(changes) => {
                    last = rv;
                    changes.into_iter().filter(&matches).map(|c| (c.kind.as_str().to_string(), c.object, c.rv)).collect()
                }
                Err(e) => {
                    let _ = tx.send(line("ERROR", &e.status())).await;
                    return;
                }
            },
        };
        for (kind, obj, rv) in initial {
            last = last.max(rv);
            if tx.send(line(&kind, &obj)).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let next = tokio::time::timeout_at(deadline, live.recv()).await;
            let change = match next {
                Err(_) => return,
                Ok(Ok(c)) => c,
                Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {
                    let e = ApiError::new(410, "Expired", "the watch fell behind; start again from a list");
                    let _ = tx.send(line("ERROR", &e.status())).await;
                    return;
                }
                Ok(Err(_)) => return,
            };
            if change.rv <= last || !matches(&change) {
                continue;
            }
            last = change.rv;
            if tx.send(line(change.kind.as_str(), &change.object)).await.is_err() {
                return;
            }
        }
    });
    let mut r = Response::new(Body::from_stream(ReceiverStream::new(rx)));
    r.headers_mut().insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
    r
}

/// Who the caller is, as the API server authenticated it: a token with a lab identity is
/// that identity; the kubeconfig's token is the lab's administrator.
fn self_review(shared: &Shared, token: String) -> Response {
    let user = match shared.identities.lock().unwrap().get(&token) {
        Some(id) => json!({"username": id.username, "uid": format!("uid-{}", id.username), "groups": id.groups}),
        None => json!({"username": LAB_ADMIN, "uid": "uid-lab-admin", "groups": ["system:masters", "system:authenticated"]}),
    };
    json_response(
        201,
        &json!({"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview", "metadata": {}, "status": {"userInfo": user}}),
    )
}

/// The user the lab's kubeconfig authenticates as.
pub const LAB_ADMIN: &str = "lab-admin";

fn token_review(shared: &Shared, body: &Bytes) -> Response {
    let Ok(mut review) = serde_json::from_slice::<Value>(body) else {
        return error_response(&ApiError::bad_request("the body of the request could not be decoded"));
    };
    let token = review.pointer("/spec/token").and_then(Value::as_str).unwrap_or_default().to_string();
    let wanted: Vec<String> = review
        .pointer("/spec/audiences")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(|v| v.as_str().map(String::from)).collect())
        .unwrap_or_default();
    let identity = shared.identities.lock().unwrap().get(&token).cloned();
    let status = match identity {
        None => json!({"authenticated": false, "error": "invalid bearer token"}),
        Some(id) => {
            let token_aud = if id.audiences.is_empty() { vec!["https://kubernetes.default.svc".to_string()] } else { id.audiences.clone() };
            let matched: Vec<&String> =
                if wanted.is_empty() { token_aud.iter().collect() } else { wanted.iter().filter(|a| token_aud.contains(a)).collect() };
            if matched.is_empty() {
                json!({"authenticated": false, "error": "token audiences do not match"})
            } else {
                json!({"authenticated": true, "audiences": matched,
                       "user": {"username": id.username, "uid": format!("uid-{}", id.username), "groups": id.groups}})
            }
        }
    };
    review["status"] = status;
    review["apiVersion"] = json!("authentication.k8s.io/v1");
    review["kind"] = json!("TokenReview");
    json_response(201, &review)
}

fn access_review(shared: &Shared, body: &Bytes) -> Response {
    let Ok(mut review) = serde_json::from_slice::<Value>(body) else {
        return error_response(&ApiError::bad_request("the body of the request could not be decoded"));
    };
    let spec = review.get("spec").cloned().unwrap_or_default();
    let s = |p: &str| spec.pointer(p).and_then(Value::as_str).unwrap_or_default().to_string();
    let user = s("/user");
    let groups: Vec<String> = spec
        .get("groups")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(|v| v.as_str().map(String::from)).collect())
        .unwrap_or_default();
    let (verb, group, resource, ns) = (
        s("/resourceAttributes/verb"),
        s("/resourceAttributes/group"),
        s("/resourceAttributes/resource"),
        s("/resourceAttributes/namespace"),
    );
    let allowed = shared.rules.lock().unwrap().iter().any(|r| {
        (r.subject == user || groups.contains(&r.subject))
            && (r.verb == verb || r.verb == "*")
            && r.group == group
            && r.resource == resource
            && r.namespace.as_ref().is_none_or(|n| *n == ns)
    });
    review["status"] = if allowed {
        json!({"allowed": true, "reason": "allowed by the lab's access table"})
    } else {
        json!({"allowed": false, "reason": format!("{user} may not {verb} {resource}.{group} in {ns:?}")})
    };
    review["apiVersion"] = json!("authorization.k8s.io/v1");
    review["kind"] = json!("SubjectAccessReview");
    json_response(201, &review)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_resolve_like_the_api_server() {
        let t = parse_path("/api/v1/namespaces/apisix/pods/apisix-etcd-1").unwrap();
        assert_eq!((t.resource.plural, t.namespace.as_deref(), t.name.as_deref()), ("pods", Some("apisix"), Some("apisix-etcd-1")));
        let t = parse_path("/api/v1/pods").unwrap();
        assert_eq!((t.resource.plural, t.namespace, t.name), ("pods", None, None));
        let t = parse_path("/api/v1/persistentvolumes/pv-1").unwrap();
        assert_eq!(t.name.as_deref(), Some("pv-1"));
        let t = parse_path("/apis/coordination.k8s.io/v1/namespaces/x/leases/l").unwrap();
        assert_eq!(t.resource.kind, "Lease");
        let t = parse_path("/api/v1/namespaces/x/pods/p/status").unwrap();
        assert_eq!(t.subresource.as_deref(), Some("status"));
        assert!(parse_path("/api/v1/namespaces/x/persistentvolumes/p").is_none());
        assert!(parse_path("/apis/nope/v1/things").is_none());
    }

    #[test]
    fn query_strings_decode() {
        let q = query_map("labelSelector=app%3Detcd%2Ctier+in+%28a%29&watch=true");
        assert_eq!(q["labelSelector"], "app=etcd,tier in (a)");
        assert_eq!(q["watch"], "true");
    }
}
