//! Process tasks on the host: real children, exit codes, signals, timeouts, tree kill.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::time::{Duration, Instant};

use crate::support::agent::Agent;
use crate::support::{pid_alive, wait_for};
use serde_json::json;

const T: Duration = Duration::from_secs(15);

#[test]
fn exit_codes_signals_and_start_failures() {
    let a = Agent::start(&[]);
    a.run("ok", &["true"]);
    a.run_sh("three", "exit 3");
    a.run_sh("killed", "kill -KILL $$");
    a.run("missing", &["/definitely/not/here"]);
    let r = a.create(json!({"name": "baddir", "spec": {"process": {"command": ["true"], "workingDir": "/no/such/dir"}}}));
    assert_eq!(
        r.status, 201,
        "a start failure is a task that says so, not an HTTP error"
    );

    let ok = a.wait_state("ok", "terminated", T);
    assert_eq!(
        (ok["exitCode"].as_i64(), ok["reason"].as_str()),
        (Some(0), Some("Succeeded"))
    );
    assert!(ok.get("signal").is_none());
    let three = a.wait_state("three", "terminated", T);
    assert_eq!(
        (three["exitCode"].as_i64(), three["reason"].as_str()),
        (Some(3), Some("Failed"))
    );
    let killed = a.wait_state("killed", "terminated", T);
    assert_eq!(
        (killed["exitCode"].as_i64(), killed["signal"].as_i64()),
        (Some(137), Some(9))
    );
    assert_eq!(killed["message"], "terminated by signal SIGKILL");
    let missing = a.wait_state("missing", "terminated", T);
    assert_eq!(
        (missing["exitCode"].as_i64(), missing["reason"].as_str()),
        (Some(127), Some("ProcessStartFailed"))
    );
    assert!(
        missing["message"]
            .as_str()
            .unwrap()
            .contains("/definitely/not/here"),
        "{missing}"
    );
    assert!(missing["startedAt"].is_null());
    let baddir = a.wait_state("baddir", "terminated", T);
    assert_eq!(baddir["reason"], "ProcessStartFailed");
    assert!(
        baddir["message"].as_str().unwrap().contains("No such file"),
        "{baddir}"
    );
}

#[test]
fn argv_is_exec_not_shell_and_env_overlays_agent_env() {
    let a = Agent::start_with_env(
        &[],
        &[("AGENT_ONLY", "from-agent"), ("OVERRIDDEN", "agent")],
    );
    let r = a.create(json!({"name": "env", "spec": {"process": {
        "command": ["sh", "-c", "echo \"$AGENT_ONLY $OVERRIDDEN $TASK_VAR\"; printf '%s|' \"$@\"; pwd", "argv0"],
        "args": ["two words", "$HOME", "*"],
        "env": [{"name": "OVERRIDDEN", "value": "task"}, {"name": "TASK_VAR", "value": "x y"}],
        "workingDir": "/usr/share"}}}));
    assert_eq!(r.status, 201);
    assert_eq!(a.wait_state("env", "terminated", T)["exitCode"], 0);
    assert_eq!(
        a.stdout("env"),
        "from-agent task x y\ntwo words|$HOME|*|/usr/share\n"
    );
}

