//! The `task-executor` binary: the agent, plus its `shim-server` role (which forks one
//! supervisor per task).
#![forbid(unsafe_code)]

use anyhow::Context;
use clap::{Parser, Subcommand};
use task_executor::config::Config;

#[derive(Parser)]
#[command(
    name = "task-executor",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    config: Config,
}

#[derive(Subcommand)]
enum Command {
    /// Print the Task CustomResourceDefinition (YAML), as crds/ holds it.
    Crd,
    /// Fork server that starts shims (started by the agent; not for direct use).
    #[command(hide = true)]
    ShimServer {
        /// The open-file soft limit for tasks (the agent's own, before it raised it).
        #[arg(long)]
        nofile_soft: Option<u64>,
    },
    /// Measure latency, throughput, list time and memory against a raw spawn loop.
    Bench {
        #[arg(long, default_value_t = 10_000)]
        held_tasks: usize,
        #[arg(long, default_value_t = 16)]
        clients: usize,
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        duration: std::time::Duration,
        #[arg(long, default_value_t = 300)]
        latency_samples: usize,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Crd) => {
            print!("{}", task_executor::kube::crd::crd_yaml()?);
            Ok(())
        }
        Some(Command::ShimServer { nofile_soft }) => {
            if let Some(soft) = nofile_soft {
                // Best effort: tasks then keep the raised limit, which only ever helps.
                let _ = task_executor::limits::set_nofile_soft(soft);
            }
            std::process::exit(task_executor::runtime::shim::server::serve())
        }
        Some(Command::Bench {
            held_tasks,
            clients,
            duration,
            latency_samples,
        }) => {
            let opts = task_executor::bench::BenchOptions {
                held_tasks,
                clients,
                duration,
                latency_samples,
            };
            print!("{}", task_executor::bench::run(&opts)?);
            Ok(())
        }
        None => serve(cli.config),
    }
}

fn serve(config: Config) -> anyhow::Result<()> {
    task_executor::telemetry::init(&config.log_level, config.log_format);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        // Only short file-system writes run there; few threads keep few malloc arenas.
        .max_blocking_threads(8)
        .enable_all()
        .build()
        .context("building the async runtime")?;
    let result = rt.block_on(task_executor::run(config, shutdown_signal()));
    // Exit waiters block in flock(2) on threads of their own; don't wait for them.
    rt.shutdown_background();
    result.context("task-executor failed")
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
