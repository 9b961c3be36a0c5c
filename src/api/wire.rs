//! Wire shapes. Requests may use the seed's shape (`spec`) or upstream's (`process`);
//! every response carries both, so the BatchSandbox controller and curl users agree.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::manager::TaskView;
use crate::task::fields;
use crate::task::model::{ProcessSpec, TaskSpec, TaskState, TaskStatus};
use crate::task::template::PodTemplate;
use crate::task::time::Time;

/// A task as a client sends it: the documented shape (`spec`) or upstream's (`process`,
/// `podTemplateSpec`). The output-only fields of both shapes (a task read back and sent
/// again) are known and ignored.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = name_required)]
pub struct TaskRequest {
    /// A Kubernetes object name (lowercase RFC 1123 subdomain).
    #[serde(default)]
    #[schemars(transform = no_default)]
    #[schemars(length(min = 1, max = crate::task::name::MAX_NAME_LEN))]
    #[schemars(pattern(crate::task::name::NAME_PATTERN))]
    pub name: String,
    #[serde(default)]
    pub spec: Option<TaskSpec>,
    /// Upstream's wire format: the process at the top level.
    #[serde(default)]
    pub process: Option<ProcessSpec>,
    /// Upstream's container task (the same as `spec.podTemplateSpec`).
    #[serde(default)]
    pub pod_template_spec: Option<PodTemplate>,
    /// Output only (ignored).
    #[serde(default)]
    #[schemars(with = "Option<serde_json::Value>")]
    pub status: Option<serde_json::Value>,
    /// Output only (ignored).
    #[serde(default)]
    #[schemars(with = "Option<serde_json::Value>")]
    pub process_status: Option<serde_json::Value>,
    /// Output only (ignored): upstream's status of a pod-template task.
    #[serde(default)]
    #[schemars(with = "Option<serde_json::Value>")]
    pub pod_status: Option<serde_json::Value>,
    /// Output only (ignored).
    #[serde(default)]
    #[schemars(with = "Option<serde_json::Value>")]
    pub deletion_timestamp: Option<serde_json::Value>,
}

/// Serde fills in an empty name, which is refused: the document shows no default...
fn no_default(schema: &mut schemars::Schema) {
    schema.remove("default");
}

/// ...and says the name is required.
fn name_required(schema: &mut schemars::Schema) {
    schema.insert("required".into(), serde_json::json!(["name"]));
}

impl TaskRequest {
    /// Folds both shapes into one spec; a message for a 400 when they can't be combined.
    pub fn into_parts(self) -> Result<(String, TaskSpec), String> {
        let mut spec = self.spec.unwrap_or_default();
        match (spec.process.as_ref(), self.process) {
            (None, Some(p)) => spec.process = Some(p),
            (Some(a), Some(b)) if *a != b => {
                return Err(format!(
                    "task {:?}: process and spec.process disagree",
                    self.name
                ));
            }
            _ => {}
        }
        match (spec.pod_template_spec.as_ref(), self.pod_template_spec) {
            (None, Some(t)) => spec.pod_template_spec = Some(t),
            (Some(a), Some(b)) if *a != b => {
                return Err(format!(
                    "task {:?}: podTemplateSpec and spec.podTemplateSpec disagree",
                    self.name
                ));
            }
            _ => {}
        }
        Ok((self.name, spec))
    }

    /// Unknown fields inside its pod templates (decoding saw only a JSON value there), as
    /// paths under `prefix` (the request's own path: empty, or `[1]` in an array).
    pub fn template_unknown_fields(&self, prefix: &str) -> Vec<String> {
        let top = self
            .pod_template_spec
            .as_ref()
            .map(|t| (t, "podTemplateSpec"));
        let nested = self
            .spec
            .as_ref()
            .and_then(|s| s.pod_template_spec.as_ref())
            .map(|t| (t, "spec.podTemplateSpec"));
        top.into_iter()
            .chain(nested)
            .flat_map(|(t, at)| {
                let at = fields::join(prefix, at);
                t.unknown_fields()
                    .into_iter()
                    .map(move |f| fields::join(&at, &f))
            })
            .collect()
    }
}

/// A task as the agent returns it.
#[derive(Debug, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TaskResponse {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deletion_timestamp: Option<Time>,
    pub spec: TaskSpec,
    pub status: TaskStatus,
    /// Upstream's shape of the same facts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub process: Option<ProcessSpec>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_template_spec: Option<PodTemplate>,
    pub process_status: TaskState,
}

impl From<TaskView> for TaskResponse {
    fn from(v: TaskView) -> Self {
        let process = v.spec.process.clone().map(|mut p| {
            p.timeout_seconds = v.spec.effective_timeout();
            p
        });
        TaskResponse {
            name: v.name,
            deletion_timestamp: v.deletion_timestamp,
            process,
            pod_template_spec: v.spec.pod_template_spec.clone(),
            process_status: v.state.clone(),
            status: TaskStatus {
                state: v.state,
                hooks: v.hooks,
                usage: v.usage,
            },
            spec: v.spec,
        }
    }
}

/// A task's answer as bytes (no trailing newline): what the manager caches per task and
/// `GET /tasks/{name}` and `GET /getTasks` send.
pub fn render_task(view: TaskView) -> bytes::Bytes {
    // Serialising owned, plain data to a Vec can't fail.
    serde_json::to_vec(&TaskResponse::from(view))
        .unwrap_or_else(|_| b"{}".to_vec())
        .into()
}

/// `/health` and `/readyz`: `healthy`, `ready`, or `notReady` with a reason.
#[derive(Debug, Serialize, JsonSchema)]
pub struct Health {
    pub status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// An error answer, as upstream sends them.
#[derive(Debug, Serialize, JsonSchema)]
pub struct ErrorBody<'a> {
    /// The status text (Go's `http.StatusText`), e.g. `Not Found`.
    pub code: &'a str,
    pub message: &'a str,
}
