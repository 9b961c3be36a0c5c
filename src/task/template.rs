//! Upstream's container task: a Kubernetes `PodTemplateSpec` (core/v1) with exactly one
//! container, run as a CRI container like `spec.container`. The template is kept and
//! echoed exactly as sent (a JSON value); k8s-openapi's types parse it to check it and to
//! turn it into the agent's container spec.
//!
//! What the agent honours: the container's `image`, `command`, `args`, `env` (values),
//! `workingDir`, `volumeMounts` and `resources` (`cpu` and `memory` limits and requests,
//! to the container runtime), the template's `hostPath` and `emptyDir` volumes
//! (any other volume kind names one of the pod's volumes), and `activeDeadlineSeconds`
//! (the task's timeout, unless `spec.timeoutSeconds` is set). Fields that describe
//! or are defaults (`metadata`, the container's `name`, `imagePullPolicy`,
//! `terminationMessage*`, the pod's `restartPolicy`, `dnsPolicy`, `schedulerName`,
//! `terminationGracePeriodSeconds`, `enableServiceLinks`, `priority`,
//! `preemptionPolicy`) and empty values are accepted. Anything else that
//! is set would be dropped, so the task is refused, naming it.

use std::borrow::Cow;
use std::collections::HashSet;

use k8s_openapi::api::core::v1 as core;
use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use super::model::{ContainerSpec, EnvVar, VolumeMount};

/// A `PodTemplateSpec` as the client sent it.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(transparent)]
pub struct PodTemplate(pub Value);

impl<'de> Deserialize<'de> for PodTemplate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        if !v.is_object() {
            return Err(serde::de::Error::custom(
                "podTemplateSpec must be an object (a Kubernetes PodTemplateSpec)",
            ));
        }
        Ok(PodTemplate(v))
    }
}

impl JsonSchema for PodTemplate {
    fn schema_name() -> Cow<'static, str> {
        "PodTemplateSpec".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "object",
            "description": "A Kubernetes PodTemplateSpec (core/v1) with exactly one container, \
                            run as a CRI container task (container mode). Honoured: the \
                            container's image, command, args, env (values), workingDir, \
                            volumeMounts and resources (cpu, memory); the template's \
                            hostPath and emptyDir volumes. Kept and echoed as sent.",
            "x-kubernetes-preserve-unknown-fields": true,
        })
    }
}

/// The template as the agent runs it.
#[derive(Clone, Debug, PartialEq)]
pub struct TemplateTask {
    pub container: ContainerSpec,
    /// The template's volumes that its container mounts.
    pub volumes: Vec<TemplateVolume>,
    /// Made from a `podTemplateSpec` (error messages name it).
    pub from_template: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct TemplateVolume {
    pub name: String,
    pub source: VolumeSource,
}

#[derive(Clone, Debug, PartialEq)]
pub enum VolumeSource {
    HostPath {
        path: String,
        kind: HostPathKind,
    },
    /// A directory of the task's own, removed with it.
    EmptyDir,
    /// Another kind (configMap, secret, ...): the pod's own volume of that name.
    Pod,
}

/// `hostPath.type`: what must be at the path before the container starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostPathKind {
    /// `""`: no check.
    Any,
    Directory,
    DirectoryOrCreate,
    File,
    FileOrCreate,
}

const POD_FIELDS: &[&str] = &[
    "containers",
    "volumes",
    "restartPolicy",
    "dnsPolicy",
    "schedulerName",
    "terminationGracePeriodSeconds",
    "activeDeadlineSeconds",
    "enableServiceLinks",
    "priority",
    "preemptionPolicy",
];
const CONTAINER_FIELDS: &[&str] = &[
    "name",
    "image",
    "command",
    "args",
    "env",
    "workingDir",
    "volumeMounts",
    "imagePullPolicy",
    "terminationMessagePath",
    "terminationMessagePolicy",
    "resources",
];
const MOUNT_FIELDS: &[&str] = &["name", "mountPath", "readOnly"];

impl PodTemplate {
    /// Fields of the template that `PodTemplateSpec` does not have, as paths inside it
    /// (`spec.containers[0].foo`).
    pub fn unknown_fields(&self) -> Vec<String> {
        super::fields::decode_value::<core::PodTemplateSpec>(&self.0)
            .map(|d| d.unknown)
            .unwrap_or_default()
    }

