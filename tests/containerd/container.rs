//! Container mode end to end: the real `task-executor` binary against a real containerd
//! (CRI v1), shared by all test processes (see `support/containerd.rs`). Nothing here is
//! skipped: without a working containerd every test fails with the reason.

use std::fs;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::support::agent::Agent;
use crate::support::containerd::{self, BUSYBOX};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(30);

struct Env {
    agent: Agent,
    vol: PathBuf,
    data: PathBuf,
    agent_id: String,
    socket: PathBuf,
    _tmp: tempfile::TempDir,
}

fn setup(extra: &[&str]) -> Env {
    let cd = containerd::shared();
    let tmp = tempfile::Builder::new()
        .prefix("te-cri-")
        .tempdir()
        .unwrap();
    let vol = tmp.path().join("vol");
    let data = tmp.path().join("data");
    fs::create_dir_all(&vol).unwrap();
    fs::create_dir_all(&data).unwrap();
    let agent_id = task_executor::runtime::container::agent_id(
        &fs::canonicalize(&data).unwrap().display().to_string(),
    );
    let socket = cd.socket.display().to_string();
    let volume = format!("data={}", vol.display());
    let mut args = vec![
        "--enable-container-mode=true",
        "--cri-socket",
        &socket,
        "--volume",
        &volume,
        "--reconcile-interval",
        "100ms",
        "--stop-grace-period",
        "2s",
    ];
    args.extend_from_slice(extra);
    let agent = Agent::start_in(&data, &args);
    Env {
        agent,
        vol,
        data,
        agent_id,
        socket: cd.socket.clone(),
        _tmp: tmp,
    }
}

impl Env {
    /// Deletes every task, stops the agent, and checks CRI holds nothing of ours.
    fn finish(mut self) {
        containerd::stop_and_expect_nothing_left(&mut self.agent, &self.socket, &self.agent_id);
    }

    fn containers_of(&self, task: &str) -> usize {
        containerd::leftovers(&self.socket, &self.agent_id)
            .0
            .iter()
            .filter(|c| c.labels.get("task-executor.io/task").map(String::as_str) == Some(task))
            .count()
    }
}

fn container_task(name: &str, container: Value) -> Value {
    let mut c = json!({"image": BUSYBOX});
    c.as_object_mut()
        .unwrap()
        .extend(container.as_object().unwrap().clone());
    json!({"name": name, "spec": {"container": c}})
}

fn sh(name: &str, script: &str) -> Value {
    container_task(name, json!({"command": ["sh", "-c", script]}))
}

#[test]
fn exit_codes_env_command_and_args() {
    let env = setup(&[]);
    let a = &env.agent;
    a.create_ok(&container_task(
        "ok",
        json!({"command": ["sh", "-c"], "args": ["echo \"hello $GREETING\""],
               "env": [{"name": "GREETING", "value": "from-env"}], "workingDir": "/tmp"}),
    ));
    a.create_ok(&sh("fails", "pwd; exit 7"));
    // No command: the image's default (sh) gets these args.
    a.create_ok(&container_task(
        "default-entry",
        json!({"args": ["sh", "-c", "exit 3"]}),
    ));
    let ok = a.wait_state("ok", "terminated", T);
    assert_eq!(ok["exitCode"], 0, "{ok}");
    assert_eq!(ok["reason"], "Succeeded");
    assert!(
        ok["startedAt"].is_string() && ok["finishedAt"].is_string(),
        "{ok}"
    );
    let bad = a.wait_state("fails", "terminated", T);
    assert_eq!(
        (bad["exitCode"].as_i64(), bad["reason"].as_str()),
        (Some(7), Some("Failed"))
    );
    let d = a.wait_state("default-entry", "terminated", T);
    assert_eq!(d["exitCode"], 3, "{d}");

    // The CRI log of each container is in its task dir.
    let log = fs::read_to_string(env.data.join("ok/container.log")).unwrap();
    assert!(log.contains(" stdout F hello from-env"), "{log}");
    let log = fs::read_to_string(env.data.join("fails/container.log")).unwrap();
    assert!(log.contains(" stdout F /"), "{log}");
    env.finish();
}

