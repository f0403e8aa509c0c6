//! Real etcd members as processes on loopback, and what tests ask of them: keys, membership,
//! health and a consistency check at one revision.

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use etcd_client::{Client, ConnectOptions, GetOptions, MemberAddOptions};
use tokio::process::{Child, Command};

use crate::process::{free_port, kill_now, spawn_tied, terminate};

/// Env var naming another etcd binary (for example a newer minor) instead of the pinned 3.5.
pub const ETCD_BIN_ENV: &str = "ETCD_MEDIC_LAB_ETCD_BIN";

/// The etcd binary the lab runs: `$ETCD_MEDIC_LAB_ETCD_BIN`, else the vendored 3.5.x that
/// matches the Bitnami image of the APISIX chart.
pub fn etcd_binary() -> PathBuf {
    match std::env::var_os(ETCD_BIN_ENV) {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => etcd_bin_vendored_linux_amd64::etcd_bin_path().unwrap().to_path_buf(),
    }
}

/// `etcd --version`'s first line, e.g. `etcd Version: 3.5.34`.
pub fn etcd_version() -> Result<String> {
    let out = std::process::Command::new(etcd_binary()).arg("--version").output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text.lines().next().unwrap_or_default().trim().to_string())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClusterState {
    New,
    Existing,
}

impl ClusterState {
    pub fn as_str(self) -> &'static str {
        match self {
            ClusterState::New => "new",
            ClusterState::Existing => "existing",
        }
    }
}

/// A member's stable identity: its name and its ports, which survive restarts like a
/// StatefulSet pod's DNS name does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberSpec {
    pub name: String,
    pub client_port: u16,
    pub peer_port: u16,
}

impl MemberSpec {
    pub fn new(name: impl Into<String>) -> Self {
        MemberSpec { name: name.into(), client_port: free_port(), peer_port: free_port() }
    }
    pub fn client_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }
    pub fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }
}

/// `name=peer,name=peer` as etcd's `--initial-cluster` wants it.
pub fn initial_cluster<'a>(members: impl IntoIterator<Item = &'a MemberSpec>) -> String {
    members.into_iter().map(|m| format!("{}={}", m.name, m.peer_url())).collect::<Vec<_>>().join(",")
}

/// Everything one etcd start needs.
#[derive(Clone, Debug)]
pub struct EtcdConfig {
    pub member: MemberSpec,
    pub data_dir: PathBuf,
    pub initial_cluster: String,
    pub state: ClusterState,
    pub token: String,
    /// stdout and stderr of the process, appended across restarts.
    pub log_file: PathBuf,
    /// `--snapshot-count`, when not etcd's default: a test that needs snapshot files on
    /// disk sets it low.
    pub snapshot_count: Option<u64>,
}

impl EtcdConfig {
    pub fn args(&self) -> Vec<String> {
        let m = &self.member;
        vec![
            format!("--name={}", m.name),
            format!("--data-dir={}", self.data_dir.display()),
            format!("--listen-client-urls={}", m.client_url()),
            format!("--advertise-client-urls={}", m.client_url()),
            format!("--listen-peer-urls={}", m.peer_url()),
            format!("--initial-advertise-peer-urls={}", m.peer_url()),
            format!("--initial-cluster={}", self.initial_cluster),
            format!("--initial-cluster-state={}", self.state.as_str()),
            format!("--initial-cluster-token={}", self.token),
            // Lab speed: durability against power loss is not what these tests examine, and
            // a killed process loses nothing the kernel already has.
            "--unsafe-no-fsync".into(),
            "--logger=zap".into(),
            "--log-level=info".into(),
        ]
        .into_iter()
        .chain(self.snapshot_count.map(|n| format!("--snapshot-count={n}")))
        .collect()
    }
}

/// One running etcd process. Dropping it kills it.
pub struct EtcdProcess {
    child: Child,
    pub config: EtcdConfig,
}

