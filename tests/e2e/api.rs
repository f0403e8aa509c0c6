//! The real agent (`etcd-medic serve`) as a controller meets it: every status and code of
//! the contract from a real request, authentication and authorization through the lab's
//! TokenReview/SubjectAccessReview tables, a heal over HTTP after a flood of bad requests,
//! Events, metrics, history across restarts, and a graceful stop that the next start
//! resumes.

use std::time::Duration;

use anyhow::{Context, Result};
use etcd_medic_lab::agent::{Serve, ServedAgent};
use etcd_medic_lab::apiserver::{AccessRule, Fault, FaultKind, TokenIdentity};
use etcd_medic_lab::http::request;
use etcd_medic_lab::objects::SetShape;
use etcd_medic_lab::{Lab, NODE_NAME};
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use serde_json::{Value, json};

/// May create and get remediations in `apisix`.
const CONTROLLER: &str = "controller-token";
/// May only get them.
const READER: &str = "reader-token";
/// A valid token with no access at all.
const NOBODY: &str = "nobody-token";

fn grant(lab: &Lab) {
    for (token, user) in [(CONTROLLER, "system:serviceaccount:ops:healer"), (READER, "jane"), (NOBODY, "mallory")] {
        lab.api
            .add_identity(token, TokenIdentity { username: user.into(), groups: vec!["system:authenticated".into()], audiences: vec![] });
    }
    lab.api.allow_remediations("system:serviceaccount:ops:healer", Some("apisix"));
    lab.api.allow(AccessRule {
        subject: "jane".into(),
        verb: "get".into(),
        group: "etcd-medic.io".into(),
        resource: "remediations".into(),
        namespace: Some("apisix".into()),
    });
}