#[test]
fn volume_mounts_reach_the_host() {
    let env = setup(&[]);
    let a = &env.agent;
    a.create_ok(&container_task(
        "writer",
        json!({"command": ["sh", "-c", "echo written-inside > /mnt/data/out.txt"],
               "volumeMounts": [{"name": "data", "mountPath": "/mnt/data"}]}),
    ));
    fs::write(env.vol.join("in.txt"), "from-host").unwrap();
    a.create_ok(&container_task(
        "reader",
        json!({"command": ["sh", "-c", "cat /ro/in.txt; echo x > /ro/denied"],
               "volumeMounts": [{"name": "data", "mountPath": "/ro", "readOnly": true}]}),
    ));
    let w = a.wait_state("writer", "terminated", T);
    assert_eq!(w["exitCode"], 0, "{w}");
    assert_eq!(
        fs::read_to_string(env.vol.join("out.txt")).unwrap(),
        "written-inside\n"
    );
    let r = a.wait_state("reader", "terminated", T);
    assert_ne!(
        r["exitCode"], 0,
        "a read-only mount must refuse writes: {r}"
    );
    let log = fs::read_to_string(env.data.join("reader/container.log")).unwrap();
    assert!(log.contains("from-host"), "{log}");
    assert!(!env.vol.join("denied").exists());
    env.finish();
}