impl EtcdProcess {
    pub fn spawn(config: EtcdConfig) -> Result<Self> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&config.log_file)
            .with_context(|| format!("open {}", config.log_file.display()))?;
        let mut cmd = Command::new(etcd_binary());
        cmd.args(config.args()).stdout(log.try_clone()?).stderr(log);
        let child = spawn_tied(cmd).context("spawn etcd")?;
        Ok(EtcdProcess { child, config })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// SIGTERM as the kubelet sends it, SIGKILL after 5 s.
    pub async fn stop(mut self) -> Option<ExitStatus> {
        terminate(&mut self.child, Duration::from_secs(5)).await
    }

    pub fn kill(mut self) {
        kill_now(&mut self.child);
    }

    pub async fn wait(&mut self) -> Option<ExitStatus> {
        self.child.wait().await.ok()
    }

    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The messages of the last `n` log lines: etcd logs JSON, and a person wants the `msg`
    /// and `error` fields, as `kubectl logs --previous` would show the important part.
    pub fn log_tail(&self, n: usize) -> String {
        log_tail(&self.config.log_file, n)
    }
}

impl Drop for EtcdProcess {
    fn drop(&mut self) {
        kill_now(&mut self.child);
    }
}

pub fn log_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| match serde_json::from_str::<serde_json::Value>(l) {
            Ok(v) => {
                let msg = v.get("msg").and_then(|m| m.as_str()).unwrap_or(l);
                match v.get("error").and_then(|e| e.as_str()) {
                    Some(e) => format!("{msg}: {e}"),
                    None => msg.to_string(),
                }
            }
            Err(_) => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A record of a WAL file damaged in place: one byte of a key's name flipped, so the record
/// still decodes and its CRC no longer matches (`walpb: crc mismatch` in 3.5 and 3.6).
pub fn flip_a_byte_in_the_wal(data: &Path) -> Result<()> {
    let wal = std::fs::read_dir(data.join("member/wal"))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .min()
        .context("no WAL file")?;
    let mut bytes = std::fs::read(&wal)?;
    let needle = b"/apisix/routes/00007";
    let at = bytes.windows(needle.len()).position(|w| w == needle).context("key not found in the WAL")?;
    bytes[at + needle.len() - 1] ^= 0x01;
    std::fs::write(&wal, bytes)?;
    Ok(())
}

/// Member ids the way etcdctl prints them.
pub fn format_id(id: u64) -> String {
    format!("{id:x}")
}

pub fn parse_id(text: &str) -> Option<u64> {
    u64::from_str_radix(text.trim(), 16).ok()
}

/// A client bound to exactly these endpoints, with short timeouts so a dead member is an
/// error, not a hang.
pub async fn connect(endpoints: &[String]) -> Result<Client> {
    let opts = ConnectOptions::new().with_connect_timeout(Duration::from_secs(2)).with_timeout(Duration::from_secs(5));
    Client::connect(endpoints, Some(opts)).await.map_err(|e| anyhow!("connect to {endpoints:?}: {e}"))
}

/// What `etcdctl endpoint health` checks: a linearizable read answers in time.
pub async fn endpoint_healthy(url: &str) -> bool {
    let check = async {
        let mut c = connect(&[url.to_string()]).await.ok()?;
        c.get("health", None).await.ok()
    };
    matches!(tokio::time::timeout(Duration::from_secs(2), check).await, Ok(Some(_)))
}

pub async fn wait_healthy(url: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !endpoint_healthy(url).await {
        if Instant::now() > deadline {
            bail!("{url} not healthy within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// The first endpoint that answers; membership calls go to one live member, since a
/// balanced client keeps picking a dead one.
pub async fn live_client(endpoints: &[String]) -> Result<Client> {
    for e in endpoints {
        if endpoint_healthy(e).await {
            return connect(std::slice::from_ref(e)).await;
        }
    }
    bail!("no healthy endpoint among {endpoints:?}")
}

/// One entry of `member list`, in plain types: the lab's own reading of etcd, an oracle (the
/// agent's `etcd_medic_core::member::Member` carries the health the agent judges).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberInfo {
    pub id: u64,
    pub name: String,
    pub peer_urls: Vec<String>,
    pub client_urls: Vec<String>,
    pub is_learner: bool,
}

impl MemberInfo {
    /// An added member that never started has no name yet.
    pub fn started(&self) -> bool {
        !self.name.is_empty()
    }
}

impl From<&etcd_client::Member> for MemberInfo {
    fn from(m: &etcd_client::Member) -> Self {
        MemberInfo {
            id: m.id(),
            name: m.name().to_string(),
            peer_urls: m.peer_urls().to_vec(),
            client_urls: m.client_urls().to_vec(),
            is_learner: m.is_learner(),
        }
    }
}

pub async fn member_list(endpoints: &[String]) -> Result<Vec<MemberInfo>> {
    let mut c = live_client(endpoints).await?;
    let resp = c.member_list().await?;
    Ok(resp.members().iter().map(MemberInfo::from).collect())
}

/// Retries `op` while etcd answers `etcdserver: unhealthy cluster`, which it does for a few
/// seconds after any membership change (FIELD-NOTES.md, timing facts).
///
/// A deliberate oracle, not a copy of the agent's `etcd` module: the lab plays the image's
/// `etcdctl member add/remove`, the preStop hook and the operator, and the tests check the
/// agent's membership changes against what these independent ones see.
async fn retry_unhealthy<T, F, Fut>(what: &str, mut op: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut delay = Duration::from_millis(200);
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if e.to_string().contains("unhealthy cluster") && Instant::now() < deadline => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(e) => bail!("{what}: {e}"),
        }
    }
}

pub async fn member_remove(endpoints: &[String], id: u64) -> Result<()> {
    let c = live_client(endpoints).await?;
    retry_unhealthy(&format!("member remove {}", format_id(id)), || {
        let mut c = c.clone();
        async move { c.member_remove(id).await }
    })
    .await?;
    Ok(())
}

/// `member add`; returns the new member and the member list after the add, from which the
/// new member's `--initial-cluster` is built.
pub async fn member_add(endpoints: &[String], peer_url: &str, learner: bool) -> Result<(MemberInfo, Vec<MemberInfo>)> {
    let c = live_client(endpoints).await?;
    let resp = retry_unhealthy(&format!("member add {peer_url}"), || {
        let mut c = c.clone();
        let opts = learner.then(|| MemberAddOptions::new().with_is_learner());
        async move { c.member_add([peer_url], opts).await }
    })
    .await?;
    let added = resp.member().map(MemberInfo::from).ok_or_else(|| anyhow!("member add returned no member"))?;
    Ok((added, resp.member_list().iter().map(MemberInfo::from).collect()))
}

/// The `ETCD_INITIAL_CLUSTER` that `etcdctl member add` prints: every member's name (the
/// new one's given name) with each of its peer URLs.
pub fn initial_cluster_after_add(list: &[MemberInfo], added_id: u64, name: &str) -> String {
    list.iter()
        .flat_map(|m| {
            let n = if m.id == added_id { name.to_string() } else { m.name.clone() };
            m.peer_urls.iter().map(move |u| format!("{n}={u}"))
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// What every member holds at one revision.
#[derive(Clone, Debug)]
pub struct Consistency {
    pub revision: i64,
    /// Per endpoint: (endpoint, key count, HashKV at `revision`).
    pub members: Vec<(String, usize, u32)>,
    /// The keys and values of the first member, sorted.
    pub keys: Vec<(String, String)>,
    pub consistent: bool,
}

/// Reads every key from every member at one revision (serializable, so each member answers
/// from its own store) and compares them, and compares `HashKV` at that revision.
pub async fn check_consistency(endpoints: &[String]) -> Result<Consistency> {
    let mut first = live_client(endpoints).await?;
    let revision = first.get("consistency-probe", None).await?.header().map(|h| h.revision()).unwrap_or(0);
    let mut members = Vec::new();
    let mut reference: Option<Vec<(String, String)>> = None;
    let mut consistent = true;
    let mut hashes = Vec::new();
    for e in endpoints {
        let mut c = connect(std::slice::from_ref(e)).await?;
        // Wait until this member has applied `revision`: a follower may lag a little, and a
        // member that has just joined may not answer at all while it applies the leader's
        // snapshot (a request timing out then is "not yet", not a verdict).
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let rev = c
                .get("consistency-probe", Some(GetOptions::new().with_serializable()))
                .await
                .map(|r| r.header().map(|h| h.revision()).unwrap_or(0));
            match rev {
                Ok(rev) if rev >= revision => break,
                _ if Instant::now() > deadline => bail!("{e} stays behind revision {revision}: {rev:?}"),
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        let resp = c.get("", Some(GetOptions::new().with_all_keys().with_serializable().with_revision(revision))).await?;
        let mut kvs: Vec<(String, String)> = resp
            .kvs()
            .iter()
            .map(|kv| (kv.key_str().unwrap_or_default().to_string(), kv.value_str().unwrap_or_default().to_string()))
            .collect();
        kvs.sort();
        let hash = c.hash_kv(revision).await?.hash();
        hashes.push(hash);
        members.push((e.clone(), kvs.len(), hash));
        match &reference {
            None => reference = Some(kvs),
            Some(r) => consistent &= *r == kvs,
        }
    }
    consistent &= hashes.windows(2).all(|w| w[0] == w[1]);
    Ok(Consistency { revision, members, keys: reference.unwrap_or_default(), consistent })
}

/// A plain cluster of N members in one directory, for tests that need etcd without any
/// Kubernetes around it.
pub struct EtcdCluster {
    pub dir: PathBuf,
    pub token: String,
    pub specs: Vec<MemberSpec>,
    /// `--snapshot-count` of every member, when not etcd's default.
    pub snapshot_count: Option<u64>,
    procs: Vec<Option<EtcdProcess>>,
    _tmp: Option<tempfile::TempDir>,
}

impl EtcdCluster {
    /// Starts `n` members in a fresh temporary directory and waits until all are healthy.
    pub async fn start(n: usize) -> Result<Self> {
        let tmp = tempfile::Builder::new().prefix("etcd-medic-lab-").tempdir()?;
        let mut c = Self::start_in(tmp.path(), n).await?;
        c._tmp = Some(tmp);
        Ok(c)
    }

    /// [`Self::start`] with members that take a snapshot every `every` entries: snapshot
    /// files on disk and snapshot records in the WAL.
    pub async fn start_snapshotting(n: usize, every: u64) -> Result<Self> {
        let tmp = tempfile::Builder::new().prefix("etcd-medic-lab-").tempdir()?;
        let mut c = Self::start_in_with(tmp.path(), n, Some(every)).await?;
        c._tmp = Some(tmp);
        Ok(c)
    }

    pub async fn start_in(dir: &Path, n: usize) -> Result<Self> {
        Self::start_in_with(dir, n, None).await
    }

    async fn start_in_with(dir: &Path, n: usize, snapshot_count: Option<u64>) -> Result<Self> {
        let specs: Vec<MemberSpec> = (0..n).map(|i| MemberSpec::new(format!("etcd-{i}"))).collect();
        let token = format!("lab-{}", uuid::Uuid::new_v4().simple());
        let procs = (0..n).map(|_| None).collect();
        let mut cluster = EtcdCluster { dir: dir.to_path_buf(), token, specs, snapshot_count, procs, _tmp: None };
        let ic = initial_cluster(&cluster.specs);
        for i in 0..n {
            cluster.spawn(i, &ic, ClusterState::New)?;
        }
        for s in &cluster.specs {
            wait_healthy(&s.client_url(), Duration::from_secs(30)).await?;
        }
        Ok(cluster)
    }

    pub fn data_dir(&self, i: usize) -> PathBuf {
        self.dir.join(&self.specs[i].name).join("data")
    }

    pub fn log_file(&self, i: usize) -> PathBuf {
        self.dir.join(&self.specs[i].name).join("etcd.log")
    }

    fn spawn(&mut self, i: usize, initial_cluster: &str, state: ClusterState) -> Result<()> {
        std::fs::create_dir_all(self.dir.join(&self.specs[i].name))?;
        let cfg = EtcdConfig {
            member: self.specs[i].clone(),
            data_dir: self.data_dir(i),
            initial_cluster: initial_cluster.to_string(),
            state,
            token: self.token.clone(),
            log_file: self.log_file(i),
            snapshot_count: self.snapshot_count,
        };
        self.procs[i] = Some(EtcdProcess::spawn(cfg)?);
        Ok(())
    }

    pub fn is_running(&mut self, i: usize) -> bool {
        match &mut self.procs[i] {
            Some(p) => p.try_exit().is_none(),
            None => false,
        }
    }

    pub fn process(&self, i: usize) -> Option<&EtcdProcess> {
        self.procs[i].as_ref()
    }

    /// Client URLs of the members whose process runs.
    pub fn endpoints(&mut self) -> Vec<String> {
        let running: Vec<usize> = (0..self.specs.len()).filter(|&i| self.is_running(i)).collect();
        running.into_iter().map(|i| self.specs[i].client_url()).collect()
    }

    pub async fn stop(&mut self, i: usize) {
        if let Some(p) = self.procs[i].take() {
            p.stop().await;
        }
    }

    pub fn kill(&mut self, i: usize) {
        if let Some(p) = self.procs[i].take() {
            p.kill();
        }
    }

    /// Starts member `i` again on the data it has. Returns at once: a removed member exits
    /// by itself, which [`EtcdCluster::wait_exit`] observes.
    pub fn restart(&mut self, i: usize) -> Result<()> {
        let ic = initial_cluster(&self.specs);
        self.spawn(i, &ic, ClusterState::Existing)
    }

    pub async fn wait_exit(&mut self, i: usize, timeout: Duration) -> Result<(ExitStatus, String)> {
        let p = self.procs[i].as_mut().ok_or_else(|| anyhow!("member {i} is not running"))?;
        let status = tokio::time::timeout(timeout, p.wait())
            .await
            .map_err(|_| anyhow!("member {i} still running after {timeout:?}"))?
            .ok_or_else(|| anyhow!("wait failed"))?;
        let tail = p.log_tail(60);
        self.procs[i] = None;
        Ok((status, tail))
    }

    pub async fn wait_healthy(&self, i: usize) -> Result<()> {
        wait_healthy(&self.specs[i].client_url(), Duration::from_secs(30)).await
    }

    /// A client of a live member. Right after a member was killed the others may be
    /// electing a leader (no member is healthy for a moment, longer on a loaded machine):
    /// waited for, up to 30 s.
    pub async fn client(&mut self) -> Result<Client> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match live_client(&self.endpoints()).await {
                Ok(c) => return Ok(c),
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    pub async fn put(&mut self, key: &str, value: &str) -> Result<()> {
        self.client().await?.put(key, value, None).await?;
        Ok(())
    }

    pub async fn get(&mut self, key: &str) -> Result<Option<String>> {
        let resp = self.client().await?.get(key, None).await?;
        Ok(resp.kvs().first().map(|kv| kv.value_str().unwrap_or_default().to_string()))
    }

    pub async fn members(&mut self) -> Result<Vec<MemberInfo>> {
        member_list(&self.endpoints()).await
    }

    pub async fn member_id(&mut self, i: usize) -> Result<u64> {
        let peer = self.specs[i].peer_url();
        self.members()
            .await?
            .into_iter()
            .find(|m| m.peer_urls.contains(&peer))
            .map(|m| m.id)
            .ok_or_else(|| anyhow!("no member with peer URL {peer}"))
    }

    /// Removes member `i` from the cluster as the Bitnami preStop hook does (its process
    /// keeps running until it notices); returns the removed id.
    pub async fn remove(&mut self, i: usize) -> Result<u64> {
        let id = self.member_id(i).await?;
        let others: Vec<String> = self.endpoints().into_iter().filter(|e| *e != self.specs[i].client_url()).collect();
        member_remove(&others, id).await?;
        Ok(id)
    }

    /// The replacement procedure of etcd's runtime-reconfiguration guide for member `i`:
    /// `member add` with its peer URL, then a start on an empty data dir with `existing`.
    pub async fn add_back(&mut self, i: usize) -> Result<u64> {
        let endpoints = self.endpoints();
        let (added, list) = member_add(&endpoints, &self.specs[i].peer_url(), false).await?;
        let ic = initial_cluster_after_add(&list, added.id, &self.specs[i].name);
        self.spawn(i, &ic, ClusterState::Existing)?;
        self.wait_healthy(i).await?;
        Ok(added.id)
    }

    pub async fn consistency(&mut self) -> Result<Consistency> {
        check_consistency(&self.endpoints()).await
    }
}
