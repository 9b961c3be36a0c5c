//! Nothing accepted is lost: `kill -9` of the agent, restarts, graceful shutdown.

use std::time::{Duration, Instant};

use crate::support::agent::Agent;
use crate::support::{pid_alive, wait_for};
use serde_json::json;

const T: Duration = Duration::from_secs(15);

#[test]
fn exit_while_agent_is_dead_is_reported_after_restart() {
    let mut a = Agent::start(&[]);
    let runs = a.data_dir.parent().unwrap().join("runs");
    a.run_sh(
        "finishes-alone",
        &format!("echo run >> {}; sleep 1; exit 7", runs.display()),
    );
    a.wait_state("finishes-alone", "running", T);
    a.kill9();
    std::thread::sleep(Duration::from_millis(1800)); // the task ends while nobody watches
    a.restart();
    let t = a.wait_state("finishes-alone", "terminated", T);
    assert_eq!(
        (t["exitCode"].as_i64(), t["reason"].as_str()),
        (Some(7), Some("Failed")),
        "{t}"
    );
    assert_eq!(
        std::fs::read_to_string(&runs).unwrap(),
        "run\n",
        "not re-run"
    );
}

#[test]
fn running_task_is_readopted_and_its_later_exit_seen() {
    let mut a = Agent::start(&[]);
    a.run_sh("long", "sleep 2; exit 5");
    let started = a.wait_state("long", "running", T);
    let pid = a.main_pid("long");
    a.kill9();
    assert!(pid_alive(pid), "the task survives the agent");
    a.restart();
    let again = a.wait_state("long", "running", T);
    assert_eq!(again["startedAt"], started["startedAt"]);
    let t = a.wait_state("long", "terminated", T);
    assert_eq!(t["exitCode"], 5);
}

#[test]
fn readopted_task_can_still_be_deleted_with_its_tree() {
    let mut a = Agent::start(&["--stop-grace-period", "1s"]);
    a.run_sh("stubborn", "trap '' TERM; sleep 1000 & wait; sleep 1000");
    a.wait_state("stubborn", "running", T);
    let pid = a.main_pid("stubborn");
    a.kill9();
    a.restart();
    a.wait_state("stubborn", "running", T);
    a.delete("stubborn");
    a.wait_gone("stubborn", T);
    assert!(!pid_alive(pid));
    let leftovers = std::process::Command::new("pgrep")
        .args(["-f", "^sleep 1000$", "-P", &pid.to_string()])
        .output()
        .unwrap();
    assert!(leftovers.stdout.is_empty());
}

#[test]
fn deletion_interrupted_by_a_crash_finishes_after_restart() {
    let mut a = Agent::start(&["--stop-grace-period", "4s"]);
    a.run_sh(
        "half-deleted",
        "trap '' TERM; while true; do sleep 0.2; done",
    );
    a.wait_state("half-deleted", "running", T);
    let pid = a.main_pid("half-deleted");
    a.delete("half-deleted"); // the task ignores TERM, so this takes the whole grace
    a.kill9();
    a.restart();
    let t = a
        .get("half-deleted")
        .expect("still there, still being deleted");
    assert!(t["deletionTimestamp"].is_string(), "{t}");
    // The new agent resumes the deletion instead of forgetting it.
    wait_for(Duration::from_secs(20), "deleted", || {
        a.get("half-deleted").is_none().then_some(())
    });
    assert!(!pid_alive(pid));
}

