//! The controller's caches: what the watches of pods and EtcdRemediations keep of each, and
//! only that.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher;

use super::{Ctx, observe};
use etcd_medic_client::crd::EtcdRemediation;

/// Keeps `ctx.pods` as the watch of `scope` (a namespace, or all) sees the selected pods.
pub(super) async fn watch_pods(ctx: Arc<Ctx>, scope: Option<String>) {
    let api: Api<Pod> = scoped(&ctx, &scope);
    let config = watcher::Config::default().labels(&ctx.cfg.selector);
    keep_watching(ctx, api, config, "pods", scope, |c| &c.pods, |c, p| observe::pod_seen(&p, c.cfg.container.as_deref())).await
}

/// Keeps `ctx.rems` as the watch of `scope` sees the EtcdRemediations.
pub(super) async fn watch_remediations(ctx: Arc<Ctx>, scope: Option<String>) {
    let api: Api<EtcdRemediation> = scoped(&ctx, &scope);
    keep_watching(ctx, api, watcher::Config::default(), "etcdremediations", scope, |c| &c.rems, slim).await
}

fn scoped<K>(ctx: &Ctx, scope: &Option<String>) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match scope {
        Some(ns) => Api::namespaced(ctx.api.client().clone(), ns),
        None => Api::all(ctx.api.client().clone()),
    }
}

/// The cache a watch keeps, by (namespace, name).
type Cache<V> = Mutex<HashMap<(String, String), V>>;

/// Keeps one of `ctx`'s caches as a watch of `api` sees its objects (`keep` makes what is
/// kept of one). A relist drops what it no longer has (deleted while the watch was down);
/// the first list in counts toward readiness, and the memory its decoding took is handed
/// back.
async fn keep_watching<K, V>(
    ctx: Arc<Ctx>,
    api: Api<K>,
    config: watcher::Config,
    what: &str,
    scope: Option<String>,
    cache: for<'a> fn(&'a Ctx) -> &'a Cache<V>,
    keep: fn(&Ctx, K) -> V,
) where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let name = format!("{what}/{}", scope.as_deref().unwrap_or("*"));
    let mut listed: HashSet<(String, String)> = HashSet::new();
    let mut stream = watcher(api, config).default_backoff().boxed();
    while let Some(ev) = stream.next().await {
        let in_scope = |k: &(String, String)| scope.as_ref().is_none_or(|ns| *ns == k.0);
        match ev {
            Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => {
                let key = (o.namespace().unwrap_or_default(), o.name_any());
                listed.insert(key.clone());
                let kept = keep(&ctx, o);
                cache(&ctx).lock().unwrap().insert(key, kept);
            }
            Ok(watcher::Event::Delete(o)) => {
                cache(&ctx).lock().unwrap().remove(&(o.namespace().unwrap_or_default(), o.name_any()));
            }
            Ok(watcher::Event::Init) => listed.clear(),
            Ok(watcher::Event::InitDone) => {
                cache(&ctx).lock().unwrap().retain(|k, _| !in_scope(k) || listed.contains(k));
                if ctx.synced.lock().unwrap().insert(name.clone()) {
                    tracing::info!(watch = %name, "first list in");
                }
                release_freed_memory();
            }
            Err(e) => tracing::warn!(watch = %name, "watch failed: {e}; retrying (is the EtcdRemediation CRD installed?)"),
        }
        ctx.metrics.watched.set(ctx.pods.lock().unwrap().len() as i64);
        ctx.changed.notify_one();
    }
}

/// A list decodes every selected pod in full before the controller keeps its few fields:
/// the allocator keeps that peak. Hand it back to the system once a list is in.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap pages to the system.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// What the controller keeps of a record: not its managed fields, nor annotations other
/// than its own (a record's annotations can be 256 KiB, and a tenant writes them).
fn slim(_: &Ctx, mut r: EtcdRemediation) -> EtcdRemediation {
    r.metadata.managed_fields = None;
    if let Some(a) = r.metadata.annotations.as_mut() {
        a.retain(|k, v| k.starts_with("etcd-medic.io/") && v.len() <= 1024);
    }
    r
}
