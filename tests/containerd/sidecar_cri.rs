//! Sidecar mode against a real pod: a CRI pod sandbox with a busybox `main` container on
//! the shared test containerd, the Pod served by the fake API server with that container's
//! `containerd://<id>`, and the real agent finding the container's PID through CRI
//! (verbose `ContainerStatus`) and running a task inside it.

use std::time::Duration;

use crate::support::agent::Agent;
use crate::support::containerd::{self, KubeletPod};
use crate::support::fake_apiserver::FakeApiServer;
use crate::support::wait_for;
use serde_json::json;

const NS: &str = "tests";
const T: Duration = Duration::from_secs(30);
const NAMESPACES: [&str; 5] = ["mnt", "pid", "ipc", "uts", "net"];

fn ns_link(pid: impl std::fmt::Display, name: &str) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/{name}"))
        .unwrap()
        .display()
        .to_string()
}

#[test]
fn sidecar_task_runs_in_a_cri_main_container_found_through_cri() {
    assert!(nix::unistd::geteuid().is_root(), "this test needs root");
    let cd = containerd::shared();
    let pod_name = format!("sidecar-cri-{}", std::process::id());
    // A file only the main container's root file system has.
    let marker = format!("in-main-{}", std::process::id());
    let script = format!("echo {marker} > /tmp/only-in-main && exec sleep 100000");
    // Dropped last: the sandbox (and the main container) go even if the test fails.
    let pod = KubeletPod::start(&pod_name, NS, Some(&["/bin/sh", "-c", &script]));
    let main_id = pod.main_id.clone().unwrap();
    let main_pid = pod.main_pid();
    wait_for(T, "the main container's exec of sleep", || {
        let comm = std::fs::read_to_string(format!("/proc/{main_pid}/comm")).ok()?;
        (comm.trim() == "sleep").then_some(())
    });

    let tmp = tempfile::tempdir().unwrap();
    let api = FakeApiServer::start();
    let kubeconfig = tmp.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig, NS);
    let status = |name: &str, id: String| {
        json!({"name": name, "image": "localhost/busybox:test", "imageID": "", "ready": true,
               "started": true, "restartCount": 0, "containerID": id,
               "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}})
    };
    api.put_pod(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod_name, "namespace": NS, "uid": format!("uid-{pod_name}")},
        "spec": {"containers": [{"name": "main", "image": "localhost/busybox:test"},
                                {"name": "task-executor", "image": "example/agent"}]},
        "status": {"phase": "Running", "containerStatuses": [
            status("task-executor", format!("containerd://{}", "cd".repeat(32))),
            status("main", format!("containerd://{main_id}")),
        ]}
    }));

    let socket = cd.socket.display().to_string();
    let agent = Agent::start_with_env(
        &[
            "--enable-sidecar-mode=true",
            "--main-container-name",
            "main",
            "--cri-socket",
            &socket,
            "--stop-grace-period=2s",
            "--log-format=json",
        ],
        &[
            ("POD_NAME", &pod_name),
            ("POD_NAMESPACE", NS),
            ("KUBECONFIG", kubeconfig.to_str().unwrap()),
        ],
    );
    wait_for(T, "/readyz to say ready", || {
        (agent.request("GET", "/readyz", None).status == 200).then_some(())
    });

    // The image's own /etc/passwd (one line) and the file the main container wrote, then
    // the task's namespaces.
    let probe = "cat /etc/passwd /tmp/only-in-main; \
                 for n in mnt pid ipc uts net; do /bin/busybox readlink /proc/self/ns/$n; done";
    agent.run("probe", &["/bin/sh", "-c", probe]);
    let t = agent.wait_state("probe", "terminated", T);
    assert_eq!(t["exitCode"], 0, "{t}\n{}", agent.log_tail());
    let out: Vec<String> = agent.stdout("probe").lines().map(str::to_string).collect();
    let expected: Vec<String> = ["root:x:0:0:root:/root:/bin/sh".to_string(), marker]
        .into_iter()
        .chain(NAMESPACES.map(|n| ns_link(main_pid, n)))
        .collect();
    // Both sides first: a failure message is often seen cut short.
    assert!(
        out == expected,
        "task output {out:#?}\nexpected {expected:#?}\nagent log:\n{}",
        agent.log_tail()
    );
    // The comparison means something: the container's mount and PID namespaces are not
    // the host's (its network, with a NODE-mode sandbox, is).
    for n in ["mnt", "pid"] {
        assert_ne!(ns_link(main_pid, n), ns_link("self", n), "{n}");
    }

    // The CRI resolver answered, not the cgroup scan that comes after it. (The scan would
    // find this container too: runc puts it in a cgroup named after its ID. Only the log
    // tells which of the two answered.)
    let log = agent.log_text();
    let located: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["message"] == "main container located")
        .collect();
    assert!(!located.is_empty(), "{log}");
    for l in &located {
        assert_eq!(l["resolver"], "cri", "{l}");
        assert_eq!(l["container"], format!("containerd://{main_id}"), "{l}");
        assert_eq!(l["pid"], main_pid, "{l}");
    }
}
