//! `kubectl etcd-medic`: what a person with kubectl does when an etcd member crash-loops.
//! It talks only to the API server, with the user's own kubeconfig and RBAC: every action is
//! an `EtcdRemediation` (etcd-medic.io/v1alpha1) that the controller carries out, so that a
//! heal asked from a laptop is recorded, authorized and carried out exactly as the
//! controller's own. Exit codes are the agent's CLI's (see `Error::exit_code`): 0 when the
//! asked outcome was reached, else the class of the error's stable code.

mod cli;
mod recover;
mod show;

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{CommandFactory, Parser};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;

use etcd_medic_client::crd::{EtcdRemediation, EtcdRemediationSpec};
use etcd_medic_client::retry;
use etcd_medic_core::{Code, Error, Result};

use cli::{Cli, Command, Output};
use show::Follow;

/// The label the plugin puts on its records: who asked, for `list`.
const ASKED_BY: &str = "etcd-medic.io/asked-by";

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Completion { shell } = cli.command {
        clap_complete::generate(shell, &mut Cli::command(), "kubectl-etcd_medic", &mut std::io::stdout());
        return ExitCode::SUCCESS;
    }
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(6);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            // The message can carry what a tenant wrote (an API server's or agent's answer).
            eprintln!("error: {}: {}", e.code, show::safe(&e.message));
            ExitCode::from(e.exit_code())
        }
    }
}

/// The user's API access and the namespace meant.
struct Kube {
    client: Client,
    namespace: String,
    timeout: Duration,
}

impl Kube {
    async fn connect(cli: &Cli) -> Result<Kube> {
        let opts = kube::config::KubeConfigOptions { context: cli.context.clone(), cluster: None, user: None };
        let no_access = |e: String| Error::new(Code::NotReady, format!("no Kubernetes API access (kubeconfig): {e}"));
        let config = match &cli.kubeconfig {
            Some(path) => {
                let kc = kube::config::Kubeconfig::read_from(path)
                    .map_err(|e| Error::invalid(format!("cannot read the kubeconfig {}: {e}", path.display())))?;
                kube::Config::from_custom_kubeconfig(kc, &opts).await.map_err(|e| no_access(e.to_string()))?
            }
            None if cli.context.is_some() => kube::Config::from_kubeconfig(&opts).await.map_err(|e| no_access(e.to_string()))?,
            // KUBECONFIG, ~/.kube/config, else in-cluster (a pod's ServiceAccount).
            None => kube::Config::infer().await.map_err(|e| no_access(e.to_string()))?,
        };
        let namespace = cli.namespace.clone().unwrap_or_else(|| config.default_namespace.clone());
        let client = Client::try_from(config).map_err(|e| Error::new(Code::NotReady, format!("Kubernetes client: {e}")))?;
        Ok(Kube { client, namespace, timeout: cli.request_timeout })
    }

    fn records(&self, all: bool) -> Api<EtcdRemediation> {
        if all { Api::all(self.client.clone()) } else { Api::namespaced(self.client.clone(), &self.namespace) }
    }

    /// One API call, a blip asked again (for twice the request timeout, at least 10 s); a
    /// missing object is `not_found`.
    async fn call<T, F, Fut>(&self, what: &str, not_found: Code, mut op: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = kube::Result<T>>,
    {
        let retry_for = (self.timeout * 2).max(Duration::from_secs(10));
        retry::retrying(self.timeout, retry_for, what, &mut op).await.map_err(|(e, tries)| match e {
            None => Error::new(Code::NotReady, format!("the API server did not answer for {what} within {:?}", self.timeout)),
            Some(kube::Error::Api(s)) => {
                let code = match s.code {
                    404 => not_found,
                    401 => Code::Unauthenticated,
                    403 => Code::Forbidden,
                    400 | 409 | 422 => Code::InvalidRequest,
                    _ => Code::NotReady,
                };
                Error::new(code, format!("{what}: {} ({tries} tries)", s.message))
            }
            Some(e) => Error::new(Code::NotReady, format!("{what}: {e} ({tries} tries)")),
        })
    }

    async fn pod(&self, name: &str) -> Result<Pod> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        self.call(&format!("pod {}/{name}", self.namespace), Code::PodNotFound, || api.get(name)).await
    }

