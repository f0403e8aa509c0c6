//! Access to the Kubernetes API, with each failure mapped to a code of the contract: a
//! missing object is its own `…NotFound`; an API server that errors or does not answer in
//! time is `NotReady` (the agent cannot act safely without it).
//!
//! The engine's calls survive blips: a transient failure (429, 500, 502, 503, 504, no
//! answer in time, a broken connection) is retried with exponential back-off, honouring the
//! server's `Retry-After` (`details.retryAfterSeconds` of its `Status`), until
//! [`KubeApi::retry_for`] has passed. Probes and the caller's authentication are asked
//! once: they must answer now or say why.

use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use k8s_openapi::api::authorization::v1::{SubjectAccessReview, SubjectAccessReviewSpec, SubjectAccessReviewStatus};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use kube::Api;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};

use etcd_medic_client::recovery::EtcdRecovery;

use crate::error::{Code, Error, Result};

#[derive(Clone)]
pub struct KubeApi {
    client: kube::Client,
    timeout: Duration,
    /// How long a transient failure is retried (twice the timeout, at least 10 s).
    retry_for: Duration,
}

pub use etcd_medic_client::retry::{Attempt, classify};

impl KubeApi {
    pub fn new(client: kube::Client, timeout: Duration) -> Self {
        KubeApi { client, timeout, retry_for: (timeout * 2).max(Duration::from_secs(10)) }
    }

    /// How long the engine's calls retry transient failures.
    pub fn retry_for(&self) -> Duration {
        self.retry_for
    }

    /// The usual in-cluster config, or `KUBECONFIG` / `~/.kube/config`.
    pub async fn from_environment(timeout: Duration) -> Result<Self> {
        let client = kube::Client::try_default()
            .await
            .map_err(|e| Error::new(Code::NotReady, format!("no Kubernetes API access (in-cluster config or KUBECONFIG): {e}")))?;
        Ok(KubeApi::new(client, timeout))
    }

    pub fn client(&self) -> &kube::Client {
        &self.client
    }

