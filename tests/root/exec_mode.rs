//! `process.execMode` per task: `Local` runs in the agent's own container, `Remote` inside
//! the main container (a stand-in in real namespaces, found by upstream's
//! SANDBOX_MAIN_CONTAINER lookup), unset follows `--enable-sidecar-mode`. Where a task ran
//! is read from its own `/proc/self/ns/*` links (namespace inodes). Needs root.

use std::time::Duration;

use crate::support::agent::Agent;
use crate::support::standin::MainContainer;
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(20);

/// Prints the task's mount, PID and UTS namespaces (`mnt:[4026531840]` ...).
const PROBE: &str = "readlink /proc/self/ns/mnt /proc/self/ns/pid /proc/self/ns/uts";

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", std::process::id())
}

fn probe(name: &str, exec_mode: Option<&str>) -> Value {
    let mut process = json!({"command": ["sh", "-c", PROBE]});
    if let Some(m) = exec_mode {
        process["execMode"] = json!(m);
    }
    // Upstream's wire shape, as the BatchSandbox controller sends it.
    json!({"name": name, "process": process})
}

/// The namespaces a finished probe task printed.
fn ran_in(a: &Agent, name: &str) -> Vec<String> {
    let t = a.wait_state(name, "terminated", T);
    assert_eq!(t["exitCode"], 0, "{name}: {t}\n{}", a.log_tail());
    a.stdout(name).lines().map(str::to_string).collect()
}