    /// `spec.activeDeadlineSeconds`: the task's timeout, as for a pod.
    pub fn active_deadline_seconds(&self) -> Option<i64> {
        self.0.pointer("/spec/activeDeadlineSeconds")?.as_i64()
    }

    /// Checks the template and turns it into what the container runtime runs; a message
    /// for a 400 when it can't be run as sent.
    pub fn task(&self) -> Result<TemplateTask, String> {
        const AT: &str = "podTemplateSpec";
        let parsed: core::PodTemplateSpec = super::fields::decode_value(&self.0)
            .map(|d| d.value)
            .map_err(|e| format!("{AT}.{e}"))?;
        let spec = parsed
            .spec
            .ok_or_else(|| format!("{AT}.spec is required (with exactly one container)"))?;
        if spec.containers.len() != 1 {
            return Err(format!(
                "{AT}.spec.containers must hold exactly one container, got {}",
                spec.containers.len()
            ));
        }
        unsupported(&spec, POD_FIELDS, &format!("{AT}.spec"))?;
        if let Some(t) = spec.active_deadline_seconds
            && t <= 0
        {
            return Err(format!(
                "{AT}.spec.activeDeadlineSeconds must be positive, got {t}"
            ));
        }
        let c = &spec.containers[0];
        let at = format!("{AT}.spec.containers[0]");
        unsupported(c, CONTAINER_FIELDS, &at)?;
        let image = c.image.clone().unwrap_or_default();
        if image.trim().is_empty() {
            return Err(format!("{at}.image is required"));
        }
        let mut env = Vec::new();
        for (i, e) in c.env.iter().flatten().enumerate() {
            if e.value_from.is_some() {
                return Err(format!(
                    "{at}.env[{i}] ({:?}): valueFrom is not supported (the agent can't read the pod's secrets, config maps or fields for a task); set value",
                    e.name
                ));
            }
            env.push(EnvVar {
                name: e.name.clone(),
                value: e.value.clone().unwrap_or_default(),
            });
        }
        let volumes = template_volumes(spec.volumes.as_deref().unwrap_or_default())?;
        let mut mounts = Vec::new();
        for (i, m) in c.volume_mounts.iter().flatten().enumerate() {
            unsupported(m, MOUNT_FIELDS, &format!("{at}.volumeMounts[{i}]"))?;
            mounts.push(VolumeMount {
                name: m.name.clone(),
                mount_path: m.mount_path.clone(),
                read_only: m.read_only.unwrap_or(false),
            });
        }
        let resources = match &c.resources {
            Some(r) if r.claims.as_ref().is_some_and(|c| !c.is_empty()) => {
                return Err(format!(
                    "{at}.resources.claims is not supported by the agent (a task has no pod resource claims)"
                ));
            }
            Some(r) => {
                let own = |m: &Option<
                    std::collections::BTreeMap<
                        String,
                        k8s_openapi::apimachinery::pkg::api::resource::Quantity,
                    >,
                >| {
                    m.iter()
                        .flatten()
                        .map(|(k, v)| (k.clone(), super::resources::Quantity(v.0.clone())))
                        .collect()
                };
                let r = super::resources::ResourceRequirements {
                    limits: own(&r.limits),
                    requests: own(&r.requests),
                };
                r.resolve(&format!("{at}.resources"))?;
                Some(r).filter(|r| !r.is_empty())
            }
            None => None,
        };
        let used: HashSet<String> = mounts.iter().map(|m| m.name.clone()).collect();
        Ok(TemplateTask {
            container: ContainerSpec {
                image,
                command: c.command.clone().unwrap_or_default(),
                args: c.args.clone().unwrap_or_default(),
                env,
                volume_mounts: mounts,
                working_dir: c.working_dir.clone().filter(|d| !d.is_empty()),
                target_container: None,
                resources,
            },
            volumes: volumes
                .into_iter()
                .filter(|v| used.contains(&v.name))
                .collect(),
            from_template: true,
        })
    }
}