#[test]
fn unknown_volume_is_a_400() {
    let env = setup(&[]);
    let r = env.agent.call(
        "POST",
        "/tasks",
        Some(
            &container_task(
                "v",
                json!({"command": ["true"], "volumeMounts": [{"name": "nope", "mountPath": "/x"}]}),
            )
            .to_string(),
        ),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(
        r.text().contains("nope") && r.text().contains("data"),
        "{}",
        r.text()
    );
    assert!(env.agent.get("v").is_none());
    env.finish();
}

#[test]
fn delete_stops_and_removes_a_running_container() {
    let env = setup(&[]);
    let a = &env.agent;
    a.create_ok(&sh("sleeper", "sleep 300"));
    let run = a.wait_state("sleeper", "running", T);
    assert!(run["startedAt"].is_string());
    assert_eq!(env.containers_of("sleeper"), 1);
    let started = Instant::now();
    let r = a.call("DELETE", "/tasks/sleeper", None);
    assert_eq!(r.status, 204);
    a.wait_gone("sleeper", T);
    // sleep as PID 1 ignores SIGTERM: the stop waits out the 2 s grace, then kills.
    assert!(started.elapsed() < Duration::from_secs(15));
    assert_eq!(
        env.containers_of("sleeper"),
        0,
        "container left after delete"
    );
    env.finish();
}

#[test]
fn timeout_stops_the_container_as_task_timeout() {
    let env = setup(&[]);
    let a = &env.agent;
    let mut t = sh("slow", "trap 'exit 143' TERM; sleep 300 & wait");
    t["spec"]["timeoutSeconds"] = json!(2);
    a.create_ok(&t);
    a.wait_state("slow", "running", T);
    let term = a.wait_state("slow", "terminated", T);
    assert_eq!(term["reason"], "TaskTimeout", "{term}");
    assert_eq!(term["message"], "Task exceeded timeout of 2 seconds");
    assert_ne!(term["exitCode"], 0);
    env.finish();
}

#[test]
fn timeout_survives_an_agent_restart() {
    let mut env = setup(&[]);
    let mut t = sh("deadline", "sleep 300");
    t["spec"]["timeoutSeconds"] = json!(3);
    env.agent.create_ok(&t);
    env.agent.wait_state("deadline", "running", T);
    env.agent.kill9();
    // The deadline passes while no agent runs; the next one enforces it at once.
    std::thread::sleep(Duration::from_secs(4));
    env.agent.restart();
    let term = env.agent.wait_state("deadline", "terminated", T);
    assert_eq!(term["reason"], "TaskTimeout", "{term}");
    assert_eq!(term["message"], "Task exceeded timeout of 3 seconds");
    env.finish();
}

#[test]
fn missing_image_is_err_image_pull() {
    let env = setup(&[]);
    let a = &env.agent;
    let image = "localhost:1/task-executor/no-such-image:v1";
    a.create_ok(&container_task(
        "pull",
        json!({"image": image, "command": ["true"]}),
    ));
    let t = a.wait_state("pull", "terminated", T);
    assert_eq!(t["reason"], "ErrImagePull", "{t}");
    assert!(t["message"].as_str().unwrap().contains(image), "{t}");
    assert!(t["startedAt"].is_null());
    env.finish();
}

#[test]
fn agent_kill9_and_restart_readopts_containers() {
    let mut env = setup(&[]);
    env.agent
        .create_ok(&sh("long", "sleep 4; echo done-long; exit 4"));
    env.agent.create_ok(&sh("short", "sleep 1; exit 9"));
    let started = env.agent.wait_state("long", "running", T);
    env.agent.wait_state("short", "running", T);
    env.agent.kill9();
    // "short" exits while no agent runs.
    std::thread::sleep(Duration::from_millis(1500));
    env.agent.restart();
    let short = env.agent.wait_state("short", "terminated", T);
    assert_eq!(short["exitCode"], 9, "{short}");
    let again = env.agent.wait_state("long", "running", T);
    assert_eq!(
        again["startedAt"], started["startedAt"],
        "the same container"
    );
    let long = env.agent.wait_state("long", "terminated", T);
    assert_eq!(long["exitCode"], 4, "{long}");
    assert_eq!(long["reason"], "Failed");
    assert_eq!(env.containers_of("long"), 1, "adopted, not re-created");
    // A restart after the exit still reports the real final status.
    env.agent.restart();
    let long = env.agent.wait_state("long", "terminated", T);
    assert_eq!(long["exitCode"], 4, "{long}");
    env.finish();
}

#[test]
fn process_tasks_still_work_in_container_mode() {
    let env = setup(&[]);
    let a = &env.agent;
    a.create_ok(&json!({"name": "proc", "spec": {"process": {"command": ["sh", "-c", "exit 3"]}}}));
    let t = a.wait_state("proc", "terminated", T);
    assert_eq!(t["exitCode"], 3, "{t}");
    let r = a.call("GET", "/readyz", None);
    assert_eq!(r.status, 200, "{}", r.text());
    env.finish();
}

#[test]
fn target_container_shares_the_pid_namespace() {
    let env = setup(&[]);
    let a = &env.agent;
    // Only the main container may be targeted (the task policy); before it runs, a task
    // targeting it ends TargetNotFound.
    let r = a.create(container_task(
        "absent",
        json!({"command": ["true"], "targetContainer": "absent"}),
    ));
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("targetContainer"), "{}", r.text());
    a.create_ok(&container_task(
        "no-target",
        json!({"command": ["true"], "targetContainer": "main"}),
    ));
    let t = a.wait_state("no-target", "terminated", T);
    assert_eq!(t["reason"], "TargetNotFound", "{t}");
    a.create_ok(&sh("main", "sleep 300"));
    a.wait_state("main", "running", T);
    a.create_ok(&container_task(
        "debug",
        json!({"command": ["sh", "-c", "ps | grep -v grep | grep -q 'sleep 300'"],
               "targetContainer": "main"}),
    ));
    let t = a.wait_state("debug", "terminated", T);
    assert_eq!(
        t["exitCode"], 0,
        "the target's processes must be visible: {t}"
    );
    // Without a target the same check fails: PID namespaces are per container.
    a.create_ok(&sh("isolated", "ps | grep -v grep | grep -q 'sleep 300'"));
    let t = a.wait_state("isolated", "terminated", T);
    assert_eq!(t["exitCode"], 1, "{t}");
    env.finish();
}

