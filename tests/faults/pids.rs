//! Out of processes, for real: the agent in a pids cgroup at its limit. A create is
//! accepted and waits (`ResourcesExhausted`), a delete and a log read answer (no request
//! needs a new thread, so none panics), and the waiting task starts once a process slot is free. And a
//! supervisor that took the launch but could not spawn the task gives it back: the task
//! is started later, also by an agent restarted meanwhile, never reported lost.

use std::time::Duration;

use serde_json::json;

use super::common::{marking, runs, shim_server};
use super::support::agent::Agent;
use super::support::standin::TestCgroup;

const T: Duration = Duration::from_secs(30);

#[test]
fn out_of_processes_a_create_waits_a_delete_answers_and_the_task_runs_later() {
    let cg = TestCgroup::new(&format!("te-faults-{}", std::process::id()));
    // No pids cgroup per task (`--task-pids-limit=0`): this test moves the agent into a
    // pids cgroup of its own after start, which tasks' own cgroups (made under the
    // agent's cgroup of its start) would not be in.
    let mut a = Agent::start(&["--task-pids-limit=0"]);
    let markers = a.data_dir.parent().unwrap().join("runs");
    std::fs::write(cg.procs(), a.pid().to_string()).unwrap();
    a.run("hold-1", &["sleep", "600"]);
    a.run("hold-2", &["sh", "-c", "echo held-2; exec sleep 600"]);
    a.wait_state("hold-1", "running", T);
    a.wait_state("hold-2", "running", T);
    // Threads that tokio's blocking pool started for earlier requests exit after 10 s
    // idle: wait for that, so that a request needing a new thread would have to create
    // one (which is what panicked).
    std::thread::sleep(Duration::from_secs(11));
    let current = std::fs::read_to_string(cg.dir().join("pids.current")).unwrap();
    std::fs::write(cg.dir().join("pids.max"), current.trim()).unwrap();

    create_late_and_see_it_wait(&a, &markers);
    assert_eq!(a.request("GET", "/health", None).status, 200);
    // Reading a task's output needs blocking file reads; with no thread to be had they
    // run inline (this request's handler panicked and dropped the connection).
    let logs = a.request("GET", "/tasks/hold-2/logs", None);
    assert_eq!(logs.status, 200, "{}", logs.text());
    assert!(logs.text().contains("held-2"), "{}", logs.text());

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

#[test]
fn a_task_its_supervisor_could_not_spawn_is_given_back_and_runs_after_an_agent_restart() {
    // No pids cgroup per task: the shim would leave the test's pids cgroup for it.
    let mut a = Agent::start(&["--task-pids-limit=0"]);
    let markers = a.data_dir.parent().unwrap().join("runs");
    // The shim server alone goes into a pids cgroup with room for one shim: the shim is
    // forked, claims the launch, and its spawn of the task fails with EAGAIN.
    a.run("warm", &["true"]);
    a.wait_state("warm", "terminated", T);
    let server = shim_server(a.pid()).expect("the agent's shim server");
    let cg = TestCgroup::new(&format!("te-faults-claim-{}", std::process::id()));
    std::fs::write(cg.procs(), server.to_string()).unwrap();
    std::fs::write(cg.dir().join("pids.max"), "2").unwrap();
    // The spare shim forked for "warm"'s successor was forked outside: one more task
    // takes it, and the spare forked then is the cgroup's second process.
    a.run("warm-2", &["true"]);
    a.wait_state("warm-2", "terminated", T);
    super::support::wait_for(T, "the next spare shim in the cgroup", || {
        let n = std::fs::read_to_string(cg.dir().join("pids.current")).unwrap_or_default();
        (n.trim() == "2").then_some(())
    });

    create_late_and_see_it_wait(&a, &markers);
    // The shim got as far as claiming the launch (not a fork failure of the server, which
    // never gets that far) before its spawn failed.
    let journal = a.task_dir("late").join("run.jsonl");
    super::support::wait_for(T, "a shim's claim in the journal", || {
        let text = std::fs::read_to_string(&journal).unwrap_or_default();
        text.contains("\"claimed\"").then_some(())
    });

    // An agent restarted while the task waits starts it: nothing of it ran before.
    a.restart();
    let t = a.wait_state("late", "terminated", Duration::from_secs(60));
    assert_eq!(
        (t["exitCode"].as_i64(), t["reason"].as_str()),
        (Some(0), Some("Succeeded")),
        "{t}"
    );
    assert_eq!(runs(&markers).get("late"), Some(&1));
    a.delete_all_and_stop();
}

/// Creates task `late` (it marks each run in `markers`): accepted, and waiting because
/// the machine is out of processes.
fn create_late_and_see_it_wait(a: &Agent, markers: &std::path::Path) {
    let r = a.create(json!({"name": "late", "spec": {"process": {
        "command": ["sh", "-c", marking(markers, "")]}}}));
    assert_eq!(r.status, 201, "{}", r.text());
    let w = &r.json()["status"]["state"]["waiting"];
    assert_eq!(w["reason"], "ResourcesExhausted", "{}", r.text());
    assert!(
        w["message"].as_str().unwrap().contains("out of processes"),
        "{w}"
    );
}
