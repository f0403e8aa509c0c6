//! The stand-in API server, driven by the same kube client the agent uses, checked against
//! Kubernetes' documented semantics.

use std::io::{Read, Write};
use std::time::Duration;

use anyhow::Result;
use etcd_medic_lab::apiserver::{AccessRule, ApiServer, Fault, FaultKind, TokenIdentity};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, PostParams, Preconditions, WatchEvent, WatchParams};
use serde_json::json;

async fn server() -> Result<(tempfile::TempDir, ApiServer, kube::Client)> {
    let dir = tempfile::tempdir()?;
    let api = ApiServer::start(dir.path()).await?;
    let client = api.client().await?;
    Ok((dir, api, client))
}

fn pod(name: &str, node: &str, app: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "apisix", "labels": {"app": app}},
        "spec": {"nodeName": node, "containers": [{"name": "etcd", "image": "etcd"}]},
    }))
    .unwrap()
}

fn api_error(e: kube::Error) -> (u16, String, String) {
    match e {
        kube::Error::Api(s) => (s.code, s.reason.clone(), s.message.clone()),
        other => panic!("expected a Status error, got {other}"),
    }
}

#[tokio::test]
async fn pods_get_list_and_select_like_the_api_server() -> Result<()> {
    let (_d, api, client) = server().await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "apisix");
    pods.create(&PostParams::default(), &pod("a", "node-a", "etcd")).await?;
    pods.create(&PostParams::default(), &pod("b", "node-b", "etcd")).await?;
    pods.create(&PostParams::default(), &pod("c", "node-a", "web")).await?;

    let got = pods.get("a").await?;
    assert!(got.metadata.uid.is_some() && got.metadata.resource_version.is_some());
    let (code, reason, message) = api_error(pods.get("zzz").await.unwrap_err());
    assert_eq!((code, reason.as_str(), message.as_str()), (404, "NotFound", "pods \"zzz\" not found"));

    let on_a = pods.list(&ListParams::default().fields("spec.nodeName=node-a")).await?;
    assert_eq!(on_a.items.len(), 2);
    let etcd_on_a = pods.list(&ListParams::default().fields("spec.nodeName=node-a").labels("app=etcd")).await?;
    assert_eq!(etcd_on_a.items.iter().map(|p| p.metadata.name.clone().unwrap()).collect::<Vec<_>>(), ["a"]);
    let all: Api<Pod> = Api::all(client);
    assert_eq!(all.list(&ListParams::default().labels("app in (etcd,web)")).await?.items.len(), 3);
    let (code, _, message) = api_error(pods.list(&ListParams::default().fields("spec.bogus=1")).await.unwrap_err());
    assert_eq!((code, message.as_str()), (400, "field label not supported: spec.bogus"));
    drop(api);
    Ok(())
}

#[tokio::test]
async fn delete_honours_the_uid_precondition_and_is_graceful_for_pods_on_a_node() -> Result<()> {
    let (_d, api, client) = server().await?;
    let pods: Api<Pod> = Api::namespaced(client, "apisix");
    let created = pods.create(&PostParams::default(), &pod("a", "node-a", "etcd")).await?;
    let uid = created.metadata.uid.clone().unwrap();

    let wrong = DeleteParams {
        preconditions: Some(Preconditions { uid: Some("not-the-uid".into()), resource_version: None }),
        ..Default::default()
    };
    let (code, reason, message) = api_error(pods.delete("a", &wrong).await.unwrap_err());
    assert_eq!((code, reason.as_str()), (409, "Conflict"));
    assert!(message.contains("Precondition failed: UID in precondition: not-the-uid"), "{message}");
    assert!(pods.get("a").await?.metadata.deletion_timestamp.is_none());

    let right =
        DeleteParams { preconditions: Some(Preconditions { uid: Some(uid.clone()), resource_version: None }), ..Default::default() };
    let answer = pods.delete("a", &right).await?;
    let marked = answer.left().expect("a pod on a node comes back as the object, marked for deletion");
    assert!(marked.metadata.deletion_timestamp.is_some());
    // Only the kubelet finishes the delete.
    api.store().finalize(etcd_medic_lab::apiserver::store::find_resource("", "v1", "pods").unwrap(), "apisix", "a", &uid).unwrap();
    assert_eq!(api_error(pods.get("a").await.unwrap_err()).0, 404);
    Ok(())
}

