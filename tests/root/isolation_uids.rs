//! `--task-uid-range`: each host task runs as a uid of its own, so a task can't read
//! another's environment (`/proc/PID/environ`) or signal it, which tasks of one uid can.
//! Real agents (as root) and real task processes: the uids are read from the tasks'
//! output and from `/proc/PID/status`; hooks, `securityContext.runAsUser`, a `kill -9` and
//! restart of the agent, a used-up range (503) and bad flag values. Needs root.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use crate::support::agent::Agent;
use crate::support::wait_for;
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(30);

/// `id -u; id -g; id -G` of a task, once it printed them.
fn ids(a: &Agent, name: &str) -> String {
    wait_for(T, &format!("{name}'s ids"), || {
        let out = a.stdout(name);
        (out.lines().count() >= 3).then_some(out)
    })
}

const PRINT_IDS: &str = "id -u; id -g; id -G";

/// A task that prints its ids and then sleeps (so it holds its uid while running).
fn sleeper(a: &Agent, name: &str) {
    a.run_sh(name, &format!("{PRINT_IDS}; exec sleep 1000"));
    a.wait_state(name, "running", T);
}

/// The real uid of a running process.
fn proc_uid(pid: i32) -> u32 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn each_task_gets_a_uid_of_its_own_and_a_deleted_tasks_uid_is_given_again() {
    let a = Agent::start(&["--task-uid-range", "3000000-3000003"]);
    sleeper(&a, "a");
    sleeper(&a, "b");
    // The uid's number as gid (no --task-run-as-user), no other group.
    assert_eq!(ids(&a, "a"), "3000000\n3000000\n3000000\n");
    assert_eq!(ids(&a, "b"), "3000001\n3000001\n3000001\n");
    assert_eq!(proc_uid(a.main_pid("b")), 3000001);
    // A finished task still holds its uid; a runAsUser of the request's choosing is
    // refused (the task policy) and takes none.
    a.run_sh("done", PRINT_IDS);
    assert_eq!(a.wait_state("done", "terminated", T)["exitCode"], 0);
    assert_eq!(ids(&a, "done"), "3000002\n3000002\n3000002\n");
    let r = a.create(json!({"name": "chosen", "spec": {"process": {
        "command": ["sh", "-c", PRINT_IDS], "securityContext": {"runAsUser": 1234}}}}));
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(
        r.text().contains("--task-uid-range 3000000-3000003"),
        "{}",
        r.text()
    );
    sleeper(&a, "c");
    assert_eq!(ids(&a, "c"), "3000003\n3000003\n3000003\n");

    // Used up: a clear 503 that changes nothing (unlimited --max-concurrent-tasks).
    let r = a.create(json!({"name": "full", "spec": {"process": {"command": ["true"]}}}));
    assert_eq!(r.status, 503, "{}", r.text());
    let body = r.json();
    assert_eq!(body["code"], "Service Unavailable");
    let msg = body["message"].as_str().unwrap();
    assert!(
        msg.contains("no free task uid") && msg.contains("--task-uid-range 3000000-3000003"),
        "{msg}"
    );
    assert!(a.get("full").is_none() && !a.task_dir("full").exists());

    // A deleted task's uid is free once it is gone; a held one is never given.
    a.delete("a");
    a.wait_gone("a", T);
    sleeper(&a, "d");
    assert_eq!(ids(&a, "d"), "3000000\n3000000\n3000000\n");
    assert_eq!(proc_uid(a.main_pid("b")), 3000001);
}

/// The victim (a secret in its environment) and a hostile task that tries to read its
/// environment and signal it; returns the hostile task's report.
fn hostile_against_victim(args: &[&str]) -> String {
    let a = Agent::start(args);
    let secret = "victim-secret-5f2e9a";
    let r = a.create(json!({"name": "victim", "spec": {"process": {
        "command": ["sleep", "1000"],
        "env": [{"name": "VICTIM_SECRET", "value": secret}]}}}));
    assert_eq!(r.status, 201, "{}", r.text());
    a.wait_state("victim", "running", T);
    let pid = a.main_pid("victim");
    let script = format!(
        "if cat /proc/{pid}/environ > /dev/null 2>&1; then echo read: allowed; \
         tr '\\0' '\\n' < /proc/{pid}/environ | grep VICTIM_SECRET; else echo read: denied; fi; \
         if kill -0 {pid} 2>/dev/null; then echo signal: allowed; else echo signal: denied; fi; \
         id -u"
    );
    a.run_sh("hostile", &script);
    assert_eq!(a.wait_state("hostile", "terminated", T)["exitCode"], 0);
    assert!(a.get("victim").unwrap()["status"]["state"]["running"].is_object());
    let out = a.stdout("hostile");
    if out.contains("read: allowed") {
        assert!(out.contains(secret), "{out}");
    } else {
        assert!(!out.contains(secret), "{out}");
    }
    out
}

#[test]
fn with_the_range_a_task_cant_read_or_signal_another_and_without_it_can() {
    // The default path: neither task sets a securityContext.
    let shared = hostile_against_victim(&["--task-run-as-user", "65534"]);
    assert!(
        shared.contains("read: allowed") && shared.contains("signal: allowed"),
        "tasks of one uid reach each other: {shared}"
    );
    let own = hostile_against_victim(&[
        "--task-run-as-user",
        "65534",
        "--task-uid-range",
        "3000100-3000199",
    ]);
    assert_eq!(
        own, "read: denied\nsignal: denied\n3000101\n",
        "each task its own uid"
    );
}

