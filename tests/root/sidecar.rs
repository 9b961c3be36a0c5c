//! Sidecar mode with upstream's lookup (SANDBOX_MAIN_CONTAINER in a process's env), against
//! a stand-in main container in real namespaces. Needs root, as the agent does in a pod.

use std::time::Duration;

use crate::support::agent::Agent;
use crate::support::pid_alive;
use crate::support::standin::{MainContainer, Options, TestCgroup};
use serde_json::json;

const T: Duration = Duration::from_secs(15);

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", std::process::id())
}

fn sidecar_agent(container: &str, extra: &[&str]) -> Agent {
    let mut args = vec![
        "--enable-sidecar-mode=true",
        "--main-container-name",
        container,
    ];
    args.extend_from_slice(extra);
    Agent::start(&args)
}

#[test]
fn task_runs_in_the_main_containers_namespaces_env_and_fs() {
    let name = unique("main-ns");
    let main = MainContainer::start(&name, "main-host");
    let a = sidecar_agent(&name, &[]);
    let r = a.create(json!({"name": "inside", "spec": {"process": {
        "command": ["sh", "-c", "hostname; readlink /proc/self/ns/uts /proc/self/ns/ipc /proc/self/ns/net /proc/self/ns/mnt /proc/self/ns/pid; echo \"$TARGET_VAR $TASK_VAR\"; pwd; exit 9"],
        "env": [{"name": "TASK_VAR", "value": "from-task"}],
        "workingDir": "/mnt/only-here"}}}));
    assert_eq!(r.status, 201, "{}", r.text());
    let t = a.wait_state("inside", "terminated", T);
    assert_eq!(t["exitCode"], 9, "{t}");
    let out = a.stdout("inside");
    let lines: Vec<&str> = out.lines().collect();
    let want = [
        main.hostname.clone(),
        main.ns("uts"),
        main.ns("ipc"),
        main.ns("net"),
        main.ns("mnt"),
        main.ns("pid"),
        "hello-from-target from-task".into(),
        "/mnt/only-here".into(),
    ];
    assert_eq!(lines, want, "agent log:\n{}", a.log_text());
    // The agent itself stays outside.
    assert_ne!(
        std::fs::read_link("/proc/self/ns/mnt")
            .unwrap()
            .to_string_lossy(),
        main.ns("mnt")
    );
    assert_eq!(a.request("GET", "/readyz", None).status, 200);
}

#[test]
fn delete_kills_a_term_ignoring_task_inside_the_container() {
    let name = unique("main-del");
    let _main = MainContainer::start(&name, "del-host");
    let a = sidecar_agent(&name, &["--stop-grace-period", "1s"]);
    a.run_sh(
        "stubborn",
        "trap '' TERM; sleep 1000 & while true; do sleep 0.2; done",
    );
    a.wait_state("stubborn", "running", T);
    let pid = a.main_pid("stubborn");
    assert!(pid_alive(pid));
    a.delete("stubborn");
    a.wait_gone("stubborn", T);
    assert!(!pid_alive(pid));
}

#[test]
fn a_stop_sends_each_process_inside_the_container_one_sigterm() {
    // The reaper signals the commands' groups inside the container and the shim signals
    // the tree from outside: a process both reached ran its TERM handler twice.
    let name = unique("main-once");
    let _main = MainContainer::start(&name, "once-host");
    let a = sidecar_agent(&name, &["--stop-grace-period", "1s"]);
    let tasks: Vec<String> = (0..2).map(|i| format!("once-{i}")).collect();
    // A loop of builtins runs the trap right after each SIGTERM, so two are never merged
    // into one; the trap doesn't exit, so each SIGTERM of the stop (timeout, then the
    // grace period, then SIGKILL) is counted. The 300 sleeps make the shim's walk of the
    // tree take milliseconds: a second SIGTERM would come long after the first.
    let script = "for i in $(seq 300); do sleep 1000 & done; \
                  trap 'echo got TERM' TERM; echo ready; while :; do :; done";
    for t in &tasks {
        a.create_ok(&json!({"name": t, "spec": {"process": {
            "command": ["sh", "-c", script], "timeoutSeconds": 2}}}));
    }
    for t in &tasks {
        let s = a.wait_state(t, "terminated", T);
        assert_eq!(s["reason"], "TaskTimeout", "{s}");
        assert_eq!(a.stdout(t), "ready\ngot TERM\n", "{t}: {s}");
    }
}