#[test]
fn tasks_start_with_clean_signal_state_and_search_their_own_path() {
    // Nothing blocked (the shim blocks signals for itself) or ignored (the agent was
    // started with some ignored), and a process group of its own.
    let a = Agent::start_ignoring("INT HUP USR1", &[]);
    a.run_sh(
        "signals",
        "grep -E '^Sig(Blk|Ign)' /proc/self/status; ps -o pgid= -p $$; echo $$",
    );
    a.wait_state("signals", "terminated", T);
    let out = a.stdout("signals");
    let lines: Vec<&str> = out.lines().map(str::trim).collect();
    let mask = |line: &str| u64::from_str_radix(line.split('\t').nth(1).unwrap(), 16).unwrap();
    assert_eq!(mask(lines[0]), 0, "blocked: {out}");
    // Signals 32 and 33 included (glibc's own: its posix_spawn and sigaction would leave
    // them ignored, which every non-glibc program would inherit).
    assert_eq!(mask(lines[1]), 0, "ignored: {out}");
    assert_eq!(
        lines[2], lines[3],
        "the task leads its own process group: {out}"
    );

    // A bare command name is looked up in the task's PATH, not the agent's.
    let bin = tempfile::tempdir().unwrap();
    let tool = bin.path().join("only-in-task-path");
    std::fs::write(&tool, "#!/bin/sh\necho found \"$1\"\n").unwrap();
    std::fs::set_permissions(&tool, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let path = format!("{}:/usr/bin:/bin", bin.path().display());
    let r = a.create(json!({"name": "path", "spec": {"process": {
        "command": ["only-in-task-path"], "args": ["it"],
        "env": [{"name": "PATH", "value": path}]}}}));
    assert_eq!(r.status, 201);
    let t = a.wait_state("path", "terminated", T);
    assert_eq!(t["exitCode"], 0, "{t}");
    assert_eq!(a.stdout("path"), "found it\n");
    a.run("not-on-agent-path", &["only-in-task-path"]);
    let t = a.wait_state("not-on-agent-path", "terminated", T);
    assert_eq!(
        (t["exitCode"].as_i64(), t["reason"].as_str()),
        (Some(127), Some("ProcessStartFailed")),
        "{t}"
    );
}

#[test]
fn descriptors_the_agent_inherited_are_not_held_by_supervisors() {
    // A caller that gives the agent a pipe (here a FIFO on fd 3, not close-on-exec) and
    // waits for its EOF must get it when the agent is gone, although its tasks and their
    // supervisors live on.
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("caller-pipe");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .unwrap();
    let script = format!("exec 3>{}; exec \"$0\" \"$@\"", fifo.display());
    let mut a = Agent::start_wrapped(&["sh", "-c", &script], &[]);
    a.run("lives-on", &["sleep", "30"]);
    a.wait_state("lives-on", "running", T);
    let main = a.main_pid("lives-on");
    a.kill9();
    assert!(pid_alive(main), "the task outlives the agent");
    wait_for(T, "EOF on the caller's pipe", || {
        let mut buf = [0u8; 16];
        match (&reader).read(&mut buf) {
            Ok(0) => Some(()),
            _ => None, // EAGAIN: a writer (some supervisor) still holds it
        }
    });
}

#[test]
fn stdout_and_stderr_go_to_capped_logs() {
    let a = Agent::start(&["--max-log-bytes", "20000"]);
    a.run_sh(
        "chatty",
        "i=0; while [ $i -lt 3000 ]; do echo line-$i; echo err-$i >&2; i=$((i+1)); done",
    );
    a.wait_state("chatty", "terminated", T);
    let dir = a.task_dir("chatty");
    let size = |f: &str| std::fs::metadata(dir.join(f)).map(|m| m.len()).unwrap_or(0);
    assert!(
        size("stdout.log") + size("stdout.log.1") <= 20000,
        "stdout over the cap"
    );
    assert!(
        size("stderr.log") + size("stderr.log.1") <= 20000,
        "stderr over the cap"
    );
    assert!(
        a.stdout("chatty").ends_with("line-2999\n"),
        "the newest output is kept"
    );
    assert!(
        std::fs::read_to_string(dir.join("stderr.log"))
            .unwrap()
            .ends_with("err-2999\n")
    );
}

#[test]
fn all_output_is_in_the_log_when_the_task_is_reported_terminated() {
    // A client that long-polls for `terminated` and then reads the log must find every
    // byte the task wrote before exiting: the exit is recorded only after the pipes are
    // drained. A race shows only sometimes, and more under load: eight clients at once,
    // ten tasks each.
    let a = Agent::start(&[]);
    let script = "i=0; while [ $i -lt 2000 ]; do echo line-$i; i=$((i+1)); done; echo last";
    std::thread::scope(|s| {
        for client in 0..8 {
            let a = &a;
            s.spawn(move || {
                for round in 0..10 {
                    let name = format!("out-{client}-{round}");
                    a.run_sh(&name, script);
                    let r = a.request("GET", &format!("/tasks/{name}?wait=20s"), None);
                    let t = &r.json()["status"]["state"]["terminated"];
                    assert_eq!(t["exitCode"], 0, "{}", r.text());
                    let out = a.stdout(&name);
                    let tail = &out[out.len().saturating_sub(30)..];
                    assert!(out.ends_with("line-1999\nlast\n"), "{name}: ...{tail:?}");
                    assert_eq!(out.lines().count(), 2001, "{name}");
                }
            });
        }
    });
}

#[test]
fn timeout_stops_the_task_with_task_timeout() {
    let a = Agent::start(&[]);
    let r = a.create(json!({"name": "slow", "spec": {"process": {"command": ["sleep", "30"], "timeoutSeconds": 1}}}));
    assert_eq!(r.status, 201);
    let t0 = Instant::now();
    let t = a.wait_state("slow", "terminated", T);
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "stopped soon after the timeout"
    );
    assert_eq!(t["reason"], "TaskTimeout");
    assert_eq!(t["message"], "Task exceeded timeout of 1 seconds");
    assert_eq!(
        (t["exitCode"].as_i64(), t["signal"].as_i64()),
        (Some(143), Some(15))
    );
    // Upstream's wire shape carries the timeout inside `process`.
    let r = a.request("POST", "/setTasks", Some(&json!([{"name": "slow2", "process": {"command": ["sleep", "30"], "timeoutSeconds": 1}}])));
    assert_eq!(r.status, 200);
    assert_eq!(
        a.wait_state("slow2", "terminated", T)["reason"],
        "TaskTimeout"
    );
}