fn template_volumes(volumes: &[core::Volume]) -> Result<Vec<TemplateVolume>, String> {
    let mut out: Vec<TemplateVolume> = Vec::new();
    for (i, v) in volumes.iter().enumerate() {
        let at = format!("podTemplateSpec.spec.volumes[{i}]");
        if v.name.is_empty() || v.name.contains('/') || v.name == "." || v.name == ".." {
            return Err(format!("{at}.name {:?} is not a valid volume name", v.name));
        }
        if out.iter().any(|o| o.name == v.name) {
            return Err(format!("{at}: volume {:?} is declared twice", v.name));
        }
        let source = if let Some(h) = &v.host_path {
            if !h.path.starts_with('/') {
                return Err(format!(
                    "{at}.hostPath.path must be absolute, got {:?}",
                    h.path
                ));
            }
            let kind = match h.type_.as_deref().unwrap_or_default() {
                "" => HostPathKind::Any,
                "Directory" => HostPathKind::Directory,
                "DirectoryOrCreate" => HostPathKind::DirectoryOrCreate,
                "File" => HostPathKind::File,
                "FileOrCreate" => HostPathKind::FileOrCreate,
                other => {
                    return Err(format!(
                        "{at}.hostPath.type {other:?} is not supported (supported: \"\", Directory, DirectoryOrCreate, File, FileOrCreate)"
                    ));
                }
            };
            VolumeSource::HostPath {
                path: h.path.clone(),
                kind,
            }
        } else if let Some(e) = &v.empty_dir {
            if e.medium.as_deref().is_some_and(|m| !m.is_empty()) || e.size_limit.is_some() {
                return Err(format!(
                    "{at}.emptyDir: medium and sizeLimit are not supported (a task's emptyDir is a directory in its task dir)"
                ));
            }
            VolumeSource::EmptyDir
        } else {
            VolumeSource::Pod
        };
        out.push(TemplateVolume {
            name: v.name.clone(),
            source,
        });
    }
    Ok(out)
}

