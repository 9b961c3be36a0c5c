//! An agent out of file descriptors: a task whose launch was sent is followed through its
//! journal (the only authority then), never recorded `StartError` for a run it had.

use std::time::Duration;

use serde_json::json;

use super::support::agent::Agent;
use super::support::{http, wait_for};

#[test]
fn tasks_that_ran_while_the_agent_was_out_of_descriptors_report_their_real_exit() {
    // A hard limit the agent can't raise: a few dozen descriptors for everything.
    let a = Agent::start_wrapped(&["prlimit", "--nofile=64:64", "--"], &[]);
    let n = 40;
    let addr = a.addr;
    let creators: Vec<_> = (0..n)
        .map(|i| {
            std::thread::spawn(move || {
                let body = json!({"name": format!("t{i}"), "spec": {"process": {
                    "command": ["sh", "-c", "sleep 0.3; exit 3"]}}});
                // Refused creates (503: out of descriptors) are retried: nothing was promised.
                // A 409 is an earlier try that was accepted but whose answer was lost.
                wait_for(Duration::from_secs(60), "a create to be accepted", || {
                    let b = serde_json::to_vec(&body).unwrap();
                    http::request(addr, "POST", "/tasks", Some(&b))
                        .ok()
                        .filter(|r| r.status == 201 || r.status == 409)
                })
            })
        })
        .collect();
    for c in creators {
        c.join().unwrap();
    }
    for i in 0..n {
        let name = format!("t{i}");
        let t = wait_for(Duration::from_secs(90), "the task to end", || {
            let r = http::request(addr, "GET", &format!("/tasks/{name}"), None).ok()?;
            (r.status == 200).then(|| r.json())?["status"]["state"]
                .get("terminated")
                .cloned()
        });
        assert_eq!(t["exitCode"], 3, "{name}: {t}");
        assert_eq!(t["reason"], "Failed", "{name}: {t}");
    }
}

/// What an earlier agent out of descriptors left: a task that ran (its journal holds its
/// exit) recorded `StartError` in task.json. A restarted agent follows the journal.
#[test]
fn a_start_error_recorded_for_a_task_whose_journal_shows_its_run_gives_way_to_the_journal() {
    let mut a = Agent::start(&[]);
    a.run_sh("ran", "exit 3");
    let t = a.wait_state("ran", "terminated", Duration::from_secs(30));
    assert_eq!(t["exitCode"], 3, "{t}");
    a.kill9();
    let rec_path = a.task_dir("ran").join("task.json");
    let mut rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&rec_path).unwrap()).unwrap();
    rec["finalStatus"] = json!({
        "exitCode": 128, "reason": "StartError", "startedAt": null,
        "finishedAt": "2026-01-01T00:00:00Z",
        "message": "failed to launch the task supervisor: run.jsonl: Too many open files (os error 24)"
    });
    std::fs::write(&rec_path, serde_json::to_vec(&rec).unwrap()).unwrap();
    a.restart();
    let t = a.wait_state("ran", "terminated", Duration::from_secs(30));
    assert_eq!(
        t["exitCode"], 3,
        "the journal's exit, not the recorded StartError: {t}"
    );
    assert_eq!(t["reason"], "Failed", "{t}");
}

/// A re-adopted task holds no descriptor of its own (its journal's release is heard
/// through one inotify instance shared by all), so an agent restarted at the descriptor
/// limit its tasks ran under before still has room to serve. With two pidfds per adopted
/// task, 40 tasks took all of 80 descriptors and the API was unreachable.
#[test]
fn tasks_re_adopted_at_a_low_descriptor_limit_leave_the_api_reachable() {
    let mut a = Agent::start_wrapped(&["prlimit", "--nofile=80:80", "--"], &[]);
    let outside = tempfile::tempdir().unwrap();
    let go = outside.path().join("go");
    let script = format!(
        "while [ ! -e {} ]; do sleep 0.1; done; exit 4",
        go.display()
    );
    let n = 40;
    for i in 0..n {
        a.run_sh(&format!("t{i}"), &script);
    }
    for i in 0..n {
        a.wait_state(&format!("t{i}"), "running", Duration::from_secs(30));
    }
    // Under the same limit again; `restart` waits for /health.
    a.restart();
    for i in 0..n {
        let t = a.get(&format!("t{i}")).unwrap();
        assert!(t["status"]["state"]["running"].is_object(), "t{i}: {t}");
    }
    a.run("after", &["true"]);
    a.wait_state("after", "terminated", Duration::from_secs(30));
    std::fs::write(&go, b"").unwrap();
    for i in 0..n {
        let t = a.wait_state(&format!("t{i}"), "terminated", Duration::from_secs(30));
        assert_eq!(t["exitCode"], 4, "t{i}: the real exit, heard of: {t}");
    }
}

/// Out of descriptors, a client that connects is answered at once (503, saying why)
/// through a descriptor kept in reserve, instead of waiting unanswered in the backlog;
/// once descriptors are free again it is served as before.
#[test]
fn a_client_of_an_agent_out_of_descriptors_is_told_so_at_once() {
    let a = Agent::start_wrapped(
        &["prlimit", "--nofile=64:64", "--"],
        &["--header-read-timeout", "10m"],
    );
    // Idle connections (no request: each holds a descriptor of the agent's until the
    // header timeout) beyond the limit.
    let idle: Vec<_> = (0..80)
        .map(|_| std::net::TcpStream::connect(a.addr).unwrap())
        .collect();
    let r = http::request(a.addr, "GET", "/health", None).expect("an answer, not a wait");
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.text().contains("file descriptors"), "{}", r.text());
    drop(idle);
    wait_for(Duration::from_secs(30), "the API to serve again", || {
        http::request(a.addr, "GET", "/health", None)
            .ok()
            .filter(|r| r.status == 200)
    });
}