fn own_namespaces() -> Vec<String> {
    ["mnt", "pid", "uts"]
        .iter()
        .map(|k| {
            std::fs::read_link(format!("/proc/self/ns/{k}"))
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect()
}

fn main_namespaces(main: &MainContainer) -> Vec<String> {
    ["mnt", "pid", "uts"].iter().map(|k| main.ns(k)).collect()
}

/// `task_executor_tasks{kind=...,state=...}` from `/metrics`.
fn tasks_metric(a: &Agent, kind: &str, state: &str) -> u64 {
    let text = a.call("GET", "/metrics", None).text();
    text.lines()
        .find(|l| {
            l.starts_with("task_executor_tasks{")
                && l.contains(&format!("kind=\"{kind}\""))
                && l.contains(&format!("state=\"{state}\""))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_sidecar_mode_agent_runs_local_tasks_in_its_own_container() {
    let name = unique("em-sidecar");
    let main = MainContainer::start(&name, "em-sidecar-host");
    let a = Agent::start(&["--enable-sidecar-mode=true", "--main-container-name", &name]);
    for (task, mode) in [
        ("default", None),
        ("local", Some("Local")),
        ("remote", Some("Remote")),
    ] {
        let r = a.create(probe(task, mode));
        assert_eq!(r.status, 201, "{}", r.text());
        // The answer echoes the process as sent: execMode only when it was sent.
        assert_eq!(r.json()["process"]["execMode"], json!(mode), "{task}");
    }
    assert_eq!(ran_in(&a, "default"), main_namespaces(&main));
    assert_eq!(ran_in(&a, "remote"), main_namespaces(&main));
    assert_eq!(ran_in(&a, "local"), own_namespaces());
    assert_ne!(own_namespaces(), main_namespaces(&main));
    // `execMode: ""` (Go's zero value) is unset, as upstream's agent reads it: the
    // agent's mode; the answer has no execMode, as upstream's `omitempty` echo.
    let r = a.create(probe("empty", Some("")));
    assert_eq!(r.status, 201, "{}", r.text());
    assert!(
        r.json()["process"].get("execMode").is_none(),
        "{}",
        r.text()
    );
    assert_eq!(ran_in(&a, "empty"), main_namespaces(&main));
    // The metrics count each task by the runtime it ran on.
    assert_eq!(tasks_metric(&a, "host", "terminated"), 1);
    assert_eq!(tasks_metric(&a, "sidecar", "terminated"), 3);
}

#[test]
fn a_host_mode_agent_runs_remote_tasks_in_the_main_container() {
    let name = unique("em-host");
    let main = MainContainer::start(&name, "em-host-host");
    let a = Agent::start(&["--main-container-name", &name]);
    a.create_ok(&probe("default", None));
    a.create_ok(&probe("remote", Some("Remote")));
    assert_eq!(ran_in(&a, "default"), own_namespaces());
    assert_eq!(ran_in(&a, "remote"), main_namespaces(&main));
    // In the container's file system, and deleted like any task.
    a.create_ok(&json!({"name": "inside", "process": {
        "command": ["sh", "-c", "hostname; ls -d /mnt/only-here; sleep 1000"],
        "execMode": "Remote"}}));
    a.wait_state("inside", "running", T);
    let pid = a.main_pid("inside");
    a.delete("inside");
    a.wait_gone("inside", T);
    assert!(!crate::support::pid_alive(pid));
    assert_eq!(a.request("GET", "/readyz", None).status, 200);
}

#[test]
fn a_remote_task_without_a_main_container_ends_target_not_found() {
    let name = unique("em-nobody");
    let a = Agent::start(&["--main-container-name", &name]);
    a.create_ok(&probe("remote", Some("Remote")));
    let t = a.wait_state("remote", "terminated", T);
    assert_eq!(t["reason"], "TargetNotFound", "{t}");
    assert!(t["message"].as_str().unwrap().contains(&name), "{t}");
    // A host-mode agent is ready without a main container: its own tasks need none.
    assert_eq!(a.request("GET", "/readyz", None).status, 200);
    a.create_ok(&probe("local", None));
    assert_eq!(ran_in(&a, "local"), own_namespaces());
}

#[test]
fn an_invalid_exec_mode_is_a_400() {
    let a = Agent::start(&[]);
    for bad in [json!("remote"), json!("local "), json!(1)] {
        let r = a.create(json!({"name": "bad", "process": {"command": ["true"], "execMode": bad}}));
        assert_eq!(r.status, 400, "{bad}: {}", r.text());
        assert!(
            r.json()["message"]
                .as_str()
                .unwrap()
                .contains("process.execMode"),
            "{}",
            r.text()
        );
    }
    assert!(a.get("bad").is_none());
}

/// A task keeps the runtime it was created for: restarted without
/// `--enable-sidecar-mode`, the agent re-adopts a task that runs in the main container as
/// a sidecar task, and new tasks follow the new flags.
#[test]
fn the_exec_mode_decided_at_creation_survives_a_restart_with_other_flags() {
    let name = unique("em-restart");
    let main = MainContainer::start(&name, "em-restart-host");
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut first = Agent::start_in(
        &data,
        &["--enable-sidecar-mode=true", "--main-container-name", &name],
    );
    first.create_ok(&json!({"name": "long", "process": {
        "command": ["sh", "-c", &format!("{PROBE}; sleep 3")]}}));
    first.wait_state("long", "running", T);
    assert_eq!(tasks_metric(&first, "sidecar", "running"), 1);
    let record: Value =
        serde_json::from_slice(&std::fs::read(data.join("long/task.json")).unwrap()).unwrap();
    assert_eq!(record["execMode"], "Remote", "{record}");
    assert!(
        record["spec"]["process"].get("execMode").is_none(),
        "the spec stays as sent: {record}"
    );
    first.kill9();
    // Its drop would stop the task's supervisor; the next agent owns them now.
    std::mem::forget(first);

    let second = Agent::start_in(&data, &["--main-container-name", &name]);
    assert_eq!(
        tasks_metric(&second, "sidecar", "running")
            + tasks_metric(&second, "sidecar", "terminated"),
        1,
        "re-adopted as a sidecar task:\n{}",
        second.call("GET", "/metrics", None).text()
    );
    assert_eq!(ran_in(&second, "long"), main_namespaces(&main));
    second.create_ok(&probe("after", None));
    assert_eq!(ran_in(&second, "after"), own_namespaces());
    assert_eq!(tasks_metric(&second, "host", "terminated"), 1);
}
