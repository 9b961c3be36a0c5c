//! The parts the agent is composed of, from the configuration: the runtimes, the
//! credential check, the Kubernetes integrations.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use crate::api::auth::{Authenticator, KubernetesAuth, TokenFile};
use crate::config::{AuthMode, Config};
use crate::manager::Manager;
use crate::runtime::container::volumes::{
    POD_VOLUMES_TIMEOUT, PodVolumes, StaticVolumes, VolumeResolver,
};
use crate::runtime::container::{ContainerRuntime, ContainerRuntimeConfig};
use crate::runtime::first_use::FirstUse;
use crate::runtime::process::ProcessRuntime;
use crate::runtime::sidecar::{EnvLocator, MainContainerLocator, SidecarRuntime, Unlocatable};
use crate::runtime::{Runtime, Runtimes};
use crate::task::model::ExecMode;
use crate::task::policy::PolicyLevel;

use super::AppError;

/// The credential check `--auth-mode` asks for, with what it needs.
pub(super) async fn build_auth(
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
pub(super) fn start_kube_integrations(
    config: &Config,
    kube: &crate::kube::KubeClient,
    manager: &Arc<Manager>,
    sidecar: SidecarRuntime,
) -> Result<(), AppError> {
    let pod = config.pod_name.clone().zip(config.pod_namespace.clone());
    if config.enable_sidecar_mode
        && let Some(watch) = restart_watch(config, kube, sidecar)
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
        crate::kube::task_controller::start(kube.clone(), ns, pod, manager.clone(), events);
    }
    Ok(())
}

/// The runtimes, plus the concrete handles that need more than the trait.
pub(super) struct Built {
    pub runtimes: Runtimes,
    /// For removing an agent-owned sandbox at shutdown.
    pub container: Option<ContainerRuntime>,
    /// For the Pod watch to stop tasks of a restarted main container.
    pub sidecar: SidecarRuntime,
}

/// Starts the watch of the own Pod that stops the tasks of a replaced main container, when
/// the agent knows its Pod.
pub(super) fn restart_watch(
    config: &Config,
    kube: &crate::kube::KubeClient,
    sidecar: SidecarRuntime,
) -> Option<impl FnOnce() + Send + 'static> {
    let (pod, ns) = config.pod_name.clone().zip(config.pod_namespace.clone())?;
    let (kube, container) = (kube.clone(), config.main_container_name.clone());
    Some(move || {
        crate::kube::restart_watch::start(kube, ns, pod, container, move |_| {
            let sidecar = sidecar.clone();
            tokio::spawn(async move { sidecar.target_changed().await });
        })
    })
}

/// Where process tasks' cgroups are made, logged once with what the tasks get.
pub(super) fn task_containment(config: &Config) -> Option<crate::runtime::containment::Parent> {
    use crate::runtime::containment;
    let found = if config.task_cgroups {
        containment::detect()
    } else {
        Err("--task-cgroups=false".to_string())
    };
    match found {
        Ok(p) => {
            tracing::info!(mechanism = p.kind.as_str(), parent = %p.dir.display(), "process tasks get a cgroup each");
            sweep_leftovers(&p.dir);
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
pub(super) fn task_limits(
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
    for parent in c.v1_parents() {
        sweep_leftovers(parent);
    }
    c
}

/// Removes what dead shims left in `parent` (see `containment::sweep_leftovers`), once
/// at start: before, each shim that died before its claim left a cgroup for good.
fn sweep_leftovers(parent: &std::path::Path) {
    let removed = crate::runtime::containment::sweep_leftovers(parent);
    if removed > 0 {
        tracing::info!(parent = %parent.display(), removed, "removed empty task cgroups left by dead shims");
    }
}

pub(super) async fn build_runtimes(
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
        .with_signalling(crate::sys::proc_handle::check_signalling().inspect_err(
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
    let remote: Arc<dyn Runtime> = match restart_watch(config, kube, sidecar.clone()) {
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