#[test]
fn agent_kill9_and_restart_readopts_a_sidecar_task() {
    let name = unique("main-adopt");
    let _main = MainContainer::start(&name, "adopt-host");
    let mut a = sidecar_agent(&name, &[]);
    a.run_sh("adopted", "sleep 2; exit 6");
    a.wait_state("adopted", "running", T);
    a.kill9();
    a.restart();
    a.wait_state("adopted", "running", T);
    assert_eq!(a.wait_state("adopted", "terminated", T)["exitCode"], 6);
}

#[test]
fn missing_main_container_is_reported_not_retried() {
    let name = unique("nobody-home");
    let a = sidecar_agent(&name, &[]);
    let r = a.request("GET", "/readyz", None);
    assert_eq!(r.status, 503);
    assert!(r.json()["reason"].as_str().unwrap().contains(&name));
    a.run("orphan", &["true"]);
    let t = a.wait_state("orphan", "terminated", T);
    assert_eq!(t["reason"], "TargetNotFound");
    assert!(t["message"].as_str().unwrap().contains(&name), "{t}");
    assert_eq!(
        a.request("GET", "/health", None).status,
        200,
        "liveness is not readiness"
    );
}

#[test]
fn main_container_restart_terminates_its_tasks_with_target_restarted() {
    let name = unique("main-restart");
    let mut main = MainContainer::start(&name, "first-host");
    let a = sidecar_agent(&name, &[]);
    a.run("victim", &["sleep", "1000"]);
    a.wait_state("victim", "running", T);
    main.stop();
    let t = a.wait_state("victim", "terminated", T);
    assert_eq!(t["reason"], "TargetRestarted", "{t}");
    // New tasks go to the new container.
    let second = MainContainer::start(&name, "second-host");
    a.run("after", &["hostname"]);
    assert_eq!(a.wait_state("after", "terminated", T)["exitCode"], 0);
    assert_eq!(a.stdout("after").trim(), second.hostname);
}

#[test]
fn tasks_run_as_the_containers_user_and_optionally_in_its_cgroup() {
    let cg = TestCgroup::new(&unique("task-executor-join"));
    let name = unique("main-hardened");
    let opts = Options {
        marker: Some(&name),
        uid: Some(1000),
        groups: &[2000, 3000],
        cgroup: Some(&cg),
        ..Default::default()
    };
    let mut main = MainContainer::start_with("hard-host", opts);
    // No workingDir: the task starts where the container's processes do.
    let probe = [
        "sh",
        "-c",
        "id -u; id -g; id -G; pwd; grep ':pids:' /proc/self/cgroup",
    ];
    {
        // Opted out: the sidecar's identity and cgroup, as upstream does.
        let a = sidecar_agent(&name, &["--sidecar-run-as-target-user=false"]);
        a.run("default", &probe);
        assert_eq!(a.wait_state("default", "terminated", T)["exitCode"], 0);
        let out = a.stdout("default");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(&lines[..2], ["0", "0"], "{out}");
        assert_eq!(
            lines[3], "/mnt/only-here",
            "the container's working directory: {out}"
        );
        assert!(
            !lines[4].contains(cg.dir().file_name().unwrap().to_str().unwrap()),
            "{out}"
        );
    }
    {
        // By default the container's identity; joining its cgroup is asked for.
        let a = sidecar_agent(&name, &["--sidecar-join-cgroup"]);
        a.run("hardened", &probe);
        let t = a.wait_state("hardened", "terminated", T);
        assert_eq!(t["exitCode"], 0, "{t} {}", a.log_tail());
        let out = a.stdout("hardened");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            &lines[..4],
            ["1000", "1000", "1000 2000 3000", "/mnt/only-here"],
            "runs as the container's uid, gid and groups, where it works: {out}"
        );
        assert!(
            lines[4].ends_with(&format!(
                "/{}",
                cg.dir().file_name().unwrap().to_str().unwrap()
            )),
            "in the container's cgroup: {out}"
        );
    }
    main.stop();
}

