//! The BatchSandbox controller's traffic, as shipped in `examples/`: the exact bytes its Go
//! client's `Set` POSTs to `/setTasks` (`json.Marshal` of `[task]`: compact, upstream's
//! wire shape with a top-level `process`), and what this agent answers to its `GET
//! /getTasks` once that task has finished (both shapes). The files are read here, so the
//! examples can't drift from what the agent really does. Times differ per run and are
//! compared normalized.

use std::time::Duration;

use crate::support::agent::{Agent, normalize_times};
use serde_json::Value;

const REQUEST: &str = include_str!("../../examples/controller-set-tasks-request.json");
const RESPONSE: &str = include_str!("../../examples/controller-get-tasks-response.json");
/// Upstream's newer fields (per-task `execMode`, `lifecycle` hooks), as its Go client
/// marshals them.
const LIFECYCLE_REQUEST: &str =
    include_str!("../../examples/controller-set-tasks-lifecycle-request.json");
const T: Duration = Duration::from_secs(30);

/// Every `...At` string is a `metav1.Time`: UTC RFC 3339, second precision.
fn assert_times_are_metav1(v: &Value) {
    match v {
        Value::Object(m) => {
            for (k, val) in m {
                if let (true, Some(s)) = (k.ends_with("At"), val.as_str()) {
                    let t: jiff::Timestamp = s.parse().unwrap_or_else(|e| panic!("{k}: {s}: {e}"));
                    assert_eq!(t.to_string(), s, "{k}");
                    assert!(s.len() == 20 && s.ends_with('Z'), "{k}: {s}");
                } else {
                    assert_times_are_metav1(val);
                }
            }
        }
        Value::Array(a) => a.iter().for_each(assert_times_are_metav1),
        _ => {}
    }
}

#[test]
fn controller_examples_are_what_the_agent_takes_and_answers() {
    // Go's json.Marshal output: one line, no trailing newline.
    assert!(
        !REQUEST.contains('\n'),
        "the request example must stay compact"
    );
    let request: Value = serde_json::from_str(REQUEST).unwrap();
    let mut expected: Value = serde_json::from_str(RESPONSE).unwrap();
    assert_times_are_metav1(&expected);
    let name = request[0]["name"].as_str().unwrap();

    let agent = Agent::start(&[]);
    let r = agent.call("POST", "/setTasks", Some(REQUEST));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("warning"), None, "every field is known");
    // `Client.Set` returns the element with the task's name; it echoes the process.
    let set = r.json();
    let mine = set
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == name)
        .unwrap_or_else(|| panic!("{name} not in {set}"));
    assert_eq!(mine["process"], names_only(&request[0]["process"]));

    agent.wait_state(name, "terminated", T);
    let r = agent.call("GET", "/getTasks", None);
    assert_eq!(r.status, 200, "{}", r.text());
    let mut got = r.json();
    assert_times_are_metav1(&got);
    // What the task used varies from run to run; the example leaves it out (the
    // controller reads no such member).
    for t in got.as_array_mut().unwrap() {
        let usage = t["status"].as_object_mut().unwrap().remove("usage");
        assert!(usage.is_some_and(|u| u["cpuSeconds"].is_number()), "{t}");
    }
    normalize_times(&mut got);
    normalize_times(&mut expected);
    assert_eq!(
        got,
        expected,
        "GET /getTasks answered\n{}",
        serde_json::to_string_pretty(&got).unwrap()
    );
    // The request's process comes back in upstream's shape (environment values left out
    // unless --show-task-env), and it really ran.
    assert_eq!(expected[0]["process"], names_only(&request[0]["process"]));
    assert_eq!(agent.stdout(name), "hello from-controller from /tmp\n");

    // An answer sent back as a request (output-only fields and all) has no unknown field.
    let again = agent.call("POST", "/setTasks?fieldValidation=Strict", Some(&r.text()));
    assert_eq!(again.status, 200, "{}", again.text());
    assert_eq!(again.header("warning"), None);
}