#[test]
fn container_log_is_capped() {
    let env = setup(&["--max-log-bytes", "4096"]);
    let a = &env.agent;
    // The sleep lets the running container's log be rotated (ReopenContainerLog) first.
    a.create_ok(&sh(
        "chatty",
        "for i in $(seq 1 3000); do echo line-$i; done; sleep 3; echo after-rotation",
    ));
    let t = a.wait_state("chatty", "terminated", T);
    assert_eq!(t["exitCode"], 0, "{t}");
    let dir = env.data.join("chatty");
    let live = fs::read_to_string(dir.join("container.log")).unwrap();
    let rotated = fs::read(dir.join("container.log.1")).map_or(0, |b| b.len());
    assert!(live.len() + rotated <= 4096, "{} + {rotated}", live.len());
    assert!(
        live.contains("after-rotation"),
        "newest output kept: {live}"
    );
    assert!(rotated > 0, "the running container's log was rotated");
    assert!(
        live.contains("[task-executor]"),
        "a marker shows the cut: {live}"
    );
    env.finish();
}

#[test]
fn unreachable_cri_socket_fails_tasks_and_readiness() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let sock = tmp.path().join("absent.sock");
    let mut a = Agent::start_in(
        &data,
        &[
            "--enable-container-mode=true",
            "--cri-socket",
            sock.to_str().unwrap(),
        ],
    );
    let r = a.call("GET", "/readyz", None);
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.text().contains("absent.sock"), "{}", r.text());
    a.create_ok(&sh("c", "true"));
    let t = a.wait_state("c", "terminated", T);
    assert_eq!(t["reason"], "RuntimeError", "{t}");
    assert!(
        t["message"].as_str().unwrap().contains("unreachable"),
        "{t}"
    );
    // Process tasks are unaffected.
    a.create_ok(&json!({"name": "p", "spec": {"process": {"command": ["true"]}}}));
    assert_eq!(a.wait_state("p", "terminated", T)["exitCode"], 0);
    a.delete_all_and_stop();
}

/// Inside Kubernetes the agent joins its own pod's sandbox (found by kubelet's pod labels)
/// instead of creating one; here a "kubelet" sandbox with a `main` container is made
/// through CRI directly, and the agent is given its pod's name and namespace.
#[test]
fn pod_mode_joins_the_pods_sandbox_and_targets_kubelet_containers() {
    let cd = containerd::shared();
    let tmp = tempfile::tempdir().unwrap();
    let pod = format!("pod-{}", std::process::id());
    // Stands in for kubelet: the pod's sandbox and its `main` container.
    let kp = containerd::KubeletPod::start(&pod, "tests", Some(&["sleep", "301"]));

    let data = tmp.path().join("data");
    let mut a = Agent::start_in(
        &data,
        &[
            "--enable-container-mode=true",
            "--cri-socket",
            cd.socket.to_str().unwrap(),
            "--pod-name",
            &pod,
            "--pod-namespace",
            "tests",
            "--reconcile-interval",
            "100ms",
        ],
    );
    a.create_ok(&container_task(
        "peek",
        json!({"command": ["sh", "-c", "ps | grep -v grep | grep -q 'sleep 301'"],
               "targetContainer": "main"}),
    ));
    let t = a.wait_state("peek", "terminated", T);
    assert_eq!(t["exitCode"], 0, "sees the pod's main container: {t}");
    let agent_id = task_executor::runtime::container::agent_id(&format!("pod:tests/{pod}"));
    let (ours, owned) = containerd::leftovers(&cd.socket, &agent_id);
    assert_eq!(ours.len(), 1);
    assert_eq!(
        ours[0].pod_sandbox_id, kp.sandbox_id,
        "runs in the pod's sandbox"
    );
    assert!(owned.is_empty(), "no sandbox of its own in a pod");
    a.delete_all_and_stop();
    assert!(containerd::leftovers(&cd.socket, &agent_id).0.is_empty());

    // The pod's sandbox and main container are kubelet's: still there (removed on drop).
    let left = kp.containers();
    assert_eq!(left.len(), 1);
    assert_eq!(Some(&left[0].id), kp.main_id.as_ref());
}
