//! Unknown fields of a Task's spec (a cluster whose CRD is newer than the agent keeps
//! them): never dropped without a word. `Warn` (default) runs the task and publishes a
//! Warning Event naming them; the annotation `task-executor.io/field-validation: Strict`
//! refuses the Task (`InvalidSpec`); `Ignore` runs it silently. A spec that can't be
//! decoded at all fails that Task alone, never the watch of all of them.

use std::sync::Arc;

use ::kube::runtime::controller::Action;
use serde_json::{Value, json};

use super::fixtures::{Fixture, NS, POD};
use super::reconcile::reconcile;
use crate::kube::crd::{FIELD_VALIDATION_ANNOTATION, FINALIZER, Task};

fn task_with(name: &str, spec: Value, validation: Option<&str>) -> Task {
    let mut meta = json!({"name": name, "namespace": NS, "uid": format!("uid-{name}"),
                          "generation": 1, "resourceVersion": "7",
                          "labels": {"task-executor.io/pod": POD},
                          "finalizers": [FINALIZER]});
    if let Some(v) = validation {
        meta["annotations"] = json!({FIELD_VALIDATION_ANNOTATION: v});
    }
    let mut spec = spec;
    spec["podName"] = json!(POD);
    serde_json::from_value(json!({
        "apiVersion": "task-executor.io/v1alpha1", "kind": "Task",
        "metadata": meta, "spec": spec
    }))
    .unwrap()
}

fn with_unknown() -> Value {
    json!({"process": {"command": ["true"], "foo": 1}, "retries": 3})
}

/// Reconciles `t` once, answering its status write; returns the status written.
async fn run_once(f: &mut Fixture, t: Task) -> Value {
    let (res, body) = tokio::join!(reconcile(Arc::new(t.clone()), f.watcher.clone()), async {
        let call = f.api.next().await;
        let body = call.body.clone();
        call.ok(&t);
        body
    });
    assert_eq!(res.unwrap(), Action::await_change());
    body["status"].clone()
}

fn events(f: &mut Fixture) -> Vec<(&'static str, bool, String)> {
    let mut out = Vec::new();
    while let Ok((_, ev)) = f.events.try_recv() {
        out.push((ev.reason, ev.warning, ev.note));
    }
    out
}

#[test]
fn unknown_fields_of_the_spec_are_collected_with_their_paths() {
    let t = task_with("t", with_unknown(), None);
    assert_eq!(t.spec.unknown_fields, ["spec.process.foo", "spec.retries"]);
    assert_eq!(t.spec.task.process.as_ref().unwrap().command, ["true"]);
    // Serialized back (status writes, the CRD's schema), they are not there.
    let v = serde_json::to_value(&t.spec).unwrap();
    assert_eq!(v, json!({"podName": POD, "process": {"command": ["true"]}}));
    let t = task_with(
        "tpl",
        json!({"podTemplateSpec": {"spec": {"containers": [{"name": "c", "image": "i", "imagee": 1}]}}}),
        None,
    );
    assert_eq!(
        t.spec.unknown_fields,
        ["spec.podTemplateSpec.spec.containers[0].imagee"]
    );
}

#[tokio::test]
async fn warn_runs_the_task_and_a_warning_event_names_the_fields() {
    let mut f = Fixture::new(None);
    let status = run_once(&mut f, task_with("t", with_unknown(), None)).await;
    assert_eq!(status["phase"], "Running", "{status}");
    assert_eq!(f.runtime.started(), ["t"]);
    let evs = events(&mut f);
    let unknown = evs
        .iter()
        .find(|(r, _, _)| *r == "UnknownField")
        .unwrap_or_else(|| panic!("{evs:?}"));
    assert!(unknown.1, "a Warning event");
    assert_eq!(
        unknown.2,
        r#"ignored: unknown field "spec.process.foo", unknown field "spec.retries""#
    );
}

#[tokio::test]
async fn strict_refuses_the_task_and_ignore_runs_it_silently() {
    let mut f = Fixture::new(None);
    let status = run_once(&mut f, task_with("strict", with_unknown(), Some("Strict"))).await;
    let why = &status["state"]["terminated"];
    assert_eq!(why["reason"], "InvalidSpec", "{status}");
    assert_eq!(
        why["message"],
        r#"strict decoding error: unknown field "spec.process.foo", unknown field "spec.retries""#
    );
    assert!(f.runtime.started().is_empty());
    assert!(f.manager.get("strict").is_err());

    let status = run_once(&mut f, task_with("quiet", with_unknown(), Some("Ignore"))).await;
    assert_eq!(status["phase"], "Running", "{status}");
    assert!(events(&mut f).iter().all(|(r, _, _)| *r != "UnknownField"));

    let status = run_once(&mut f, task_with("odd", with_unknown(), Some("strict"))).await;
    let why = &status["state"]["terminated"];
    assert_eq!(why["reason"], "InvalidSpec", "{status}");
    assert!(
        why["message"]
            .as_str()
            .unwrap()
            .starts_with("annotation task-executor.io/field-validation: "),
        "{status}"
    );
}

#[tokio::test]
async fn a_spec_that_cannot_be_decoded_fails_that_task_alone() {
    let mut f = Fixture::new(None);
    // A list holding it still decodes: the watch goes on for the others.
    let list: Vec<Task> = serde_json::from_value(json!([
        serde_json::to_value(task_with("fine", json!({"process": {"command": ["true"]}}), None)).unwrap(),
        {"apiVersion": "task-executor.io/v1alpha1", "kind": "Task",
         "metadata": {"name": "broken", "namespace": NS, "uid": "uid-broken",
                      "finalizers": [FINALIZER]},
         "spec": {"podName": POD, "process": {"command": "true"}}}
    ]))
    .unwrap();
    let status = run_once(&mut f, list[1].clone()).await;
    let why = &status["state"]["terminated"];
    assert_eq!(why["reason"], "InvalidSpec", "{status}");
    assert!(
        why["message"]
            .as_str()
            .unwrap()
            .starts_with("spec.process.command: invalid type"),
        "{status}"
    );
    assert!(f.runtime.started().is_empty());
}