    async fn record(&self, name: &str) -> Result<EtcdRemediation> {
        let api = self.records(false);
        self.call(&format!("EtcdRemediation {}/{name}", self.namespace), Code::RemediationNotFound, || api.get(name)).await
    }

    async fn list(&self, all: bool, pod: Option<&str>) -> Result<Vec<EtcdRemediation>> {
        let api = self.records(all);
        let lp = ListParams::default();
        let mut items = self.call("EtcdRemediations", Code::NotFound, || api.list(&lp)).await?.items;
        items.retain(|r| pod.is_none_or(|p| r.spec.pod == p));
        show::newest_first(&mut items);
        Ok(items)
    }

    /// A record asking for `spec` on the pod as it is now (its UID pins the instance).
    async fn ask(&self, mut spec: EtcdRemediationSpec, verb: &str) -> Result<EtcdRemediation> {
        let pod = self.pod(&spec.pod).await?;
        spec.pod_uid = pod.metadata.uid.clone();
        let mut cr = EtcdRemediation::new("", spec);
        cr.metadata.name = None;
        cr.metadata.generate_name = Some(show::generate_name(&cr.spec.pod, verb));
        cr.metadata.labels = Some([(ASKED_BY.to_string(), "kubectl-etcd-medic".to_string())].into());
        let now = jiff::Timestamp::now().round(jiff::Unit::Microsecond).unwrap_or_else(|_| jiff::Timestamp::now());
        cr.metadata.annotations = Some([(show::ASKED_AT.to_string(), now.to_string())].into());
        let api = self.records(false);
        // Not retried: a create whose answer was lost would make a second record. A blip
        // is an error the person sees and asks again.
        api.create(&PostParams::default(), &cr).await.map_err(|e| match e {
            kube::Error::Api(s) if s.code == 403 => Error::new(Code::Forbidden, format!("creating an EtcdRemediation: {}", s.message)),
            kube::Error::Api(s) if s.code == 404 => {
                Error::new(Code::NotFound, format!("EtcdRemediations are not served (is etcd-medic's CRD installed?): {}", s.message))
            }
            kube::Error::Api(s) if matches!(s.code, 400 | 422) => Error::invalid(format!("the EtcdRemediation was refused: {}", s.message)),
            e => Error::new(Code::NotReady, format!("creating an EtcdRemediation: {e}")),
        })
    }

