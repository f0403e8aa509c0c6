//! What each subcommand does, over the library: `serve`, `locate`, `diagnose`, `inspect`, `remediate` (the same
//! engine entry as the API, followed through its progress events) and `restore` (the same
//! library call as the API's). One shutdown path for all (see `shutdown`).

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;

use crate::cli::{Cli, Command, NodeArgs, Output, PodRef, ServeArgs};
use crate::engine::{Engine, Options, Phase};
use crate::error::{Code, Error};
use crate::shutdown::Shutdown;
use etcd_medic_core::progress::line;

/// Parses the command line, runs the command, and maps its end to an exit status: 0, or the
/// class of the error's code (see [`Error::exit_code`]).
pub fn parse_and_run() -> ExitCode {
    let cli = Cli::parse();
    crate::telemetry::init(cli.log.log_format);
    let result = runtime().and_then(|rt| rt.block_on(run(cli.command)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => match e.downcast_ref::<Error>() {
            Some(err) => {
                eprintln!("error: {} ({})", err.message, err.code);
                ExitCode::from(err.exit_code())
            }
            None => {
                eprintln!("error: {e:#}");
                ExitCode::from(1)
            }
        },
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?)
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve(args) => serve(&args).await,
        Command::Locate { pod, node, output } => locate(&pod, &node, output).await,
        Command::Diagnose { pod, node, output } => diagnose(&pod, &node, output).await,
        Command::Inspect { pod, data_dir, full, node, output } => {
            let depth = if full { crate::data::Depth::Full } else { crate::data::Depth::Heads };
            let (json, table) = match (pod, data_dir) {
                (Some(pod), _) => {
                    let found = node.locator().await?.inspect(&pod.namespace, &pod.name, depth).await?;
                    (serde_json::to_string_pretty(&found)?, found.render_table())
                }
                (None, Some(dir)) => {
                    let vol = crate::host::volume::Volume::open(&dir, std::path::Path::new(""))?;
                    let facts = crate::data::facts(&vol, std::path::Path::new(""), depth)?;
                    (serde_json::to_string_pretty(&facts)?, facts.render_table())
                }
                (None, None) => unreachable!("clap requires a pod or --data-dir"),
            };
            match output {
                Output::Json => println!("{json}"),
                Output::Table => print!("{table}"),
            }
            Ok(())
        }
        Command::Controller(args) => {
            let shutdown = Shutdown::on_signals("releasing the lead; remediations under way go on on their nodes");
            crate::controller::run(args.config()?, shutdown).await
        }
        Command::Crd => {
            // Both CRDs, as `kubectl apply -f -` takes them.
            print!("{}---\n{}", etcd_medic_client::crd::crd_yaml(), etcd_medic_client::recovery::crd_yaml());
            Ok(())
        }
        Command::Remediate { pod, node, dry_run, force, engine } => {
            let opts = engine.options(&node, dry_run, force)?;
            remediate(&pod, &node, opts).await
        }
        Command::Rebuild { data_dir, name, client_urls, held_revision, etcd, timeout } => {
            // The survivor's own revision, read offline: the cluster starts past it too.
            let vol = crate::host::volume::Volume::open(&data_dir, std::path::Path::new(""))?;
            let facts = crate::data::facts(&vol, std::path::Path::new(""), crate::data::Depth::Heads)?;
            let own = facts.db.as_ref().and_then(|d| d.revision).unwrap_or(0);
            drop(vol);
            let revision = etcd_medic_core::recover::bumped_revision(own, [held_revision], etcd_medic_core::recover::BUMP);
            let spec = crate::rebuild::Spec { etcd, data: data_dir, name, client_urls, revision, proc_root: "/proc".into(), timeout };
            let rebuilt = crate::rebuild::rebuild(&spec).await?;
            println!("{}", serde_json::to_string_pretty(&rebuilt)?);
            Ok(())
        }
        Command::Hold { .. } => {
            Shutdown::on_signals("the holder ends").stopped().await;
            Ok(())
        }
        Command::Restore { quarantine_id, force, node } => {
            let failpoint = crate::failpoint::Failpoint::from_env();
            let (_, said) = crate::engine::restore(&node.locator().await?, &node.state_dir, &quarantine_id, force, &failpoint).await?;
            println!("{said}");
            Ok(())
        }
    }
}

