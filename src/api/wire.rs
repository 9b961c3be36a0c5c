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
        TaskResponse::of(v, true)
    }
}

impl TaskResponse {
    /// The answer for a task; without `show_env`, its environment variables keep their
    /// names (and `valueFrom`) but lose their values, wherever the spec holds them.
    pub fn of(mut v: TaskView, show_env: bool) -> Self {
        if !show_env {
            conceal_env_values(&mut v.spec);
        }
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
/// `GET /tasks/{name}` and `GET /getTasks` send (`--show-task-env`).
pub fn render_task(view: TaskView) -> bytes::Bytes {
    render(TaskResponse::of(view, true))
}

/// The same without environment values (the default).
pub fn render_task_without_env_values(view: TaskView) -> bytes::Bytes {
    render(TaskResponse::of(view, false))
}

fn render(resp: TaskResponse) -> bytes::Bytes {
    // Serialising owned, plain data to a Vec can't fail.
    serde_json::to_vec(&resp)
        .unwrap_or_else(|_| b"{}".to_vec())
        .into()
}

/// Drops every environment value of a spec: the process's, the container's, and those of
/// a `podTemplateSpec`'s containers (kept as the client sent them, so walked as JSON).
fn conceal_env_values(spec: &mut TaskSpec) {
    let clear = |env: &mut Vec<crate::task::model::EnvVar>| {
        for e in env {
            e.value.clear();
        }
    };
    if let Some(p) = spec.process.as_mut() {
        clear(&mut p.env);
    }
    if let Some(c) = spec.container.as_mut() {
        clear(&mut c.env);
    }
    if let Some(t) = spec.pod_template_spec.as_mut() {
        let pod = t.0.get_mut("spec").and_then(|s| s.as_object_mut());
        for list in pod.into_iter().flat_map(|p| {
            p.iter_mut()
                .filter(|(k, _)| {
                    matches!(
                        k.as_str(),
                        "containers" | "initContainers" | "ephemeralContainers"
                    )
                })
                .filter_map(|(_, v)| v.as_array_mut())
        }) {
            for c in list {
                let env = c.get_mut("env").and_then(|e| e.as_array_mut());
                for e in env.into_iter().flatten() {
                    if let Some(e) = e.as_object_mut() {
                        e.remove("value");
                    }
                }
            }
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_env_value_of_a_spec_is_dropped_names_and_references_kept() {
        let mut spec: TaskSpec = serde_json::from_value(json!({
            "container": {"image": "busybox", "env": [{"name": "C", "value": "c-secret"}]},
            "podTemplateSpec": {"spec": {
                "containers": [{"name": "x", "image": "busybox", "env": [
                    {"name": "P", "value": "p-secret"},
                    {"name": "R", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]}],
                "initContainers": [{"name": "i", "env": [{"name": "I", "value": "i-secret"}]}]}}
        }))
        .unwrap();
        conceal_env_values(&mut spec);
        let out = serde_json::to_value(&spec).unwrap();
        assert!(!out.to_string().contains("secret\""), "{out}");
        assert_eq!(out["container"]["env"], json!([{"name": "C"}]));
        assert_eq!(
            out["podTemplateSpec"]["spec"]["containers"][0]["env"],
            json!([{"name": "P"}, {"name": "R", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}])
        );
        assert_eq!(
            out["podTemplateSpec"]["spec"]["initContainers"][0]["env"],
            json!([{"name": "I"}])
        );
    }
}