#[test]
fn delete_kills_the_whole_tree_including_term_ignorers_and_daemons() {
    let a = Agent::start(&["--stop-grace-period", "1s"]);
    let pids = a.data_dir.parent().unwrap().join("pids");
    let script = format!(
        "trap '' TERM; \
         (trap '' TERM; exec sleep 1001) & echo $! >> {p}; \
         setsid sh -c 'echo $$ >> {p}; exec sleep 1002' & \
         sh -c 'sleep 1003 & echo $! >> {p}' ; \
         echo $$ >> {p}; while true; do sleep 1; done",
        p = pids.display()
    );
    a.run_sh("tree", &script);
    let read = || -> Vec<i32> {
        std::fs::read_to_string(&pids)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.parse().ok())
            .collect()
    };
    let all = wait_for(T, "four pids", || Some(read()).filter(|p| p.len() == 4));
    assert!(all.iter().all(|p| pid_alive(*p)));
    let t0 = Instant::now();
    a.delete("tree");
    a.wait_gone("tree", T);
    assert!(
        t0.elapsed() < Duration::from_secs(6),
        "grace 1s, then SIGKILL"
    );
    wait_for(
        Duration::from_secs(3),
        "every process of the task to be gone",
        || all.iter().all(|p| !pid_alive(*p)).then_some(()),
    );
}

#[test]
fn background_children_outlive_a_finished_task_until_it_is_deleted() {
    // Upstream's pool sandboxes run `bootstrap.sh ... &`: the task "succeeds" while its
    // daemon keeps running; deleting the task must still stop the daemon.
    let a = Agent::start(&["--stop-grace-period", "1s"]);
    let pidfile = a.data_dir.parent().unwrap().join("daemon");
    a.run_sh(
        "boot",
        &format!("sleep 1000 & echo $! > {}", pidfile.display()),
    );
    let t = a.wait_state("boot", "terminated", T);
    assert_eq!(t["exitCode"], 0);
    let daemon: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        pid_alive(daemon),
        "the daemon keeps running after the task finished"
    );
    a.delete("boot");
    a.wait_gone("boot", T);
    wait_for(Duration::from_secs(3), "daemon gone", || {
        (!pid_alive(daemon)).then_some(())
    });
}

#[test]
fn two_hundred_concurrent_tasks_report_their_own_exit_codes() {
    let a = Agent::start(&[]);
    let tasks: Vec<_> = (0..200)
        .map(|i| json!({"name": format!("t{i}"), "process": {"command": ["sh", "-c", format!("sleep 0.5; exit {}", i % 256)]}}))
        .collect();
    let r = a.request("POST", "/setTasks", Some(&json!(tasks)));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json().as_array().unwrap().len(), 200);
    let running = a.request("GET", "/getTasks", None).json();
    let n_running = running
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["status"]["state"].get("running").is_some())
        .count();
    assert!(
        n_running > 1,
        "tasks run concurrently (saw {n_running} running)"
    );
    wait_for(Duration::from_secs(60), "all 200 terminated", || {
        let list = a.request("GET", "/getTasks", None).json();
        let arr = list.as_array().unwrap().clone();
        arr.iter()
            .all(|t| t["status"]["state"].get("terminated").is_some())
            .then_some(arr)
    })
    .iter()
    .for_each(|t| {
        let i: i64 = t["name"].as_str().unwrap()[1..].parse().unwrap();
        assert_eq!(
            t["status"]["state"]["terminated"]["exitCode"].as_i64(),
            Some(i % 256),
            "{t}"
        );
    });
}

