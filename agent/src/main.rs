use std::process::ExitCode;

use clap::Parser;
use etcd_medic::cli::{Cli, Command, NodeArgs, Output, PodRef, ServeArgs};
use etcd_medic::kubeapi::KubeApi;
use etcd_medic::locate::Locator;
use etcd_medic::remediation::Options;

fn main() -> ExitCode {
    let cli = Cli::parse();
    etcd_medic::telemetry::init(cli.log.log_format);
    let result = match &cli.command {
        Command::Serve(args) => {
            args.validate().map_err(anyhow::Error::from).and_then(|_| runtime()).and_then(|rt| rt.block_on(serve(args)))
        }
        Command::Locate { pod, node, output } => runtime().and_then(|rt| rt.block_on(locate(pod, node, *output))),
        Command::Remediate { pod, node, dry_run, force, engine } => {
            let opts = engine.options(node, *dry_run, *force);
            runtime().and_then(|rt| rt.block_on(remediate(pod, node, opts)))
        }
        Command::Restore { quarantine_id, node } => runtime().and_then(|rt| rt.block_on(restore(quarantine_id, node))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => match e.downcast_ref::<etcd_medic::Error>() {
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

async fn serve(args: &ServeArgs) -> anyhow::Result<()> {
    args.node.configure_etcd_tls()?;
    let listener =
        tokio::net::TcpListener::bind(args.listen).await.map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.listen))?;
    let agent = etcd_medic::api::Agent::new(etcd_medic::api::Config {
        layout: args.node.layout()?,
        api_timeout: args.node.api_timeout,
        engine: args.engine.options(&args.node, false, false),
        auth: args.auth,
        audiences: args.audiences.clone(),
        rate_limit: args.rate_limit,
        max_in_flight: args.max_in_flight,
        tls: args.tls_cert_file.clone().zip(args.tls_key_file.clone()),
    });
    etcd_medic::api::serve(agent, listener).await
}

async fn locate(pod: &PodRef, node: &NodeArgs, output: Output) -> anyhow::Result<()> {
    let locator = Locator { api: KubeApi::from_environment(node.api_timeout).await?, layout: node.layout()? };
    let plan = locator.locate(&pod.namespace, &pod.name, None).await?;
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&plan)?),
        Output::Table => print!("{}", plan.render_table()),
    }
    Ok(())
}

async fn remediate(pod: &PodRef, node: &NodeArgs, opts: Options) -> anyhow::Result<()> {
    node.configure_etcd_tls()?;
    use etcd_medic::remediation::{Engine, Phase, Remediation};
    let locator = Locator { api: KubeApi::from_environment(node.api_timeout).await?, layout: node.layout()? };
    let start = std::time::Instant::now();
    let printed = std::sync::Mutex::new(0usize);
    // One line when a step starts and one when it ends, as a person on the node follows it.
    let progress = |r: &Remediation| {
        let mut n = printed.lock().unwrap();
        let lines: Vec<String> = r
            .steps
            .iter()
            .flat_map(|s| {
                let mut v = vec![format!("{:<11} ...", s.name)];
                if let Some(o) = &s.outcome {
                    v.push(format!("{:<11} {o}: {}", s.name, s.message));
                }
                v
            })
            .collect();
        for l in &lines[(*n).min(lines.len())..] {
            println!("[{:>6.1}s] {l}", start.elapsed().as_secs_f64());
        }
        *n = lines.len();
    };
    // Ctrl-C or SIGTERM: the engine stops at the next safe point and says how to resume.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("interrupted: stopping at the next safe point (run the same command again to resume)");
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let engine = Engine { locator: &locator, opts, progress: &progress, stop: &stop };
    let r = engine.run(&pod.namespace, &pod.name, None).await;
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
            Err(etcd_medic::Error::new(etcd_medic::Code::NotReady, "interrupted").into())
        }
        (phase, Some(e)) => {
            println!("remediation {} {phase:?} after {took:.1}s", r.id);
            Err(etcd_medic::Error::new(e.code, e.message.clone()).into())
        }
        (phase, None) => anyhow::bail!("remediation {} ended {phase:?}", r.id),
    }
}

/// Puts the quarantine of remediation `id` back into the pod's data dir as it is now,
/// refusing while any process holds it.
async fn restore(id: &str, node: &NodeArgs) -> anyhow::Result<()> {
    let locator = Locator { api: KubeApi::from_environment(node.api_timeout).await?, layout: node.layout()? };
    println!("{}", etcd_medic::remediation::restore(&locator, &node.state_dir, id).await?);
    Ok(())
}