    /// One attempt, asked once (probes, authentication).
    async fn call<T>(&self, what: &str, not_found: Code, fut: impl Future<Output = kube::Result<T>>) -> Result<T> {
        match tokio::time::timeout(self.timeout, fut).await {
            Err(_) => Err(self.no_answer(what)),
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.failed(what, not_found, &e)),
        }
    }

    fn no_answer(&self, what: &str) -> Error {
        Error::new(Code::NotReady, format!("the Kubernetes API server did not answer for {what} within {:?}", self.timeout))
    }

    fn failed(&self, what: &str, not_found: Code, e: &kube::Error) -> Error {
        match e {
            kube::Error::Api(s) if s.code == 404 => Error::new(not_found, format!("{what} not found")),
            kube::Error::Api(s) => Error::new(
                Code::NotReady,
                format!("the Kubernetes API server answered {} for {what}: {} ({})", s.code, s.message, s.reason),
            ),
            e => Error::new(Code::NotReady, format!("the Kubernetes API server failed for {what}: {e}")),
        }
    }

    /// `op` until it answers, retrying transient failures for [`Self::retry_for`]; the
    /// error is the last attempt's, with how often it was tried.
    async fn retrying<T, F, Fut>(&self, what: &str, not_found: Code, mut op: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = kube::Result<T>>,
    {
        self.retrying_raw(what, &mut op).await.map_err(|(e, tries)| match e {
            None => self.no_answer(what).with_tries(tries),
            Some(e) => self.failed(what, not_found, &e).with_tries(tries),
        })
    }

    /// The retry loop: `Err((None, n))` when the last attempt got no answer in time.
    async fn retrying_raw<T, F, Fut>(&self, what: &str, op: &mut F) -> std::result::Result<T, (Option<kube::Error>, u32)>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = kube::Result<T>>,
    {
        etcd_medic_client::retry::retrying(self.timeout, self.retry_for, what, op).await
    }

    pub async fn pod(&self, namespace: &str, name: &str) -> Result<Pod> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        self.retrying(&format!("pod {namespace}/{name}"), Code::PodNotFound, || api.get(name)).await
    }

    pub async fn pvc(&self, namespace: &str, name: &str) -> Result<PersistentVolumeClaim> {
        let api: Api<PersistentVolumeClaim> = Api::namespaced(self.client.clone(), namespace);
        self.retrying(&format!("PersistentVolumeClaim {namespace}/{name}"), Code::PVCNotFound, || api.get(name)).await
    }

    pub async fn statefulset(&self, namespace: &str, name: &str) -> Result<StatefulSet> {
        let api: Api<StatefulSet> = Api::namespaced(self.client.clone(), namespace);
        self.retrying(&format!("StatefulSet {namespace}/{name}"), Code::NotFound, || api.get(name)).await
    }

    /// The `EtcdRecovery` of a set, if one exists.
    pub async fn recovery(&self, namespace: &str, name: &str) -> Result<Option<EtcdRecovery>> {
        let api: Api<EtcdRecovery> = Api::namespaced(self.client.clone(), namespace);
        self.retrying(&format!("EtcdRecovery {namespace}/{name}"), Code::NotFound, || api.get_opt(name)).await
    }

    /// Every `EtcdRecovery` in `namespace` (all when `None`).
    pub async fn recoveries(&self, namespace: Option<&str>) -> Result<Vec<EtcdRecovery>> {
        let api: Api<EtcdRecovery> = match namespace {
            Some(ns) => Api::namespaced(self.client.clone(), ns),
            None => Api::all(self.client.clone()),
        };
        let lp = ListParams::default();
        Ok(self.retrying("EtcdRecoveries", Code::NotFound, || api.list(&lp)).await?.items)
    }

    /// Sets the replicas of StatefulSet `name` if it is still the one with `uid` (the UID in
    /// a patch is a precondition: a set made anew under the name is a 409, never scaled).
    pub async fn scale_statefulset(&self, namespace: &str, name: &str, uid: &str, replicas: i32) -> Result<StatefulSet> {
        let api: Api<StatefulSet> = Api::namespaced(self.client.clone(), namespace);
        let body = serde_json::json!({"metadata": {"uid": uid}, "spec": {"replicas": replicas}});
        let (pp, patch) = (PatchParams::default(), Patch::Merge(body));
        self.retrying(&format!("StatefulSet {namespace}/{name}"), Code::NotFound, || api.patch(name, &pp, &patch)).await
    }

    /// Makes `r` (not retried: an answer lost would hide whether it was made; the caller
    /// reads again). `None` when one of that name exists already.
    pub async fn create_recovery(&self, namespace: &str, r: &EtcdRecovery) -> Result<Option<EtcdRecovery>> {
        let api: Api<EtcdRecovery> = Api::namespaced(self.client.clone(), namespace);
        match self.call(&format!("EtcdRecovery {namespace}"), Code::NotFound, api.create(&PostParams::default(), r)).await {
            Ok(r) => Ok(Some(r)),
            Err(_) if self.recovery(namespace, &r.metadata.name.clone().unwrap_or_default()).await?.is_some() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes the status of EtcdRecovery `name` as it was at `resource_version` (a merge
    /// patch of the status subresource; a record changed since is a 409, never overwritten).
    pub async fn recovery_status(
        &self,
        namespace: &str,
        name: &str,
        resource_version: &str,
        status: &serde_json::Value,
    ) -> Result<EtcdRecovery> {
        let api: Api<EtcdRecovery> = Api::namespaced(self.client.clone(), namespace);
        let body = serde_json::json!({"metadata": {"resourceVersion": resource_version}, "status": status});
        let (pp, patch) = (PatchParams::default(), Patch::Merge(body));
        self.call(&format!("EtcdRecovery {namespace}/{name}"), Code::NotFound, api.patch_status(name, &pp, &patch)).await
    }

    /// Makes pod `p` (not retried: an answer lost would hide whether it was made; the caller
    /// reads again). `None` when one of that name exists already.
    pub async fn create_pod(&self, namespace: &str, p: &Pod) -> Result<Option<Pod>> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let name = p.metadata.name.clone().unwrap_or_default();
        match self.call(&format!("pod {namespace}/{name}"), Code::PodNotFound, api.create(&PostParams::default(), p)).await {
            Ok(p) => Ok(Some(p)),
            Err(_) if api.get_opt(&name).await.ok().flatten().is_some() => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub async fn pods(&self, namespace: &str) -> Result<Vec<Pod>> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let lp = ListParams::default();
        Ok(self.retrying(&format!("pods in {namespace}"), Code::PodNotFound, || api.list(&lp)).await?.items)
    }

    /// Deletes the pod only if it still has `uid`: a replacement is never hit. A transient
    /// failure is retried; once an attempt may have gone through without its answer, a pod
    /// that is then gone or replaced means the delete was done (the precondition keeps a
    /// retry from ever deleting the replacement).
    pub async fn delete_pod(&self, namespace: &str, name: &str, uid: &str) -> Result<Deleted> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let dp = DeleteParams {
            preconditions: Some(Preconditions { uid: Some(uid.to_string()), resource_version: None }),
            ..Default::default()
        };
        let what = format!("deleting pod {namespace}/{name}");
        let mut attempts = 0u32;
        let mut op = || {
            attempts += 1;
            api.delete(name, &dp)
        };
        match self.retrying_raw(&what, &mut op).await {
            Ok(_) => Ok(Deleted::Now),
            Err((Some(kube::Error::Api(s)), tries)) if matches!(s.code, 404 | 409) && tries > 1 => {
                Ok(Deleted::Earlier(format!("an earlier attempt went through (its answer was lost; now {})", s.code)))
            }
            Err((Some(kube::Error::Api(s)), _)) if s.code == 409 => {
                Err(Error::new(Code::PodUIDMismatch, format!("pod {namespace}/{name} is no longer {uid}: it was replaced; not deleting")))
            }
            Err((Some(kube::Error::Api(s)), _)) if s.code == 404 => {
                Err(Error::new(Code::PodNotFound, format!("pod {namespace}/{name} is gone")))
            }
            Err((e, tries)) => {
                // Out of retries: the pod itself says whether one of them went through.
                match self.pod(namespace, name).await {
                    Ok(p) if p.metadata.uid.as_deref() != Some(uid) => Ok(Deleted::Earlier("the pod was replaced".into())),
                    Ok(p) if p.metadata.deletion_timestamp.is_some() => Ok(Deleted::Earlier("the pod is terminating".into())),
                    Err(pe) if pe.code == Code::PodNotFound => Ok(Deleted::Earlier("the pod is gone".into())),
                    _ => Err(match e {
                        None => self.no_answer(&what).with_tries(tries),
                        Some(e) => self.failed(&what, Code::PodNotFound, &e).with_tries(tries),
                    }),
                }
            }
        }
    }

    pub async fn lease(&self, namespace: &str, name: &str) -> Result<Option<Lease>> {
        let api: Api<Lease> = Api::namespaced(self.client.clone(), namespace);
        match self.retrying(&format!("lease {namespace}/{name}"), Code::ClusterLocked, || api.get(name)).await {
            Ok(l) => Ok(Some(l)),
            Err(e) if e.code == Code::ClusterLocked => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Creates or replaces (with its resourceVersion) a lease, asked once: the lease's
    /// owner decides what a failure means (a write whose answer was lost may have gone
    /// through). A conflict is `ClusterLocked`.
    pub async fn write_lease(&self, namespace: &str, lease: &Lease, create: bool) -> Result<Lease> {
        let api: Api<Lease> = Api::namespaced(self.client.clone(), namespace);
        let name = lease.metadata.name.clone().unwrap_or_default();
        let fut = async {
            if create { api.create(&PostParams::default(), lease).await } else { api.replace(&name, &PostParams::default(), lease).await }
        };
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(Ok(l)) => Ok(l),
            Ok(Err(kube::Error::Api(s))) if s.code == 409 => {
                Err(Error::new(Code::ClusterLocked, format!("lease {namespace}/{name} changed under us: another agent took it")))
            }
            Ok(Err(e)) => Err(Error::new(Code::NotReady, format!("writing lease {namespace}/{name}: {e}"))),
            Err(_) => Err(Error::new(Code::NotReady, format!("writing lease {namespace}/{name} timed out"))),
        }
    }

    pub async fn pv(&self, name: &str) -> Result<PersistentVolume> {
        let api: Api<PersistentVolume> = Api::all(self.client.clone());
        self.retrying(&format!("PersistentVolume {name}"), Code::PVNotFound, || api.get(name)).await
    }

    /// The API server answers at all (readiness): `/version`, readable by every caller.
    pub async fn ping(&self) -> Result<String> {
        self.call("the API server's version", Code::NotReady, self.client.apiserver_version()).await.map(|v| v.git_version)
    }

    /// TokenReview of a caller's bearer token.
    pub async fn token_review(&self, token: &str, audiences: &[String]) -> Result<TokenReviewStatus> {
        let review = TokenReview {
            spec: TokenReviewSpec { token: Some(token.to_string()), audiences: (!audiences.is_empty()).then(|| audiences.to_vec()) },
            ..Default::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let r = self.call("a TokenReview", Code::NotReady, api.create(&PostParams::default(), &review)).await?;
        Ok(r.status.unwrap_or_default())
    }

    /// SubjectAccessReview: may this user do `verb` on `resource` of `group` in `namespace`?
    pub async fn subject_access_review(&self, spec: SubjectAccessReviewSpec) -> Result<SubjectAccessReviewStatus> {
        let review = SubjectAccessReview { spec, ..Default::default() };
        let api: Api<SubjectAccessReview> = Api::all(self.client.clone());
        let r = self.call("a SubjectAccessReview", Code::NotReady, api.create(&PostParams::default(), &review)).await?;
        Ok(r.status.unwrap_or_default())
    }
}

/// How a pod delete ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Deleted {
    /// This call deleted it.
    Now,
    /// An earlier attempt did (its answer was lost): why the agent knows.
    Earlier(String),
}
