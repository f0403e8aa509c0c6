//! The command line: typed flags, each with its environment fallback.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::error::{Error, Result};

#[derive(Debug, Parser)]
#[command(
    name = "etcd-medic",
    version,
    about = "Heals etcd members stuck in `etcdserver: member not found` crash loops.",
    long_about = "Heals etcd members stuck in `etcdserver: member not found` crash loops.\n\n\
        Runs on every node as a DaemonSet (`serve`); a controller or a person asks the agent on \
        the failing pod's node to remediate one pod. The agent finds the pod's volume on the \
        host, proves it is safe to act, moves the stale member data into a restorable \
        quarantine, repairs membership, restarts the pod and verifies the member rejoined."
)]
pub struct Cli {
    #[command(flatten)]
    pub log: LogArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct LogArgs {
    /// Log format: human-readable lines or one JSON object per line.
    #[arg(long, global = true, env = "ETCD_MEDIC_LOG_FORMAT", value_enum, default_value_t = LogFormat::Plain)]
    pub log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Plain,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: the HTTP API on this node (the DaemonSet's command).
    Serve(ServeArgs),
    /// Print the resolved plan for a pod (host path, data dir, profile, files that would
    /// move, sizes). Changes nothing.
    Locate {
        /// The pod, as NAMESPACE/POD.
        pod: PodRef,
        #[command(flatten)]
        node: NodeArgs,
        /// Output format.
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Say why a pod's etcd fails: the crash signature in its container's last log (else
    /// its termination message), what the agent would do about it, the chart generation and
    /// the evidence. Changes nothing.
    Diagnose {
        /// The pod, as NAMESPACE/POD.
        pod: PodRef,
        #[command(flatten)]
        node: NodeArgs,
        /// Output format.
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// What the pod's member files say, read offline through the proven volume: the WAL's
    /// member and cluster ids, term, commit and index range, the db's revision and consistent
    /// index, whether their checksums hold, and the diagnosis they confirm or correct.
    /// Changes nothing.
    Inspect {
        /// The pod, as NAMESPACE/POD.
        #[arg(required_unless_present = "data_dir", conflicts_with = "data_dir")]
        pod: Option<PodRef>,
        /// A data dir on this node instead of a pod's (a quarantine, a copy, a backup): its
        /// files only, no diagnosis.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Read the newest WAL segments whole, every record's CRC chained across them (by
        /// default only their heads and the newest segment are read).
        #[arg(long)]
        full: bool,
        #[command(flatten)]
        node: NodeArgs,
        /// Output format.
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Remediate one pod from this node's shell: the same engine as the API. Shows progress,
    /// runs to verification, and exits 0 only when the remediation Succeeded.
    Remediate {
        /// The pod, as NAMESPACE/POD.
        pod: PodRef,
        #[command(flatten)]
        node: NodeArgs,
        /// Check every gate and print the plan; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Act even though the pod does not look failing, or fails in a way the agent does
        /// not know (UnknownFailure, SelfHealing). Never overrides quorum, a split brain, path
        /// safety or a running etcd process.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        engine: EngineArgs,
    },
    /// Run the controller (a Deployment of two replicas, one leading): watch etcd pods,
    /// detect crash loops and their signatures, decide, record an EtcdRemediation and
    /// dispatch it to the agent on the pod's node.
    Controller(ControllerArgs),
    /// Print the EtcdRemediation CustomResourceDefinition (etcd-medic.io/v1alpha1) as YAML,
    /// as the Helm chart's crds/etcdremediations.yaml holds it.
    Crd,
    /// Quorum lost: make a one-member cluster of a fenced survivor's data dir on this node
    /// (etcd --force-new-cluster, then the revision moved past every revision held and all
    /// before it compacted), verified by starting it once; the pod's etcd then starts it.
    /// Refuses (NotFenced) while any process uses the data.
    Rebuild {
        /// The survivor's data dir on this node (a pod's, or a copy of its quarantine).
        #[arg(long)]
        data_dir: PathBuf,
        /// The member's name and client URLs, as its pod starts it.
        #[arg(long)]
        name: String,
        #[arg(long = "client-url", required = true)]
        client_urls: Vec<String>,
        /// The highest revision another member's db held (`kubectl etcd-medic recover`
        /// shows them): the cluster starts 1,000,000,000 past it and past the survivor's own.
        #[arg(long, default_value_t = 0)]
        held_revision: u64,
        /// The etcd binary to run (the image's).
        #[arg(long, default_value = "/usr/local/bin/etcd")]
        etcd: PathBuf,
        /// Each start of etcd may take this long to serve.
        #[arg(long, default_value = "2m", value_parser = parse_duration)]
        timeout: std::time::Duration,
    },
    /// A quorum recovery's holder pod's command: keeps the pod (and so the member's volume,
    /// mounted) until it is stopped; touches nothing. Arguments after it are ignored (the
    /// holder keeps the etcd container's, where the agent reads its data dir).
    Hold {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
        ignored: Vec<String>,
    },
    /// Put a quarantine back where it came from (refuses while etcd runs on that data).
    Restore {
        /// The quarantine id, as shown by `remediate` and the API (`quarantinePath`).
        quarantine_id: String,
        /// Even when the remediation removed the member and added it again (its data is then
        /// a removed member's): only to mend membership by hand.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        node: NodeArgs,
    },
}

/// How remediations run (the CLI's and the agent's alike).
#[derive(Clone, Debug, Args)]
pub struct EngineArgs {
    /// How long to wait for the member to rejoin before the remediation is Failed.
    #[arg(long, env = "ETCD_MEDIC_VERIFY_TIMEOUT", default_value = "5m", value_parser = parse_duration)]
    pub verify_timeout: std::time::Duration,
    /// Quarantines kept per member; older ones are pruned after a remediation succeeds.
    #[arg(long, env = "ETCD_MEDIC_KEEP_QUARANTINES", default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..))]
    pub keep_quarantines: u16,
    /// The namespace of the clusters' Leases (one remediation per etcd cluster). Every entry
    /// point, the DaemonSet's agents and `remediate` from a node's shell alike, must use the
    /// same one to exclude each other: the agent's own namespace.
    #[arg(long, env = "ETCD_MEDIC_LEASE_NAMESPACE", default_value = "etcd-medic")]
    pub lease_namespace: String,
}

impl EngineArgs {
    /// The engine's options: everything it depends on, read here at the edge (the etcd
    /// client TLS files, the test hook) and given to it, never looked up inside.
    pub fn options(&self, node: &NodeArgs, dry_run: bool, force: bool) -> Result<crate::engine::Options> {
        Ok(crate::engine::Options {
            dry_run,
            force,
            etcd_endpoints: node.etcd_endpoints.clone(),
            state_dir: node.state_dir.clone(),
            verify_timeout: self.verify_timeout,
            keep_quarantines: self.keep_quarantines as usize,
            lease_namespace: Some(self.lease_namespace.clone()),
            settle: crate::engine::SETTLE,
            etcd: node.etcd()?,
            failpoint: crate::failpoint::Failpoint::from_env(),
        })
    }
}

/// Where this node's things are.
#[derive(Clone, Debug, Args)]
pub struct NodeArgs {
    /// This node's name, as in the pods' `spec.nodeName`.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// The kubelet's root dir on the host. When not given: the running kubelet's
    /// `--root-dir`, else the first distribution default holding the pod (/var/lib/kubelet,
    /// then microk8s, k0s, RKE1 and TKGI roots).
    #[arg(long, env = "KUBELET_ROOT_DIR")]
    pub kubelet_root: Option<PathBuf>,
    /// Prefix under which the host's paths are reached (where the host's `/` is mounted).
    #[arg(long, env = "HOST_ROOT", default_value = "/")]
    pub host_root: PathBuf,
    /// The host's /proc (the DaemonSet runs with hostPID), to read the kubelet's flags.
    #[arg(long, env = "HOST_PROC", default_value = "/proc")]
    pub proc_root: PathBuf,
    /// Where the kubelet writes containers' logs, read to diagnose a crash (default: the
    /// host's /var/log/pods under --host-root).
    #[arg(long, env = "POD_LOG_ROOT")]
    pub pod_log_root: Option<PathBuf>,
    /// The etcd container's name, when it is neither `etcd` nor recognisable by its image.
    #[arg(long, env = "ETCD_MEDIC_CONTAINER")]
    pub container: Option<String>,
    /// How long to wait for each Kubernetes API call before giving up with NotReady.
    #[arg(long, env = "ETCD_MEDIC_API_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub api_timeout: std::time::Duration,
    /// Journal and state of remediations on this node.
    #[arg(long, env = "ETCD_MEDIC_STATE_DIR", default_value = "/var/lib/etcd-medic")]
    pub state_dir: PathBuf,
    /// etcd client endpoints to use instead of discovering them from the sibling pods.
    #[arg(long, env = "ETCD_MEDIC_ETCD_ENDPOINTS", value_delimiter = ',')]
    pub etcd_endpoints: Vec<String>,
    /// Client TLS per etcd StatefulSet: `<dir>/<namespace>/<statefulset>/` holds `ca.crt`,
    /// `tls.crt` and `tls.key` (a kubernetes.io/tls Secret with its CA, mounted there). Only
    /// that set's `https://` endpoints get them; a set without a directory gets no client
    /// certificate.
    #[arg(long, env = "ETCD_MEDIC_ETCD_TLS_DIR")]
    pub etcd_tls_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub node: NodeArgs,
    /// Address of the HTTP API.
    #[arg(long, env = "ETCD_MEDIC_LISTEN", default_value = "0.0.0.0:9464")]
    pub listen: SocketAddr,
    /// How callers are authenticated: a bearer token checked by TokenReview and
    /// SubjectAccessReview (`kubernetes`), or not at all (`none`, loopback only).
    #[arg(long, env = "ETCD_MEDIC_AUTH", value_enum, default_value_t = AuthMode::Kubernetes)]
    pub auth: AuthMode,
    /// Audiences a caller's token must be valid for (TokenReview `spec.audiences`); none
    /// means the API server's own.
    #[arg(long = "audience", env = "ETCD_MEDIC_AUDIENCES", value_delimiter = ',')]
    pub audiences: Vec<String>,
    /// Requests per second each client address may make to /v1 (bursts of twice that).
    #[arg(long, env = "ETCD_MEDIC_RATE_LIMIT", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub rate_limit: u32,
    /// Requests /v1 serves at once; more are answered 429.
    #[arg(long, env = "ETCD_MEDIC_MAX_IN_FLIGHT", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_in_flight: u32,
    /// Identities (user names, comma-separated) with a reserve of a quarter of the slots and
    /// no per-identity bound: the controller's service account. Every other identity may
    /// hold a quarter of the slots at once.
    #[arg(long, env = "ETCD_MEDIC_RESERVED_FOR", value_delimiter = ',')]
    pub reserved_for: Vec<String>,
    /// Serve HTTPS with this certificate (PEM, chain first); read again when it changes.
    #[arg(long, env = "ETCD_MEDIC_TLS_CERT_FILE", requires = "tls_key_file")]
    pub tls_cert_file: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, env = "ETCD_MEDIC_TLS_KEY_FILE", requires = "tls_cert_file")]
    pub tls_key_file: Option<PathBuf>,
    /// The etcd binary a quorum recovery's rebuild runs (the image's).
    #[arg(long, env = "ETCD_MEDIC_ETCD", default_value = "/usr/local/bin/etcd")]
    pub etcd: PathBuf,
    #[command(flatten)]
    pub engine: EngineArgs,
}

#[derive(Debug, Args)]
pub struct ControllerArgs {
    /// Namespaces whose pods are watched (comma-separated); all when not given.
    #[arg(long, env = "ETCD_MEDIC_NAMESPACES", value_delimiter = ',')]
    pub namespaces: Vec<String>,
    /// Label selector of the etcd pods (the Bitnami chart's label by default).
    #[arg(long, env = "ETCD_MEDIC_SELECTOR", default_value = "app.kubernetes.io/name=etcd")]
    pub selector: String,
    /// The etcd container's name, when it is not `etcd` (else the pod's first container).
    #[arg(long, env = "ETCD_MEDIC_CONTAINER")]
    pub container: Option<String>,
    /// Restarts of the etcd container before a pod is a candidate.
    #[arg(long, env = "ETCD_MEDIC_MIN_RESTARTS", default_value_t = 3)]
    pub min_restarts: u32,
    /// How long a pod has not been Ready before it is a candidate.
    #[arg(long, env = "ETCD_MEDIC_FAILING_FOR", default_value = "60s", value_parser = parse_duration)]
    pub failing_for: std::time::Duration,
    /// A failure that can only repeat (`member not found`, `bad member ID arg`, corrupt data)
    /// is a candidate from its first crash while the others keep quorum; other failures wait
    /// for `--min-restarts` and `--failing-for`.
    #[arg(long, env = "ETCD_MEDIC_FIRST_CRASH", default_value_t = true, action = clap::ArgAction::Set)]
    pub first_crash: bool,
    /// Hold every remediation while more than this percentage of the watched clusters
    /// (StatefulSets) have a failing member...
    #[arg(long, env = "ETCD_MEDIC_MAX_FAILING_PERCENT", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub max_failing_percent: u32,
    /// ...and at least this many clusters do: one member of the only cluster is no storm.
    #[arg(long, env = "ETCD_MEDIC_STORM_MIN_CLUSTERS", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub storm_min_clusters: u32,
    /// Remediations per pod in 24 hours at most.
    #[arg(long, env = "ETCD_MEDIC_MAX_ATTEMPTS", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_attempts: u32,
    /// The wait after a pod's first remediation before another; doubled after each.
    #[arg(long, env = "ETCD_MEDIC_COOLDOWN", default_value = "5m", value_parser = parse_duration)]
    pub cooldown: std::time::Duration,
    /// A StatefulSet with fewer than a majority of its members Ready this long has lost
    /// quorum: its recovery is proposed (an EtcdRecovery awaiting a person's approval).
    #[arg(long, env = "ETCD_MEDIC_QUORUM_LOST_FOR", default_value = "2m", value_parser = parse_duration)]
    pub quorum_lost_for: std::time::Duration,
    /// The image of the holder pods that give the agents a fenced member's volume during a
    /// quorum recovery's rebuild (the agent's own image; the chart sets it). Without it, an
    /// approved recovery stops once fenced, and the rebuild is a person's.
    #[arg(long, env = "ETCD_MEDIC_HOLDER_IMAGE")]
    pub holder_image: Option<String>,
    /// Plan only: every EtcdRemediation is a dry run through the agent's checks.
    #[arg(long, env = "ETCD_MEDIC_DRY_RUN")]
    pub dry_run: bool,
    /// The namespace of the agents' Service.
    #[arg(long, env = "ETCD_MEDIC_AGENT_NAMESPACE", default_value = "etcd-medic")]
    pub agent_namespace: String,
    /// The agents' Service, whose EndpointSlices say which agent runs on which node.
    #[arg(long, env = "ETCD_MEDIC_AGENT_SERVICE", default_value = "etcd-medic")]
    pub agent_service: String,
    /// The token the agents authenticate the controller by (a projected ServiceAccount
    /// token with the agents' audience), read again for every call.
    #[arg(long, env = "ETCD_MEDIC_AGENT_TOKEN_FILE", default_value = "/var/run/secrets/etcd-medic/token")]
    pub agent_token_file: PathBuf,
    /// The CA that signed the agents' serving certificates (HTTPS agents).
    #[arg(long, env = "ETCD_MEDIC_AGENT_CA_FILE")]
    pub agent_ca_file: Option<PathBuf>,
    /// Verify the agents' certificate for this name (e.g. `etcd-medic.etcd-medic.svc`, one
    /// certificate for every agent) instead of each agent's pod IP.
    #[arg(long, env = "ETCD_MEDIC_AGENT_SERVER_NAME", requires = "agent_ca_file")]
    pub agent_server_name: Option<String>,
    /// The namespace of the leader-election Lease (the controller's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "etcd-medic")]
    pub lease_namespace: String,
    /// The leader-election Lease.
    #[arg(long, env = "ETCD_MEDIC_LEASE_NAME", default_value = "etcd-medic-controller")]
    pub lease_name: String,
    /// How long a leader that stopped renewing keeps the lead.
    #[arg(long, env = "ETCD_MEDIC_LEASE_DURATION", default_value = "15s", value_parser = parse_duration)]
    pub lease_duration: std::time::Duration,
    /// This replica's name in the Lease (its pod's name; a random suffix is added).
    #[arg(long, env = "POD_NAME", default_value = "etcd-medic-controller")]
    pub identity: String,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "ETCD_MEDIC_ADMIN_LISTEN", default_value = "0.0.0.0:9465")]
    pub admin_listen: SocketAddr,
    /// How long to wait for each Kubernetes API call.
    #[arg(long, env = "ETCD_MEDIC_API_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub api_timeout: std::time::Duration,
}

impl ControllerArgs {
    pub fn config(&self) -> Result<crate::controller::Config> {
        for ns in &self.namespaces {
            etcd_medic_core::names::validate_namespace(ns)?;
        }
        if self.lease_duration < std::time::Duration::from_secs(2) {
            return Err(Error::invalid("--lease-duration must be at least 2s"));
        }
        let suffix = &uuid::Uuid::new_v4().simple().to_string()[..8];
        Ok(crate::controller::Config {
            namespaces: self.namespaces.clone(),
            selector: self.selector.clone(),
            container: self.container.clone(),
            thresholds: etcd_medic_core::detect::Thresholds {
                min_restarts: self.min_restarts,
                failing_for_secs: self.failing_for.as_secs() as i64,
                first_crash: self.first_crash,
            },
            limits: etcd_medic_core::detect::Limits {
                max_failing_percent: self.max_failing_percent,
                storm_min_clusters: self.storm_min_clusters,
                max_attempts: self.max_attempts,
                cooldown_secs: self.cooldown.as_secs() as i64,
            },
            quorum_lost_for: self.quorum_lost_for,
            holder_image: self.holder_image.clone().filter(|i| !i.is_empty()),
            dry_run: self.dry_run,
            agent_namespace: self.agent_namespace.clone(),
            agent_service: self.agent_service.clone(),
            agent_token_file: Some(self.agent_token_file.clone()),
            agent_ca_file: self.agent_ca_file.clone(),
            agent_server_name: self.agent_server_name.clone(),
            lease_namespace: self.lease_namespace.clone(),
            lease_name: self.lease_name.clone(),
            lease_duration: self.lease_duration,
            identity: format!("{}_{suffix}", self.identity),
            admin: self.admin_listen,
            api_timeout: self.api_timeout,
            fallback: std::time::Duration::from_secs(10),
            poll: std::time::Duration::from_secs(1),
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AuthMode {
    Kubernetes,
    None,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

/// `500ms`, `10s`, `2m`, or plain seconds.
pub fn parse_duration(s: &str) -> std::result::Result<std::time::Duration, String> {
    etcd_medic_core::duration::parse(s)
}

impl NodeArgs {
    /// How to reach etcd: each set's client TLS from `--etcd-tls-dir`, read when it is targeted.
    pub fn etcd(&self) -> Result<crate::etcd::Etcd> {
        Ok(crate::etcd::Etcd::with_tls_dir(self.etcd_tls_dir.clone()))
    }

    /// The locator of this node, with a client of the API server from the environment.
    pub async fn locator(&self) -> Result<crate::locate::Locator> {
        Ok(crate::locate::Locator { api: crate::kubeapi::KubeApi::from_environment(self.api_timeout).await?, layout: self.layout()? })
    }

    /// The node layout the locator needs; the node name is required to act on a pod.
    pub fn layout(&self) -> Result<crate::locate::NodeLayout> {
        let node_name = self
            .node_name
            .clone()
            .filter(|n| !n.is_empty())
            .ok_or_else(|| Error::invalid("--node-name (or NODE_NAME) is required: the agent acts only on pods of its node"))?;
        Ok(crate::locate::NodeLayout {
            node_name,
            host_root: self.host_root.clone(),
            kubelet_root: self.kubelet_root.clone(),
            proc_root: self.proc_root.clone(),
            container: self.container.clone(),
            pod_log_root: self.pod_log_root.clone().unwrap_or_else(|| self.host_root.join("var/log/pods")),
        })
    }
}

impl ServeArgs {
    /// Refuses configurations that are unsafe on a node: no authentication on an address
    /// other hosts can reach.
    pub fn validate(&self) -> Result<()> {
        if self.auth == AuthMode::None && !self.listen.ip().is_loopback() {
            return Err(Error::invalid(format!(
                "--auth none is only allowed on a loopback address, not {}; use --listen 127.0.0.1:{} or --auth kubernetes",
                self.listen,
                self.listen.port()
            )));
        }
        self.node.layout().map(|_| ())
    }
}

/// `NAMESPACE/POD`, both valid Kubernetes names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for PodRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl FromStr for PodRef {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let (ns, name) = s.split_once('/').ok_or_else(|| Error::invalid(format!("{s:?} is not NAMESPACE/POD")))?;
        validate_namespace(ns)?;
        validate_pod_name(name)?;
        Ok(PodRef { namespace: ns.to_string(), name: name.to_string() })
    }
}

pub use etcd_medic_core::names::{validate_namespace, validate_pod_name};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Code;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn pod_refs_are_validated() {
        let p: PodRef = "apisix/apisix-etcd-1".parse().unwrap();
        assert_eq!((p.namespace.as_str(), p.name.as_str()), ("apisix", "apisix-etcd-1"));
        for bad in ["apisix", "/x", "x/", "Apisix/p", "ns/Pod", "ns/-p", "ns/p_q", "ns/a/b", &format!("{}/p", "a".repeat(64))] {
            let e = bad.parse::<PodRef>().unwrap_err();
            assert_eq!(e.code, Code::InvalidRequest, "{bad}");
        }
        assert!("ns/a.b-c".parse::<PodRef>().is_ok());
    }

    #[test]
    fn serve_defaults_follow_the_contract() {
        let cli = Cli::try_parse_from(["etcd-medic", "serve", "--node-name", "n1"]).unwrap();
        let Command::Serve(s) = cli.command else { panic!() };
        assert_eq!(s.listen.to_string(), "0.0.0.0:9464");
        assert_eq!(s.auth, AuthMode::Kubernetes);
        assert_eq!(s.node.kubelet_root, None);
        assert_eq!(s.node.api_timeout, std::time::Duration::from_secs(10));
        assert_eq!(s.node.host_root, PathBuf::from("/"));
        assert_eq!(s.node.state_dir, PathBuf::from("/var/lib/etcd-medic"));
        assert_eq!(cli.log.log_format, LogFormat::Plain);
        s.validate().unwrap();
    }

    #[test]
    fn auth_none_is_refused_off_loopback() {
        let parse = |listen: &str| {
            let cli = Cli::try_parse_from(["etcd-medic", "serve", "--node-name", "n1", "--auth", "none", "--listen", listen]).unwrap();
            let Command::Serve(s) = cli.command else { panic!() };
            s.validate()
        };
        assert_eq!(parse("0.0.0.0:9464").unwrap_err().code, Code::InvalidRequest);
        assert!(parse("127.0.0.1:9464").is_ok());
        assert!(parse("[::1]:9464").is_ok());
    }

    #[test]
    fn tls_needs_both_files() {
        let parse = |args: &[&str]| Cli::try_parse_from([&["etcd-medic", "serve", "--node-name", "n1"], args].concat());
        assert!(parse(&["--tls-cert-file", "c.pem"]).is_err());
        assert!(parse(&["--tls-key-file", "k.pem"]).is_err());
        let cli = parse(&["--tls-cert-file", "c.pem", "--tls-key-file", "k.pem"]).unwrap();
        let Command::Serve(s) = cli.command else { panic!() };
        assert_eq!((s.tls_cert_file, s.tls_key_file), (Some("c.pem".into()), Some("k.pem".into())));
    }

    #[test]
    fn node_name_is_required_to_serve() {
        let cli = Cli::try_parse_from(["etcd-medic", "serve"]).unwrap();
        let Command::Serve(s) = cli.command else { panic!() };
        if std::env::var_os("NODE_NAME").is_none() {
            assert_eq!(s.validate().unwrap_err().code, Code::InvalidRequest);
        }
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("500ms").unwrap(), std::time::Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), std::time::Duration::from_secs(120));
        assert_eq!(parse_duration("7").unwrap(), std::time::Duration::from_secs(7));
        assert!(parse_duration("x").is_err() && parse_duration("5d").is_err());
    }

    #[test]
    fn remediate_parses_its_flags() {
        let cli = Cli::try_parse_from(["etcd-medic", "remediate", "apisix/apisix-etcd-1", "--dry-run", "--force"]).unwrap();
        let Command::Remediate { pod, dry_run, force, .. } = cli.command else { panic!() };
        assert_eq!(pod.to_string(), "apisix/apisix-etcd-1");
        assert!(dry_run && force);
        assert!(Cli::try_parse_from(["etcd-medic", "locate", "not-a-ref"]).is_err());
    }
}
