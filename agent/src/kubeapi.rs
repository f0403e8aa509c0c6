//! Access to the Kubernetes API, with each failure mapped to a code of the contract: a
//! missing object is its own `…NotFound`; an API server that errors or does not answer in
//! time is `NotReady` (the agent cannot act safely without it).

use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use k8s_openapi::api::authorization::v1::{SubjectAccessReview, SubjectAccessReviewSpec, SubjectAccessReviewStatus};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::events::v1::Event;
use kube::Api;
use kube::api::{DeleteParams, ListParams, PostParams, Preconditions};

use crate::error::{Code, Error, Result};

#[derive(Clone)]
pub struct KubeApi {
    client: kube::Client,
    timeout: Duration,
}

impl KubeApi {
    pub fn new(client: kube::Client, timeout: Duration) -> Self {
        KubeApi { client, timeout }
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

    async fn call<T>(&self, what: &str, not_found: Code, fut: impl Future<Output = kube::Result<T>>) -> Result<T> {
        match tokio::time::timeout(self.timeout, fut).await {
            Err(_) => {
                Err(Error::new(Code::NotReady, format!("the Kubernetes API server did not answer for {what} within {:?}", self.timeout)))
            }
            Ok(Ok(v)) => Ok(v),
            Ok(Err(kube::Error::Api(s))) if s.code == 404 => Err(Error::new(not_found, format!("{what} not found"))),
            Ok(Err(kube::Error::Api(s))) => Err(Error::new(
                Code::NotReady,
                format!("the Kubernetes API server answered {} for {what}: {} ({})", s.code, s.message, s.reason),
            )),
            Ok(Err(e)) => Err(Error::new(Code::NotReady, format!("the Kubernetes API server failed for {what}: {e}"))),
        }
    }

    pub async fn pod(&self, namespace: &str, name: &str) -> Result<Pod> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        self.call(&format!("pod {namespace}/{name}"), Code::PodNotFound, api.get(name)).await
    }

    pub async fn pvc(&self, namespace: &str, name: &str) -> Result<PersistentVolumeClaim> {
        let api: Api<PersistentVolumeClaim> = Api::namespaced(self.client.clone(), namespace);
        self.call(&format!("PersistentVolumeClaim {namespace}/{name}"), Code::PVCNotFound, api.get(name)).await
    }

    pub async fn pods(&self, namespace: &str) -> Result<Vec<Pod>> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        Ok(self.call(&format!("pods in {namespace}"), Code::PodNotFound, api.list(&ListParams::default())).await?.items)
    }

    /// Deletes the pod only if it still has `uid`: a replacement is never hit.
    pub async fn delete_pod(&self, namespace: &str, name: &str, uid: &str) -> Result<()> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let dp = DeleteParams {
            preconditions: Some(Preconditions { uid: Some(uid.to_string()), resource_version: None }),
            ..Default::default()
        };
        match tokio::time::timeout(self.timeout, api.delete(name, &dp)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(kube::Error::Api(s))) if s.code == 409 => {
                Err(Error::new(Code::PodUIDMismatch, format!("pod {namespace}/{name} is no longer {uid}: it was replaced; not deleting")))
            }
            Ok(Err(kube::Error::Api(s))) if s.code == 404 => Err(Error::new(Code::PodNotFound, format!("pod {namespace}/{name} is gone"))),
            Ok(Err(e)) => Err(Error::new(Code::NotReady, format!("deleting pod {namespace}/{name}: {e}"))),
            Err(_) => Err(Error::new(Code::NotReady, format!("deleting pod {namespace}/{name} timed out"))),
        }
    }

    pub async fn lease(&self, namespace: &str, name: &str) -> Result<Option<Lease>> {
        let api: Api<Lease> = Api::namespaced(self.client.clone(), namespace);
        match self.call(&format!("lease {namespace}/{name}"), Code::ClusterLocked, api.get(name)).await {
            Ok(l) => Ok(Some(l)),
            Err(e) if e.code == Code::ClusterLocked => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Creates or replaces (with its resourceVersion) a lease; a conflict is `ClusterLocked`.
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
        self.call(&format!("PersistentVolume {name}"), Code::PVNotFound, api.get(name)).await
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

    /// Records an events.k8s.io/v1 Event in `namespace`.
    pub async fn create_event(&self, namespace: &str, event: &Event) -> Result<()> {
        let api: Api<Event> = Api::namespaced(self.client.clone(), namespace);
        self.call("an Event", Code::NotReady, api.create(&PostParams::default(), event)).await.map(|_| ())
    }
}
