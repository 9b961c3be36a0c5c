//! The `task-executor` binary: the agent, plus its `init` role (a container's first
//! process, which supervises the agent) and its `shim-server` role (which forks one
//! supervisor per task).
#![forbid(unsafe_code)]

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};
use task_executor::config::{Config, go_flags};

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
    /// Run as a container's first process: start the agent (given its flags after `--`)
    /// and its shim server, restart the agent when it dies, forward signals, reap orphans.
    Init(InitArgs),
    /// Print the Task CustomResourceDefinition (YAML), as crds/ holds it.
    Crd,
    /// Fork server that starts shims (started by the init or the agent; not for direct use).
    #[command(hide = true)]
    ShimServer {
        /// The open-file soft limit for tasks (the agent's own, before it raised it).
        #[arg(long)]
        nofile_soft: Option<u64>,
        /// The oom_score_adj for shims and tasks (the container's, when the agent's was
        /// raised by the init).
        #[arg(long, allow_negative_numbers = true)]
        oom_score_adj: Option<i32>,
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
        /// Running tasks to re-adopt after a kill -9 of the agent (0: skip).
        #[arg(long, default_value_t = 5_000)]
        adopted_tasks: usize,
        /// Finished tasks to hold, list, and load again after a kill -9 (0: skip).
        #[arg(long, default_value_t = 100_000)]
        finished_tasks: usize,
    },
}

#[derive(clap::Args)]
struct InitArgs {
    /// Longest pause between restarts of an agent that keeps dying (the first restart is
    /// immediate; the pause doubles from 1s).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    restart_delay_max: std::time::Duration,
    /// An agent that ran this long is restarted at once again when it dies.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    restart_reset_after: std::time::Duration,
    /// On SIGTERM/SIGINT, how long the agent may take to exit before it is killed.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    agent_stop_timeout: std::time::Duration,
    /// The agent's flags (its environment variables work as well).
    #[arg(last = true, value_name = "AGENT FLAGS")]
    agent_args: Vec<std::ffi::OsString>,
}

/// Margin over the tasks' grace period for their supervisors to record the exit.
const DRAIN_MARGIN: std::time::Duration = std::time::Duration::from_secs(5);

fn main() -> anyhow::Result<()> {
    // Upstream's deployments write Go `flag` spellings (`-listen-addr=...`).
    let cli = Cli::parse_from(go_flags::normalise(&Cli::command(), std::env::args_os()));
    match cli.command {
        Some(Command::Init(args)) => std::process::exit(init(args)?),
        Some(Command::Crd) => {
            print!("{}", task_executor::kube::crd::crd_yaml()?);
            Ok(())
        }
        Some(Command::ShimServer {
            nofile_soft,
            oom_score_adj,
        }) => {
            if let Some(soft) = nofile_soft {
                // Best effort: tasks then keep the raised limit, which only ever helps.
                let _ = task_executor::limits::set_nofile_soft(soft);
            }
            if let Some(adj) = oom_score_adj {
                // Back to the container's value: down to the value the init had needs no
                // privilege (the kernel's oom_score_adj_min).
                if let Err(e) = std::fs::write("/proc/self/oom_score_adj", adj.to_string()) {
                    eprintln!("task-executor shim-server: oom_score_adj {adj}: {e}");
                }
            }
            std::process::exit(task_executor::runtime::shim::server::serve(
                task_executor::agent_only_env(),
            ))
        }
        Some(Command::Bench {
            held_tasks,
            clients,
            duration,
            latency_samples,
            adopted_tasks,
            finished_tasks,
        }) => {
            let opts = task_executor::bench::BenchOptions {
                held_tasks,
                clients,
                duration,
                latency_samples,
                adopted_tasks,
                finished_tasks,
            };
            print!("{}", task_executor::bench::run(&opts)?);
            Ok(())
        }
        None => serve(cli.config),
    }
}

/// The agent's flags are checked here, once, so that a bad one stops the container with
/// its usage error instead of a restart loop.
fn init(args: InitArgs) -> anyhow::Result<i32> {
    let argv0 = std::ffi::OsString::from("task-executor");
    let argv = std::iter::once(argv0).chain(args.agent_args.clone());
    let agent = Config::try_parse_from(go_flags::normalise(&Config::command(), argv))
        .unwrap_or_else(|e| e.exit());
    task_executor::telemetry::init(&agent.log_level, agent.log_format);
    let exe = std::env::current_exe().context("locating the task-executor binary")?;
    Ok(task_executor::init::run(task_executor::init::Options {
        exe,
        agent_args: args.agent_args,
        restart: task_executor::init::backoff::Policy {
            max_delay: args.restart_delay_max,
            reset_after: args.restart_reset_after,
        },
        agent_stop_timeout: args.agent_stop_timeout,
        drain_timeout: agent.stop_grace_period.saturating_add(DRAIN_MARGIN),
    }))
}

fn serve(config: Config) -> anyhow::Result<()> {
    task_executor::telemetry::init(&config.log_level, config.log_format);
    let under_init = match task_executor::runtime::launcher::adopt_server_on_stdin() {
        Ok(true) => {
            tracing::debug!("using the shim server of task-executor init");
            true
        }
        Ok(false) => false,
        Err(e) => {
            tracing::warn!(error = %e, "starting a shim server of our own");
            false
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        // Only short reads and scans run there (`sys::offload`; the store writes on
        // threads of its own); few threads keep few malloc arenas.
        .max_blocking_threads(8)
        .enable_all()
        .build()
        .context("building the async runtime")?;
    let result = rt.block_on(task_executor::run(config, shutdown_signal(under_init)));
    // A log read or a /proc scan in the blocking pool is not worth waiting for.
    rt.shutdown_background();
    result.context("task-executor failed")
}

/// Resolves on SIGTERM or SIGINT. Under `task-executor init` that signal means the
/// container is stopping, and the init has the supervisors stop the tasks; without it the
/// tasks keep running for the next agent to re-adopt.
async fn shutdown_signal(under_init: bool) {
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
    match under_init {
        true => tracing::info!(
            "shutting down; the container is stopping and its init stops the running tasks, recording their exits"
        ),
        false => {
            tracing::info!("shutting down; tasks keep running and are re-adopted on the next start")
        }
    }
}
