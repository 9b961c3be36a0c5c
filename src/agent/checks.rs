//! What the configuration may ask of the agent, checked before anything starts; and the
//! environment that is the agent's own (never handed to tasks).

use crate::runtime;

use crate::config::Config;
use crate::task::policy::{PolicyLevel, TaskPolicy};

use super::AppError;

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
pub(super) fn check_task_identity(config: &Config) -> Result<(), AppError> {
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
    let caps = crate::sys::procfs::own_effective_caps()?;
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
pub(super) fn task_policy(config: &Config) -> TaskPolicy {
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
pub(super) fn check_task_policy(config: &Config) -> Result<(), AppError> {
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
