//! The `Task` custom resource (`tasks.task-executor.io`, `v1alpha1`): one task for the agent
//! of the pod named in `spec.podName`. The spec embeds the HTTP API's `TaskSpec`, so a
//! Task and a `POST /tasks` body run the same way.

use ::kube::CustomResource;
use ::kube::CustomResourceExt;
use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};

use crate::manager::TaskView;
use crate::task::fields;
use crate::task::model::{HookStatuses, ResourceUsage, TaskSpec, TaskState};

pub const GROUP: &str = "task-executor.io";
/// Set by the agent on every Task it runs; removed once the task's processes are gone.
pub const FINALIZER: &str = "task-executor.io/stop";
/// The label the agent selects its Tasks by (`task-executor.io/pod=<pod name>`).
pub const POD_LABEL: &str = "task-executor.io/pod";
/// The file `task-executor crd` writes and `crds/` holds.
pub const CRD_FILE: &str = "tasks.task-executor.io.yaml";

/// A task for the agent in pod `podName`. The agent selects Tasks by the label
/// `task-executor.io/pod=<podName>` and checks `spec.podName` too.
// The lint mistakes the repeated `type_ = "string"` of two print columns for a duplicate.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, JsonSchema)]
#[kube(
    group = "task-executor.io",
    version = "v1alpha1",
    kind = "Task",
    plural = "tasks",
    singular = "task",
    namespaced,
    status = "TaskCrStatus",
    derive = "PartialEq",
    doc = "A short-lived task run by the task-executor agent of one pod",
    printcolumn(name = "Pod", type_ = "string", json_path = ".spec.podName"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Exit code", type_ = "integer", json_path = ".status.exitCode"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct TaskCrSpec {
    /// The pod whose task-executor runs this task.
    pub pod_name: String,
    /// What to run: the same fields as the HTTP API's task spec.
    #[serde(flatten)]
    pub task: TaskSpec,
    /// Fields of the spec the agent does not know (`spec.foo`), found as it was decoded:
    /// the API server keeps them when the cluster's CRD is newer than the agent.
    #[serde(skip)]
    #[schemars(skip)]
    pub unknown_fields: Vec<String>,
    /// Why the spec could not be decoded (the Task then ends `InvalidSpec`): one bad
    /// object must not fail the watch of all of them.
    #[serde(skip)]
    #[schemars(skip)]
    pub invalid: Option<String>,
}

/// The annotation that chooses what an unknown field of a Task's spec does, as
/// `?fieldValidation=` does over HTTP: `Warn` (default: the task runs, a Warning Event
/// names each field), `Strict` (the Task ends `InvalidSpec`), `Ignore`.
pub const FIELD_VALIDATION_ANNOTATION: &str = "task-executor.io/field-validation";

/// Decoded by hand so that unknown fields are collected rather than dropped: serde's
/// `flatten` would swallow them without a trace.
impl<'de> Deserialize<'de> for TaskCrSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let mut rest = serde_json::Map::<String, serde_json::Value>::deserialize(d)?;
        let pod_name = match rest.remove("podName") {
            None | Some(serde_json::Value::Null) => String::new(),
            Some(serde_json::Value::String(s)) => s,
            Some(other) => {
                return Err(D::Error::custom(format!(
                    "spec.podName: invalid type: {other}, expected a string"
                )));
            }
        };
        let decoded = match fields::decode_value::<TaskSpec>(&serde_json::Value::Object(rest)) {
            Ok(d) => d,
            Err(e) => {
                return Ok(TaskCrSpec {
                    pod_name,
                    invalid: Some(format!("spec.{e}")),
                    ..Default::default()
                });
            }
        };
        let mut unknown: Vec<String> = decoded
            .unknown
            .iter()
            .map(|f| fields::join("spec", f))
            .collect();
        if let Some(t) = &decoded.value.pod_template_spec {
            unknown.extend(
                t.unknown_fields()
                    .iter()
                    .map(|f| fields::join("spec.podTemplateSpec", f)),
            );
        }
        Ok(TaskCrSpec {
            pod_name,
            task: decoded.value,
            unknown_fields: unknown,
            invalid: None,
        })
    }
}

/// Where the task is, as its agent last reported it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TaskCrStatus {
    /// Waiting, Running, Succeeded or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// The exit code, once terminated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// The full state, as the HTTP API shows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<TaskState>,
    /// The lifecycle hooks' states, as the HTTP API shows them (`status.hooks`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hooks: Option<HookStatuses>,
    /// The generation of the spec the agent ran (later spec changes are not applied).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// What the task used, once it ended, as the HTTP API shows it (`status.usage`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<ResourceUsage>,
}

pub mod phase {
    pub const WAITING: &str = "Waiting";
    pub const RUNNING: &str = "Running";
    pub const SUCCEEDED: &str = "Succeeded";
    pub const FAILED: &str = "Failed";
}

impl TaskCrStatus {
    /// The status that shows `state`.
    pub fn from_state(
        state: &TaskState,
        hooks: Option<&HookStatuses>,
        observed_generation: Option<i64>,
    ) -> Self {
        let (phase, exit_code) = match state {
            TaskState::Waiting(_) => (phase::WAITING, None),
            TaskState::Running(_) => (phase::RUNNING, None),
            // As upstream's controller reads it: success is exit code 0 alone (a failed
            // `postStop` hook's task has exit code 1, or the command's own).
            TaskState::Terminated(t) if t.exit_code == 0 => (phase::SUCCEEDED, Some(0)),
            TaskState::Terminated(t) => (phase::FAILED, Some(t.exit_code)),
        };
        TaskCrStatus {
            phase: Some(phase.to_string()),
            exit_code,
            state: Some(state.clone()),
            hooks: hooks.cloned(),
            observed_generation,
            usage: None,
        }
    }

