//! `task-executor init` on the bare machine, with the real agent under it: restarts with
//! backoff, signal forwarding, the stop sequence and its exit status, reaping.
//! (tests/containerd/in_pod.rs runs the same init as a container's first process.)

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use crate::support::agent::Agent;
use crate::support::init::{Init, argv, children_of, oom_score_adj, signal};
use crate::support::{pid_alive, wait_for};

const T: Duration = Duration::from_secs(30);

/// A task that runs until `go` exists, then says so and exits 7.
fn wait_for_go(go: &std::path::Path) -> String {
    format!(
        "while [ ! -e {} ]; do sleep 0.05; done; echo finished; exit 7",
        go.display()
    )
}

#[test]
fn a_dead_agent_is_restarted_with_backoff_and_its_running_task_readopted() {
    // No reset within the test, so the delays are exactly the backoff's sequence.
    let init = Init::start(&["--restart-reset-after", "1h"], &[]);
    let a = &init.agent;
    let go = a.data_dir.parent().unwrap().join("go");
    a.run_sh("survivor", &wait_for_go(&go));
    let started = a.wait_state("survivor", "running", T);
    let task = a.main_pid("survivor");

    // The agent is the preferred OOM victim; the server (and so every shim) is not.
    let (agent, server) = (init.agent_pid().unwrap(), init.server_pid().unwrap());
    let base = oom_score_adj(init.pid());
    assert_eq!(oom_score_adj(agent), (base + 100).min(1000));
    assert_eq!(oom_score_adj(server), base);

    // Two kill -9, then a SIGHUP to the init, which forwards it (the agent dies of it).
    let mut old = init.kill_agent();
    old = init.wait_new_agent(old, T);
    signal(old, "KILL");
    old = init.wait_new_agent(old, T);
    init.signal("HUP");
    init.wait_new_agent(old, T);

    let restarts = init.events_with("the agent exited; restarting it");
    let seen: Vec<(i64, i64)> = restarts
        .iter()
        .map(|e| {
            (
                e["exit_code"].as_i64().unwrap(),
                e["restart_in_ms"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(seen, [(137, 0), (137, 1000), (129, 2000)], "{restarts:?}");
    assert!(pid_alive(task), "the task outlives three agents");
    assert_eq!(
        init.server_pid(),
        Some(server),
        "one shim server serves every agent"
    );

    let again = a.wait_state("survivor", "running", T);
    assert_eq!(again["startedAt"], started["startedAt"]);
    std::fs::write(&go, b"").unwrap();
    let t = a.wait_state("survivor", "terminated", T);
    assert_eq!(
        (t["exitCode"].as_i64(), t["reason"].as_str()),
        (Some(7), Some("Failed")),
        "{t}"
    );
    assert_eq!(a.stdout("survivor"), "finished\n");

    // New tasks still start through the init's server: the agent started none of its own.
    a.run("after", &["env"]);
    assert_eq!(a.wait_state("after", "terminated", T)["exitCode"], 0);
    let env = a.stdout("after");
    assert!(env.contains("TASK_EXECUTOR_TASK=after\n"), "{env}");
    assert!(
        !env.contains("TASK_EXECUTOR_SHIM_SERVER"),
        "the handover leaks: {env}"
    );
    let agent = init.agent_pid().unwrap();
    assert!(
        children_of(agent)
            .iter()
            .all(|(_, argv)| argv[1] != "shim-server"),
        "{:?}",
        children_of(agent)
    );
    wait_for(T, "no zombie under the init", || {
        init.zombies().is_empty().then_some(())
    });
}

#[test]
fn sigterm_stops_the_agent_then_each_task_and_the_init_exits_with_the_agent_status() {
    let mut init = Init::start(&[], &["--stop-grace-period", "2s"]);
    let a = &init.agent;
    let runs = a.data_dir.parent().unwrap().join("runs");
    a.run_sh(
        "graceful",
        &format!(
            "echo run >> {}; trap 'echo got TERM; exit 3' TERM; while true; do sleep 0.05; done",
            runs.display()
        ),
    );
    a.run_sh("stubborn", "trap '' TERM; while true; do sleep 0.05; done");
    a.wait_state("graceful", "running", T);
    a.wait_state("stubborn", "running", T);
    let mut pids: Vec<i32> = children_of(init.pid()).into_iter().map(|c| c.0).collect();
    for name in ["graceful", "stubborn"] {
        let rec = crate::support::agent::started_record(&a.task_dir(name)).unwrap();
        pids.push(rec["shim"]["pid"].as_i64().unwrap() as i32);
        pids.push(a.main_pid(name));
    }

    init.signal("TERM");
    let status = init.wait_exit(Duration::from_secs(60));
    assert_eq!(status.code(), Some(0), "the agent's exit after SIGTERM");
    for pid in pids {
        assert!(!pid_alive(pid), "{pid} ({:?}) outlived the init", argv(pid));
    }
    let messages: Vec<String> = init
        .events()
        .iter()
        .filter(|e| e["target"] == "task_executor::init")
        .map(|e| e["message"].as_str().unwrap_or_default().to_string())
        .collect();
    let order = [
        "stop requested: stopping the agent, then the tasks' supervisors",
        "the agent stopped; stopping the tasks' supervisors",
        "task-executor init exits",
    ];
    let at: Vec<Option<usize>> = order
        .iter()
        .map(|m| messages.iter().position(|x| x == m))
        .collect();
    assert!(
        at.iter().all(Option::is_some) && at.is_sorted(),
        "{messages:?}"
    );

    // The next agent on the data dir reports what each supervisor recorded; nothing reruns.
    let data_dir = init.agent.data_dir.clone();
    let next = Agent::start_in(&data_dir, &[]);
    let g = next.wait_state("graceful", "terminated", T);
    assert_eq!(
        (g["exitCode"].as_i64(), g["reason"].as_str()),
        (Some(3), Some("Failed"))
    );
    assert!(
        g["message"]
            .as_str()
            .unwrap()
            .starts_with("stopped on request"),
        "{g}"
    );
    assert_eq!(next.stdout("graceful"), "got TERM\n");
    let s = next.wait_state("stubborn", "terminated", T);
    assert_eq!(
        (s["exitCode"].as_i64(), s["signal"].as_i64()),
        (Some(137), Some(9)),
        "{s}"
    );
    assert_eq!(
        std::fs::read_to_string(&runs).unwrap(),
        "run\n",
        "not re-run"
    );
}

#[test]
fn an_agent_that_does_not_stop_is_killed_and_the_init_exits_with_its_death() {
    let mut init = Init::start(&["--agent-stop-timeout", "1s"], &[]);
    let agent = init.agent_pid().unwrap();
    signal(agent, "STOP");
    init.signal("TERM");
    let status = init.wait_exit(T);
    assert_eq!(status.code(), Some(137), "128 + SIGKILL");
    assert!(!pid_alive(agent));
    assert_eq!(
        init.events_with("the agent did not stop in time; killing it")
            .len(),
        1
    );
}

#[test]
fn sigint_while_the_agent_keeps_failing_exits_with_its_last_status() {
    // The agent's port is taken: every start fails with exit code 1.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut init = Init::start_unready(&[], &[], Some(taken.local_addr().unwrap()));
    let restarts = wait_for(T, "two failed starts", || {
        let r = init.events_with("the agent exited; restarting it");
        (r.len() >= 2).then_some(r)
    });
    assert!(restarts.iter().all(|e| e["exit_code"] == 1), "{restarts:?}");
    assert_eq!(restarts[0]["restart_in_ms"], 0);
    assert_eq!(restarts[1]["restart_in_ms"], 1000);
    init.signal("INT");
    let status = init.wait_exit(T);
    assert_eq!(status.code(), Some(1), "{status:?}");
    assert!(status.signal().is_none());
}

#[test]
fn orphans_are_reaped_and_a_dead_shim_server_is_replaced() {
    let init = Init::start(&[], &[]);
    let a = &init.agent;
    let go = a.data_dir.parent().unwrap().join("go");
    a.run_sh("orphaned", &wait_for_go(&go));
    a.wait_state("orphaned", "running", T);
    let shim =
        crate::support::agent::started_record(&a.task_dir("orphaned")).unwrap()["shim"]["pid"]
            .as_i64()
            .unwrap() as i32;

    // Without its server, the shim is the init's child.
    let server = init.server_pid().unwrap();
    signal(server, "KILL");
    wait_for(T, "the shim re-parented to the init", || {
        let s = task_executor::sys::procfs::stat(shim)?;
        (s.ppid == init.pid()).then_some(())
    });
    // The agent starts a server of its own for the next task.
    a.run("meanwhile", &["sh", "-c", "env; exit 4"]);
    assert_eq!(a.wait_state("meanwhile", "terminated", T)["exitCode"], 4);
    let env = a.stdout("meanwhile");
    assert!(
        !env.contains("TASK_EXECUTOR_SHIM_SERVER"),
        "the handover leaks: {env}"
    );
    let agent = init.agent_pid().unwrap();
    assert!(
        children_of(agent)
            .iter()
            .any(|(_, argv)| argv[1] == "shim-server"),
        "the agent's own server"
    );

    // The orphaned shim's exit is reaped by the init.
    std::fs::write(&go, b"").unwrap();
    assert_eq!(a.wait_state("orphaned", "terminated", T)["exitCode"], 7);
    wait_for(T, "the shim reaped", || {
        task_executor::sys::procfs::stat(shim)
            .is_none()
            .then_some(())
    });

    // The agent dies: its server comes to the init, exits (its socket closed) and is
    // reaped; the next agent gets a new server from the init.
    let old = init.kill_agent();
    init.wait_new_agent(old, T);
    let fresh = init.server_pid().expect("a new shim server");
    assert_ne!(fresh, server);
    a.run("after", &["true"]);
    assert_eq!(a.wait_state("after", "terminated", T)["exitCode"], 0);
    wait_for(T, "no zombie and no stray server under the init", || {
        let servers = init
            .children()
            .iter()
            .filter(|(_, argv)| argv[1] == "shim-server")
            .count();
        (init.zombies().is_empty() && servers == 1).then_some(())
    });
    assert_eq!(init.events_with("the shim server exited; the agent starts one of its own, and its next start gets a new one").len(), 1);
}

#[test]
fn a_killed_supervisors_task_is_stopped_with_its_orphans_though_the_init_adopts_them() {
    // In a pod the shim server is the init's child, so what a killed shim leaves (the
    // task's main process and its double-forked orphan) is re-parented to the init. Main
    // dies at once when the agent kills its `sleep 0.2` (its stderr is a broken pipe, and
    // the shell reports "Killed"); reaped at once, its group (the orphan's) could no longer
    // be proven the task's, and the orphan would survive.
    let init = Init::start(&[], &[]);
    let a = &init.agent;
    let sleeps = ["38001", "38002", "38003"];
    let running = || -> Vec<i32> {
        sleeps
            .iter()
            .flat_map(|n| crate::support::pids_with_cmdline(&["sleep", n]))
            .collect()
    };
    let kill_all = |pids: Vec<i32>| {
        for p in pids {
            signal(p, "KILL");
        }
    };
    a.run_sh(
        "orphans",
        &format!(
            "(sleep {} &); sleep {} & setsid sleep {} & trap '' TERM; echo up; \
             while true; do sleep 0.2; done",
            sleeps[0], sleeps[1], sleeps[2]
        ),
    );
    a.wait_state("orphans", "running", T);
    wait_for(T, "the task's processes", || {
        (running().len() == 3).then_some(())
    });
    let shim = crate::support::agent::started_record(&a.task_dir("orphans")).unwrap()["shim"]["pid"]
        .as_i64()
        .unwrap() as i32;
    signal(shim, "KILL");
    let t = a.wait_state("orphans", "terminated", T);
    assert_eq!(t["reason"], "SupervisorLost", "{t}");
    let t0 = std::time::Instant::now();
    while !running().is_empty() && t0.elapsed() < T {
        std::thread::sleep(Duration::from_millis(50));
    }
    let left = running();
    kill_all(left.clone());
    assert!(left.is_empty(), "still running: {left:?}\n{}", a.log_tail());
}
