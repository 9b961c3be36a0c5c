//! The task model shared by the HTTP API, the store, the runtimes and the Task CRD.

use std::borrow::Cow;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use super::identity::SecurityContext;
pub use super::lifecycle::{ExecAction, ExecMode, HookName, Lifecycle, LifecycleHandler};
pub use super::resources::ResourceRequirements;
use super::template::{PodTemplate, TemplateTask};
use super::time::Time;

/// What to run. Exactly one of `process`, `container` or `podTemplateSpec` is set.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TaskSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<ProcessSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<ContainerSpec>,
    /// Upstream's container task (a PodTemplateSpec with one container); container mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_template_spec: Option<PodTemplate>,
    /// Stop the task after this many seconds (upstream's CRD keeps it beside `process`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<i64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProcessSpec {
    /// argv[0] and leading arguments; executed directly, no shell.
    #[serde(default)]
    pub command: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    /// Upstream's wire format carries the timeout inside `process`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<i64>,
    /// `Local` (the agent's container) or `Remote` (inside the pod's main container);
    /// unset (or `""`, Go's zero value): `Remote` exactly when the agent runs with
    /// `--enable-sidecar-mode`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "ExecMode::deserialize_optional"
    )]
    pub exec_mode: Option<ExecMode>,
    /// Hooks run before the main command starts and after it has stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifecycle: Option<Lifecycle>,
    /// Who the task runs as (`runAsUser`, `runAsGroup`) and whether it may gain
    /// privileges (`allowPrivilegeEscalation`, default false: `no_new_privs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_context: Option<SecurityContext>,
    /// Kubernetes' `ResourceRequirements` for all of the task's commands together:
    /// `limits.cpu`, `limits.memory`, `limits["task-executor.io/pids"]`, `requests.cpu`,
    /// `requests.memory`. Enforced through the task's cgroup; a task asking for what this
    /// agent can't enforce is refused (400).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ContainerSpec {
    pub image: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volume_mounts: Vec<VolumeMount>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    /// Share this container's PID namespace (like `kubectl debug --target`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_container: Option<String>,
    /// Kubernetes' `ResourceRequirements`, handed to the container runtime (CRI
    /// `LinuxContainerResources`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EnvVar {
    pub name: String,
    /// Omitted when empty, as Kubernetes' `EnvVar` (`omitempty`), and in answers unless
    /// the agent runs with `--show-task-env`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub value: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VolumeMount {
    pub name: String,
    pub mount_path: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_only: bool,
}