/// Refuses fields of `value` that are set (not empty) and not in `known`.
fn unsupported<T: Serialize>(value: &T, known: &[&str], at: &str) -> Result<(), String> {
    let Ok(Value::Object(map)) = serde_json::to_value(value) else {
        return Ok(());
    };
    let extra: Vec<String> = map
        .iter()
        .filter(|(k, v)| !known.contains(&k.as_str()) && !is_empty(v))
        .map(|(k, _)| format!("{at}.{k}"))
        .collect();
    if extra.is_empty() {
        return Ok(());
    }
    Err(format!(
        "{} not supported by the agent (it would be ignored); supported: {}",
        if extra.len() == 1 {
            format!("{} is", extra[0])
        } else {
            format!("{} are", extra.join(", "))
        },
        known.join(", ")
    ))
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(m) => m.values().all(is_empty),
        Value::Bool(_) | Value::Number(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn t(v: Value) -> PodTemplate {
        serde_json::from_value(v).unwrap()
    }

    fn one(container: Value, volumes: Value) -> PodTemplate {
        t(json!({"spec": {"containers": [container], "volumes": volumes}}))
    }

    #[test]
    fn maps_the_container_and_its_volumes() {
        let p = t(json!({
        "metadata": {"labels": {"app": "x"}, "creationTimestamp": null},
        "spec": {
            "restartPolicy": "Never",
            "securityContext": {},
            "containers": [{
                "name": "job", "image": "busybox", "command": ["sh", "-c"], "args": ["echo"],
                "env": [{"name": "A", "value": "b"}, {"name": "EMPTY"}],
                "workingDir": "/w", "resources": {}, "imagePullPolicy": "IfNotPresent",
                "volumeMounts": [
                    {"name": "scratch", "mountPath": "/s"},
                    {"name": "host", "mountPath": "/h", "readOnly": true},
                    {"name": "pods-own", "mountPath": "/p"}
                ]}],
            "volumes": [
                {"name": "scratch", "emptyDir": {}},
                {"name": "host", "hostPath": {"path": "/srv", "type": "DirectoryOrCreate"}},
                {"name": "cfg", "configMap": {"name": "c"}},
                {"name": "unused", "emptyDir": {}}
            ]}}));
        let task = p.task().unwrap();
        assert_eq!(task.container.image, "busybox");
        assert_eq!(task.container.command, ["sh", "-c"]);
        assert_eq!(task.container.args, ["echo"]);
        assert_eq!(task.container.working_dir.as_deref(), Some("/w"));
        assert_eq!(task.container.env[1].value, "");
        assert_eq!(task.container.volume_mounts.len(), 3);
        assert!(task.container.volume_mounts[1].read_only);
        assert_eq!(
            task.volumes,
            [
                TemplateVolume {
                    name: "scratch".into(),
                    source: VolumeSource::EmptyDir
                },
                TemplateVolume {
                    name: "host".into(),
                    source: VolumeSource::HostPath {
                        path: "/srv".into(),
                        kind: HostPathKind::DirectoryOrCreate
                    }
                },
            ]
        );
        assert!(p.unknown_fields().is_empty());
    }

    #[test]
    fn refusals_name_the_field() {
        let c = json!({"name": "c", "image": "i"});
        let cases = [
            (
                t(json!({"spec": {"containers": [c.clone(), c.clone()]}})),
                "podTemplateSpec.spec.containers must hold exactly one container, got 2",
            ),
            (t(json!({"spec": {"containers": []}})), "got 0"),
            (
                t(json!({"metadata": {}})),
                "podTemplateSpec.spec is required",
            ),
            (
                one(json!({"name": "c"}), json!([])),
                "podTemplateSpec.spec.containers[0].image is required",
            ),
            (
                one(
                    json!({"name": "c", "image": "i", "env": [{"name": "S", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]}),
                    json!([]),
                ),
                "podTemplateSpec.spec.containers[0].env[0] (\"S\"): valueFrom is not supported",
            ),
            (
                one(
                    json!({"name": "c", "image": "i", "securityContext": {"runAsUser": 1000}}),
                    json!([]),
                ),
                "podTemplateSpec.spec.containers[0].securityContext is not supported",
            ),
            (
                one(
                    json!({"name": "c", "image": "i", "volumeMounts": [{"name": "v", "mountPath": "/v", "subPath": "x"}]}),
                    json!([]),
                ),
                "podTemplateSpec.spec.containers[0].volumeMounts[0].subPath is not supported",
            ),
            (
                t(
                    json!({"spec": {"containers": [c.clone()], "hostNetwork": true, "nodeName": "n"}}),
                ),
                "podTemplateSpec.spec.hostNetwork, podTemplateSpec.spec.nodeName are not supported",
            ),
            (
                one(
                    c.clone(),
                    json!([{"name": "h", "hostPath": {"path": "rel"}}]),
                ),
                "podTemplateSpec.spec.volumes[0].hostPath.path must be absolute",
            ),
            (
                one(
                    c.clone(),
                    json!([{"name": "h", "hostPath": {"path": "/x", "type": "Socket"}}]),
                ),
                "podTemplateSpec.spec.volumes[0].hostPath.type \"Socket\" is not supported",
            ),
            (
                one(
                    c.clone(),
                    json!([{"name": "m", "emptyDir": {"medium": "Memory"}}]),
                ),
                "podTemplateSpec.spec.volumes[0].emptyDir: medium and sizeLimit are not supported",
            ),
            (
                one(
                    c.clone(),
                    json!([{"name": "a", "emptyDir": {}}, {"name": "a", "emptyDir": {}}]),
                ),
                "podTemplateSpec.spec.volumes[1]: volume \"a\" is declared twice",
            ),
            (
                t(json!({"spec": {"containers": "x"}})),
                "podTemplateSpec.spec.containers: invalid type",
            ),
        ];
        for (p, want) in cases {
            let e = p.task().unwrap_err();
            assert!(
                e.starts_with(want) || e.contains(want),
                "{want}\n  got: {e}"
            );
        }
    }

    #[test]
    fn unknown_fields_inside_the_template() {
        let p = t(
            json!({"spec": {"containers": [{"name": "c", "image": "i", "imag": "x"}],
                                  "volumez": []}, "extra": 1}),
        );
        assert_eq!(
            p.unknown_fields(),
            ["extra", "spec.containers[0].imag", "spec.volumez"]
        );
        assert!(serde_json::from_value::<PodTemplate>(json!([1])).is_err());
    }
}