/// An open directory the tasks' uids can write to.
fn open_dir() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    fs::set_permissions(d.path(), fs::Permissions::from_mode(0o777)).unwrap();
    d
}

fn marker(dir: &Path, name: &str) -> String {
    wait_for(T, name, || fs::read_to_string(dir.join(name)).ok())
}

#[test]
fn hooks_run_as_their_tasks_uid() {
    let dir = open_dir();
    let d = dir.path().display();
    // The gid comes from --task-run-as-user when that sets one.
    let a = Agent::start(&[
        "--task-uid-range",
        "3000200-3000209",
        "--task-run-as-user",
        "65534:65533",
    ]);
    sleeper(&a, "first");
    let hook = |step: &str| {
        json!({"exec": {"command": ["sh", "-c",
        format!("echo $(id -u) $(id -g) $(id -G) > {d}/{step}")]}})
    };
    let r = a.create(json!({"name": "hooked", "spec": {"process": {
        "command": ["sh", "-c", format!("echo $(id -u) $(id -g) $(id -G) > {d}/main")],
        "lifecycle": {"preStart": hook("pre"), "postStop": hook("post")}}}}));
    assert_eq!(r.status, 201, "{}", r.text());
    a.wait_state("hooked", "terminated", T);
    for step in ["pre", "main", "post"] {
        assert_eq!(marker(dir.path(), step), "3000201 65533 65533\n", "{step}");
    }
    assert_eq!(ids(&a, "first"), "3000200\n65533\n65533\n");
}

#[test]
fn a_restarted_agent_keeps_each_running_tasks_uid_and_gives_it_to_no_other() {
    let mut a = Agent::start(&["--task-uid-range", "3000300-3000309"]);
    sleeper(&a, "long");
    sleeper(&a, "other");
    let (long, other) = (a.main_pid("long"), a.main_pid("other"));
    assert_eq!((proc_uid(long), proc_uid(other)), (3000300, 3000301));
    let record: Value =
        serde_json::from_slice(&fs::read(a.task_dir("long").join("task.json")).unwrap()).unwrap();
    assert_eq!(record["hostUid"], 3000300);
    a.kill9();
    a.restart();
    a.wait_state("long", "running", T);
    assert_eq!(a.main_pid("long"), long);
    assert_eq!(proc_uid(long), 3000300, "the same process, the same uid");
    sleeper(&a, "new");
    assert_eq!(ids(&a, "new"), "3000302\n3000302\n3000302\n");
    // Once a re-adopted task is gone, its uid is free again.
    a.delete("long");
    a.wait_gone("long", T);
    assert!(!crate::support::pid_alive(long));
    sleeper(&a, "later");
    assert_eq!(ids(&a, "later"), "3000300\n3000300\n3000300\n");
    assert_eq!(proc_uid(other), 3000301);
}

/// The agent's stderr when it refuses to start with these flags (20 s at most).
fn refusal(args: &[&str]) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let out = std::process::Command::new("timeout")
        .arg("20")
        .arg(crate::support::agent::BIN)
        .args(args)
        .args(["--listen-addr", "127.0.0.1:0", "--data-dir"])
        .arg(tmp.path().join("data"))
        .output()
        .unwrap();
    // 124: still running after 20 s (it started).
    assert!(
        !out.status.success() && out.status.code() != Some(124),
        "{args:?}: {out:?}"
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_ranges_stop_the_agent_with_the_reason() {
    let e = refusal(&["--task-uid-range", "200-100"]);
    assert!(
        e.contains("--task-uid-range") && e.contains("200 is above 100"),
        "{e}"
    );
    let e = refusal(&["--task-uid-range", "0-100"]);
    assert!(
        e.contains("\"0\" is not a numeric uid between 1 and 2147483647"),
        "{e}"
    );
    let e = refusal(&["--task-uid-range", "100-2147483648"]);
    assert!(e.contains("between 1 and 2147483647"), "{e}");
    let e = refusal(&["--task-uid-range", "100"]);
    assert!(e.contains("expected FIRST-LAST"), "{e}");
    let e = refusal(&[
        "--task-uid-range",
        "100-109",
        "--max-concurrent-tasks",
        "11",
    ]);
    assert!(
        e.contains("--task-uid-range 100-109 holds 10 uids, fewer than --max-concurrent-tasks 11"),
        "{e}"
    );
    let e = refusal(&[
        "--task-uid-range",
        "65000-65535",
        "--task-run-as-user",
        "65534",
    ]);
    assert!(
        e.contains("--task-uid-range 65000-65535 holds --task-run-as-user's uid 65534"),
        "{e}"
    );
    // And it needs the capabilities to change ids.
    let tmp = tempfile::tempdir().unwrap();
    let out = std::process::Command::new("timeout")
        .args(["20", "setpriv", "--bounding-set=-setuid", "--inh-caps=-all"])
        .arg(crate::support::agent::BIN)
        .args([
            "--task-uid-range",
            "100-199",
            "--listen-addr",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(tmp.path().join("data"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("--task-uid-range 100-199 needs CAP_SETUID and CAP_SETGID"),
        "{err}"
    );
}
