//! A person's pause: `etcd-medic.io/paused: "true"` on the pod, its StatefulSet or its
//! namespace, read briefly cached.

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::Api;

use super::Ctx;
use super::observe::{self, PodSeen};

/// latter two looked up at most every 10 s).
pub(crate) async fn paused_on(ctx: &Ctx, pod: &PodSeen) -> Option<String> {
    if pod.paused {
        return Some(format!("pod {}/{}", pod.namespace, pod.name));
    }
    match &pod.cluster {
        Some(set) => set_paused(ctx, &pod.namespace, set).await,
        None => namespace_paused(ctx, &pod.namespace).await,
    }
}

/// A StatefulSet's pause, on it or on its namespace: what a quorum recovery, whose set has no
/// pods left, is held by.
pub(crate) async fn set_paused(ctx: &Ctx, namespace: &str, set: &str) -> Option<String> {
    let key = format!("statefulset {namespace}/{set}");
    let api: Api<StatefulSet> = Api::namespaced(ctx.api.client().clone(), namespace);
    if cached_pause(ctx, &key, || async {
        api.get_opt(set).await.map(|s| s.is_some_and(|s| observe::is_paused(s.metadata.annotations.as_ref())))
    })
    .await
    {
        return Some(key);
    }
    namespace_paused(ctx, namespace).await
}

async fn namespace_paused(ctx: &Ctx, namespace: &str) -> Option<String> {
    let key = format!("namespace {namespace}");
    let api: Api<Namespace> = Api::all(ctx.api.client().clone());
    let ns = namespace.to_string();
    if cached_pause(ctx, &key, || async move {
        api.get_opt(&ns).await.map(|n| n.is_some_and(|n| observe::is_paused(n.metadata.annotations.as_ref())))
    })
    .await
    {
        return Some(key);
    }
    None
}

async fn cached_pause<F, Fut>(ctx: &Ctx, key: &str, look: F) -> bool
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = kube::Result<bool>>,
{
    if let Some((at, paused)) = ctx.pauses.lock().unwrap().get(key)
        && at.elapsed() < Duration::from_secs(10)
    {
        return *paused;
    }
    // Unreadable counts as paused: the controller does not act on what it cannot see.
    let paused = match tokio::time::timeout(ctx.cfg.api_timeout, look()).await {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => {
            tracing::warn!("cannot read the pause annotation of {key}: {e}; holding");
            true
        }
        Err(_) => true,
    };
    ctx.pauses.lock().unwrap().insert(key.to_string(), (Instant::now(), paused));
    paused
}