/// The observed state, shaped like Kubernetes' ContainerState: one member is set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum TaskState {
    Waiting(Waiting),
    Running(Running),
    Terminated(Terminated),
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Waiting {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Running {
    /// `null` when unknown (a task re-adopted after its run journal was damaged), never a
    /// made-up time.
    pub started_at: Option<Time>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Terminated {
    pub exit_code: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    pub reason: Reason,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// `null` when the task never started, as metav1.Time encodes a zero time.
    pub started_at: Option<Time>,
    pub finished_at: Time,
}

/// Reasons a terminated task carries.
pub mod reason {
    pub const INITIALIZED: &str = "Initialized";
    /// Waiting: the start failed for lack of processes, file descriptors, memory or disk,
    /// and is retried.
    pub const RESOURCES_EXHAUSTED: &str = "ResourcesExhausted";
    pub const SUCCEEDED: &str = "Succeeded";
    pub const FAILED: &str = "Failed";
    pub const TIMEOUT: &str = "TaskTimeout";
    /// A container task's container could not be started (the CRI's and kubelet's word).
    pub const START_ERROR: &str = "StartError";
    /// A process task's command could not be started (missing binary, not executable,
    /// bad working directory, identity): upstream's word for its own failed exec.
    pub const PROCESS_START_FAILED: &str = "ProcessStartFailed";
    /// The agent could not start the task (its supervisor could not be launched, the
    /// machine ran out of resources past `--start-retry-timeout`, a volume could not be
    /// prepared): upstream's word for any other failed start.
    pub const START_FAILED: &str = "StartFailed";
    pub const SUPERVISOR_LOST: &str = "SupervisorLost";
    pub const NODE_RESTARTED: &str = "NodeRestarted";
    pub const TARGET_RESTARTED: &str = "TargetRestarted";
    pub const TARGET_NOT_FOUND: &str = "TargetNotFound";
    pub const RUNTIME_ERROR: &str = "RuntimeError";
    pub const IMAGE_PULL_ERROR: &str = "ErrImagePull";
    /// Waiting: the task's `preStart` hook runs; the main command starts after it.
    pub const PRE_START_HOOK_RUNNING: &str = "PreStartHookRunning";
    /// The `preStart` hook failed (non-zero exit, timeout, not startable): the main
    /// command never ran.
    pub const PRE_START_HOOK_FAILED: &str = "PreStartHookFailed";
    /// Waiting: the main command never started (its `preStart` hook failed, or it could
    /// not be started) and the `postStop` hook runs.
    pub const POST_STOP_HOOK_RUNNING: &str = "PostStopHookRunning";
    /// The `postStop` hook failed after the main command ran and ended (exit code 1 after
    /// a success, else the command's own); also the reason of a failed `postStop` hook's
    /// status.
    pub const POST_STOP_HOOK_FAILED: &str = "PostStopHookFailed";
    /// The kernel's OOM killer ended the task's process: its memory limit was reached
    /// (kubelet's word; exit code 137).
    pub const OOM_KILLED: &str = "OOMKilled";
    /// Every reason above: the words a `Reason` keeps without an allocation.
    pub const ALL: &[&str] = &[
        INITIALIZED,
        RESOURCES_EXHAUSTED,
        SUCCEEDED,
        FAILED,
        TIMEOUT,
        START_ERROR,
        PROCESS_START_FAILED,
        START_FAILED,
        SUPERVISOR_LOST,
        NODE_RESTARTED,
        TARGET_RESTARTED,
        TARGET_NOT_FOUND,
        RUNTIME_ERROR,
        IMAGE_PULL_ERROR,
        PRE_START_HOOK_RUNNING,
        PRE_START_HOOK_FAILED,
        POST_STOP_HOOK_RUNNING,
        POST_STOP_HOOK_FAILED,
        OOM_KILLED,
    ];
}

// A terminated state's reason: one of the agent's own words (`reason::ALL`), kept as a
// `&'static str`, or another (a container runtime's) as a string of its own. Every
// finished task keeps one, and "Succeeded" as a `String` cost each a 32-byte allocation.
// (Not a doc comment: it would become the schema's description, in the CRD and the API
// document, where the field's own says what a reason is.)
#[derive(Clone, Debug, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(transparent)]
pub struct Reason(Cow<'static, str>);

impl Reason {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<&str> for Reason {
    fn from(s: &str) -> Self {
        match reason::ALL.iter().find(|r| **r == s) {
            Some(r) => Reason(Cow::Borrowed(r)),
            None => Reason(Cow::Owned(s.to_owned())),
        }
    }
}

impl From<String> for Reason {
    fn from(s: String) -> Self {
        match reason::ALL.iter().find(|r| **r == s) {
            Some(r) => Reason(Cow::Borrowed(r)),
            None => Reason(Cow::Owned(s)),
        }
    }
}

impl<'de> Deserialize<'de> for Reason {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Reason::from)
    }
}

impl std::ops::Deref for Reason {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl PartialEq<str> for Reason {
    fn eq(&self, other: &str) -> bool {
        *self.0 == *other
    }
}

impl PartialEq<&str> for Reason {
    fn eq(&self, other: &&str) -> bool {
        *self.0 == **other
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TaskStatus {
    pub state: TaskState,
    /// The lifecycle hooks that have run or run now (absent for a task without hooks, or
    /// before its first hook started).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hooks: Option<HookStatuses>,
    /// What the process task used, once it ended (absent without a cgroup of its own;
    /// a running task's usage is in `/metrics`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<ResourceUsage>,
}

/// What a task's cgroup counted: all of its commands (hooks too) and their supervisor,
/// up to its main command's end.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResourceUsage {
    /// CPU time used, user and system, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_seconds: Option<f64>,
    /// The most memory the task held at once (its cgroup's peak, page cache included),
    /// in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_peak_bytes: Option<u64>,
    /// Processes of the task the kernel's OOM killer ended (its memory limit was
    /// reached); absent when none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oom_kills: Option<u64>,
}

impl ResourceUsage {
    pub fn is_empty(&self) -> bool {
        *self == ResourceUsage::default()
    }
}

/// How each lifecycle hook is or ended, in the shape of a task state: `running`, then
/// `terminated` (exit code, `Succeeded` or the hook's failure reason, the tail of its
/// output in `message` when it failed, times).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HookStatuses {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_start: Option<TaskState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post_stop: Option<TaskState>,
}

impl HookStatuses {
    pub fn get(&self, hook: HookName) -> Option<&TaskState> {
        match hook {
            HookName::PreStart => self.pre_start.as_ref(),
            HookName::PostStop => self.post_stop.as_ref(),
        }
    }

    pub fn slot(&mut self, hook: HookName) -> &mut Option<TaskState> {
        match hook {
            HookName::PreStart => &mut self.pre_start,
            HookName::PostStop => &mut self.post_stop,
        }
    }

    /// Takes each hook's state from `newer` where it is further along (never back).
    pub fn merge(&mut self, newer: &HookStatuses) {
        for h in HookName::ALL {
            if let Some(n) = newer.get(h)
                && self.get(h).is_none_or(|old| n.rank() > old.rank())
            {
                *self.slot(h) = Some(n.clone());
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.pre_start.is_none() && self.post_stop.is_none()
    }
}

impl TaskState {
    pub fn initialized() -> Self {
        TaskState::Waiting(Waiting {
            reason: Some(reason::INITIALIZED.into()),
            message: None,
        })
    }

    pub fn is_terminated(&self) -> bool {
        matches!(self, TaskState::Terminated(_))
    }

    /// Waiting < Running < Terminated: a state never moves backwards.
    pub fn rank(&self) -> u8 {
        match self {
            TaskState::Waiting(_) => 0,
            TaskState::Running(_) => 1,
            TaskState::Terminated(_) => 2,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            TaskState::Waiting(_) => "waiting",
            TaskState::Running(_) => "running",
            TaskState::Terminated(_) => "terminated",
        }
    }
}

impl Terminated {
    /// The terminated state for a process that exited with `code` or died of `signal`.
    pub fn from_exit(
        code: Option<i32>,
        signal: Option<i32>,
        started: Option<Time>,
        finished: Time,
    ) -> Self {
        let (exit_code, reason, message) = match (code, signal) {
            (_, Some(sig)) => (
                128 + sig,
                reason::FAILED,
                Some(format!("terminated by signal {}", signal_name(sig))),
            ),
            (Some(0), None) => (0, reason::SUCCEEDED, None),
            (Some(c), None) => (c, reason::FAILED, None),
            (None, None) => (128, reason::FAILED, Some("exit status unknown".into())),
        };
        Terminated {
            exit_code,
            signal,
            reason: reason.into(),
            message,
            started_at: started,
            finished_at: finished,
        }
    }

    /// A task that could not be started at all.
    pub fn failed_to_start(reason: &str, exit_code: i32, message: String) -> Self {
        Terminated {
            exit_code,
            signal: None,
            reason: reason.into(),
            message: Some(message),
            started_at: None,
            finished_at: Time::now(),
        }
    }
}

pub fn signal_name(sig: i32) -> String {
    nix::sys::signal::Signal::try_from(sig)
        .map(|s| s.as_str().to_string())
        .unwrap_or_else(|_| format!("{sig}"))
}

impl TaskSpec {
    /// The timeout in effect: `spec.timeoutSeconds`, else `process.timeoutSeconds`, else
    /// a pod template's `activeDeadlineSeconds`.
    pub fn effective_timeout(&self) -> Option<i64> {
        self.timeout_seconds
            .or_else(|| self.process.as_ref().and_then(|p| p.timeout_seconds))
            .or_else(|| {
                self.pod_template_spec
                    .as_ref()
                    .and_then(PodTemplate::active_deadline_seconds)
            })
    }

    /// Checks the spec on its own; returns a message for a 400.
    pub fn validate(&self) -> Result<(), String> {
        let kinds = [
            self.process.is_some(),
            self.container.is_some(),
            self.pod_template_spec.is_some(),
        ];
        match kinds.iter().filter(|k| **k).count() {
            0 => return Err("spec must set either process, container or podTemplateSpec".into()),
            1 => {}
            _ => {
                return Err(
                    "spec must set only one of process, container or podTemplateSpec".into(),
                );
            }
        }
        if let Some(p) = &self.process {
            if p.command.is_empty() {
                return Err("process.command must not be empty".into());
            }
            check_argv(&p.command, &p.args, "process")?;
            check_env(&p.env, "process")?;
            check_dir(p.working_dir.as_deref(), "process")?;
            if let Some(l) = &p.lifecycle {
                l.validate("process.lifecycle")?;
            }
            if let Some(sc) = &p.security_context {
                sc.validate("process.securityContext")?;
            }
            if let Some(r) = &p.resources {
                r.resolve("process.resources")?;
            }
        }
        if let Some(c) = &self.container {
            check_container(c, "container")?;
        }
        if let Some(t) = &self.pod_template_spec {
            check_container(&t.task()?.container, "podTemplateSpec.spec.containers[0]")?;
        }
        // A process task's zero or negative timeout is upstream's "already timed out"
        // (its agent stops the task at its first check); a container task's must be
        // positive, as Kubernetes' `activeDeadlineSeconds`.
        if self.is_container_task()
            && let Some(t) = self.timeout_seconds
            && t <= 0
        {
            return Err(format!("timeoutSeconds must be positive, got {t}"));
        }
        Ok(())
    }

    /// The container a container task runs: `container` as given, or the one of
    /// `podTemplateSpec` with the template's volumes. `None` for a process task.
    pub fn container_task(&self) -> Option<Result<TemplateTask, String>> {
        if let Some(c) = &self.container {
            return Some(Ok(TemplateTask {
                container: c.clone(),
                volumes: Vec::new(),
                from_template: false,
            }));
        }
        self.pod_template_spec.as_ref().map(PodTemplate::task)
    }

    /// True for the tasks container mode runs.
    pub fn is_container_task(&self) -> bool {
        self.container.is_some() || self.pod_template_spec.is_some()
    }

    /// What the task's `resources` ask for (a process task's, or a container task's);
    /// empty when nothing (or something invalid: `validate` refuses that).
    pub fn limits(&self) -> super::resources::TaskLimits {
        let r = match (&self.process, self.container_task()) {
            (Some(p), _) => p.resources.clone(),
            (None, Some(Ok(t))) => t.container.resources,
            _ => None,
        };
        r.and_then(|r| r.resolve("resources").ok())
            .unwrap_or_default()
    }

    /// The process task's lifecycle hooks, if it has any.
    pub fn lifecycle_hooks(&self) -> Option<&Lifecycle> {
        self.process
            .as_ref()
            .and_then(|p| p.lifecycle.as_ref())
            .filter(|l| l.has_hooks())
    }
}

fn check_container(c: &ContainerSpec, what: &str) -> Result<(), String> {
    if c.image.trim().is_empty() {
        return Err(format!("{what}.image must not be empty"));
    }
    check_argv(&c.command, &c.args, what)?;
    check_env(&c.env, what)?;
    check_dir(c.working_dir.as_deref(), what)?;
    if let Some(r) = &c.resources {
        r.resolve(&format!("{what}.resources"))?;
    }
    for m in &c.volume_mounts {
        if m.name.is_empty() || !m.mount_path.starts_with('/') {
            return Err(format!(
                "{what}.volumeMounts entry {:?} needs a name and an absolute mountPath",
                m.name
            ));
        }
    }
    Ok(())
}

fn check_argv(command: &[String], args: &[String], what: &str) -> Result<(), String> {
    if command.iter().chain(args).any(|a| a.contains('\0')) {
        return Err(format!(
            "{what}.command and args must not contain NUL bytes"
        ));
    }
    if command.first().is_some_and(|c| c.is_empty()) {
        return Err(format!("{what}.command[0] must not be empty"));
    }
    Ok(())
}

fn check_env(env: &[EnvVar], what: &str) -> Result<(), String> {
    for e in env {
        if e.name.is_empty()
            || e.name.contains('=')
            || e.name.contains('\0')
            || e.value.contains('\0')
        {
            return Err(format!(
                "{what}.env entry {:?} is invalid: names must be non-empty without '=' or NUL",
                e.name
            ));
        }
    }
    Ok(())
}

fn check_dir(dir: Option<&str>, what: &str) -> Result<(), String> {
    match dir {
        Some(d) if d.contains('\0') => Err(format!("{what}.workingDir must not contain NUL bytes")),
        Some(d) if !d.is_empty() && !d.starts_with('/') => Err(format!(
            "{what}.workingDir must be an absolute path, got {d:?}"
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agents_own_reasons_are_kept_without_an_allocation_and_read_as_written() {
        for r in reason::ALL {
            let parsed: Reason = serde_json::from_str(&format!("\"{r}\"")).unwrap();
            assert!(matches!(parsed.0, Cow::Borrowed(_)), "{r}");
            assert_eq!(parsed, *r);
            assert_eq!(serde_json::to_string(&parsed).unwrap(), format!("\"{r}\""));
        }
        // Another's word (a container runtime's) is kept as it came.
        let other = Reason::from("Completed");
        assert!(matches!(other.0, Cow::Owned(_)));
        assert_eq!(other.as_str(), "Completed");
        assert_eq!(other.to_string(), "Completed");
        assert_eq!(Reason::from(String::from("Succeeded")), reason::SUCCEEDED);
        // Its schema is a string's, as it was.
        assert_eq!(
            serde_json::to_value(schemars::schema_for!(Reason)).unwrap()["type"],
            "string"
        );
    }

    #[test]
    fn state_serializes_with_one_member() {
        let s = TaskState::initialized();
        assert_eq!(
            serde_json::to_string(&s).unwrap(),
            r#"{"waiting":{"reason":"Initialized"}}"#
        );
        let t = TaskState::Terminated(Terminated {
            exit_code: 0,
            signal: None,
            reason: "Succeeded".into(),
            message: None,
            started_at: None,
            finished_at: Time::from_unix_millis(0),
        });
        assert_eq!(
            serde_json::to_string(&t).unwrap(),
            r#"{"terminated":{"exitCode":0,"reason":"Succeeded","startedAt":null,"finishedAt":"1970-01-01T00:00:00Z"}}"#
        );
    }

    #[test]
    fn signal_exit_is_128_plus_n() {
        let t = Terminated::from_exit(None, Some(9), None, Time::now());
        assert_eq!(
            (t.exit_code, t.signal, t.reason.as_str()),
            (137, Some(9), "Failed")
        );
        assert_eq!(t.message.as_deref(), Some("terminated by signal SIGKILL"));
    }

    #[test]
    fn validation_messages() {
        let bad = TaskSpec::default();
        assert!(
            bad.validate()
                .unwrap_err()
                .contains("either process, container or podTemplateSpec")
        );
        let p = TaskSpec {
            process: Some(ProcessSpec {
                command: vec!["true".into()],
                ..Default::default()
            }),
            timeout_seconds: Some(0),
            ..Default::default()
        };
        assert!(p.validate().is_ok(), "upstream's already-timed-out task");
        let c = TaskSpec {
            container: Some(ContainerSpec {
                image: "busybox".into(),
                ..Default::default()
            }),
            timeout_seconds: Some(0),
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().contains("timeoutSeconds"));
    }
}