#[test]
fn accepted_but_never_started_task_is_started_after_restart() {
    // Simulate a crash between "task.json is durable" and "the shim started": the record
    // exists without any shim record. The task was accepted, so it must run.
    let mut a = Agent::start(&[]);
    a.kill9();
    write_accepted(&a.data_dir);
    // A directory without a record (crash before the record was written) and one with
    // only a torn record (crash while writing it) are cleaned up: neither was answered.
    std::fs::create_dir_all(a.data_dir.join("never-accepted")).unwrap();
    std::fs::create_dir_all(a.data_dir.join("torn")).unwrap();
    std::fs::write(
        a.data_dir.join("torn/task.json"),
        b"{\"name\": \"torn\", \"uid\": \"x",
    )
    .unwrap();
    // The (empty) run journal is created with the record; nothing ran yet.
    std::fs::write(a.data_dir.join("torn/run.jsonl"), b"").unwrap();
    // But an unreadable record beside a journal that says it ran: kept, quarantined out
    // of the tasks' way (its name is free again).
    std::fs::create_dir_all(a.data_dir.join("damaged")).unwrap();
    std::fs::write(a.data_dir.join("damaged/task.json"), b"garbage").unwrap();
    let launched =
        json!({"launch": {"argv": ["true"], "env": [], "graceMs": 1000, "maxLogBytes": 1024}});
    std::fs::write(
        a.data_dir.join("damaged/run.jsonl"),
        format!("{launched}\n"),
    )
    .unwrap();
    a.restart();
    let t = a.wait_state("accepted", "terminated", T);
    assert_eq!(t["exitCode"], 4);
    assert!(a.get("never-accepted").is_none());
    assert!(!a.data_dir.join("never-accepted").exists());
    assert!(!a.data_dir.join("torn").exists());
    let kept: Vec<_> = std::fs::read_dir(a.data_dir.join(".quarantine"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("damaged."))
        .collect();
    assert_eq!(kept.len(), 1, "never delete what may hold a result");
    assert!(kept[0].path().join("run.jsonl").exists());
    assert!(a.get("damaged").is_none());
}

#[test]
fn sigterm_exits_quickly_and_tasks_keep_running() {
    let mut a = Agent::start(&[]);
    a.run("survivor", &["sleep", "30"]);
    a.wait_state("survivor", "running", T);
    let pid = a.main_pid("survivor");
    let took = a.sigterm();
    assert!(
        took < Duration::from_secs(4),
        "graceful shutdown took {took:?}"
    );
    assert!(pid_alive(pid), "tasks are not stopped by an agent shutdown");
    let t0 = Instant::now();
    a.restart();
    assert!(t0.elapsed() < Duration::from_secs(10));
    a.wait_state("survivor", "running", T);
    a.delete("survivor");
    a.wait_gone("survivor", T);
    assert!(!pid_alive(pid));
}

#[test]
fn a_dead_pid_reused_never_looks_alive() {
    // The shim record names a process by pid and start time. Point it at a live process
    // with the wrong start time: the task must not be reported running.
    let mut a = Agent::start(&[]);
    a.run_sh("reused", "sleep 1; exit 2");
    a.wait_state("reused", "running", T);
    a.kill9();
    let dir = a.task_dir("reused");
    let shim_pid = crate::support::agent::started_record(&dir).unwrap()["shim"]["pid"]
        .as_i64()
        .unwrap() as i32;
    // Kill the shim and its task so no exit record is written, then forge the record to
    // name our own (live) test process with a wrong start time.
    std::process::Command::new("kill")
        .args(["-KILL", &shim_pid.to_string()])
        .status()
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let me = std::process::id();
    let journal = std::fs::read_to_string(dir.join("run.jsonl")).unwrap();
    let launch = journal.lines().next().unwrap();
    let forged = json!({"started": {"shim": {"pid": me, "startTime": 1}, "main": {"pid": me, "startTime": 1}, "startedAt": "2026-01-01T00:00:00Z"}});
    std::fs::write(dir.join("run.jsonl"), format!("{launch}\n{forged}\n")).unwrap();
    a.restart();
    let t = a.wait_state("reused", "terminated", T);
    assert_eq!(t["reason"], "SupervisorLost", "{t}");
    assert!(
        pid_alive(me as i32),
        "the agent never signals a process it doesn't own"
    );
}

#[test]
fn a_node_restart_is_reported_and_never_reruns_a_task() {
    // A reboot can't be staged in a test; what it leaves behind can: journals whose launch
    // line names another boot (the kernel's random boot_id), with no exit line, as a power
    // loss leaves them. A launch of this boot with nothing after it is an agent crash
    // before the shim started: that task is started.
    let mut a = Agent::start(&[]);
    a.kill9();
    let this_boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    let ran = a.data_dir.parent().unwrap().join("ran");
    let cases = [
        (
            "was-starting",
            "00000000-0000-4000-8000-000000000000",
            false,
        ),
        ("was-running", "00000000-0000-4000-8000-000000000000", true),
        ("agent-crashed", this_boot.trim(), false),
    ];
    for (name, boot, started) in cases {
        let dir = a.data_dir.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let argv = ["sh", "-c", &format!("echo {name} >> {}", ran.display())].map(String::from);
        let rec = json!({"name": name, "uid": format!("uid-{name}"), "createdAt": "2026-01-01T00:00:00Z",
                         "spec": {"process": {"command": argv}}});
        std::fs::write(dir.join("task.json"), rec.to_string()).unwrap();
        let mut journal = json!({"launch": {"argv": argv, "env": [], "graceMs": 1000,
                                             "maxLogBytes": 4096, "bootId": boot}})
        .to_string();
        if started {
            // Pids of the old boot: start time 1 matches no process of this one.
            let gone = json!({"pid": 4_000_000, "startTime": 1});
            let line = json!({"started": {"shim": gone, "main": gone, "startedAt": "2026-01-01T00:00:00Z"}});
            journal = format!("{journal}\n{line}");
        }
        std::fs::write(dir.join("run.jsonl"), format!("{journal}\n")).unwrap();
    }
    a.restart();
    for (name, message) in [
        (
            "was-starting",
            "the node restarted while the task was starting",
        ),
        ("was-running", "the node restarted while the task ran"),
    ] {
        let t = a.wait_state(name, "terminated", T);
        assert_eq!(t["reason"], "NodeRestarted", "{t}");
        assert!(t["message"].as_str().unwrap().starts_with(message), "{t}");
    }
    let t = a.wait_state("agent-crashed", "terminated", T);
    assert_eq!(
        (t["exitCode"].as_i64(), t["reason"].as_str()),
        (Some(0), Some("Succeeded")),
        "{t}"
    );
    assert_eq!(
        std::fs::read_to_string(&ran).unwrap(),
        "agent-crashed\n",
        "only it ran"
    );

    // And it stays that way across another restart.
    a.restart();
    assert_eq!(
        a.wait_state("was-starting", "terminated", T)["reason"],
        "NodeRestarted"
    );
    assert_eq!(std::fs::read_to_string(&ran).unwrap(), "agent-crashed\n");
}

#[test]
fn a_launch_taken_by_a_supervisor_that_died_is_never_run_again() {
    // The shim makes its claim on the launch durable before it starts the task. If it dies
    // between that and recording the start, the task may be running: a restarted agent
    // must report it, not start it a second time. Staged as such a crash leaves it.
    let mut a = Agent::start(&[]);
    a.kill9();
    let this_boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    let ran = a.data_dir.parent().unwrap().join("ran");
    let dir = a.data_dir.join("taken");
    std::fs::create_dir_all(&dir).unwrap();
    let argv = ["sh", "-c", &format!("echo taken >> {}", ran.display())].map(String::from);
    let rec = json!({"name": "taken", "uid": "uid-taken", "createdAt": "2026-01-01T00:00:00Z",
                     "spec": {"process": {"command": argv}}});
    std::fs::write(dir.join("task.json"), rec.to_string()).unwrap();
    let launch = json!({"launch": {"argv": argv, "env": [], "graceMs": 1000,
                                    "maxLogBytes": 4096, "bootId": this_boot.trim()}});
    let claimed = json!({"claimed": {"shim": {"pid": 4_000_000, "startTime": 1}}});
    std::fs::write(dir.join("run.jsonl"), format!("{launch}\n{claimed}\n")).unwrap();
    a.restart();
    let t = a.wait_state("taken", "terminated", T);
    assert_eq!(t["reason"], "SupervisorLost", "{t}");
    assert!(
        t["message"].as_str().unwrap().contains("not started again"),
        "{t}"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(!ran.exists(), "the task was started a second time");
}

#[test]
fn times_of_a_lost_supervisor_never_change() {
    // Kill the task's supervisor: the task is reported SupervisorLost with the start time
    // its journal knows, and the same times after every restart of the agent.
    let mut a = Agent::start(&[]);
    a.run("orphaned", &["sleep", "60"]);
    let started = a.wait_state("orphaned", "running", T)["startedAt"].clone();
    let main = a.main_pid("orphaned");
    let shim =
        crate::support::agent::started_record(&a.task_dir("orphaned")).unwrap()["shim"]["pid"]
            .as_i64()
            .unwrap() as i32;
    std::process::Command::new("kill")
        .args(["-KILL", &shim.to_string()])
        .status()
        .unwrap();
    let lost = a.wait_state("orphaned", "terminated", T);
    assert_eq!(lost["reason"], "SupervisorLost", "{lost}");
    assert_eq!(lost["startedAt"], started, "{lost}");
    wait_for(T, "the task to be stopped", || {
        (!pid_alive(main)).then_some(())
    });
    for _ in 0..2 {
        std::thread::sleep(Duration::from_millis(1100)); // times have second precision
        a.restart();
        let again = a.wait_state("orphaned", "terminated", T);
        assert_eq!(again, lost, "times once recorded never change");
    }

    // The same for a supervisor that died while the agent was down.
    a.run("orphaned-later", &["sleep", "60"]);
    let started = a.wait_state("orphaned-later", "running", T)["startedAt"].clone();
    let shim = crate::support::agent::started_record(&a.task_dir("orphaned-later")).unwrap()["shim"]
        ["pid"]
        .as_i64()
        .unwrap() as i32;
    a.kill9();
    std::process::Command::new("kill")
        .args(["-KILL", &shim.to_string()])
        .status()
        .unwrap();
    a.restart();
    let lost = a.wait_state("orphaned-later", "terminated", T);
    assert_eq!(
        (lost["reason"].as_str(), &lost["startedAt"]),
        (Some("SupervisorLost"), &started),
        "{lost}"
    );
    std::thread::sleep(Duration::from_millis(1100));
    a.restart();
    assert_eq!(a.wait_state("orphaned-later", "terminated", T), lost);
}

#[test]
fn readopted_tasks_cost_no_thread_each_and_a_killed_supervisor_is_noticed() {
    // In a pod the pids limit counts threads: re-adopting running tasks must not take a
    // thread per task. And a re-adopted task whose supervisor is killed is reported at
    // once, not when the task would have ended.
    const N: usize = 200;
    let mut a = Agent::start(&[]);
    let tasks: Vec<_> = (0..N)
        .map(|i| json!({"name": format!("r{i}"), "process": {"command": ["sleep", "120"]}}))
        .collect();
    assert_eq!(
        a.request("POST", "/setTasks", Some(&json!(tasks))).status,
        200
    );
    for i in 0..N {
        a.wait_state(&format!("r{i}"), "running", T);
    }
    a.kill9();
    a.restart();
    for i in 0..N {
        a.wait_state(&format!("r{i}"), "running", T);
    }
    let threads = threads_of(a.pid());
    assert!(
        threads < 32,
        "{threads} threads after re-adopting {N} tasks"
    );

    let shim = crate::support::agent::started_record(&a.task_dir("r7")).unwrap()["shim"]["pid"]
        .as_i64()
        .unwrap() as i32;
    let t0 = Instant::now();
    std::process::Command::new("kill")
        .args(["-KILL", &shim.to_string()])
        .status()
        .unwrap();
    let t = a.wait_state("r7", "terminated", T);
    assert_eq!(t["reason"], "SupervisorLost", "{t}");
    println!("a killed supervisor was reported after {:?}", t0.elapsed());
    assert!(
        a.get("r8").unwrap()["status"]["state"]
            .get("running")
            .is_some()
    );
}

fn threads_of(pid: i32) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap()
}

#[test]
fn finished_tasks_read_the_same_after_a_restart_beside_those_still_followed() {
    // Finished tasks (more than one of the restart's batches of reads) of several ends,
    // beside a running task and an accepted one that never started: after a restart each
    // finished task shows exactly what it showed, the running one is still followed, the
    // accepted one runs, nothing runs twice.
    let mut a = Agent::start(&["--stop-grace-period", "1s"]);
    let runs = a.data_dir.parent().unwrap().join("runs");
    const N: usize = 300;
    for i in 0..N {
        a.run_sh(
            &format!("done-{i}"),
            &format!(
                "echo {i} >> {}; echo out-{i}; exit {}",
                runs.display(),
                i % 4
            ),
        );
    }
    let r = a.create(json!({"name": "timed-out", "spec": {"process": {
        "command": ["sleep", "100"], "timeoutSeconds": 1,
        "lifecycle": {"postStop": {"exec": {"command": ["true"]}}}}}}));
    assert_eq!(r.status, 201, "{}", r.text());
    let mut finished: Vec<String> = (0..N).map(|i| format!("done-{i}")).collect();
    finished.push("timed-out".into());
    let before: Vec<serde_json::Value> = finished
        .iter()
        .map(|n| {
            a.wait_state(n, "terminated", T);
            a.get(n).unwrap()
        })
        .collect();
    assert_eq!(
        before[N]["status"]["state"]["terminated"]["reason"],
        "TaskTimeout"
    );
    a.run_sh("long", "sleep 3; exit 6");
    a.wait_state("long", "running", T);
    a.kill9();
    write_accepted(&a.data_dir);
    a.restart();
    for (n, was) in finished.iter().zip(&before) {
        assert_eq!(&a.get(n).unwrap(), was, "{n} reads as before");
    }
    assert_eq!(a.stdout("done-7"), "out-7\n");
    assert_eq!(a.wait_state("long", "terminated", T)["exitCode"], 6);
    assert_eq!(a.wait_state("accepted", "terminated", T)["exitCode"], 4);
    let mut ran: Vec<usize> = std::fs::read_to_string(&runs)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    ran.sort_unstable();
    assert_eq!(ran, (0..N).collect::<Vec<_>>(), "each ran once");
    // A settled task is deleted as any other.
    a.delete("done-1");
    a.wait_gone("done-1", T);
}

/// The record of a task `accepted` (it exits 4) that no shim took: what a crash between
/// its durable record and its launch leaves.
fn write_accepted(data_dir: &std::path::Path) {
    let dir = data_dir.join("accepted");
    std::fs::create_dir_all(&dir).unwrap();
    let rec = json!({"name": "accepted", "uid": "test-1", "createdAt": "2026-01-01T00:00:00Z",
                     "spec": {"process": {"command": ["sh", "-c", "exit 4"]}}});
    std::fs::write(dir.join("task.json"), rec.to_string()).unwrap();
}