#[tokio::test]
async fn leases_use_optimistic_concurrency() -> Result<()> {
    let (_d, _api, client) = server().await?;
    let leases: Api<Lease> = Api::namespaced(client, "apisix");
    let lease: Lease = serde_json::from_value(
        json!({"metadata": {"name": "etcd-medic-cluster-1"}, "spec": {"holderIdentity": "node-a", "leaseDurationSeconds": 15}}),
    )?;
    let first = leases.create(&PostParams::default(), &lease).await?;
    let (code, reason, _) = api_error(leases.create(&PostParams::default(), &lease).await.unwrap_err());
    assert_eq!((code, reason.as_str()), (409, "AlreadyExists"));

    let mut mine = first.clone();
    mine.spec.as_mut().unwrap().holder_identity = Some("node-b".into());
    leases.replace("etcd-medic-cluster-1", &PostParams::default(), &mine).await?;
    let mut stale = first;
    stale.spec.as_mut().unwrap().holder_identity = Some("node-c".into());
    let (code, reason, message) = api_error(leases.replace("etcd-medic-cluster-1", &PostParams::default(), &stale).await.unwrap_err());
    assert_eq!((code, reason.as_str()), (409, "Conflict"));
    assert!(message.contains("the object has been modified"), "{message}");
    assert_eq!(leases.get("etcd-medic-cluster-1").await?.spec.unwrap().holder_identity.as_deref(), Some("node-b"));
    Ok(())
}

#[tokio::test]
async fn watch_streams_changes_from_a_resource_version() -> Result<()> {
    let (_d, api, client) = server().await?;
    let pods: Api<Pod> = Api::namespaced(client, "apisix");
    let a = pods.create(&PostParams::default(), &pod("a", "node-a", "etcd")).await?;
    let rv = pods.list(&ListParams::default()).await?.metadata.resource_version.unwrap();
    let mut stream = pods.watch(&WatchParams::default().fields("spec.nodeName=node-a").timeout(10), &rv).await?.boxed();
    pods.create(&PostParams::default(), &pod("b", "node-b", "etcd")).await?; // filtered out
    api.modify::<Pod>("apisix", "a", |p| {
        p.metadata.labels.get_or_insert_default().insert("x".into(), "y".into());
    })?;
    pods.delete("a", &DeleteParams { grace_period_seconds: Some(0), ..Default::default() }).await?;
    let mut seen = Vec::new();
    while seen.len() < 2 {
        match tokio::time::timeout(Duration::from_secs(5), stream.try_next()).await?? {
            Some(WatchEvent::Modified(p)) => seen.push(("MODIFIED", p.metadata.name.unwrap())),
            Some(WatchEvent::Deleted(p)) => seen.push(("DELETED", p.metadata.name.unwrap())),
            Some(WatchEvent::Added(p)) => seen.push(("ADDED", p.metadata.name.unwrap())),
            Some(other) => panic!("unexpected {other:?}"),
            None => break,
        }
    }
    assert_eq!(seen, [("MODIFIED", "a".to_string()), ("DELETED", "a".to_string())]);
    assert!(a.metadata.uid.is_some());
    Ok(())
}

