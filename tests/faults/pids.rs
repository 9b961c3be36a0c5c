//! Out of processes, for real: the agent in a pids cgroup at its limit. A create is
//! accepted and waits (`ResourcesExhausted`), a delete answers (no request needs a new
//! thread, so none panics), and the waiting task starts once a process slot is free.

use std::time::Duration;

use serde_json::json;

use super::common::{marking, runs};
use super::support::agent::Agent;
use super::support::standin::TestCgroup;

const T: Duration = Duration::from_secs(30);

#[test]
fn out_of_processes_a_create_waits_a_delete_answers_and_the_task_runs_later() {
    let cg = TestCgroup::new(&format!("te-faults-{}", std::process::id()));
    let mut a = Agent::start(&[]);
    let markers = a.data_dir.parent().unwrap().join("runs");
    std::fs::write(cg.procs(), a.pid().to_string()).unwrap();
    a.run("hold-1", &["sleep", "600"]);
    a.run("hold-2", &["sleep", "600"]);
    a.wait_state("hold-1", "running", T);
    a.wait_state("hold-2", "running", T);
    // Threads that tokio's blocking pool started for earlier requests exit after 10 s
    // idle: wait for that, so that a request needing a new thread would have to create
    // one (which is what panicked).
    std::thread::sleep(Duration::from_secs(11));
    let current = std::fs::read_to_string(cg.dir().join("pids.current")).unwrap();
    std::fs::write(cg.dir().join("pids.max"), current.trim()).unwrap();

    let r = a.create(json!({"name": "late", "spec": {"process": {
        "command": ["sh", "-c", marking(&markers, "")]}}}));
    assert_eq!(r.status, 201, "{}", r.text());
    let w = &r.json()["status"]["state"]["waiting"];
    assert_eq!(w["reason"], "ResourcesExhausted", "{}", r.text());
    assert!(
        w["message"].as_str().unwrap().contains("out of processes"),
        "{w}"
    );
    assert_eq!(a.request("GET", "/health", None).status, 200);

    // A delete needs no new thread or process: it answers, and frees two slots.
    a.delete("hold-1");
    a.wait_gone("hold-1", T);
    let t = a.wait_state("late", "terminated", Duration::from_secs(60));
    assert_eq!(t["exitCode"], 0, "{t}");
    assert_eq!(runs(&markers).get("late"), Some(&1));

    std::fs::write(cg.dir().join("pids.max"), "max").unwrap();
    a.delete_all_and_stop();
    a.kill9();
}