    /// Follows record `name` until `done` holds for it or `timeout` passes, telling each
    /// new step on stderr when `progress`.
    async fn follow(
        &self,
        name: &str,
        timeout: Duration,
        progress: bool,
        done: impl Fn(&EtcdRemediation) -> bool,
    ) -> Result<EtcdRemediation> {
        let start = Instant::now();
        let mut told = Follow::default();
        loop {
            let cr = self.record(name).await?;
            if progress {
                for line in told.lines(&cr, start.elapsed()) {
                    eprintln!("{line}");
                }
            }
            if done(&cr) {
                return Ok(cr);
            }
            if start.elapsed() > timeout {
                let phase = show::safe(cr.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or("not started"));
                return Err(Error::new(
                    Code::NotReady,
                    format!("EtcdRemediation {}/{name} is still {phase} after {timeout:?} (is the controller running?)", self.namespace),
                ));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

fn ended(cr: &EtcdRemediation) -> bool {
    etcd_medic_client::crd::is_final(cr.status.as_ref())
}

/// The exit status for an ended record: 0 when it reached `want`, else its error's class.
fn verdict(cr: &EtcdRemediation, want: &[&str]) -> u8 {
    let s = cr.status.as_ref();
    if s.and_then(|s| s.phase.as_deref()).is_some_and(|p| want.contains(&p)) {
        return 0;
    }
    show::error_of(cr).exit_code()
}

pub(crate) fn print(out: Output, value: &impl serde::Serialize, table: impl FnOnce() -> String) -> Result<()> {
    let text = match out {
        Output::Table => table(),
        Output::Json => serde_json::to_string_pretty(value).map_err(|e| Error::new(Code::Internal, e.to_string()))? + "\n",
        Output::Yaml => serde_yaml::to_string(value).map_err(|e| Error::new(Code::Internal, e.to_string()))?,
    };
    // A closed pipe (`| head`) is the reader's choice, not an error.
    let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes());
    Ok(())
}

async fn run(cli: Cli) -> Result<u8> {
    let kube = Kube::connect(&cli).await?;
    let out = cli.output;
    match cli.command {
        Command::Completion { .. } => Ok(0),
        Command::Diagnose { pod, timeout } => {
            let spec = EtcdRemediationSpec { pod, dry_run: true, reason: Some("kubectl etcd-medic diagnose".into()), ..Default::default() };
            let cr = kube.ask(spec, "diagnose").await?;
            let cr = kube.follow(&cr.name_any(), timeout, false, ended).await?;
            print(out, &cr, || show::diagnosis(&cr))?;
            // A diagnosis is the answer, whatever the dry run's verdict on acting.
            Ok(if cr.status.as_ref().is_some_and(|s| s.diagnosis.is_some()) { 0 } else { verdict(&cr, &["Planned"]) })
        }
        Command::Heal { pod, dry_run, force, wait, timeout, reason } => {
            let reason = Some(reason.unwrap_or_else(|| "kubectl etcd-medic heal".into()));
            let cr = kube.ask(EtcdRemediationSpec { pod, dry_run, force, reason, ..Default::default() }, "heal").await?;
            let name = cr.name_any();
            if !wait {
                print(out, &cr, || format!("etcdremediation.etcd-medic.io/{name} created\n"))?;
                return Ok(0);
            }
            eprintln!("etcdremediation.etcd-medic.io/{name} created; following it (Ctrl-C stops following, not the heal)");
            let cr = kube.follow(&name, timeout, out == Output::Table, ended).await?;
            print(out, &cr, || show::verdict_line(&cr))?;
            Ok(verdict(&cr, &["Succeeded", "Planned"]))
        }
        Command::Status { pod } => {
            let items = kube.list(false, pod.as_deref()).await?;
            match pod {
                Some(p) => {
                    let cr = items.into_iter().next().ok_or_else(|| {
                        Error::new(Code::RemediationNotFound, format!("no EtcdRemediation of pod {}/{p}", kube.namespace))
                    })?;
                    print(out, &cr, || show::detail(&cr))?;
                }
                None => {
                    let latest = show::latest_per_pod(items);
                    print(out, &latest, || show::table(&latest, false))?;
                }
            }
            Ok(0)
        }
        Command::List { all_namespaces } => {
            let items = kube.list(all_namespaces, None).await?;
            print(out, &items, || show::table(&items, all_namespaces))?;
            Ok(0)
        }
        Command::Restore { id, force, wait, timeout } => {
            let name = resolve(&kube, &id).await?;
            let before = kube.record(&name).await?;
            // What the controller would not act on is said now, not after a wait.
            let s = before.status.clone().unwrap_or_default();
            if !before.ran_and_ended() {
                return Err(Error::invalid(format!(
                    "EtcdRemediation {}/{name} is {}{}: only a remediation that ran and ended (Succeeded or Failed) has a quarantine to restore",
                    kube.namespace,
                    show::safe(s.phase.as_deref().unwrap_or("not started")),
                    if before.spec.dry_run { " (a dry run)" } else { "" }
                )));
            }
            let what = format!("EtcdRemediation {}/{name}", kube.namespace);
            let api = kube.records(false);
            let pp = PatchParams::default();
            // A restore that failed is asked again by a new generation of the spec.
            if before.spec.restore {
                let off = Patch::Merge(json!({"spec": {"restore": false}}));
                kube.call(&what, Code::RemediationNotFound, || api.patch(&name, &pp, &off)).await?;
            }
            let on = Patch::Merge(json!({"spec": {"restore": true, "restoreForce": force}}));
            let asked = kube.call(&what, Code::RemediationNotFound, || api.patch(&name, &pp, &on)).await?;
            let generation = asked.metadata.generation;
            if !wait {
                eprintln!("etcdremediation.etcd-medic.io/{name}: restore asked");
                return Ok(0);
            }
            let answered = |cr: &EtcdRemediation| {
                let r = cr.status.as_ref().and_then(|s| s.restore.as_ref());
                r.is_some_and(|r| r.phase == "Restored" || r.observed_generation >= generation)
            };
            let cr = kube.follow(&name, timeout, false, answered).await?;
            let r = cr.status.as_ref().and_then(|s| s.restore.clone()).unwrap_or_default();
            print(out, &r, || show::restore_line(&name, &r))?;
            Ok(match r.code.as_deref() {
                None => 0,
                Some(c) => show::code_of(c).map_or(6, |c| Error::new(c, "").exit_code()),
            })
        }
        Command::Members { pod, timeout } => {
            let cr = forced_dry_run(&kube, pod, "members", timeout).await?;
            let s = cr.status.clone().unwrap_or_default();
            if s.members.is_empty() {
                return Err(show::error_of(&cr));
            }
            print(out, &json!({"clusterID": s.cluster_id, "members": s.members}), || show::members(&s))?;
            Ok(0)
        }
        Command::Recover { statefulset, survivor, approve, wait, timeout } => {
            let ask = recover::Ask { name: &statefulset, picked: survivor.as_deref(), approve: approve.as_deref(), wait, timeout };
            recover::run(&kube, out, ask).await
        }
        Command::Inspect { pod, timeout } => {
            let cr = forced_dry_run(&kube, pod, "inspect", timeout).await?;
            let s = cr.status.clone().unwrap_or_default();
            let Some(data) = &s.data else { return Err(show::error_of(&cr)) };
            print(out, &json!({"data": data, "diagnosis": s.diagnosis}), || show::inspect(&cr, data))?;
            Ok(0)
        }
    }
}

/// A dry run that changes nothing, so force is harmless: it lets the check reach the
/// volume and etcd for a pod that does not look failing. Followed to its end.
pub(crate) async fn forced_dry_run(kube: &Kube, pod: String, what: &str, timeout: Duration) -> Result<EtcdRemediation> {
    let spec =
        EtcdRemediationSpec { pod, dry_run: true, force: true, reason: Some(format!("kubectl etcd-medic {what}")), ..Default::default() };
    let cr = kube.ask(spec, what).await?;
    kube.follow(&cr.name_any(), timeout, false, ended).await
}

/// A record's name, or the agent's remediation id that a record's status names.
async fn resolve(kube: &Kube, id: &str) -> Result<String> {
    if etcd_medic_core::names::validate_pod_name(id).is_ok() {
        match kube.record(id).await {
            Ok(r) => return Ok(r.name_any()),
            Err(e) if e.code == Code::RemediationNotFound => {}
            Err(e) => return Err(e),
        }
    }
    let items = kube.list(false, None).await?;
    items.into_iter().find(|r| r.status.as_ref().and_then(|s| s.remediation_id.as_deref()) == Some(id)).map(|r| r.name_any()).ok_or_else(
        || {
            Error::new(
                Code::RemediationNotFound,
                format!("no EtcdRemediation in {} named {id} or carrying remediation {id}", kube.namespace),
            )
        },
    )
}