#[tokio::test]
async fn token_and_access_reviews_answer_from_the_test_table() -> Result<()> {
    let (_d, api, client) = server().await?;
    api.add_identity(
        "good-token",
        TokenIdentity {
            username: "system:serviceaccount:ops:healer".into(),
            groups: vec!["system:serviceaccounts".into()],
            audiences: vec!["etcd-medic".into()],
        },
    );
    api.allow(AccessRule {
        subject: "system:serviceaccount:ops:healer".into(),
        verb: "create".into(),
        group: "etcd-medic.io".into(),
        resource: "remediations".into(),
        namespace: Some("apisix".into()),
    });

    let reviews: Api<TokenReview> = Api::all(client.clone());
    let review = |token: &str, aud: &str| TokenReview {
        spec: TokenReviewSpec { token: Some(token.into()), audiences: Some(vec![aud.into()]) },
        ..Default::default()
    };
    let ok = reviews.create(&PostParams::default(), &review("good-token", "etcd-medic")).await?.status.unwrap();
    assert_eq!(ok.authenticated, Some(true));
    assert_eq!(ok.user.unwrap().username.as_deref(), Some("system:serviceaccount:ops:healer"));
    let bad_aud = reviews.create(&PostParams::default(), &review("good-token", "other")).await?.status.unwrap();
    assert_eq!(bad_aud.authenticated, Some(false));
    let unknown = reviews.create(&PostParams::default(), &review("nope", "etcd-medic")).await?.status.unwrap();
    assert_eq!(unknown.authenticated, Some(false));

    let sars: Api<SubjectAccessReview> = Api::all(client);
    let sar = |verb: &str, ns: &str| SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some("system:serviceaccount:ops:healer".into()),
            resource_attributes: Some(ResourceAttributes {
                verb: Some(verb.into()),
                group: Some("etcd-medic.io".into()),
                resource: Some("remediations".into()),
                namespace: Some(ns.into()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    assert!(sars.create(&PostParams::default(), &sar("create", "apisix")).await?.status.unwrap().allowed);
    assert!(!sars.create(&PostParams::default(), &sar("create", "kube-system")).await?.status.unwrap().allowed);
    assert!(!sars.create(&PostParams::default(), &sar("delete", "apisix")).await?.status.unwrap().allowed);
    Ok(())
}

/// A raw HTTP/1.1 request, for what a kube client would not send.
fn raw(addr: std::net::SocketAddr, path: &str, token: Option<&str>) -> Result<(u16, String)> {
    let mut s = std::net::TcpStream::connect(addr)?;
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    write!(s, "GET {path} HTTP/1.1\r\nHost: lab\r\n{auth}Connection: close\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let code = out.split(' ').nth(1).unwrap_or("0").parse()?;
    Ok((code, out.split("\r\n\r\n").nth(1).unwrap_or_default().to_string()))
}

#[tokio::test]
async fn unauthenticated_requests_and_injected_faults_get_status_bodies() -> Result<()> {
    let (_d, api, client) = server().await?;
    let addr = api.addr;
    let (code, body) = tokio::task::spawn_blocking(move || raw(addr, "/api/v1/namespaces/x/pods", Some("wrong"))).await??;
    assert_eq!(code, 401);
    assert!(body.contains("\"reason\":\"Unauthorized\""), "{body}");
    let token = api.token.clone();
    let (code, _) = tokio::task::spawn_blocking(move || raw(addr, "/api/v1/namespaces/x/pods", Some(&token))).await??;
    assert_eq!(code, 200);

    api.inject(Fault::new("/api/v1/namespaces/apisix/pods", FaultKind::Status(500)));
    let pods: Api<Pod> = Api::namespaced(client, "apisix");
    assert_eq!(api_error(pods.get("a").await.unwrap_err()).0, 500);
    api.clear_faults();
    assert_eq!(api_error(pods.get("a").await.unwrap_err()).0, 404);
    assert!(api.seen().iter().any(|r| r.method == "GET" && r.path == "/api/v1/namespaces/apisix/pods/a"));
    Ok(())
}

/// The agent's Events go through kube-runtime's Recorder: a first Event is created, a repeat
/// is a JSON merge patch of its `series`, and the stand-in takes patch types as Kubernetes
/// does (a type it does not implement is refused, never misapplied).
#[tokio::test]
async fn events_are_recorded_and_a_repeat_patches_the_series() -> Result<()> {
    use k8s_openapi::api::events::v1::Event as K8sEvent;
    use kube::api::{Patch, PatchParams};
    use kube::runtime::events::{Event, EventType, Recorder, Reporter};
    let (_dir, api, client) = server().await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "apisix");
    let p = pods.create(&PostParams::default(), &pod("apisix-etcd-1", "node-a", "etcd")).await?;
    let recorder = Recorder::new(client.clone(), Reporter { controller: "etcd-medic.io/agent".into(), instance: Some("n".into()) });
    let ev = |note: &str| Event {
        type_: EventType::Warning,
        reason: "RemediationRefused".into(),
        note: Some(note.into()),
        action: "Remediate".into(),
        secondary: None,
    };
    let reference = k8s_openapi::api::core::v1::ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        namespace: Some("apisix".into()),
        name: p.metadata.name.clone(),
        uid: p.metadata.uid.clone(),
        ..Default::default()
    };
    recorder.publish(&ev("first"), &reference).await?;
    recorder.publish(&ev("second"), &reference).await?;
    let events: Api<K8sEvent> = Api::namespaced(client.clone(), "apisix");
    let all = events.list(&ListParams::default()).await?.items;
    assert_eq!(all.len(), 1, "{all:?}");
    let series = all[0].series.as_ref().expect("a series after the repeat");
    assert_eq!(series.count, 2);
    assert_eq!(all[0].note.as_deref(), Some("first"), "the Recorder keeps the first note");
    let patches: Vec<_> = api.seen().into_iter().filter(|q| q.method == "PATCH").collect();
    assert_eq!(patches.len(), 1);
    assert_eq!(patches[0].content_type, "application/merge-patch+json");
    // Patch types as the API server takes them.
    let name = all[0].metadata.name.clone().unwrap();
    let json_patch = Patch::Json::<()>(serde_json::from_value(json!([{"op": "replace", "path": "/note", "value": "x"}]))?);
    assert_eq!(api_error(events.patch(&name, &PatchParams::default(), &json_patch).await.unwrap_err()).0, 415);
    let apply = Patch::Apply(json!({"apiVersion": "events.k8s.io/v1", "kind": "Event", "note": "x"}));
    assert_eq!(api_error(events.patch(&name, &PatchParams::default(), &apply).await.unwrap_err()).0, 400, "apply needs a fieldManager");
    let merged = events.patch(&name, &PatchParams::default(), &Patch::Merge(json!({"note": "third"}))).await?;
    assert_eq!(merged.note.as_deref(), Some("third"));
    Ok(())
}

#[tokio::test]
async fn lists_come_in_pages_with_continue_tokens() -> Result<()> {
    let (_dir, _api, client) = server().await?;
    let pods: Api<Pod> = Api::namespaced(client, "apisix");
    for i in 0..5 {
        pods.create(&PostParams::default(), &pod(&format!("p-{i}"), "node-a", "etcd")).await?;
    }
    let first = pods.list(&ListParams::default().limit(2)).await?;
    assert_eq!(first.items.len(), 2);
    assert_eq!(first.metadata.remaining_item_count, Some(3));
    let token = first.metadata.continue_.clone().expect("a continue token");
    let second = pods.list(&ListParams::default().limit(2).continue_token(&token)).await?;
    let last = pods.list(&ListParams::default().limit(2).continue_token(second.metadata.continue_.as_deref().unwrap_or(""))).await?;
    assert_eq!(last.items.len(), 1);
    assert_eq!(last.metadata.continue_, None, "the last page has no token");
    let names: Vec<String> = [first.items, second.items, last.items].concat().into_iter().filter_map(|p| p.metadata.name).collect();
    assert_eq!(names, ["p-0", "p-1", "p-2", "p-3", "p-4"]);
    Ok(())
}