#[track_caller]
fn assert_problem(r: &etcd_medic_lab::http::Response, status: u16, code: &str) {
    assert_eq!(r.status, status, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/problem+json"), "{}", r.text());
    let p = r.json();
    assert_eq!(p["code"], code, "{p}");
    assert_eq!(p["status"], status, "{p}");
    assert!(p["title"].is_string() && p["type"].is_string() && p["detail"].as_str().is_some_and(|d| !d.is_empty()), "{p}");
}

/// A copy of pod `from` named `name` on `node`, whose data volume claims `claim`.
fn pod_copy(lab: &Lab, from: &str, name: &str, node: &str, claim: &str) -> Result<()> {
    let mut p: Value = serde_json::to_value(lab.api.get::<Pod>("apisix", from).expect("the pod"))?;
    p["metadata"] = json!({"name": name, "namespace": "apisix", "labels": p["metadata"]["labels"]});
    p["spec"]["nodeName"] = json!(node);
    for v in p["spec"]["volumes"].as_array_mut().unwrap() {
        if v.get("persistentVolumeClaim").is_some() {
            v["persistentVolumeClaim"]["claimName"] = json!(claim);
        }
    }
    lab.api.create::<Pod>(&serde_json::from_value(p)?)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_status_of_the_contract_comes_with_its_code() -> Result<()> {
    let lab = Lab::start(SetShape::apisix(3, NODE_NAME)).await?;
    grant(&lab);
    let mut how = Serve::new(&lab);
    how.args = vec!["--rate-limit".into(), "1000".into()];
    let agent = ServedAgent::start(&lab, how).await?;
    agent.wait_ready(Duration::from_secs(30)).await?;
    let ok = |pod: &str| json!({"namespace": "apisix", "pod": pod, "dryRun": true});

    // Probes, metrics and the document need no token.
    assert_eq!(agent.get("/healthz", None).await?.text(), "ok");
    assert_eq!(agent.get("/readyz", None).await?.status, 200);
    let doc = agent.get("/openapi.json", None).await?;
    assert!(doc.json()["paths"]["/v1/remediations"]["post"]["responses"]["202"]["description"].is_string());

    // 401: no token, a malformed header, a token the API server does not know.
    let r = agent.post(None, &ok("apisix-etcd-1")).await?;
    assert_problem(&r, 401, "Unauthenticated");
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    let r = request(agent.addr, "GET", "/v1/remediations", &[("Authorization", "Basic YTpi")], None).await?;
    assert_problem(&r, 401, "Unauthenticated");
    assert_problem(&agent.post(Some("forged"), &ok("apisix-etcd-1")).await?, 401, "Unauthenticated");
    // 403: a reader may not create; nobody may read; the controller only in its namespace.
    assert_problem(&agent.post(Some(READER), &ok("apisix-etcd-1")).await?, 403, "Forbidden");
    assert_problem(&agent.get("/v1/remediations?namespace=apisix", Some(NOBODY)).await?, 403, "Forbidden");
    assert_problem(&agent.get("/v1/remediations", Some(CONTROLLER)).await?, 403, "Forbidden");
    let r = agent.post(Some(CONTROLLER), &json!({"namespace": "kube-system", "pod": "etcd-0"})).await?;
    assert_problem(&r, 403, "Forbidden");
    assert!(r.json()["detail"].as_str().unwrap().contains("etcd-medic-caller"), "says what to bind");

    // 400: whatever is not a valid request, each saying why.
    let auth = format!("Bearer {CONTROLLER}");
    let raw = |body: &'static str, ct: &'static str| {
        let auth = auth.clone();
        async move {
            request(agent.addr, "POST", "/v1/remediations", &[("Authorization", &auth), ("Content-Type", ct)], Some(body.as_bytes())).await
        }
    };
    for body in [
        "",
        "{",
        "[]",
        "null",
        r#"{"namespace":"apisix"}"#,
        r#"{"namespace":"apisix","pod":"apisix-etcd-1","dryrun":true}"#,
        r#"{"namespace":"apisix","pod":1}"#,
        r#"{"namespace":"apisix","pod":"apisix-etcd-1","force":"yes"}"#,
        r#"{"namespace":"","pod":"apisix-etcd-1"}"#,
        r#"{"namespace":"apisix","pod":""}"#,
        r#"{"namespace":"APISIX","pod":"apisix-etcd-1"}"#,
        r#"{"namespace":"apisix","pod":"../../etc"}"#,
        r#"{"namespace":"apisix","pod":"apisix-etcd-1","etcdEndpoints":["file:///etc/passwd"]}"#,
    ] {
        assert_problem(&raw(body, "application/json").await?, 400, "InvalidRequest");
    }
    assert_problem(&raw(r#"{"namespace":"apisix","pod":"apisix-etcd-1"}"#, "text/plain").await?, 400, "InvalidRequest");
    assert_problem(&agent.get("/v1/remediations?limit=0&namespace=apisix", Some(CONTROLLER)).await?, 400, "InvalidRequest");
    assert_problem(&agent.get("/v1/remediations?namespace=No_Such", Some(CONTROLLER)).await?, 400, "InvalidRequest");
    // 413: over 64 KiB, refused before it is read whole.
    let big = json!({"namespace": "apisix", "pod": "apisix-etcd-1", "reason": "x".repeat(70 * 1024)});
    assert_problem(&agent.post(Some(CONTROLLER), &big).await?, 413, "PayloadTooLarge");
    // 404: no such pod, claim, volume, remediation or path; 405: no such method.
    assert_problem(&agent.post(Some(CONTROLLER), &ok("apisix-etcd-9")).await?, 404, "PodNotFound");
    pod_copy(&lab, "apisix-etcd-0", "apisix-etcd-7", NODE_NAME, "data-apisix-etcd-7")?;
    assert_problem(&agent.post(Some(CONTROLLER), &ok("apisix-etcd-7")).await?, 404, "PVCNotFound");
    let claim: PersistentVolumeClaim = serde_json::from_value(json!({
        "metadata": {"name": "data-apisix-etcd-8", "namespace": "apisix"},
        "spec": {"volumeName": "pv-that-is-gone", "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
        "status": {"phase": "Bound"}}))?;
    lab.api.create(&claim)?;
    pod_copy(&lab, "apisix-etcd-0", "apisix-etcd-8", NODE_NAME, "data-apisix-etcd-8")?;
    assert_problem(&agent.post(Some(CONTROLLER), &ok("apisix-etcd-8")).await?, 404, "PVNotFound");
    assert_problem(&agent.get("/v1/remediations/0123456789ab", Some(CONTROLLER)).await?, 404, "RemediationNotFound");
    assert_problem(&agent.get("/v1/remediations/..", Some(CONTROLLER)).await?, 404, "RemediationNotFound");
    assert_problem(&agent.get("/v2/remediations", Some(CONTROLLER)).await?, 404, "NotFound");
    let r = request(agent.addr, "DELETE", "/v1/remediations", &[("Authorization", &auth)], None).await?;
    assert_problem(&r, 405, "MethodNotAllowed");
    // 409: the pod was replaced since the caller looked.
    let r = agent.post(Some(CONTROLLER), &json!({"namespace": "apisix", "pod": "apisix-etcd-1", "podUID": "0000-gone"})).await?;
    assert_problem(&r, 409, "PodUIDMismatch");
    // 421: the pod is another node's; the detail says which.
    pod_copy(&lab, "apisix-etcd-0", "apisix-etcd-6", "lab-node-b", "data-apisix-etcd-0")?;
    let r = agent.post(Some(CONTROLLER), &ok("apisix-etcd-6")).await?;
    assert_problem(&r, 421, "WrongNode");
    assert!(r.json()["detail"].as_str().unwrap().contains("lab-node-b"));
    let mut real_ids: Vec<String> = Vec::new();
    if lab.node.real_mounts {
        // 422: etcd runs on the member's data, forced or not.
        let r = agent.post(Some(CONTROLLER), &ok("apisix-etcd-1")).await?;
        assert_problem(&r, 422, "PodRunning");
        let forced = json!({"namespace": "apisix", "pod": "apisix-etcd-1", "dryRun": true, "force": true});
        assert_problem(&agent.post(Some(CONTROLLER), &forced).await?, 422, "PodRunning");
        // A stopped container that has not failed: PodHealthy; the refused dry run is
        // recorded, and readable by id. Forced, every gate passes: 200 with the plan.
        lab.set.kill_container(2).await;
        lab.api.modify::<Pod>("apisix", "apisix-etcd-2", |p| {
            p.status = Some(
                // The sandbox and its IP stay while the container is stopped, as in a cluster.
                serde_json::from_value(
                    json!({"phase": "Pending", "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}], "containerStatuses": [{
                    "name": "etcd", "ready": false, "restartCount": 0, "image": "", "imageID": "",
                    "state": {"waiting": {"reason": "PodInitializing"}}}]}),
                )
                .unwrap(),
            );
        })?;
        let r = agent.post(Some(CONTROLLER), &ok("apisix-etcd-2")).await?;
        assert_problem(&r, 422, "PodHealthy");
        let id = r.json()["id"].as_str().expect("a refused dry run names its record").to_string();
        let shown = agent.get(&format!("/v1/remediations/{id}"), Some(READER)).await?;
        assert_eq!((shown.status, shown.json()["phase"].clone()), (200, json!("Refused")));
        let forced = json!({"namespace": "apisix", "pod": "apisix-etcd-2", "dryRun": true, "force": true});
        let planned = agent.post(Some(CONTROLLER), &forced).await?;
        assert_eq!(planned.status, 200, "{}", planned.text());
        let plan = planned.json();
        assert_eq!(plan["phase"], "Planned");
        assert!(plan["plan"]["hostPath"].as_str().unwrap().ends_with("/data"), "{plan}");
        assert!(plan["plan"]["move"].as_array().unwrap().iter().any(|m| m["path"] == "member/wal"), "{plan}");
        assert!(etcd_medic_lab::agent::tree(&lab.set.volume_path(2)?).iter().all(|(p, _)| !p.to_string_lossy().contains(".etcd-medic")));
        // A dry run never stands in for a real remediation: the POST starts one (202), whose
        // refusal shows in its phase; a refusal changed nothing, so asking again starts anew.
        let real = agent.post(Some(CONTROLLER), &json!({"namespace": "apisix", "pod": "apisix-etcd-2"})).await?;
        assert_eq!(real.status, 202, "{}", real.text());
        let real_id = real.json()["id"].as_str().unwrap().to_string();
        assert_ne!(real_id, plan["id"].as_str().unwrap());
        let refused = agent.wait_finished(&real_id, Some(CONTROLLER), Duration::from_secs(60)).await?;
        assert_eq!((refused["phase"].as_str(), refused["error"]["code"].as_str()), (Some("Refused"), Some("PodHealthy")), "{refused}");
        let anew = agent.post(Some(CONTROLLER), &json!({"namespace": "apisix", "pod": "apisix-etcd-2"})).await?;
        assert_eq!(anew.status, 202);
        real_ids.push(real_id);
        real_ids.push(anew.json()["id"].as_str().unwrap().to_string());
        agent.wait_finished(real_ids.last().unwrap(), Some(CONTROLLER), Duration::from_secs(60)).await?;
        // Endpoints of another etcd cluster: the gates would guard the wrong cluster. Refused
        // before anything is asked of them, and nothing of them is told back.
        let mut other = etcd_medic_lab::etcd::EtcdCluster::start(1).await?;
        let elsewhere =
            json!({"namespace": "apisix", "pod": "apisix-etcd-2", "dryRun": true, "force": true, "etcdEndpoints": other.endpoints()});
        let r = agent.post(Some(CONTROLLER), &elsewhere).await?;
        assert_problem(&r, 400, "InvalidRequest");
        assert!(r.json()["detail"].as_str().unwrap().contains("must each name a pod of StatefulSet apisix/apisix-etcd"), "{}", r.text());
        assert!(!r.text().contains(&other.endpoints()[0]), "{}", r.text());
        drop(other);
        // The volume shrunk to what it holds plus 4 MiB: no room for the member to fetch a
        // snapshot while the quarantine keeps the old data. InsufficientSpace.
        let volume = lab.set.volume_path(2)?;
        let st = nix::sys::statvfs::statvfs(&volume)?;
        let used = (st.blocks() - st.blocks_free()) as u64 * st.fragment_size() as u64;
        let size = format!("size={}", used + 4 * 1024 * 1024);
        nix::mount::mount(None::<&str>, &volume, None::<&str>, nix::mount::MsFlags::MS_REMOUNT, Some(size.as_str()))?;
        assert_problem(&agent.post(Some(CONTROLLER), &forced).await?, 422, "InsufficientSpace");
    } else {
        etcd_medic_lab::skip("partly: needs root (the gates that need real mounts)");
    }
    // Events only for the real remediations, none for dry runs: they change nothing.
    let ours = etcd_medic_lab::agent::events(&lab, "apisix");
    // Each note names its remediation (a repeat is folded into the first Event's series).
    let of = |e: &k8s_openapi::api::events::v1::Event, id: &str| {
        e.note.as_deref().unwrap_or_default().starts_with(&format!("remediation {id}: "))
    };
    assert!(ours.iter().all(|e| real_ids.iter().any(|id| of(e, id))), "{ours:?}");
    assert_eq!(real_ids.is_empty(), ours.is_empty());
    if let Some(first) = real_ids.first() {
        let refused = ours.iter().find(|e| e.reason.as_deref() == Some("RemediationRefused") && of(e, first));
        let refused = refused.expect("a RemediationRefused Event");
        assert_eq!(refused.type_.as_deref(), Some("Warning"));
        assert!(refused.note.as_deref().unwrap().contains(": PodHealthy:"), "{refused:?}");
        assert_eq!(refused.regarding.as_ref().and_then(|r| r.name.as_deref()), Some("apisix-etcd-2"));
    }
    let metrics = agent.get("/metrics", None).await?.text();
    assert!(metrics.contains(r#"etcd_medic_http_requests_total{route="/v1/remediations",status="401"}"#), "{metrics}");
    assert!(!agent.log_text().contains(CONTROLLER), "tokens never reach the log");
    drop(agent);
    lab.shutdown().await;
    Ok(())
}

/// Not ready while the API server does not answer (POSTs get 503 NotReady); ready, and
/// serving, once it does, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_waits_for_the_api_server_and_refuses_tokens_for_other_audiences() -> Result<()> {
    let lab = Lab::start(SetShape::apisix(1, NODE_NAME)).await?;
    grant(&lab);
    lab.api.add_identity(
        "scoped",
        TokenIdentity { username: "system:serviceaccount:ops:healer".into(), groups: vec![], audiences: vec!["etcd-medic".into()] },
    );
    lab.api.inject(Fault::new("/version", FaultKind::Status(503)));
    let mut how = Serve::new(&lab);
    how.args = vec!["--audience".into(), "etcd-medic".into()];
    let agent = ServedAgent::start(&lab, how).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_problem(&agent.get("/readyz", None).await?, 503, "NotReady");
    assert_problem(
        &agent.post(Some("scoped"), &json!({"namespace": "apisix", "pod": "apisix-etcd-0", "dryRun": true})).await?,
        503,
        "NotReady",
    );
    assert_eq!(agent.get("/healthz", None).await?.status, 200, "alive while not ready");
    lab.api.clear_faults();
    agent.wait_ready(Duration::from_secs(30)).await?;
    // A token for the API server's own audience is not one for the agent.
    assert_problem(&agent.get("/v1/remediations?namespace=apisix", Some(CONTROLLER)).await?, 401, "Unauthenticated");
    let r = agent.get("/v1/remediations?namespace=apisix", Some("scoped")).await?;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["items"], json!([]));
    drop(agent);
    lab.shutdown().await;
    Ok(())
}

/// 1,000 concurrent bad requests: every one answered with a 4xx and a code, /healthz
/// answers throughout, and then a controller heals the reference failure over HTTP: 202
/// and Location at once, the same remediation for a repeated POST, Events on the pod,
/// metrics, and the history still there after the agent restarts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_heals_over_http_after_a_flood_of_bad_requests() -> Result<()> {
    let (lab, old_id) = crate::reference_failure::broken_lab().await?;
    if !lab.node.real_mounts {
        etcd_medic_lab::skip("needs root: the heal acts on real mounts");
        return Ok(());
    }
    grant(&lab);
    let mut agent = ServedAgent::start(&lab, Serve::new(&lab)).await?;
    agent.wait_ready(Duration::from_secs(30)).await?;

    let addr = agent.addr;
    let big = vec![b'x'; 80 * 1024];
    let flood: Vec<_> = (0..1000)
        .map(|i| {
            let big = big.clone();
            tokio::spawn(async move {
                let auth = format!("Bearer {CONTROLLER}");
                let (body, headers): (Vec<u8>, Vec<(&str, &str)>) = match i % 4 {
                    0 => (b"{not json".to_vec(), vec![("Authorization", auth.as_str()), ("Content-Type", "application/json")]),
                    1 => (big, vec![("Authorization", auth.as_str())]),
                    2 => (br#"{"namespace":"apisix","pod":"apisix-etcd-1"}"#.to_vec(), vec![]),
                    _ => (br#"{"namespace":"a b","pod":"x"}"#.to_vec(), vec![("Authorization", auth.as_str())]),
                };
                request(addr, "POST", "/v1/remediations", &headers, Some(&body))
                    .await
                    .with_context(|| format!("flood request {i} (kind {})", i % 4))
            })
        })
        .collect();
    // The probes and /metrics never pass through /v1's rate limit, in-flight bound or auth.
    for probe in ["/healthz", "/readyz", "/metrics"] {
        let r = agent.get(probe, None).await?;
        assert_eq!(r.status, 200, "{probe} answers while /v1 is flooded: {}", r.text());
    }
    let mut by_status = std::collections::BTreeMap::<u16, usize>::new();
    for f in flood {
        let r = f.await??;
        assert!((400..500).contains(&r.status) && r.code().is_some(), "{} {}", r.status, r.text());
        *by_status.entry(r.status).or_default() += 1;
    }
    assert!(by_status.contains_key(&429), "one client flooding is rate limited: {by_status:?}");
    eprintln!("1000 bad requests answered: {by_status:?}");
    assert_eq!(agent.get("/healthz", None).await?.status, 200);
    assert_eq!(
        etcd_medic_lab::agent::tree(&lab.set.volume_path(1)?).iter().filter(|(p, _)| p.to_string_lossy().contains(".etcd-medic")).count(),
        0
    );

    // The controller's call, once its bucket refilled.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let uid = lab.set.pod_uid(1)?;
    let ask = json!({"namespace": "apisix", "pod": "apisix-etcd-1", "podUID": uid, "reason": "alert EtcdMemberCrashLooping"});
    let started = agent.post(Some(CONTROLLER), &ask).await?;
    assert_eq!(started.status, 202, "{}", started.text());
    let id = started.json()["id"].as_str().unwrap().to_string();
    assert_eq!(started.header("location"), Some(format!("/v1/remediations/{id}").as_str()));
    assert_eq!(started.json()["phase"], "Pending");
    let again = agent.post(Some(CONTROLLER), &ask).await?;
    assert_eq!((again.status, again.json()["id"].as_str()), (200, Some(id.as_str())), "one remediation per pod instance");
    // Once the pod was replaced (a new UID), asking for the pod while the remediation still
    // verifies is answered with it too: one remediation per pod at a time.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while agent.get(&format!("/v1/remediations/{id}"), Some(CONTROLLER)).await?.json()["step"] != "Verify" {
        assert!(tokio::time::Instant::now() < deadline, "never reached Verify");
        // Under the agent's default rate limit (10 per second per client).
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let during = agent.post(Some(CONTROLLER), &json!({"namespace": "apisix", "pod": "apisix-etcd-1"})).await?;
    if during.status == 202 {
        // Only if it had finished in between.
        let first = agent.get(&format!("/v1/remediations/{id}"), Some(CONTROLLER)).await?.json();
        assert!(first["finishedAt"].is_string(), "a second remediation beside a running one: {}", during.text());
    } else {
        assert_eq!((during.status, during.json()["id"].as_str()), (200, Some(id.as_str())), "{}", during.text());
    }
    // The rest as a controller written against etcd-medic-client does it: the agent of the
    // pod's node found through the EndpointSlices of the agents' Service, then typed calls.
    lab.api.create::<k8s_openapi::api::discovery::v1::EndpointSlice>(&serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "etcd-medic-x1", "namespace": "etcd-medic", "labels": {"kubernetes.io/service-name": "etcd-medic"}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": agent.addr.port(), "protocol": "TCP"}],
        "endpoints": [{"addresses": ["10.9.9.9"], "nodeName": "another-node", "conditions": {"ready": true}},
                      {"addresses": [agent.addr.ip().to_string()], "nodeName": NODE_NAME, "conditions": {"ready": true}}],
    }))?)?;
    let url = etcd_medic_client::discover::agent_on_node(&lab.api.client().await?, "etcd-medic", "etcd-medic", NODE_NAME).await?;
    assert_eq!(url, format!("http://{}", agent.addr));
    let reader = etcd_medic_client::AgentClient::new(&url)?.with_token(READER);
    let typed = reader.wait(&id, Duration::from_secs(240)).await?;
    let listed = reader.list(Some("apisix"), Some(10)).await?;
    assert!(listed.items.iter().any(|r| r.id == id && r.phase == typed.phase), "{listed:?}");
    let done = serde_json::to_value(&typed)?;
    assert_eq!(done["phase"], "Succeeded", "{done:#}\n{}", agent.log_text());
    // Restore through the API: `update` is required, and a running etcd holds the data.
    let denied = reader.restore(&id, true).await.unwrap_err();
    assert_eq!(denied.code, etcd_medic::Code::Forbidden, "{denied}");
    let controller = etcd_medic_client::AgentClient::new(&url)?.with_token(CONTROLLER);
    // The heal changed membership: the old data is a removed member's, put back only forced.
    let removed = controller.restore(&id, false).await.unwrap_err();
    assert_eq!(removed.code, etcd_medic::Code::QuorumAtRisk, "{removed}");
    let held = controller.restore(&id, true).await.unwrap_err();
    assert_eq!(held.code, etcd_medic::Code::PodRunning, "{held}");
    assert_eq!(controller.restore("nosuchid", false).await.unwrap_err().code, etcd_medic::Code::RemediationNotFound);
    let steps: Vec<&str> = done["steps"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(steps, ["Check", "Lock", "Quarantine", "Membership", "Restart", "Verify", "Retention"]);
    assert!(done["steps"].as_array().unwrap().iter().all(|s| s["outcome"] == "Done" && s["end"].is_string()));
    assert_eq!(done["reason"], "alert EtcdMemberCrashLooping");
    crate::reference_failure::assert_every_key(&lab, 3, crate::reference_failure::KEYS).await?;
    let members = etcd_medic_lab::etcd::member_list(&lab.set.endpoints()).await?;
    assert!(members.iter().all(|m| m.id != old_id), "the stale id is gone");

    // What a person watching sees: Events on the pod and the metrics.
    let reasons: Vec<String> = etcd_medic_lab::agent::events(&lab, "apisix").into_iter().filter_map(|e| e.reason).collect();
    for want in ["RemediationStarted", "DataQuarantined", "PodRestarted", "MemberRejoined"] {
        assert!(reasons.iter().any(|r| r == want), "{want} missing from {reasons:?}");
    }
    let metrics = agent.get("/metrics", None).await?.text();
    for want in
        [r#"etcd_medic_remediations_total{outcome="Succeeded",code=""} 1"#, "etcd_medic_remediations_in_flight 0", r#"step="Quarantine""#]
    {
        assert!(metrics.contains(want), "{want} missing from\n{metrics}");
    }
    assert!(!metrics.contains("etcd_medic_last_success_timestamp_seconds 0.0"), "{metrics}");
    // The log is JSON, and each line of the remediation carries its id.
    assert!(agent.log_text().lines().filter(|l| l.contains("step started")).all(|l| l.contains(&id)), "{}", agent.log_text());

    // History survives a restart: the journal is the source of truth.
    assert!(agent.terminate(Duration::from_secs(20)).await.is_some_and(|s| s.success()), "SIGTERM: a clean exit");
    let agent = ServedAgent::start(&lab, Serve::new(&lab)).await?;
    agent.wait_ready(Duration::from_secs(30)).await?;
    let list = agent.get("/v1/remediations?namespace=apisix", Some(READER)).await?;
    assert_eq!(list.json()["items"][0]["id"], id.as_str(), "newest first: {}", list.text());
    assert_eq!(list.json()["items"][0]["phase"], "Succeeded");
    drop(agent);
    lab.shutdown().await;
    Ok(())
}

/// SIGTERM while a remediation is under way: the agent stops at the next safe point, keeps
/// the journal Running (and the cluster's lease), exits cleanly; the next start resumes
/// it without a new request, and it succeeds with nothing done twice. Meanwhile the
/// crash-looping image re-added itself on the emptied data dir and was stopped before etcd
/// started (a race CI met: the resume counted that entry as a fourth voter and refused
/// `QuorumAtRisk`); the entry is the pod's own, not another voter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_at_a_safe_point_and_the_next_start_resumes() -> Result<()> {
    let (lab, _) = crate::reference_failure::broken_lab().await?;
    if !lab.node.real_mounts {
        etcd_medic_lab::skip("needs root: the heal acts on real mounts");
        return Ok(());
    }
    grant(&lab);
    // The leases in the agent's own namespace, as the DaemonSet of deploy/ keeps them.
    let mut how = Serve::new(&lab);
    how.args = vec!["--lease-namespace".into(), "etcd-medic".into()];
    how.env = vec![("ETCD_MEDIC_FAILPOINT".into(), "after:Quarantine".into())];
    let mut agent = ServedAgent::start(&lab, how).await?;
    agent.wait_ready(Duration::from_secs(30)).await?;
    let uid_before = lab.set.pod_uid(1)?;
    // The crash loop parked, so that the image's re-add below happens exactly once.
    lab.set.hold_restarts(1, Duration::from_secs(60)).await?;
    let started = agent.post(Some(CONTROLLER), &json!({"namespace": "apisix", "pod": "apisix-etcd-1"})).await?;
    assert_eq!(started.status, 202, "{}", started.text());
    let id = started.json()["id"].as_str().unwrap().to_string();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let r = agent.get(&format!("/v1/remediations/{id}"), Some(CONTROLLER)).await?.json();
        if r["steps"].as_array().is_some_and(|s| s.iter().any(|s| s["name"] == "Quarantine" && s["outcome"] == "Done")) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never quarantined: {r}\n{}", agent.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The image's `member add` on the emptied data dir, stopped before etcd started.
    let others = lab.set.other_endpoints(1);
    let (added, _) = etcd_medic_lab::etcd::member_add(&others, &lab.set.members()[1].peer_url(), false).await?;
    let exit = agent.terminate(Duration::from_secs(20)).await;
    assert!(exit.is_some_and(|s| s.success()), "a clean exit on SIGTERM: {exit:?}\n{}", agent.log_text());
    let journal = etcd_medic::journal::read(&agent.state_dir, &id)?;
    assert_eq!(journal.phase, etcd_medic::engine::Phase::Running, "left for the resume");
    assert_eq!(lab.set.pod_uid(1)?, uid_before, "stopped before the restart");
    let leases = lab.api.list::<k8s_openapi::api::coordination::v1::Lease>(Some("etcd-medic"));
    assert!(
        leases.iter().any(|l| l.spec.as_ref().and_then(|s| s.holder_identity.as_deref()) == Some(&format!("{NODE_NAME}/{id}"))),
        "the cluster stays locked for the resume"
    );

    let mut how = Serve::new(&lab);
    how.args = vec!["--lease-namespace".into(), "etcd-medic".into()];
    let agent = ServedAgent::start(&lab, how).await?;
    lab.set.release_restarts();
    let done = agent.wait_finished(&id, Some(CONTROLLER), Duration::from_secs(240)).await?;
    assert_eq!(done["phase"], "Succeeded", "{done:#}\n{}", agent.log_text());
    let members = etcd_medic_lab::etcd::member_list(&others).await?;
    assert!(!members.iter().any(|m| m.id == added.id), "the unstarted entry went when the pod restarted: {members:?}");
    let names: Vec<&str> = done["steps"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names.iter().filter(|n| **n == "Quarantine").count(), 1, "{names:?}");
    assert!(names.contains(&"Resume"), "{names:?}");
    crate::reference_failure::assert_every_key(&lab, 3, crate::reference_failure::KEYS).await?;
    drop(agent);
    lab.shutdown().await;
    Ok(())
}

/// schemathesis (from PyPI) against `/openapi.json` of a served agent on a healthy lab:
/// generated and mutated requests on every operation, with and without a token, and no
/// answer the document does not describe, no server error. `ETCD_MEDIC_SCHEMATHESIS` names
/// the `st` binary (`.ci/run` installs it); CI fails without it, elsewhere it is skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_nothing_the_document_does_not_promise() -> Result<()> {
    let Some(st) = std::env::var_os("ETCD_MEDIC_SCHEMATHESIS") else {
        assert!(std::env::var_os("CI").is_none(), "CI must run schemathesis: set ETCD_MEDIC_SCHEMATHESIS to the `st` binary");
        eprintln!("skipped: ETCD_MEDIC_SCHEMATHESIS is not set");
        return Ok(());
    };
    let lab = Lab::start(SetShape::apisix(3, NODE_NAME)).await?;
    grant(&lab);
    let mut how = Serve::new(&lab);
    how.args = vec!["--rate-limit".into(), "100000".into(), "--max-in-flight".into(), "256".into()];
    let agent = ServedAgent::start(&lab, how).await?;
    agent.wait_ready(Duration::from_secs(30)).await?;
    let reports = lab.dir.path().join("schemathesis");
    let out = tokio::process::Command::new(st)
        .arg("run")
        .arg(format!("http://{}/openapi.json", agent.addr))
        .args(["--checks", "all", "--exclude-checks", "positive_data_acceptance", "--max-examples", "60", "--seed", "1"])
        // One worker: CPython 3.11 can fail parsing lambda sources in two threads at once
        // ("AST constructor recursion depth mismatch"), a crash of the tool, not a finding.
        .args(["--workers", "1", "--no-color", "--header", &format!("Authorization: Bearer {CONTROLLER}")])
        .arg("--report-dir")
        .arg(&reports)
        .env("SCHEMATHESIS_HOOKS", "")
        .output()
        .await?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis found problems:\n{text}\n{}\nagent log tail:\n{}",
        String::from_utf8_lossy(&out.stderr),
        tail(&agent.log_text(), 40)
    );
    eprintln!("{}", tail(&text, 25));
    drop(agent);
    lab.shutdown().await;
    Ok(())
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// HTTPS from a certificate and key on disk, and a rotated pair served without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_the_rotated_certificate_without_a_restart() -> Result<()> {
    let lab = Lab::start(SetShape::apisix(1, NODE_NAME)).await?;
    let dir = lab.dir.path().join("tls");
    std::fs::create_dir_all(&dir)?;
    let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    // A self-signed pair for 127.0.0.1, written as a rotation writes it: aside, then renamed.
    let issue_with = |name: &str, san: &str| -> Result<std::path::PathBuf> {
        let (c, k) = (dir.join(format!("{name}.crt")), dir.join(format!("{name}.key")));
        let out = std::process::Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1"])
            .args(["-subj", &format!("/CN={name}"), "-addext", san])
            // An end-entity certificate (rustls refuses a CA as a server's certificate).
            .args(["-addext", "basicConstraints=critical,CA:FALSE"])
            .arg("-keyout")
            .arg(&k)
            .arg("-out")
            .arg(&c)
            .output()?;
        anyhow::ensure!(out.status.success(), "openssl: {}", String::from_utf8_lossy(&out.stderr));
        std::fs::copy(&k, dir.join("tls.key.new"))?;
        std::fs::copy(&c, dir.join("tls.crt.new"))?;
        std::fs::rename(dir.join("tls.key.new"), &key)?;
        std::fs::rename(dir.join("tls.crt.new"), &cert)?;
        Ok(c)
    };
    let issue = |name: &str| issue_with(name, "subjectAltName=IP:127.0.0.1");
    let first = issue("first")?;
    let mut how = Serve::new(&lab);
    how.args = vec!["--tls-cert-file".into(), cert.to_string_lossy().into(), "--tls-key-file".into(), key.to_string_lossy().into()];
    let agent = ServedAgent::start(&lab, how).await?;
    let curl = |ca: &std::path::Path| {
        let out = std::process::Command::new("curl")
            .args(["-sS", "--max-time", "5", "--cacert"])
            .arg(ca)
            .arg(format!("https://{}/healthz", agent.addr))
            .output()
            .expect("curl runs");
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    assert_eq!(curl(&first), (true, "ok".to_string()), "served with the first certificate");
    let plain = request(agent.addr, "GET", "/healthz", &[], None).await;
    assert!(plain.is_err() || plain.is_ok_and(|r| r.status != 200), "no plain HTTP on a TLS port");

    tokio::time::sleep(Duration::from_millis(1100)).await;
    let second = issue("second")?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !curl(&second).0 {
        assert!(tokio::time::Instant::now() < deadline, "the rotated certificate was not served:\n{}", agent.log_text());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(!curl(&first).0, "the first certificate is no longer served");
    assert!(agent.log_text().contains("TLS certificate reloaded"));

    // One certificate for the agents' Service name serves every agent, reached by pod IP:
    // the client verifies that name, never any other (the controller's
    // --agent-server-name).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let service = "etcd-medic.etcd-medic.svc";
    let named = issue_with("named", &format!("subjectAltName=DNS:{service}"))?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let ca = std::fs::read(&named)?;
    let url = format!("https://{}", agent.addr);
    let asked = |name: Option<&'static str>| {
        let client = etcd_medic_client::AgentClient::with_ca_for(&url, &ca, name).expect("a client");
        async move { client.list(None, None).await }
    };
    // No token: an answer at all (401) proves the TLS handshake; a TLS failure is no answer.
    loop {
        let e = asked(Some(service)).await.err();
        if e.as_ref().map(|e| e.code) == Some(etcd_medic_core::Code::Unauthenticated) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the named certificate was not served ({e:?}):\n{}", agent.log_text());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let by_ip = asked(None).await.expect_err("the certificate names no IP");
    assert_eq!(by_ip.code, etcd_medic_core::Code::NotReady, "{by_ip:?}");
    let other = asked(Some("etcd-medic.other.svc")).await.expect_err("another name");
    assert_eq!(other.code, etcd_medic_core::Code::NotReady, "{other:?}");
    drop(agent);
    lab.shutdown().await;
    Ok(())
}