#[test]
fn delete_reaches_every_process_of_the_task_inside_the_container() {
    // Orphans inside the main container's PID namespace are re-parented within it, not
    // to the shim outside: setsid'd and double-forked daemons must still be stopped.
    let name = unique("main-tree");
    let main = MainContainer::start(&name, "tree-host");
    let a = sidecar_agent(&name, &["--stop-grace-period", "1s"]);
    a.run_sh(
        "tree",
        "(setsid sleep 3021 &); sh -c 'sleep 3022 &'; \
         setsid sh -c 'trap \"\" TERM; sleep 3023 & exec sleep 3024' & sleep 3025",
    );
    a.wait_state("tree", "running", T);
    let in_container = |argv: &[&str]| -> Vec<i32> {
        crate::support::pids_with_cmdline(argv)
            .into_iter()
            .filter(|p| {
                std::fs::read_link(format!("/proc/{p}/ns/pid"))
                    .is_ok_and(|ns| ns.to_string_lossy() == main.ns("pid"))
            })
            .collect()
    };
    let sleeps = ["3021", "3022", "3023", "3024", "3025"];
    let pids: Vec<i32> = crate::support::wait_for(T, "the task's five processes", || {
        let found: Vec<i32> = sleeps
            .iter()
            .flat_map(|s| in_container(&["sleep", s]))
            .collect();
        (found.len() == sleeps.len()).then_some(found)
    });
    a.delete("tree");
    a.wait_gone("tree", T);
    crate::support::wait_for(T, "every process of the task to be gone", || {
        pids.iter().all(|p| !pid_alive(*p)).then_some(())
    });
    assert!(main.alive(), "the main container itself is untouched");
}

#[test]
fn join_cgroup_holds_when_the_agent_has_a_cgroup_namespace_of_its_own() {
    // On cgroup v2 Kubernetes gives each container a private cgroup namespace: from the
    // agent the main container's cgroup then reads `/../<id>`. Reproduced with the agent
    // in cgroups of its own (v1 pids and v2) and a cgroup namespace rooted there, and the
    // main container in sibling cgroups: the task must land in the container's.
    let name = unique("main-cgns");
    let target = TestCgroup::new(&unique("te-cgns-target"));
    let target_v2 = TestCgroup::new_v2(&unique("te-cgns-target"));
    let agent = TestCgroup::new(&unique("te-cgns-agent"));
    let agent_v2 = TestCgroup::new_v2(&unique("te-cgns-agent"));
    let mut main = MainContainer::start_with(
        "cgns-host",
        Options {
            marker: Some(&name),
            cgroup: Some(&target),
            more_cgroups: &[&target_v2],
            ..Default::default()
        },
    );
    let enter = format!(
        "echo $$ > {} && echo $$ > {} && exec unshare --cgroup \"$0\" \"$@\"",
        agent.procs().display(),
        agent_v2.procs().display()
    );
    let a = Agent::start_wrapped(
        &["sh", "-c", &enter],
        &[
            "--enable-sidecar-mode=true",
            "--main-container-name",
            &name,
            "--sidecar-join-cgroup",
        ],
    );
    a.run(
        "joined",
        &["sh", "-c", "grep -E ':pids:|^0::' /proc/self/cgroup"],
    );
    let t = a.wait_state("joined", "terminated", T);
    assert_eq!(t["exitCode"], 0, "{t}");
    let out = a.stdout("joined");
    let leaf = |c: &TestCgroup| format!("/{}", c.dir().file_name().unwrap().to_str().unwrap());
    let pids = out
        .lines()
        .find(|l| l.contains(":pids:"))
        .unwrap_or_default();
    let v2 = out
        .lines()
        .find(|l| l.starts_with("0::"))
        .unwrap_or_default();
    assert!(pids.ends_with(&leaf(&target)), "v1 pids: {out}");
    assert!(v2.ends_with(&leaf(&target_v2)), "v2: {out}");
    drop(a);
    main.stop();
}

