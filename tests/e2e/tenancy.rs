//! Tenants against each other, mounted for real. A tenant owns a namespace: it creates pods and
//! StatefulSets there, chooses what its etcd prints and answers, writes its volumes, and may
//! call the agent for its own namespace (as `etcd-medic-caller` lets it). Nothing it does may
//! reach another tenant's cluster, or tell it anything about one.

use std::time::Duration;

use anyhow::Result;
use etcd_medic_lab::agent::{Serve, ServedAgent};
use etcd_medic_lab::apiserver::TokenIdentity;
use etcd_medic_lab::etcd::ClusterState;
use etcd_medic_lab::objects::{SetShape, StartProfile};
use etcd_medic_lab::statefulset::{SimOptions, StatefulSetSim};
use etcd_medic_lab::{Lab, NODE_NAME};
use serde_json::json;

const TENANT: &str = "tenant-token";
const VICTIM: &str = "victim-token";

/// A TCP relay: every connection to `listen` is spliced to `to`.
async fn relay(listen: std::net::SocketAddr, to: String) -> Result<tokio::task::JoinHandle<()>> {
    let l = tokio::net::TcpListener::bind(listen).await?;
    Ok(tokio::spawn(async move {
        while let Ok((mut inbound, _)) = l.accept().await {
            let to = to.clone();
            tokio::spawn(async move {
                if let Ok(mut out) = tokio::net::TcpStream::connect(to).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                }
            });
        }
    }))
}

/// The victim (the APISIX release, healthy, with its keys) and a tenant's StatefulSet of two
/// plain pods (`existing` once installed, as the agent requires): pod 0 crash-loops on its
/// data, pod 1's client port is a relay to the victim's first member. The tenant may call the agent for its namespace only.
struct Attack {
    lab: Lab,
    tenant: StatefulSetSim,
    _relay: tokio::task::JoinHandle<()>,
}

impl Attack {
    async fn mount() -> Result<Option<Attack>> {
        let lab = Lab::start(SetShape::apisix(3, NODE_NAME)).await?;
        if !lab.node.real_mounts {
            etcd_medic_lab::skip("needs root: the tenant's pod needs a real volume");
            lab.shutdown().await;
            return Ok(None);
        }
        lab.write_keys(20).await?;
        let mut shape = SetShape::apisix(2, NODE_NAME);
        (shape.namespace, shape.release, shape.cluster_token) = ("tenant".into(), "evil".into(), "evil-token".into());
        shape.profile = StartProfile::Plain { state: ClusterState::Existing };
        let tenant =
            StatefulSetSim::start(lab.api.clone(), lab.node.clone(), shape, lab.dir.path().join("tenant-logs"), SimOptions::default())
                .await?;
        // The tenant's own two-member cluster, then both containers stopped and kept from
        // starting: pod 0 fails on its real data, pod 1's client port is free for the relay.
        tenant.wait_all_ready(Duration::from_secs(60)).await?;
        tenant.switches().hold_restarts.store(true, std::sync::atomic::Ordering::SeqCst);
        for i in [0, 1] {
            tenant.crash_container(i)?;
            tenant.hold_restarts(i, Duration::from_secs(30)).await?;
        }
        let client = tenant.members()[1].client_url();
        let listen = client.trim_start_matches("http://").parse()?;
        let victim = lab.set.members()[0].client_url().trim_start_matches("http://").to_string();
        let _relay = relay(listen, victim).await?;
        lab.api.add_identity(
            TENANT,
            TokenIdentity {
                username: "system:serviceaccount:tenant:caller".into(),
                groups: vec!["system:authenticated".into()],
                audiences: vec![],
            },
        );
        lab.api.allow_remediations("system:serviceaccount:tenant:caller", Some("tenant"));
        lab.api.add_identity(
            VICTIM,
            TokenIdentity {
                username: "system:serviceaccount:apisix:caller".into(),
                groups: vec!["system:authenticated".into()],
                audiences: vec![],
            },
        );
        lab.api.allow_remediations("system:serviceaccount:apisix:caller", Some("apisix"));
        Ok(Some(Attack { lab, tenant, _relay }))
    }

