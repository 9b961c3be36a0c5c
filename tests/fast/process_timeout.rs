//! A process task's `timeoutSeconds` as upstream's agent reads it, with real processes
//! through upstream's wire (`/setTasks`, `/getTasks`, as its controller calls them): zero
//! or negative is a deadline already passed (the task is started and stopped at once,
//! `TaskTimeout`, a non-zero exit code the controller reads as a failure; its `postStop`
//! still runs), and a value too large for a clock is no deadline (no overflow).

use std::time::Duration;

use crate::support::agent::Agent;
use serde_json::json;

const T: Duration = Duration::from_secs(30);

#[test]
fn a_zero_or_negative_timeout_stops_the_task_at_once_as_timed_out() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().display().to_string();
    let a = Agent::start(&["--stop-grace-period", "1s"]);
    let task = |name: &str, secs: i64| {
        json!({"name": name, "process": {
            "command": ["sleep", "1000"], "timeoutSeconds": secs,
            "lifecycle": {"postStop": {"exec": {"command": ["sh", "-c", format!("echo done > {d}/{name}")]}}}}})
    };
    let r = a.request(
        "POST",
        "/setTasks",
        Some(&json!([task("zero", 0), task("negative", -5)])),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    for (name, secs) in [("zero", 0), ("negative", -5)] {
        a.wait_state(name, "terminated", T);
        let t = a.controller_view(name);
        assert_eq!(t["reason"], "TaskTimeout", "{name}: {t}");
        assert_ne!(t["exitCode"], 0, "{name}: {t}");
        assert_eq!(
            t["message"],
            format!("Task exceeded timeout of {secs} seconds"),
            "{name}"
        );
        assert!(t["startedAt"].is_string(), "it was started: {t}");
        assert_eq!(
            std::fs::read_to_string(tmp.path().join(name)).unwrap(),
            "done\n",
            "{name}: postStop ran after the stop"
        );
    }
}

#[test]
fn a_timeout_too_large_for_a_clock_is_no_deadline() {
    let a = Agent::start(&[]);
    let r = a.request(
        "POST",
        "/setTasks",
        Some(&json!([
            {"name": "huge", "process": {"command": ["sh", "-c", "echo ran"],
                                         "timeoutSeconds": i64::MAX}},
            {"name": "huge-hook", "process": {"command": ["true"], "lifecycle": {
                "preStart": {"exec": {"command": ["true"]}, "timeoutSeconds": i64::MAX}}}}
        ])),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    for name in ["huge", "huge-hook"] {
        a.wait_state(name, "terminated", T);
        let t = a.controller_view(name);
        assert_eq!(
            (t["exitCode"].as_i64(), t["reason"].as_str()),
            (Some(0), Some("Succeeded")),
            "{name}: {t}\n{}",
            a.log_tail()
        );
    }
    assert_eq!(a.stdout("huge"), "ran\n");
}