async fn serve(args: &ServeArgs) -> anyhow::Result<()> {
    args.validate()?;
    let listener = crate::server::listen(args.listen)?;
    let config = crate::server::Config {
        layout: args.node.layout()?,
        api_timeout: args.node.api_timeout,
        engine: args.engine.options(&args.node, false, false)?,
        auth: args.auth,
        audiences: args.audiences.clone(),
        rate_limit: args.rate_limit,
        max_in_flight: args.max_in_flight,
        reserved_for: args.reserved_for.clone(),
        tls: args.tls_cert_file.clone().zip(args.tls_key_file.clone()),
        rebuilder: crate::recovery::Rebuilder {
            etcd: args.etcd.clone(),
            state_dir: args.node.state_dir.clone(),
            timeout: std::time::Duration::from_secs(120),
        },
    };
    let shutdown = Shutdown::on_signals("no new requests; running remediations stop at a safe point");
    let agent = crate::server::Agent::new(config, shutdown);
    crate::server::serve(agent, listener).await
}

async fn locate(pod: &PodRef, node: &NodeArgs, output: Output) -> anyhow::Result<()> {
    let plan = node.locator().await?.locate(&pod.namespace, &pod.name, None).await?;
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&plan)?),
        Output::Table => print!("{}", plan.render_table()),
    }
    Ok(())
}

async fn diagnose(pod: &PodRef, node: &NodeArgs, output: Output) -> anyhow::Result<()> {
    let d = node.locator().await?.diagnose(&pod.namespace, &pod.name).await?;
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&d)?),
        Output::Table => print!("{}", etcd_medic_core::signature::render_table(&d)),
    }
    Ok(())
}

/// Runs one remediation from a node's shell, a line per step start and end.
async fn remediate(pod: &PodRef, node: &NodeArgs, opts: Options) -> anyhow::Result<()> {
    let locator = node.locator().await?;
    let start = Instant::now();
    let shutdown = Shutdown::on_signals("stopping at the next safe point (run the same command again to resume)");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<etcd_medic_core::progress::Update>();
    let printer = tokio::spawn(async move {
        while let Some(u) = rx.recv().await {
            if let Some(l) = line(&u.progress) {
                println!("[{:>6.1}s] {l}", start.elapsed().as_secs_f64());
            }
        }
    });
    let engine = Engine { locator: &locator, opts, progress: &tx, stop: shutdown.flag() };
    let r = engine.run(&pod.namespace, &pod.name, None).await;
    drop(tx);
    let _ = printer.await;
    let took = start.elapsed().as_secs_f64();
    match (&r.phase, &r.error) {
        (Phase::Succeeded, _) => {
            println!(
                "remediation {} Succeeded in {took:.1}s: {pod} rejoined; quarantine {}",
                r.id,
                r.quarantine_path.as_ref().map(|p| p.display().to_string()).unwrap_or_default()
            );
            Ok(())
        }
        (Phase::Planned, _) => {
            if let Some(plan) = &r.plan {
                print!("{}", plan.render_table());
            }
            println!("dry run {}: every gate passed; nothing changed", r.id);
            Ok(())
        }
        (Phase::Running, _) => {
            println!("remediation {} stopped at a safe point after {took:.1}s; run the same command again to resume it", r.id);
            Err(Error::new(Code::NotReady, "interrupted").into())
        }
        (phase, Some(e)) => {
            println!("remediation {} {phase:?} after {took:.1}s", r.id);
            Err(Error::new(e.code, e.message.clone()).into())
        }
        (phase, None) => anyhow::bail!("remediation {} ended {phase:?}", r.id),
    }
}
