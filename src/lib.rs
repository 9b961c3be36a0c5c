//! task-executor: a node agent that runs short-lived tasks for a sandbox pod.
//!
//! Layers, each importing only those below it:
//! `api` (HTTP) → `kube` (Kubernetes integrations) → `manager` (create / delete / sync) →
//! `runtime` (process, sidecar, container backends) → `task` (model, names, store).
//! Exit events flow back runtime → manager over a channel. See README.md for the API.
#![deny(unsafe_code)]

#[forbid(unsafe_code)]
pub mod api;
#[forbid(unsafe_code)]
pub mod bench;
#[forbid(unsafe_code)]
pub mod config;
#[forbid(unsafe_code)]
pub mod init;
#[forbid(unsafe_code)]
pub mod kube;
#[forbid(unsafe_code)]
pub mod limits;
#[forbid(unsafe_code)]
pub mod manager;
#[forbid(unsafe_code)]
pub mod metrics;
pub mod runtime; // holds `runtime::child_setup`, the one module allowed `unsafe`
#[forbid(unsafe_code)]
pub mod task;
#[forbid(unsafe_code)]
pub mod telemetry;

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::api::auth::{Authenticator, KubernetesAuth, TokenFile};
use crate::api::handlers::AppState;
use crate::api::server::{ServerOptions, TlsFiles};
use crate::config::{AuthMode, Config};
use crate::manager::{Manager, ManagerConfig};
use crate::runtime::container::volumes::{
    POD_VOLUMES_TIMEOUT, PodVolumes, StaticVolumes, VolumeResolver,
};
use crate::runtime::container::{ContainerRuntime, ContainerRuntimeConfig};
use crate::runtime::first_use::FirstUse;
use crate::runtime::process::ProcessRuntime;
use crate::runtime::sidecar::{EnvLocator, MainContainerLocator, SidecarRuntime, Unlocatable};
use crate::runtime::{Runtime, Runtimes};
use crate::task::model::ExecMode;
use crate::task::policy::{PolicyLevel, TaskPolicy};
use crate::task::store::Store;