    pub fn from_view(view: &TaskView, observed_generation: Option<i64>) -> Self {
        TaskCrStatus {
            usage: view.usage.clone(),
            ..Self::from_state(&view.state, view.hooks.as_ref(), observed_generation)
        }
    }

    /// True once the status says the task started (or ended): such a Task is never run again.
    pub fn has_run(&self) -> bool {
        matches!(
            self.state,
            Some(TaskState::Running(_) | TaskState::Terminated(_))
        )
    }
}

impl Task {
    /// The task spec to hand to the manager.
    pub fn task_spec(&self) -> TaskSpec {
        self.spec.task.clone()
    }

    /// The Task's choice for its unknown fields (annotation
    /// [`FIELD_VALIDATION_ANNOTATION`]); an unsupported value is an invalid spec.
    pub fn field_validation(&self) -> Result<fields::FieldValidation, String> {
        match self
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(FIELD_VALIDATION_ANNOTATION))
        {
            None => Ok(fields::FieldValidation::default()),
            Some(v) => fields::FieldValidation::parse(v)
                .map_err(|e| format!("annotation {FIELD_VALIDATION_ANNOTATION}: {e}")),
        }
    }
}

/// The CRD as YAML, exactly as `crds/tasks.task-executor.io.yaml` holds it.
pub fn crd_yaml() -> Result<String, super::KubeError> {
    let crd = Task::crd();
    let body =
        yaml_serde::to_string(&crd).map_err(|e| super::KubeError::Serialize(e.to_string()))?;
    Ok(format!(
        "# Generated by `task-executor crd`; do not edit. Regenerate with\n\
         #   cargo run -- crd > crds/{CRD_FILE} && scripts/sync-chart-crds\n{body}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::model::{ProcessSpec, Terminated};
    use crate::task::time::Time;

    #[test]
    fn spec_embeds_the_api_task_spec() {
        let t: Task = serde_json::from_value(serde_json::json!({
            "apiVersion": "task-executor.io/v1alpha1",
            "kind": "Task",
            "metadata": {"name": "t1", "namespace": "ns"},
            "spec": {
                "podName": "p1",
                "process": {"command": ["sh", "-c"], "args": ["echo hi"],
                            "env": [{"name": "A", "value": "b"}]},
                "timeoutSeconds": 5
            }
        }))
        .unwrap();
        assert_eq!(t.spec.pod_name, "p1");
        assert_eq!(
            t.task_spec(),
            TaskSpec {
                process: Some(ProcessSpec {
                    command: vec!["sh".into(), "-c".into()],
                    args: vec!["echo hi".into()],
                    env: vec![crate::task::model::EnvVar {
                        name: "A".into(),
                        value: "b".into()
                    }],
                    ..Default::default()
                }),
                timeout_seconds: Some(5),
                ..Default::default()
            }
        );
        // And back: the spec serializes flat, as the CRD schema declares it.
        let v = serde_json::to_value(&t.spec).unwrap();
        assert_eq!(v["podName"], "p1");
        assert_eq!(v["timeoutSeconds"], 5);
        assert_eq!(v["process"]["args"][0], "echo hi");
    }

    #[test]
    fn status_phase_and_exit_code() {
        let term = |code| {
            TaskState::Terminated(Terminated::from_exit(Some(code), None, None, Time::now()))
        };
        let s = TaskCrStatus::from_state(&term(0), None, Some(1));
        assert_eq!(
            (s.phase.as_deref(), s.exit_code, s.observed_generation),
            (Some("Succeeded"), Some(0), Some(1))
        );
        let s = TaskCrStatus::from_state(&term(3), None, None);
        assert_eq!((s.phase.as_deref(), s.exit_code), (Some("Failed"), Some(3)));
        assert!(s.has_run());
        let s = TaskCrStatus::from_state(&TaskState::initialized(), None, None);
        assert_eq!((s.phase.as_deref(), s.exit_code), (Some("Waiting"), None));
        assert!(!s.has_run());
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["state"]["waiting"]["reason"], "Initialized");
    }

    #[test]
    fn crd_names_and_columns() {
        let crd = Task::crd();
        assert_eq!(crd.spec.group, GROUP);
        assert_eq!(crd.spec.names.plural, "tasks");
        assert_eq!(crd.spec.scope, "Namespaced");
        let v = &crd.spec.versions[0];
        assert_eq!(v.name, "v1alpha1");
        assert!(v.subresources.as_ref().unwrap().status.is_some());
        let cols: Vec<&str> = v
            .additional_printer_columns
            .as_ref()
            .unwrap()
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(cols, ["Pod", "Phase", "Exit code", "Age"]);
    }

    /// `crds/` must hold exactly what the code generates.
    #[test]
    fn crds_dir_is_up_to_date() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("crds")
            .join(CRD_FILE);
        let on_disk =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            on_disk == crd_yaml().unwrap(),
            "{} is stale: run `cargo run -- crd > crds/{CRD_FILE}` and scripts/sync-chart-crds",
            path.display()
        );
    }
}