#[test]
fn orphans_are_reaped_not_left_as_zombies() {
    let a = Agent::start(&[]);
    // The task's child exits while its parent (the task) has already gone: it is
    // re-parented to the shim (a subreaper) and must be reaped.
    a.run_sh("orphans", "(sleep 0.3 &) ; (sleep 0.3 &); exit 0");
    a.wait_state("orphans", "terminated", T);
    std::thread::sleep(Duration::from_millis(800));
    let zombies: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .filter(|s| {
            let rest: Vec<&str> = s
                .rsplit(')')
                .next()
                .unwrap_or("")
                .split_whitespace()
                .collect();
            rest.first() == Some(&"Z")
                && rest.get(1).and_then(|p| p.parse::<i32>().ok()) == Some(a.pid())
        })
        .collect();
    assert!(zombies.is_empty(), "zombies under the agent: {zombies:?}");
}

#[test]
fn a_finished_tasks_reused_pid_and_group_are_never_signalled() {
    // Once a task's main process is reaped, its pid (its process group's id) is free. A
    // daemon it left keeps the task's supervisor alive; an unrelated process that now
    // gets pid = pgid = the old main pid must survive the task's deletion. The agent runs
    // in a PID namespace of its own so the test can hand out that pid (ns_last_pid).
    let a = Agent::start_in_pid_namespace(&["--stop-grace-period", "1s"]);
    a.run_sh("gone", "setsid sleep 300 & exit 0");
    assert_eq!(a.wait_state("gone", "terminated", T)["exitCode"], 0);
    let old_main = a.main_pid("gone");
    let init = a.ns_init().expect("the agent's pid namespace");
    let daemon = wait_for(T, "the task's daemon", || {
        crate::support::pids_with_cmdline(&["sleep", "300"])
            .into_iter()
            .find(|p| a.in_own_pid_namespace(*p))
    });
    // The next pid handed out in the agent's namespace is `old_main`.
    let unrelated = std::process::Command::new("nsenter")
        .args(["-t", &init.to_string(), "-p", "sh", "-c"])
        .arg(format!(
            "echo {} > /proc/sys/kernel/ns_last_pid && exec nsenter -t {init} -p setsid sleep 1000",
            old_main - 1
        ))
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let victim = wait_for(T, "the unrelated process", || a.host_pid(old_main));
    let mut unrelated = KillOnDrop(unrelated);
    wait_for(T, "the unrelated process to run sleep", || {
        std::fs::read(format!("/proc/{victim}/cmdline"))
            .ok()
            .filter(|c| c.starts_with(b"sleep\0"))
    });

    a.delete("gone");
    a.wait_gone("gone", T);
    wait_for(T, "the task's daemon to be stopped", || {
        (!pid_alive(daemon)).then_some(())
    });
    assert!(
        pid_alive(victim),
        "an unrelated process that reused the task's pid was signalled"
    );
    let _ = unrelated.0.kill();
    let _ = unrelated.0.wait();
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_task_with_100000_variables_is_accepted_and_sees_them() {
    // Accepting and starting must be linear in the number of variables. Names are short:
    // the kernel limits a process's arguments and environment to a quarter of its stack
    // limit (2 MiB by default), counting a pointer per variable.
    const N: usize = 100_000;
    let a = Agent::start(&[]);
    let env: Vec<_> = (0..N)
        .map(|i| json!({"name": format!("E{i}"), "value": ""}))
        .chain([json!({"name": "E7", "value": "seven"})]) // a later value wins
        .collect();
    // `env` itself (a shell would take long to import so many variables).
    let task = json!({"name": "many-vars", "spec": {"process": {"command": ["env"], "env": env}}});
    let t0 = Instant::now();
    let r = a.create(task);
    let accepted = t0.elapsed();
    assert_eq!(r.status, 201, "{}", r.text());
    let t = a.wait_state("many-vars", "terminated", Duration::from_secs(60));
    let done = t0.elapsed();
    assert_eq!(t["exitCode"], 0, "{t}");
    let out = a.stdout("many-vars");
    let ours: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with('E') && l[1..].split('=').next().unwrap().parse::<u32>().is_ok())
        .collect();
    assert_eq!(ours.len(), N, "each variable once");
    assert!(ours.contains(&"E7=seven") && ours.contains(&"E99999="));
    println!("{N} variables: accepted in {accepted:?}, terminated after {done:?}");
}