/// Processes that carry the main container's variable but are no container's init are
/// never taken for it, however old: a task's leftover (in the agent's PID namespace, or
/// PID 1 of a namespace of its own below its supervisor), a stray process, and PID 1 of a
/// namespace in a user namespace of its own. Remote tasks then run in the real one.
#[test]
fn a_process_that_sets_the_variable_cannot_squat_the_main_container() {
    let name = unique("main-squat");
    let a = sidecar_agent(&name, &["--stop-grace-period", "1s"]);
    let marker = format!("SANDBOX_MAIN_CONTAINER={name}");
    for (task, script) in [
        (
            "plain",
            format!("env -u TASK_EXECUTOR_TASK {marker} sleep 1000"),
        ),
        (
            "own-ns",
            format!(
                "exec unshare --pid --fork --mount-proc env -u TASK_EXECUTOR_TASK {marker} sleep 1000"
            ),
        ),
        (
            "detached",
            format!("setsid env -u TASK_EXECUTOR_TASK {marker} sleep 1000 & exit 0"),
        ),
    ] {
        let r = a.create(json!({"name": task, "spec": {"process": {
            "command": ["sh", "-c", script], "execMode": "Local"}}}));
        assert_eq!(r.status, 201, "{}", r.text());
    }
    a.wait_state("plain", "running", T);
    a.wait_state("own-ns", "running", T);
    a.wait_state("detached", "terminated", T);
    let mut stray = std::process::Command::new("env")
        .args([marker.as_str(), "sleep", "1000"])
        .spawn()
        .unwrap();
    let mut userns = std::process::Command::new("unshare")
        .args([
            "--user",
            "--map-root-user",
            "--pid",
            "--fork",
            "--kill-child",
            "env",
            &marker,
            "sleep",
            "1000",
        ])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));

    let r = a.request("GET", "/readyz", None);
    assert_eq!(r.status, 503, "{}", r.text());
    a.run("early", &["hostname"]);
    let t = a.wait_state("early", "terminated", T);
    assert_eq!(t["reason"], "TargetNotFound", "{t}");

    // The real one, younger than every squatter, is found.
    let main = MainContainer::start(&name, "real-host");
    a.run("inside", &["hostname"]);
    assert_eq!(a.wait_state("inside", "terminated", T)["exitCode"], 0);
    assert_eq!(a.stdout("inside").trim(), main.hostname);
    for task in ["plain", "own-ns", "detached"] {
        a.delete(task);
    }
    for task in ["plain", "own-ns", "detached"] {
        a.wait_gone(task, T);
    }
    for c in [&mut stray, &mut userns] {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// In a pod (POD_NAME set) only the Pod and the runtime name the main container: with
/// the API server unreachable, a process carrying the variable (here a real container
/// init) is not taken; the agent fails closed.
#[test]
fn in_a_pod_the_variable_is_never_consulted() {
    let name = unique("main-podonly");
    let _main = MainContainer::start(&name, "env-host");
    let dir = tempfile::tempdir().unwrap();
    let a = Agent::start_with_env(
        &["--enable-sidecar-mode=true", "--main-container-name", &name],
        &[
            ("POD_NAME", "sandbox-0"),
            ("POD_NAMESPACE", "default"),
            ("KUBECONFIG", dir.path().join("absent").to_str().unwrap()),
        ],
    );
    let r = a.request("GET", "/readyz", None);
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(!r.text().contains("SANDBOX_MAIN_CONTAINER"), "{}", r.text());
    a.run("remote", &["hostname"]);
    let t = a.wait_state("remote", "terminated", T);
    assert_eq!(t["reason"], "TargetNotFound", "{t}");
    assert!(
        !t["message"]
            .as_str()
            .unwrap()
            .contains("SANDBOX_MAIN_CONTAINER"),
        "{t}"
    );
}