/// Errors that stop the agent from starting or serving.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("data dir {path}: {source}")]
    DataDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Manager(#[from] manager::ManagerError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// The environment variables that are the agent's own: every one its flags read (from
/// the configuration itself, so none is missed), the init's hand-over of the shim server,
/// the log filter and the Kubernetes client's credentials file. Host tasks inherit the
/// agent's environment without them.
pub fn agent_only_env() -> Vec<String> {
    use clap::CommandFactory;
    let mut names: Vec<String> = Config::command()
        .get_arguments()
        .filter_map(|a| a.get_env())
        .map(|e| e.to_string_lossy().into_owned())
        .collect();
    names.extend(
        [
            runtime::launcher::SERVER_ON_STDIN_ENV,
            runtime::launcher::TASK_OOM_SCORE_ADJ_ENV,
            "RUST_LOG",
            "KUBECONFIG",
        ]
        .map(String::from),
    );
    names
}

/// `--task-run-as-user` and `--task-uid-range` need the capabilities to change ids:
/// without them every task would fail to start, so the agent doesn't start at all. A
/// range must also hold a uid for each task `--max-concurrent-tasks` lets run.
fn check_task_identity(config: &Config) -> Result<(), AppError> {
    const SETGID: u64 = 1 << 6;
    const SETUID: u64 = 1 << 7;
    let mut flags = Vec::new();
    if let Some(run_as) = config.task_run_as_user {
        flags.push(format!(
            "--task-run-as-user {}:{}",
            run_as.uid.unwrap_or_default(),
            run_as.gid.unwrap_or_default()
        ));
    }
    if let Some(range) = config.task_uid_range {
        let max = config.max_concurrent_tasks as u64;
        if max > range.size() {
            return Err(AppError::Config(format!(
                "--task-uid-range {range} holds {} uids, fewer than --max-concurrent-tasks {max}: give it at least {max}",
                range.size()
            )));
        }
        // Tasks as the default user would share a uid with the task given it.
        if let Some(uid) = config.task_run_as_user.and_then(|r| r.uid)
            && range.contains(uid)
        {
            return Err(AppError::Config(format!(
                "--task-uid-range {range} holds --task-run-as-user's uid {uid}: give a range without it"
            )));
        }
        flags.push(format!("--task-uid-range {range}"));
    }
    if flags.is_empty() {
        return Ok(());
    }
    let caps = runtime::procfs::own_effective_caps()?;
    if caps & (SETUID | SETGID) != SETUID | SETGID {
        return Err(AppError::Config(format!(
            "{} needs CAP_SETUID and CAP_SETGID (run the agent as root)",
            flags.join(" and ")
        )));
    }
    let run_as = config.task_run_as_user.unwrap_or_default();
    tracing::info!(
        uid = run_as.uid,
        gid = run_as.gid,
        uid_range = config.task_uid_range.map(|r| r.to_string()),
        "host tasks run as another user unless their securityContext says otherwise"
    );
    Ok(())
}

/// The task policy of `--task-policy` and its allowlists, over the configured identity.
fn task_policy(config: &Config) -> TaskPolicy {
    TaskPolicy {
        level: config.task_policy,
        run_as: config.task_run_as_user,
        uid_range: config.task_uid_range,
        remote_runs_as_target: config.sidecar_run_as_target_user,
        main_container: config.main_container_name.clone(),
        host_paths: config.task_host_path_allow.clone(),
        images: config.task_image_allow.clone(),
    }
}

/// `restricted` never runs a task as root: its tasks need a non-root identity to run
/// as, so an agent that would run them as itself (root) doesn't start.
fn check_task_policy(config: &Config) -> Result<(), AppError> {
    if let Some(p) = config
        .task_host_path_allow
        .iter()
        .find(|p| !p.is_absolute())
    {
        return Err(AppError::Config(format!(
            "--task-host-path-allow {}: expected an absolute directory",
            p.display()
        )));
    }
    if config.task_policy != PolicyLevel::Restricted {
        return Ok(());
    }
    let own_identity =
        config.task_uid_range.is_none() && config.task_run_as_user.and_then(|r| r.uid).is_none();
    if own_identity && nix::unistd::geteuid().is_root() {
        return Err(AppError::Config(
            "--task-policy restricted runs no task as root: give host tasks a user (--task-run-as-user or --task-uid-range)".into(),
        ));
    }
    if config.task_run_as_user.and_then(|r| r.uid) == Some(0) {
        return Err(AppError::Config(
            "--task-policy restricted runs no task as root: --task-run-as-user must not be 0"
                .into(),
        ));
    }
    if !config.sidecar_run_as_target_user {
        return Err(AppError::Config(
            "--task-policy restricted needs --sidecar-run-as-target-user (else commands in the main container run as the agent, root)".into(),
        ));
    }
    Ok(())
}

/// How long in-flight requests may take to finish once shutdown starts.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// Runs the agent until `shutdown` resolves. Tasks keep running after it returns; the next
/// start re-adopts them.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AppError> {
    match limits::raise_nofile() {
        Ok((before, after)) if before < after => {
            tracing::info!(before, after, "raised the open-file limit")
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
    runtime::reaper::start()?;
    // The one Kubernetes client (made on first use): every integration shares it; hand a
    // clone to any other component that talks to the API server.
    let kube = crate::kube::KubeClient::new(crate::kube::KubeTimeouts {
        watch: config.kube_watch_timeout,
    });
    // Credentials and certificates first: a misconfigured agent must not start at all.
    let auth = build_auth(&config, &kube).await?;
    let tls = match (&config.tls_cert_file, &config.tls_key_file) {
        (Some(cert), Some(key)) => Some(Arc::new(
            TlsFiles::load(cert, key).map_err(AppError::Config)?,
        )),
        _ => None,
    };
    check_task_identity(&config)?;
    check_task_policy(&config)?;
    let store = Store::open(&config.data_dir).map_err(|source| AppError::DataDir {
        path: config.data_dir.display().to_string(),
        source,
    })?;
    let Built {
        runtimes,
        container,
        sidecar,
    } = build_runtimes(&config, &kube).await?;
    let manager = Manager::new(
        store,
        runtimes,
        ManagerConfig {
            stop_grace: config.stop_grace_period,
            max_concurrent: (config.max_concurrent_tasks > 0)
                .then_some(config.max_concurrent_tasks),
            start_retry: config.start_retry_timeout,
            task_uids: config.task_uid_range,
            policy: task_policy(&config),
        },
    );
    manager.recover().await?;
    start_kube_integrations(&config, &kube, &manager, sidecar)?;

    let listener = tokio::net::TcpListener::bind(config.listen_addr)
        .await
        .map_err(|source| AppError::Bind {
            addr: config.listen_addr.to_string(),
            source,
        })?;
    let addr = listener.local_addr()?;
    tracing::info!(
        %addr,
        data_dir = %config.data_dir.display(),
        sidecar = config.enable_sidecar_mode,
        container = config.enable_container_mode,
        auth = ?config.auth_mode,
        tls = tls.is_some(),
        "task-executor listening"
    );
    if config.auth_mode == AuthMode::None && !addr.ip().is_loopback() {
        tracing::warn!(
            %addr,
            "no authentication (--auth-mode=none): whoever reaches this address, the pod's own containers included, can run commands as the agent"
        );
    }
    let state = Arc::new(AppState {
        manager,
        auth,
        max_body: config.max_body_bytes,
        body_timeout: config.request_timeout,
        show_task_env: config.show_task_env,
    });
    let stop = CancellationToken::new();
    let stopping = stop.clone();
    tokio::spawn(async move {
        shutdown.await;
        stopping.cancel();
    });
    let options = ServerOptions {
        max_connections: config.max_connections.max(1),
        header_read_timeout: config.header_read_timeout,
        idle_timeout: config.idle_timeout,
        shutdown_grace: SHUTDOWN_GRACE,
        guarded: state.auth.required(),
    };
    api::server::serve(listener, api::routes(state), tls, options, stop).await;
    if let Some(c) = container {
        c.shutdown().await;
    }
    Ok(())
}

/// The credential check `--auth-mode` asks for, with what it needs.
async fn build_auth(
    config: &Config,
    kube: &crate::kube::KubeClient,
) -> Result<Authenticator, AppError> {
    if config.auth_mode != AuthMode::Token && config.auth_token_file.is_some() {
        // A token file without token mode would look protected and be open.
        return Err(AppError::Config(
            "--auth-token-file is set but --auth-mode is not token".into(),
        ));
    }
    Ok(match config.auth_mode {
        AuthMode::None => Authenticator::None,
        AuthMode::Token => {
            let path = config.auth_token_file.as_deref().ok_or_else(|| {
                AppError::Config("--auth-mode=token needs --auth-token-file".into())
            })?;
            let file = TokenFile::open(path).map_err(|e| AppError::Config(e.to_string()))?;
            Authenticator::Token(Arc::new(file))
        }
        AuthMode::Kubernetes => {
            let namespace = config
                .pod_namespace
                .clone()
                .filter(|ns| !ns.is_empty())
                .ok_or_else(|| {
                    AppError::Config(
                        "--auth-mode=kubernetes needs POD_NAMESPACE (the namespace whose Task permissions callers need)".into(),
                    )
                })?;
            let client = kube
                .get()
                .await
                .map_err(|e| AppError::Config(format!("--auth-mode=kubernetes: {e}")))?;
            let reviewer = crate::kube::review::Reviewer::new(client);
            Authenticator::Kubernetes(Arc::new(KubernetesAuth::new(reviewer, namespace)))
        }
    })
}

/// The Pod watch (sidecar mode with POD_NAME/POD_NAMESPACE) and the Task watch
/// (`--watch-tasks`). Both run in the background and retry on their own.
fn start_kube_integrations(
    config: &Config,
    kube: &crate::kube::KubeClient,
    manager: &Arc<Manager>,
    sidecar: SidecarRuntime,
) -> Result<(), AppError> {
    let pod = config.pod_name.clone().zip(config.pod_namespace.clone());
    if config.enable_sidecar_mode
        && let Some(watch) = pod_watch(config, kube, sidecar)
    {
        watch();
    }
    if config.watch_tasks {
        let Some((pod, ns)) = pod else {
            return Err(AppError::Config(
                "--watch-tasks needs POD_NAME and POD_NAMESPACE".into(),
            ));
        };
        let events = crate::kube::events::EventSink::spawn(kube.clone(), pod.clone());
        crate::kube::watch::spawn(kube.clone(), ns, pod, manager.clone(), events);
    }
    Ok(())
}

/// The runtimes, plus the concrete handles that need more than the trait.
struct Built {
    runtimes: Runtimes,
    /// For removing an agent-owned sandbox at shutdown.
    container: Option<ContainerRuntime>,
    /// For the Pod watch to stop tasks of a restarted main container.
    sidecar: SidecarRuntime,
}

/// Starts the watch of the own Pod that stops the tasks of a replaced main container, when
/// the agent knows its Pod.
fn pod_watch(
    config: &Config,
    kube: &crate::kube::KubeClient,
    sidecar: SidecarRuntime,
) -> Option<impl FnOnce() + Send + 'static> {
    let (pod, ns) = config.pod_name.clone().zip(config.pod_namespace.clone())?;
    let (kube, container) = (kube.clone(), config.main_container_name.clone());
    Some(move || {
        crate::kube::pod_watch::spawn_pod_watch(kube, ns, pod, container, move |_| {
            let sidecar = sidecar.clone();
            tokio::spawn(async move { sidecar.target_changed().await });
        })
    })
}

/// Where process tasks' cgroups are made, logged once with what the tasks get.
fn task_containment(config: &Config) -> Option<crate::runtime::containment::Parent> {
    use crate::runtime::containment;
    let found = if config.task_cgroups {
        containment::detect()
    } else {
        Err("--task-cgroups=false".to_string())
    };
    match found {
        Ok(p) => {
            tracing::info!(mechanism = p.kind.as_str(), parent = %p.dir.display(), "process tasks get a cgroup each");
            crate::metrics::containment(p.kind.as_str());
            Some(p)
        }
        Err(why) => {
            tracing::warn!(why = %why, "no cgroup per task: a task's processes are ended by its process tree, and what escapes a dead supervisor is found by its uid (with --task-uid-range) or its marker");
            crate::metrics::containment("none");
            None
        }
    }
}

/// Where process tasks' limits and usage are kept, logged once.
fn task_limits(
    config: &Config,
    containment: Option<&crate::runtime::containment::Parent>,
) -> crate::runtime::limits::Controllers {
    let why_none = if config.task_cgroups {
        "the agent can make no cgroup (see the start log)"
    } else {
        "--task-cgroups=false"
    };
    let c = crate::runtime::limits::detect(containment, why_none);
    tracing::info!(controllers = %c.summary(), pids_limit = config.task_pids_limit, "resource limits per process task");
    c
}

async fn build_runtimes(
    config: &Config,
    kube: &crate::kube::KubeClient,
) -> Result<Built, AppError> {
    let exe = std::env::current_exe()?;
    let containment = task_containment(config);
    let process = ProcessRuntime::new(exe, config.stop_grace_period, config.max_log_bytes)
        .with_default_run_as(config.task_run_as_user.unwrap_or_default())
        .with_hook_timeout(Some(config.hook_timeout).filter(|t| !t.is_zero()))
        .with_limits(
            task_limits(config, containment.as_ref()),
            Some(config.task_pids_limit).filter(|n| *n > 0),
            config.task_uid_range.is_some(),
        )
        .with_containment(containment)
        .with_end_with_main(config.end_task_with_main)
        .with_signalling(crate::runtime::proc_handle::check_signalling().inspect_err(
            |why| tracing::error!(why = %why, "the agent cannot stop tasks: not ready"),
        ))
        .with_default_seccomp(config.task_policy == PolicyLevel::Restricted);
    // Every agent can run a task inside the main container (`execMode: Remote`), so the
    // sidecar runtime is always built; it looks for the main container per task.
    // In a pod (POD_NAME set) the main container is the Pod's and the runtime's answer,
    // and nothing else: an environment variable any process can set never decides it
    // there (fails closed: no answer, no target). Outside one, upstream's env scan.
    let locator: Arc<dyn MainContainerLocator> = match (&config.pod_name, &config.pod_namespace) {
        (Some(pod), Some(ns)) => Arc::new(crate::kube::locator::KubeLocator::new(
            kube.clone(),
            ns.clone(),
            pod.clone(),
            config.main_container_name.clone(),
            crate::kube::locator::default_resolvers(&config.cri_socket),
        )),
        (Some(_), None) => Arc::new(Unlocatable(
            "POD_NAME is set without POD_NAMESPACE: the Pod can't be read".into(),
        )),
        _ => Arc::new(EnvLocator {
            container: config.main_container_name.clone(),
        }),
    };
    let sidecar = SidecarRuntime::new(
        process.clone(),
        locator,
        config.main_container_name.clone(),
        config.sidecar_join_cgroup,
        config.sidecar_run_as_target_user,
    );
    // In sidecar mode the Pod watch starts with the agent; otherwise with the first
    // `Remote` task (most agents never have one).
    let remote: Arc<dyn Runtime> = match pod_watch(config, kube, sidecar.clone()) {
        Some(watch) if !config.enable_sidecar_mode => {
            Arc::new(FirstUse::new(Arc::new(sidecar.clone()), watch))
        }
        _ => Arc::new(sidecar.clone()),
    };
    let container = if config.enable_container_mode {
        let flags: HashMap<String, PathBuf> = config
            .volume_map()
            .map_err(AppError::Config)?
            .into_iter()
            .collect();
        // In a pod, volume names are also those of the own Pod (read on demand).
        let volumes: Arc<dyn VolumeResolver> = match (&config.pod_name, &config.pod_namespace) {
            (Some(pod), Some(ns)) if !pod.is_empty() && !ns.is_empty() => {
                let pod_volumes = PodVolumes::new(
                    flags,
                    Arc::new(crate::kube::pod::OwnPod::new(
                        kube.clone(),
                        ns.clone(),
                        pod.clone(),
                    )),
                    POD_VOLUMES_TIMEOUT,
                );
                // The task policy: a task mounts only what the main container does.
                Arc::new(match config.task_policy {
                    PolicyLevel::Privileged => pod_volumes,
                    _ => pod_volumes.mounted_by(config.main_container_name.clone()),
                })
            }
            _ => Arc::new(StaticVolumes::new(flags)),
        };
        let pod = config
            .pod_name
            .as_deref()
            .zip(config.pod_namespace.as_deref());
        let cfg = ContainerRuntimeConfig {
            socket: config.cri_socket.clone(),
            sandbox: ContainerRuntimeConfig::sandbox_mode(pod, &config.data_dir),
            poll_interval: config.reconcile_interval,
            grace: config.stop_grace_period,
            max_log_bytes: config.max_log_bytes,
            // Restricted: never the image's (maybe root) user; the configured task user,
            // else nobody.
            run_as: (config.task_policy == PolicyLevel::Restricted).then(|| {
                let r = config.task_run_as_user.unwrap_or_default();
                let uid = r.uid.unwrap_or(65534);
                (uid, r.gid.unwrap_or(uid))
            }),
        };
        Some(ContainerRuntime::connect(cfg, volumes).map_err(|e| AppError::Config(e.to_string()))?)
    } else {
        None
    };
    let runtimes = Runtimes {
        host: Arc::new(process),
        sidecar: remote,
        container: container.clone().map(|c| Arc::new(c) as Arc<dyn Runtime>),
        default_exec_mode: if config.enable_sidecar_mode {
            ExecMode::Remote
        } else {
            ExecMode::Local
        },
    };
    Ok(Built {
        runtimes,
        container,
        sidecar,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_flags_variable_is_the_agents_own() {
        let names = super::agent_only_env();
        for n in [
            "DATA_DIR",
            "AUTH_TOKEN_FILE",
            "TLS_KEY_FILE",
            "TASK_RUN_AS_USER",
            "TASK_UID_RANGE",
            "POD_NAME",
            "TASK_EXECUTOR_SHIM_SERVER",
            "KUBECONFIG",
        ] {
            assert!(names.iter().any(|x| x == n), "{n} in {names:?}");
        }
        // What tasks rely on stays theirs.
        for n in ["PATH", "HOME", "HTTPS_PROXY", "KUBERNETES_SERVICE_HOST"] {
            assert!(!names.iter().any(|x| x == n), "{n}");
        }
    }
}
