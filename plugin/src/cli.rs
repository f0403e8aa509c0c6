//! The command line, as kubectl users expect it: `-n`, `--context`, `--kubeconfig`, `-o`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "kubectl-etcd_medic",
    bin_name = "kubectl etcd-medic",
    version,
    about = "Diagnose, heal and restore etcd members through EtcdRemediation resources (etcd-medic.io)",
    after_help = "Exit status: 0 when the asked outcome was reached; 2 a bad request, 3 not allowed, 4 not found, \
                  5 busy or unavailable (try again), 6 refused or failed by the agent (the code is printed)."
)]
pub struct Cli {
    /// The namespace of the etcd pods (else the kubeconfig context's).
    #[arg(short = 'n', long, global = true)]
    pub namespace: Option<String>,
    /// The kubeconfig context to use.
    #[arg(long, global = true)]
    pub context: Option<String>,
    /// The kubeconfig file (else KUBECONFIG, ~/.kube/config, or in-cluster).
    #[arg(long, global = true)]
    pub kubeconfig: Option<PathBuf>,
    /// Output format.
    #[arg(short = 'o', long = "output", global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// How long to wait for each API call.
    #[arg(long, global = true, default_value = "10s", value_parser = parse_duration)]
    pub request_timeout: Duration,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
    Yaml,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Why the pod's etcd fails: its crash signature, what the agent would do and the
    /// evidence (a dry-run EtcdRemediation; nothing changes).
    Diagnose {
        pod: String,
        /// How long to wait for the agent's answer.
        #[arg(long, default_value = "2m", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Ask for a heal: an EtcdRemediation of the pod, carried out by the controller through
    /// the agent on the pod's node.
    Heal {
        pod: String,
        /// Check every gate and plan; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Act on a pod that does not look failing, or whose failure the agent does not know.
        #[arg(long)]
        force: bool,
        /// Follow the remediation to its end, one line per step, and exit with its verdict.
        #[arg(long)]
        wait: bool,
        /// How long `--wait` follows it.
        #[arg(long, default_value = "10m", value_parser = parse_duration)]
        timeout: Duration,
        /// Why it is asked, kept on the record.
        #[arg(long)]
        reason: Option<String>,
    },
    /// The newest remediation of POD in detail, or of every pod in the namespace.
    Status { pod: Option<String> },
    /// Remediations, newest first.
    List {
        /// Of every namespace.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
    },
    /// Put a remediation's quarantined member data back (refused while etcd runs on it).
    /// ID is the EtcdRemediation's name or the agent's remediation id.
    Restore {
        id: String,
        /// Put the data back even after the heal removed the member and added it again
        /// (the agent refuses that with QuorumAtRisk): only to mend membership by hand.
        #[arg(long)]
        force: bool,
        /// Return once asked, without waiting for the agent's answer.
        #[arg(long = "no-wait", action = clap::ArgAction::SetFalse)]
        wait: bool,
        #[arg(long, default_value = "2m", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// The etcd member list as the agent on the pod's node sees it (a forced dry run: nothing
    /// changes).
    Members {
        pod: String,
        #[arg(long, default_value = "2m", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// What the pod's member files say, read offline by the agent on its node: the WAL's
    /// member and cluster ids, term, commit and last index, the db's revision, whether their
    /// checksums hold, and the diagnosis they confirm (a forced dry run: nothing changes).
    Inspect {
        pod: String,
        #[arg(long, default_value = "2m", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Quorum lost: which member the StatefulSet's cluster would be rebuilt from, and what
    /// the others' data holds that it lacks, from every member's files as the agents on their
    /// nodes read them (a forced dry run of each pod: nothing changes).
    Recover {
        statefulset: String,
        /// The member a person chooses instead of the best (the plan says what it loses).
        #[arg(long)]
        survivor: Option<String>,
        /// Approve the plan whose facts have this digest (the `Facts` line shown): the plan
        /// is read again and refused (PlanChanged) when the facts give another. Recorded
        /// with your name as the API server knows it.
        #[arg(long, value_name = "FACTS")]
        approve: Option<String>,
        /// Follow an approved recovery until the controller rebuilt it (the survivor serves,
        /// exit 0), fenced it for a person's rebuild (every member stopped, exit 0), or refused
        /// it (its code's exit), for at most 10 minutes.
        #[arg(long)]
        wait: bool,
        /// How long to wait for each member's answer.
        #[arg(long, default_value = "2m", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Print a shell completion script (`source <(kubectl etcd-medic completion bash)`).
    Completion { shell: clap_complete::Shell },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    etcd_medic_core::duration::parse(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubectl_style_flags_parse_anywhere() {
        let cli = Cli::try_parse_from(["kubectl-etcd_medic", "heal", "etcd-1", "-n", "apisix", "--wait", "-o", "json"]).unwrap();
        assert_eq!(cli.namespace.as_deref(), Some("apisix"));
        assert_eq!(cli.output, Output::Json);
        assert!(matches!(cli.command, Command::Heal { wait: true, dry_run: false, .. }));
        let cli = Cli::try_parse_from(["kubectl-etcd_medic", "restore", "x", "--no-wait"]).unwrap();
        assert!(matches!(cli.command, Command::Restore { wait: false, .. }));
        assert!(Cli::try_parse_from(["kubectl-etcd_medic", "heal"]).is_err(), "a pod is required");
        assert!(Cli::try_parse_from(["kubectl-etcd_medic", "-o", "xml", "list"]).is_err());
    }
}