    /// The victim's cluster id and members (id, learner) as the victim sees them.
    async fn victim(&self) -> Result<(u64, Vec<(u64, bool)>)> {
        let mut c = etcd_medic_lab::etcd::live_client(&self.lab.set.endpoints()).await?;
        let list = c.member_list().await?;
        let mut m: Vec<(u64, bool)> = list.members().iter().map(|m| (m.id(), m.is_learner())).collect();
        m.sort();
        Ok((list.header().map(|h| h.cluster_id()).unwrap_or_default(), m))
    }

    async fn shutdown(self) {
        self.tenant.shutdown().await;
        self.lab.shutdown().await;
    }
}

/// A relay in the tenant's pod to the victim's client port: the dry run is refused
/// `ForeignMember` and tells nothing of the victim (its cluster id, names, URLs); the real run
/// is refused at Check, before anything moves, and the victim's membership is as it was: the
/// tenant's peer URL never joins it, not as a learner, not as a voter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_to_another_tenants_etcd_gets_nothing_of_it() -> Result<()> {
    let Some(attack) = Attack::mount().await? else { return Ok(()) };
    let agent = ServedAgent::start(&attack.lab, Serve::new(&attack.lab)).await?;
    agent.wait_ready(Duration::from_secs(30)).await?;
    let before = attack.victim().await?;
    let victim_names = ["apisix-etcd-0", "apisix-etcd-1", "apisix-etcd-2"];
    let victim_urls: Vec<String> = attack.lab.set.members().iter().flat_map(|m| [m.peer_url(), m.client_url()]).collect();
    let tells_nothing = |text: &str| {
        assert!(
            !text.contains(&format!("{:016x}", before.0)) && !text.contains(&format!("{:x}", before.0)),
            "the victim's cluster id: {text}"
        );
        for n in victim_names.iter().map(|s| s.to_string()).chain(victim_urls.iter().cloned()) {
            assert!(!text.contains(&n), "{n} told: {text}");
        }
    };

    let ask = |dry: bool| json!({"namespace": "tenant", "pod": "evil-etcd-0", "force": true, "dryRun": dry});
    let dry = agent.post(Some(TENANT), &ask(true)).await?;
    assert_eq!((dry.status, dry.code().as_deref()), (422, Some("ForeignMember")), "{}", dry.text());
    tells_nothing(&dry.text());

    let real = agent.post(Some(TENANT), &ask(false)).await?;
    assert_eq!(real.status, 202, "{}", real.text());
    let id = real.json()["id"].as_str().unwrap().to_string();
    let done = agent.wait_finished(&id, Some(TENANT), Duration::from_secs(60)).await?;
    assert_eq!((done["phase"].as_str(), done["error"]["code"].as_str()), (Some("Refused"), Some("ForeignMember")), "{done}");
    tells_nothing(&done.to_string());
    assert!(done["quarantine"].is_null(), "nothing moved: {done}");
    let listed = agent.get("/v1/remediations?namespace=tenant", Some(TENANT)).await?;
    tells_nothing(&listed.text());

    // No lock was taken in the victim's name: locks are named by namespace and set UID.
    let leases: Vec<k8s_openapi::api::coordination::v1::Lease> = attack.lab.api.list(None);
    let names: Vec<String> = leases.iter().filter_map(|l| l.metadata.name.clone()).collect();
    assert!(names.iter().all(|n| !n.contains(&format!("{:016x}", before.0)) && !n.contains("apisix")), "{names:?}");
    // The victim: the same members, none added; its keys are all there.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(attack.victim().await?, before, "the victim's membership did not change");
    let mut c = etcd_medic_lab::etcd::live_client(&attack.lab.set.endpoints()).await?;
    assert_eq!(c.get("/apisix/routes/", Some(etcd_client::GetOptions::new().with_prefix().with_count_only())).await?.count(), 20);
    assert!(!agent.log_text().contains(&format!("{:016x}", before.0)), "nor in the agent's log");

    // A flood of the tenant's dry runs keeps 20 of its journals, small ones, and never
    // pushes out the victim's own (made first, as the controller's dry run would be).
    let victims = agent.post(Some(VICTIM), &json!({"namespace": "apisix", "pod": "apisix-etcd-1", "dryRun": true})).await?;
    let victims_id = victims.json()["id"].as_str().unwrap_or_default().to_string();
    assert!(!victims_id.is_empty(), "{}", victims.text());
    let rss = |pid: u32| -> String {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).map(|l| l.trim_start_matches("VmRSS:").trim().to_string()))
            .unwrap_or_default()
    };
    let rss_before = rss(agent.pid());
    let mut sent = 0;
    while sent < 60 {
        let r = agent.post(Some(TENANT), &ask(true)).await?;
        match r.status {
            429 => tokio::time::sleep(Duration::from_millis(100)).await,
            _ => {
                assert_eq!(r.code().as_deref(), Some("ForeignMember"), "{}", r.text());
                sent += 1;
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    eprintln!("agent RSS before 60 dry runs through the relay: {rss_before}, after: {}", rss(agent.pid()));
    let journals: Vec<(String, u64)> = std::fs::read_dir(Serve::new(&attack.lab).state_dir.join("remediations"))?
        .flatten()
        .map(|e| (std::fs::read_to_string(e.path()).unwrap_or_default(), e.metadata().map(|m| m.len()).unwrap_or(0)))
        .collect();
    let tenants = journals.iter().filter(|(j, _)| j.contains(r#""namespace": "tenant""#)).count();
    assert!(tenants <= 21, "{tenants} of the tenant's journals kept");
    assert!(journals.iter().all(|(_, len)| *len < 16 * 1024), "journals stay small");
    let kept = agent.get(&format!("/v1/remediations/{victims_id}"), Some(VICTIM)).await?;
    assert_eq!(kept.status, 200, "the victim's journal is kept: {}", kept.text());
    drop(agent);
    attack.shutdown().await;
    Ok(())
}

/// One slow POST: its headers from `from`, then one byte of a 100-byte body and nothing more.
/// Answers the status line it finally got, and after how long.
async fn slow_post(agent: std::net::SocketAddr, from: std::net::IpAddr, token: Option<String>) -> Result<(String, Duration)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind((from, 0).into())?;
    let mut s = socket.connect(agent).await?;
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let head =
        format!("POST /v1/remediations HTTP/1.1\r\nHost: agent\r\n{auth}Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{");
    let started = tokio::time::Instant::now();
    s.write_all(head.as_bytes()).await?;
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut raw)).await;
    let text = String::from_utf8_lossy(&raw);
    Ok((text.lines().next().unwrap_or("(no answer)").to_string(), started.elapsed()))
}

/// Slow bodies from 40 pods of 40 tenants' identities and 40 unauthenticated ones, all at
/// once, with the agent as the chart runs it (32 slots, the controller's identity reserved):
/// the unauthenticated are answered 401 at once, no identity holds more than its share, no
/// slow body is held past 5 s, and the controller's calls are answered throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_bodies_take_no_slot_from_the_controller() -> Result<()> {
    let lab = Lab::start(SetShape::apisix(1, NODE_NAME)).await?;
    const CONTROLLER: &str = "controller-token";
    let controller = "system:serviceaccount:etcd-medic:etcd-medic-controller";
    lab.api.add_identity(CONTROLLER, TokenIdentity { username: controller.into(), groups: vec![], audiences: vec![] });
    lab.api.allow_remediations(controller, None);
    for i in 0..40 {
        let user = format!("system:serviceaccount:tenant-{i}:caller");
        lab.api.add_identity(&format!("slow-{i}"), TokenIdentity { username: user.clone(), groups: vec![], audiences: vec![] });
        lab.api.allow_remediations(&user, Some(&format!("tenant-{i}")));
    }
    let mut how = Serve::new(&lab);
    how.args = vec!["--reserved-for".into(), controller.into()];
    let agent = ServedAgent::start(&lab, how).await?;
    agent.wait_ready(Duration::from_secs(30)).await?;
    // Their tokens reviewed once, as a caller that called before would have them.
    for i in 0..40 {
        agent.get("/v1/remediations?namespace=tenant-0", Some(&format!("slow-{i}"))).await?;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    let addr = agent.addr;
    let slow: Vec<_> = (0..80u8)
        .map(|i| {
            let from = std::net::IpAddr::from([127, 0, 1, i + 1]);
            let token = (i < 40).then(|| format!("slow-{i}"));
            tokio::spawn(slow_post(addr, from, token))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut took = Vec::new();
    for _ in 0..40 {
        let t = tokio::time::Instant::now();
        let r = agent.get("/v1/remediations?namespace=apisix", Some(CONTROLLER)).await?;
        took.push(t.elapsed());
        assert_eq!(r.status, 200, "the controller is served during the flood: {}", r.text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut by_line = std::collections::BTreeMap::<String, Vec<Duration>>::new();
    for s in slow {
        let (line, after) = s.await??;
        by_line.entry(line).or_default().push(after);
    }
    took.sort();
    eprintln!(
        "the controller's GET during 80 slow bodies ({} calls): median {:?}, p99 {:?}; slow ones: {:?}",
        took.len(),
        took[took.len() / 2],
        took[(took.len() * 99).div_ceil(100) - 1],
        by_line.iter().map(|(l, d)| (l.as_str(), d.len(), d.iter().max())).collect::<Vec<_>>()
    );
    let count = |prefix: &str| by_line.iter().filter(|(l, _)| l.starts_with(prefix)).map(|(_, d)| d.len()).sum::<usize>();
    assert_eq!(count("HTTP/1.1 401"), 40, "{by_line:?}");
    assert_eq!(count("HTTP/1.1 400") + count("HTTP/1.1 429"), 40, "{by_line:?}");
    assert!(count("HTTP/1.1 400") <= 24, "no more slow bodies than the shared slots: {by_line:?}");
    for (line, after) in &by_line {
        assert!(after.iter().all(|d| *d < Duration::from_secs(15)), "{line}: answered within the body timeout: {after:?}");
    }
    drop(agent);
    lab.shutdown().await;
    Ok(())
}

/// A restore whose volume stops answering midway (its disk work held, as on a hung
/// filesystem): its caller is answered `NotReady` within the wait, the pod is kept from any
/// remediation until the work ends (`ClusterLocked`), and every other pod on the node is
/// served at once, as is every probe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_restore_holds_only_its_own_pod() -> Result<()> {
    let Some((lab, _)) = crate::reference_failure::broken_lab_with_mounts().await? else { return Ok(()) };
    let healed = etcd_medic_lab::agent::remediate(&lab, "apisix-etcd-1", false).await?;
    assert_eq!(healed.phase, etcd_medic::engine::Phase::Succeeded, "{healed:?}");
    // The member stopped, so that its quarantine may go back.
    lab.set.switches().hold_restarts.store(true, std::sync::atomic::Ordering::SeqCst);
    lab.set.crash_container(1)?;
    lab.set.hold_restarts(1, Duration::from_secs(30)).await?;
    let how = Serve { auth: "none", env: vec![("ETCD_MEDIC_FAILPOINT".into(), "in:Restore".into())], ..Serve::new(&lab) };
    let agent = ServedAgent::start(&lab, how).await?;
    agent.wait_ready(Duration::from_secs(30)).await?;
    let addr = agent.addr;
    let id = healed.id.clone();
    let restore = tokio::spawn(async move {
        let t = tokio::time::Instant::now();
        let r = etcd_medic_lab::http::request(addr, "POST", &format!("/v1/remediations/{id}/restore?force=true"), &[], None).await;
        (r, t.elapsed())
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Other pods are served meanwhile, at once; this pod is not remediated beside the restore.
    let t = tokio::time::Instant::now();
    let other = agent.post(None, &json!({"namespace": "apisix", "pod": "apisix-etcd-2", "dryRun": true})).await?;
    let other_took = t.elapsed();
    assert_eq!(other.code().as_deref(), Some("PodRunning"), "{}", other.text());
    assert_eq!(agent.get("/healthz", None).await?.status, 200);
    let same = agent.post(None, &json!({"namespace": "apisix", "pod": "apisix-etcd-1"})).await?;
    assert_eq!((same.status, same.code().as_deref()), (409, Some("ClusterLocked")), "{}", same.text());
    let again =
        etcd_medic_lab::http::request(addr, "POST", &format!("/v1/remediations/{}/restore?force=true", healed.id), &[], None).await?;
    assert_eq!(again.code().as_deref(), Some("ClusterLocked"), "{}", again.text());
    let (r, took) = restore.await?;
    let r = r?;
    assert_eq!((r.status, r.code().as_deref()), (503, Some("NotReady")), "{}", r.text());
    eprintln!("another pod's dry run during the hung restore: {other_took:?}; the restore's caller answered after {took:?}");
    drop(agent);
    lab.shutdown().await;
    Ok(())
}

/// A process of `root` (chrooted there, running the node's `sleep` copied in with its
/// libraries) that names `data_dir` as its etcd data dir, as a tenant's etcd would.
fn chrooted_sleeper(root: &std::path::Path, data_dir: &str) -> Result<std::process::Child> {
    use std::os::unix::process::CommandExt;
    let sleep = std::path::Path::new("/usr/bin/sleep");
    let ldd = std::process::Command::new("ldd").arg(sleep).output()?;
    let libs = String::from_utf8_lossy(&ldd.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
        .map(std::path::PathBuf::from)
        .collect::<Vec<_>>();
    for f in libs.iter().map(|p| p.as_path()).chain([sleep]) {
        let to = root.join(f.strip_prefix("/")?);
        std::fs::create_dir_all(to.parent().unwrap())?;
        std::fs::copy(f, &to)?;
    }
    let root = root.to_path_buf();
    let mut cmd = std::process::Command::new("/usr/bin/sleep");
    cmd.arg("600").env_clear().env("ETCD_DATA_DIR", data_dir);
    // SAFETY: chroot and chdir only, between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::chroot(&root)?;
            nix::unistd::chdir("/")?;
            Ok(())
        });
    }
    Ok(cmd.spawn()?)
}

/// A tenant's process names its data dir through a link to another tenant's data (its `/data`
/// is a link to the victim's host path). Followed from `/proc/<pid>/root`, that absolute link
/// resolved in the agent's own root: the tenant's process "held" the victim's data, and every
/// heal of the victim was refused PodRunning. Resolved inside the process's root, it leads
/// nowhere; a process whose data dir really is the victim's still holds it.
#[test]
fn a_tenants_data_dir_link_never_makes_it_hold_another_tenants_data() -> Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        etcd_medic_lab::skip("chroot needs root");
        return Ok(());
    }
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir()?;
    let victim = dir.path().join("victim");
    std::fs::create_dir_all(victim.join("data/member/wal"))?;
    let tenant = dir.path().join("tenant");
    std::fs::create_dir_all(&tenant)?;
    std::os::unix::fs::symlink(victim.join("data"), tenant.join("data"))?;
    let m = std::fs::metadata(victim.join("data"))?;
    let data_id = Some((m.dev(), m.ino()));
    let mut attacker = chrooted_sleeper(&tenant, "/data")?;
    let mut owner = chrooted_sleeper(&victim, "/data")?;
    // Both have exec'd once their environment is the one given.
    let started = |pid: u32| std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|e| e.starts_with(b"ETCD_DATA_DIR="));
    let t = std::time::Instant::now();
    while !(started(attacker.id()) && started(owner.id())) && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let scan = etcd_medic::host::processes::holders(std::path::Path::new("/proc"), &Default::default(), data_id);
    let _ = (attacker.kill(), owner.kill(), attacker.wait(), owner.wait());
    let pids: Vec<(u32, &str)> = scan.holders.iter().map(|h| (h.pid, h.how.as_str())).collect();
    assert!(!pids.iter().any(|(p, _)| *p == attacker.id()), "the tenant's link reached the victim's data: {pids:?}");
    assert!(pids.contains(&(owner.id(), "data dir /data")), "the victim's own process holds its data: {pids:?}");
    Ok(())
}

/// A tenant who may write EtcdRecoveries and their status, on the chart's defaults: it
/// approves a recovery of its own healthy set under its own name and forges the status the
/// controller writes mid-fence (`Fencing`, a fence of a million replicas). The controller
/// decides from the set and the members' files, never from that status: it refuses
/// (`PodHealthy`, the set has its majority) and scales nothing. A record named after another
/// set than the one it names is refused too. Asked directly, the agent's recovery steps are
/// the controller's alone (403 for the tenant), and even under the controller's name a record
/// forged `Fenced` with a holder the tenant made moves nothing while the set runs (`NotFenced`).
/// The controller, held by a person's pause on the set meanwhile, then refuses it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_fence_in_a_recoverys_status_never_scales_a_set() -> Result<()> {
    let Some((lab, _agent, c)) = crate::controller::watched_on_defaults().await? else { return Ok(()) };
    let res = etcd_medic_lab::apiserver::store::find_resource("etcd-medic.io", "v1alpha1", "etcdrecoveries").expect("served");
    let store = lab.api.store();
    let approval = json!({"by": "mallory", "facts": "0000000000000000"});
    let forged = json!({"status": {"phase": "Fencing", "fence": {"replicas": 1_000_000, "at": "2026-12-07T00:00:00Z"}}});
    for (name, set) in [("apisix-etcd", "apisix-etcd"), ("decoy", "apisix-etcd")] {
        let record = json!({"metadata": {"name": name}, "spec": {"statefulSet": set, "approval": approval}});
        store.create(res, "apisix", record).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        store.patch_part(res, "apisix", name, &forged, true).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let refused = |name: &str| store.get(res, "apisix", name).ok().filter(|r| r["status"]["phase"] == "Refused");
    while (refused("apisix-etcd").is_none() || refused("decoy").is_none()) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (own, decoy) = (refused("apisix-etcd"), refused("decoy"));
    assert_eq!(own.as_ref().map(|r| r["status"]["code"].clone()), Some(json!("PodHealthy")), "{own:?}\n{}", c.log_text());
    assert_eq!(decoy.as_ref().map(|r| r["status"]["code"].clone()), Some(json!("InvalidRequest")), "{decoy:?}");
    let sts: k8s_openapi::api::apps::v1::StatefulSet = lab.api.get("apisix", "apisix-etcd").expect("the set");
    assert_eq!(sts.clone().spec.and_then(|s| s.replicas), Some(3), "never scaled");
    assert!((0..3).all(|i| lab.set.has_pod(i)));
    lab.set.wait_all_ready(Duration::from_secs(30)).await?;

    // The agent's recovery steps, asked directly. A tenant that may call the agent (it may
    // ask remediations in its namespace) may not ask them: 403. The controller's own token,
    // on a record forged Fenced with a plan for this set and the facts it approves, and a
    // holder pod the tenant made (the label, the record as owner, a member's claim): the
    // agent reads the set itself, finds it with its replicas and pods, and refuses
    // NotFenced; the member's data is untouched.
    let identity = |user: &str| TokenIdentity {
        username: user.into(),
        groups: vec!["system:authenticated".into()],
        audiences: vec![etcd_medic_lab::controller::AUDIENCE.into()],
    };
    lab.api.add_identity("tenant-step", identity("system:serviceaccount:apisix:caller"));
    lab.api.allow_remediations("system:serviceaccount:apisix:caller", Some("apisix"));
    lab.api.add_identity("controller-step", identity(etcd_medic_lab::controller::CONTROLLER_SA));
    let uid = sts.metadata.uid.clone().unwrap_or_default();
    let plan = json!({"statefulSetUID": uid, "replicas": 3, "ready": 3, "heldRevision": 0,
                      "choice": {"survivor": "apisix-etcd-0", "facts": "0000000000000000", "why": "", "ranked": [], "lost": []}});
    let fenced = json!({"status": {"phase": "Fenced", "code": null, "plan": plan,
                                   "fence": {"replicas": 3, "at": "2026-12-07T00:00:00Z", "rebuild": true}}});
    // A person's pause on the set holds the controller's part too.
    lab.api.modify::<k8s_openapi::api::apps::v1::StatefulSet>("apisix", "apisix-etcd", |s| {
        s.metadata.annotations.get_or_insert_default().insert("etcd-medic.io/paused".into(), "true".into());
    })?;
    // The controller reads a pause at most every 10 s: the one it read before is out of date.
    tokio::time::sleep(Duration::from_secs(11)).await;
    store.patch_part(res, "apisix", "apisix-etcd", &fenced, true).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let record_uid = store.get(res, "apisix", "apisix-etcd").map_err(|e| anyhow::anyhow!("{e:?}"))?["metadata"]["uid"].clone();
    let pods = etcd_medic_lab::apiserver::store::find_resource("", "v1", "pods").expect("served");
    let holder = json!({"metadata": {"name": "apisix-etcd-1-hold", "labels": {"etcd-medic.io/holds": "apisix-etcd-1"},
        "ownerReferences": [{"apiVersion": "etcd-medic.io/v1alpha1", "kind": "EtcdRecovery", "name": "apisix-etcd", "uid": record_uid, "controller": true}]},
        "spec": {"nodeName": etcd_medic_lab::NODE_NAME, "containers": [{"name": "etcd", "image": "mallory/etcd",
                 "env": [{"name": "ETCD_ON_K8S", "value": "yes"}, {"name": "ETCD_DATA_DIR", "value": "/bitnami/etcd/data"}],
                 "volumeMounts": [{"name": "data", "mountPath": "/bitnami/etcd"}]}],
                 "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "data-apisix-etcd-1"}}]}});
    store.create(pods, "apisix", holder).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let before = etcd_medic_lab::agent::tree(&lab.set.pv_path(1));
    let body = br#"{"namespace":"apisix","statefulSet":"apisix-etcd","holder":"apisix-etcd-1-hold","action":"Quarantine"}"#;
    let ask = |token: &'static str| {
        let auth = format!("Bearer {token}");
        async move {
            let headers = [("Authorization", auth.as_str()), ("Content-Type", "application/json")];
            etcd_medic_lab::http::request(_agent.addr, "POST", "/v1/recovery-steps", &headers, Some(body)).await
        }
    };
    let tenant = ask("tenant-step").await?;
    assert_eq!(tenant.status, 403, "{}", String::from_utf8_lossy(&tenant.body));
    let controller = ask("controller-step").await?;
    let said = String::from_utf8_lossy(&controller.body).to_string();
    assert_eq!(controller.status, 422, "{said}");
    assert!(said.contains("\"code\":\"NotFenced\"") && said.contains("has replicas"), "{said}");
    assert_eq!(etcd_medic_lab::agent::tree(&lab.set.pv_path(1)), before, "the member's data is untouched");
    // Held while paused (looks every 10 s); once the pause is lifted, the controller reads the
    // set itself and refuses: it runs, the fence is not in place.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let held = store.get(res, "apisix", "apisix-etcd").map_err(|e| anyhow::anyhow!("{e:?}"))?;
    assert_eq!(held["status"]["phase"], "Fenced", "held by the pause: {held:#}\n{}", c.log_text());
    assert!(c.log_text().contains("the recovery waits: paused by the annotation etcd-medic.io/paused on statefulset apisix/apisix-etcd"));
    lab.api.modify::<k8s_openapi::api::apps::v1::StatefulSet>("apisix", "apisix-etcd", |s| {
        s.metadata.annotations.get_or_insert_default().remove("etcd-medic.io/paused");
    })?;
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    while refused("apisix-etcd").is_none() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let last = refused("apisix-etcd");
    assert_eq!(last.as_ref().map(|r| r["status"]["code"].clone()), Some(json!("NotFenced")), "{last:?}\n{}", c.log_text());
    let sts: k8s_openapi::api::apps::v1::StatefulSet = lab.api.get("apisix", "apisix-etcd").expect("the set");
    assert_eq!(sts.spec.and_then(|s| s.replicas), Some(3), "never scaled");
    lab.set.wait_all_ready(Duration::from_secs(30)).await?;
    lab.shutdown().await;
    Ok(())
}