#[test]
fn upstream_lifecycle_shape_round_trips_byte_for_byte_and_runs() {
    use task_executor::api::wire::TaskRequest;
    use task_executor::task::fields;

    assert!(
        !LIFECYCLE_REQUEST.contains('\n'),
        "compact, as Go marshals it"
    );
    let decoded = fields::decode::<Vec<TaskRequest>>(LIFECYCLE_REQUEST.as_bytes()).unwrap();
    assert!(decoded.unknown.is_empty(), "{:?}", decoded.unknown);
    let task = &decoded.value[0];
    let process = task.process.as_ref().unwrap();
    let hooks = process.lifecycle.as_ref().unwrap();
    assert_eq!(
        hooks.pre_start.as_ref().unwrap().timeout(None),
        Some(Duration::from_secs(30))
    );
    // Encoded again in the agent's answers: the same bytes, field for field.
    let again = format!(
        r#"[{{"name":{},"process":{}}}]"#,
        serde_json::to_string(&task.name).unwrap(),
        serde_json::to_string(process).unwrap()
    );
    assert_eq!(again, LIFECYCLE_REQUEST);

    // Accepted as sent, and run. Its main command is `Remote`: with no main container
    // the task ends `TargetNotFound` before anything of it (a hook included) runs.
    let request: Value = serde_json::from_str(LIFECYCLE_REQUEST).unwrap();
    let name = request[0]["name"].as_str().unwrap();
    let container = format!("examples-main-{}", std::process::id());
    let agent = Agent::start(&["--main-container-name", &container]);
    let r = agent.call(
        "POST",
        "/setTasks?fieldValidation=Strict",
        Some(LIFECYCLE_REQUEST),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("warning"), None, "every field is known");
    assert_eq!(
        r.json()[0]["process"],
        names_only(&request[0]["process"]),
        "echoed as sent, environment values left out"
    );
    let t = agent.wait_state(name, "terminated", T);
    assert_eq!(t["reason"], "TargetNotFound", "{t}");
    assert!(agent.get(name).unwrap()["status"].get("hooks").is_none());

    // With a main container (a stand-in in real namespaces) it runs: its `preStart`
    // runs first, in the agent's container, with the task's working directory
    // `/workspace`, which this machine lacks, so the hook can't start and the main
    // command never runs; its `postStop` (no `execMode`: `Local`, as upstream's CRD
    // defaults it, though the task is `Remote`) runs too, in the agent's container.
    let _main = crate::support::standin::MainContainer::start(&container, "examples-main");
    let r = agent.call("POST", "/setTasks", Some("[]"));
    assert_eq!(r.status, 200, "{}", r.text());
    agent.wait_gone(name, T);
    let r = agent.call("POST", "/setTasks", Some(LIFECYCLE_REQUEST));
    assert_eq!(r.status, 200, "{}", r.text());
    let t = agent.wait_state(name, "terminated", T);
    assert_eq!(t["reason"], "PreStartHookFailed", "{t}");
    assert_eq!(t["exitCode"], 1, "{t}");
    let msg = t["message"].as_str().unwrap();
    let want = r#"preStart hook could not be started: failed to start "sh": working directory "/workspace""#;
    assert!(msg.starts_with(want), "{msg}");
    let status = &agent.get(name).unwrap()["status"];
    assert_eq!(
        status["hooks"]["preStart"]["terminated"]["exitCode"], 127,
        "{status}"
    );
    let post = status["hooks"]["postStop"]["terminated"]["message"]
        .as_str()
        .unwrap();
    assert!(
        post.contains(r#"failed to start "sh": working directory "/workspace""#)
            && !post.contains("inside the main container"),
        "{status}"
    );
    assert_eq!(agent.stdout(name), "", "the main command never ran");
}

/// A process as the agent echoes it by default: its environment variables without values.
fn names_only(process: &Value) -> Value {
    let mut p = process.clone();
    if let Some(env) = p["env"].as_array_mut() {
        for e in env {
            e.as_object_mut().unwrap().remove("value");
        }
    }
    p
}
