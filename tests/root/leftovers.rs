//! An agent with only the capabilities the chart gives host mode (root with CAP_SETUID,
//! CAP_SETGID and CAP_KILL: no CAP_SYS_PTRACE, so it can't read the environment, root or
//! descriptors of another user's processes) stops everything of a task that runs as
//! another user: on DELETE and on timeout its whole tree (setsid'd and double-forked
//! descendants too), and what a supervisor that died while starting the task left
//! running. Needs root.

use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::time::Duration;

use crate::support::agent::Agent;
use crate::support::{pid_alive, pids_with_cmdline, wait_for};
use serde_json::json;

const T: Duration = Duration::from_secs(30);

/// The chart's host-mode agent: root with SETUID, SETGID and KILL only.
const CHART_HOST_CAPS: [&str; 3] = [
    "setpriv",
    "--bounding-set=-all,+setuid,+setgid,+kill",
    "--inh-caps=-all",
];

/// `sleep N` processes (each N unique to its test), killed when dropped whatever the
/// test's outcome, so a failing test leaves nothing running.
struct Sleeps(Vec<&'static str>);

impl Sleeps {
    fn pids(&self) -> Vec<(&'static str, Vec<i32>)> {
        self.0
            .iter()
            .map(|n| (*n, pids_with_cmdline(&["sleep", n])))
            .collect()
    }

    /// Waits until each runs, as `uid`.
    fn wait_running(&self, uid: u32) {
        wait_for(T, "the task's processes", || {
            let all = self.pids();
            all.iter().all(|(_, p)| p.len() == 1).then_some(())
        });
        for (n, p) in self.pids() {
            let status = std::fs::read_to_string(format!("/proc/{}/status", p[0])).unwrap();
            let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
            assert!(
                line.split_whitespace().nth(1) == Some(&uid.to_string()),
                "sleep {n}: {line}"
            );
        }
    }

    fn wait_gone(&self, a: &Agent) {
        let t0 = std::time::Instant::now();
        loop {
            let left: Vec<_> = self
                .pids()
                .into_iter()
                .filter(|(_, p)| !p.is_empty())
                .collect();
            if left.is_empty() {
                return;
            }
            assert!(
                t0.elapsed() < T,
                "still running: {left:?}\n{}",
                a.log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Sleeps {
    fn drop(&mut self) {
        for (_, pids) in self.pids() {
            for p in pids {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(p),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// A task's tree: a double-forked orphan, a child, a setsid'd child, then the main
/// process (which ignores SIGTERM, so the stop must come to SIGKILL).
fn tree(s: &Sleeps) -> String {
    format!(
        "(sleep {} &); sleep {} & setsid sleep {} & trap '' TERM; echo up; \
         while true; do sleep 0.2; done",
        s.0[0], s.0[1], s.0[2]
    )
}

#[test]
fn delete_and_timeout_stop_the_whole_tree_of_a_task_of_another_user() {
    let a = Agent::start_wrapped(
        &CHART_HOST_CAPS,
        &["--task-run-as-user", "65534", "--stop-grace-period", "1s"],
    );
    let deleted = Sleeps(vec!["32001", "32002", "32003"]);
    a.run_sh("deleted", &tree(&deleted));
    a.wait_state("deleted", "running", T);
    deleted.wait_running(65534);
    let main = a.main_pid("deleted");
    a.delete("deleted");
    a.wait_gone("deleted", T);
    deleted.wait_gone(&a);
    assert!(!pid_alive(main));

    let timed = Sleeps(vec!["32011", "32012", "32013"]);
    let r = a.create(json!({"name": "timed", "spec": {"process": {
        "command": ["sh", "-c", tree(&timed)], "timeoutSeconds": 2}}}));
    assert_eq!(r.status, 201, "{}", r.text());
    a.wait_state("timed", "running", T);
    timed.wait_running(65534);
    let t = a.wait_state("timed", "terminated", T);
    assert_eq!(t["reason"], "TaskTimeout", "{t}");
    timed.wait_gone(&a);
}

/// The task's processes as a shim leaves them when it dies right after the task's first
/// process exec'ed: as 65534, in a process group of their own, with the task's marker in
/// their environment.
fn start_task_processes(name: &str, s: &Sleeps) -> Child {
    let script = format!(
        "(sleep {} &); sleep {} & setsid sleep {} & exec sleep {}",
        s.0[0], s.0[1], s.0[2], s.0[3]
    );
    Command::new("sh")
        .args(["-c", &script])
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("TASK_EXECUTOR_TASK", name)
        .uid(65534)
        .gid(65534)
        .process_group(0)
        .spawn()
        .unwrap()
}

#[test]
fn leftovers_of_a_supervisor_that_died_while_starting_a_task_of_another_user_are_stopped() {
    // The shim claims the launch (durably), then spawns the task, which names itself in
    // the journal before it execs (`spawned`), then appends `started`. Killed between the
    // last two, it leaves the task running with no `started` line; the restarted agent
    // reports SupervisorLost, never runs the task again, and must stop what runs. Staged
    // as such a crash leaves it (the window is too short to hit by chance).
    let mut a = Agent::start_wrapped(&CHART_HOST_CAPS, &["--task-run-as-user", "65534"]);
    a.kill9();
    let this_boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    let ran = a.data_dir.parent().unwrap().join("ran");
    let dir = a.data_dir.join("window");
    std::fs::create_dir_all(&dir).unwrap();
    let argv = ["sh", "-c", &format!("echo again >> {}", ran.display())].map(String::from);
    let rec = json!({"name": "window", "uid": "uid-window", "createdAt": "2026-01-01T00:00:00Z",
                     "spec": {"process": {"command": argv}}});
    std::fs::write(dir.join("task.json"), rec.to_string()).unwrap();
    let launch = json!({"launch": {"argv": argv, "env": [], "graceMs": 1000,
                                    "maxLogBytes": 4096, "bootId": this_boot.trim(),
                                    "hostRunAs": {"uid": 65534, "gid": 65534}}});
    let claimed = json!({"claimed": {"shim": {"pid": 4_000_000, "startTime": 1}}});

    let sleeps = Sleeps(vec!["33001", "33002", "33003", "33004"]);
    let mut task = start_task_processes("window", &sleeps);
    sleeps.wait_running(65534);
    let main = task.id() as i32;
    let start = task_executor::sys::procfs::stat(main).unwrap().start_time;
    let spawned = json!({"spawned": {"process": {"pid": main, "startTime": start}}});
    std::fs::write(
        dir.join("run.jsonl"),
        format!("{launch}\n{claimed}\n{spawned}\n"),
    )
    .unwrap();

    a.restart();
    let t = a.wait_state("window", "terminated", T);
    assert_eq!(t["reason"], "SupervisorLost", "{t}");
    assert!(
        t["message"].as_str().unwrap().contains("not started again"),
        "{t}"
    );
    sleeps.wait_gone(&a);
    let _ = task.wait();
    std::thread::sleep(Duration::from_millis(500));
    assert!(!ran.exists(), "the task was started a second time");
}

#[test]
fn each_command_names_itself_in_the_journal_before_it_runs() {
    // The main command and each hook find their own `spawned` line (their pid) in the
    // journal as their first action: it was written before they exec'ed. (An agent as
    // root with its tasks as root, so the tasks can read the journal.)
    let a = Agent::start(&[]);
    let journal = a.task_dir("named").join("run.jsonl");
    let check = |head: &str| {
        format!(
            r#"grep -qF '{{"spawned":{{{head}"process":{{"pid":'$$',' {}"#,
            journal.display()
        )
    };
    let r = a.create(json!({"name": "named", "spec": {"process": {
        "command": ["sh", "-c", check("")],
        "lifecycle": {
            "preStart": {"exec": {"command": ["sh", "-c", check(r#""hook":"preStart","#)]}},
            "postStop": {"exec": {"command": ["sh", "-c", check(r#""hook":"postStop","#)]}}}}}}));
    assert_eq!(r.status, 201, "{}", r.text());
    let t = a.wait_state("named", "terminated", T);
    assert_eq!(t["reason"], "Succeeded", "{t}");
    let task = a.get("named").unwrap();
    for h in ["preStart", "postStop"] {
        let hook = &task["status"]["hooks"][h]["terminated"];
        assert_eq!(hook["reason"], "Succeeded", "{h}: {task}");
    }
    // The same identities as the shim's own `started` lines.
    let text = std::fs::read_to_string(&journal).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let find = |key: &str, hook: Option<&str>| {
        lines
            .iter()
            .position(|l| {
                l.get(key)
                    .is_some_and(|v| v.get("hook").and_then(|h| h.as_str()) == hook)
            })
            .unwrap_or_else(|| panic!("no {key} {hook:?} line: {text}"))
    };
    let main = find("spawned", None);
    let started = find("started", None);
    assert!(main < started, "{text}");
    assert_eq!(
        lines[main]["spawned"]["process"],
        lines[started]["started"]["main"]
    );
    for h in ["preStart", "postStop"] {
        let (s, st) = (find("spawned", Some(h)), find("hookStarted", Some(h)));
        assert!(s < st, "{text}");
        assert_eq!(
            lines[s]["spawned"]["process"],
            lines[st]["hookStarted"]["process"]
        );
    }
}

/// Kills the shim of a running task of another user (65534) and checks that the agent
/// reports `SupervisorLost` and stops the whole tree: the main process, its child, its
/// setsid'd child and its double-forked orphan (which was the shim's child: re-parented
/// to the agent, it is found only through main's group). Main's stderr is a broken pipe
/// by then, so it dies as soon as the agent kills its `sleep 0.2` (the shell reports
/// "Killed"): the agent must not reap it before it has stopped its group.
fn killed_supervisors_task_is_stopped(a: &Agent, name: &str, s: &Sleeps) {
    a.run_sh(name, &tree(s));
    a.wait_state(name, "running", T);
    s.wait_running(65534);
    let shim = crate::support::agent::started_record(&a.task_dir(name)).unwrap()["shim"]["pid"]
        .as_i64()
        .unwrap() as i32;
    let main = a.main_pid(name);
    let main_start = task_executor::sys::procfs::stat(main).unwrap().start_time;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(shim),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let t = a.wait_state(name, "terminated", T);
    assert_eq!(t["reason"], "SupervisorLost", "{t}");
    s.wait_gone(a);
    wait_for(T, "the main process stopped", || {
        (!pid_alive(main)).then_some(())
    });
    // The agent (the subreaper it was re-parented to) reaps it once its group is gone.
    wait_for(T, "the main process reaped", || {
        task_executor::sys::procfs::stat(main)
            .is_none_or(|s| s.start_time != main_start)
            .then_some(())
    });
}

#[test]
fn a_killed_supervisors_running_task_of_another_user_is_stopped_with_its_orphans() {
    {
        let a = Agent::start_wrapped(&CHART_HOST_CAPS, &["--task-run-as-user", "65534"]);
        killed_supervisors_task_is_stopped(&a, "chart", &Sleeps(vec!["34001", "34002", "34003"]));
    }
    // The same with an agent that has every capability.
    let a = Agent::start(&["--task-run-as-user", "65534"]);
    killed_supervisors_task_is_stopped(&a, "full", &Sleeps(vec!["34011", "34012", "34013"]));
}
