//! Sidecar mode with the main container found through the Pod: the real agent binary, a
//! stand-in "main container" (a process in fresh pid/mount/uts/ipc/net namespaces, in a
//! cgroup whose path names its container ID) and an in-process fake API server that serves
//! the Pod. Needs root (namespaces, cgroups), which the CI machines have.
//!
//! No real API server can be installed here (no kube-apiserver, envtest, kind, k3s or kwok
//! is obtainable on these machines), so `crate::support::fake_apiserver` stands in for it.

use std::time::Duration;

use crate::support::agent::Agent;
use crate::support::fake_apiserver::FakeApiServer;
use crate::support::standin::{MainContainer, Options, TestCgroup};
use crate::support::wait_for;
use serde_json::{Value, json};

const NS: &str = "sandbox";
const POD: &str = "sandbox-pod-7";
const T: Duration = Duration::from_secs(30);
/// A stand-in for the main container, without upstream's env marker (so only the Pod path
/// can find it), in a cgroup whose path names its container id, as runc's do.
struct PodContainer {
    id: String,
    // Declared before the cgroup: the container must be gone before the cgroup goes.
    main: MainContainer,
    _cgroup: TestCgroup,
}

impl PodContainer {
    fn start(hostname: &str) -> PodContainer {
        Self::start_in(hostname, false)
    }

    /// `shared_pid_namespace`: the container's process is not its PID namespace's init
    /// (a pod with `shareProcessNamespace: true`, the chart's sidecar mode).
    fn start_in(hostname: &str, shared_pid_namespace: bool) -> PodContainer {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let seed = format!(
            "{:016x}{:08x}{}",
            nanos as u64,
            std::process::id(),
            hostname.len()
        );
        let id: String = seed.chars().cycle().take(64).collect();
        let cgroup = TestCgroup::new(&format!("task-executor-test-{id}"));
        let main = MainContainer::start_with(
            hostname,
            Options {
                cgroup: Some(&cgroup),
                shared_pid_namespace,
                ..Default::default()
            },
        );
        PodContainer {
            id,
            main,
            _cgroup: cgroup,
        }
    }

    fn container_id(&self) -> String {
        format!("containerd://{}", self.id)
    }

    fn ns(&self, name: &str) -> String {
        self.main.ns(name)
    }

    fn alive(&self) -> bool {
        self.main.alive()
    }
}

fn ns_link(pid: impl std::fmt::Display, name: &str) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/{name}"))
        .unwrap()
        .display()
        .to_string()
}

fn pod(main: &PodContainer, restarts: i32) -> Value {
    let status = |name: &str, id: String, restarts: i32| {
        json!({"name": name, "image": "example/image", "imageID": "", "ready": true,
               "started": true, "restartCount": restarts, "containerID": id,
               "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}})
    };
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": POD, "namespace": NS},
        "spec": {"containers": [{"name": "main", "image": "example/image"},
                                {"name": "task-executor", "image": "example/agent"}]},
        "status": {"phase": "Running", "containerStatuses": [
            status("task-executor", format!("containerd://{}", "ab".repeat(32)), 0),
            status("main", main.container_id(), restarts),
        ]}
    })
}

const PROBE: &str = "hostname; for n in uts ipc net mnt pid; do readlink /proc/self/ns/$n; done";

fn probe(agent: &Agent, name: &str) -> Vec<String> {
    agent.run_sh(name, PROBE);
    let t = agent.wait_state(name, "terminated", T);
    assert_eq!(t["exitCode"], 0, "{t}");
    agent.stdout(name).lines().map(str::to_string).collect()
}

fn expected(main: &PodContainer, hostname: &str) -> Vec<String> {
    std::iter::once(hostname.to_string())
        .chain(["uts", "ipc", "net", "mnt", "pid"].map(|n| main.ns(n)))
        .collect()
}

#[test]
fn tasks_run_in_the_pods_main_container_and_stop_when_it_is_replaced() {
    assert!(nix::unistd::geteuid().is_root(), "this test needs root");
    let tmp = tempfile::tempdir().unwrap();
    let api = FakeApiServer::start();
    let kubeconfig = tmp.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig, NS);

    // Dropped in reverse: the agent (and its tasks' leftovers), then the stand-in.
    let first = PodContainer::start("main-a");
    let agent = Agent::start_with_env(
        &[
            "--enable-sidecar-mode=true",
            "--main-container-name",
            "main",
            "--stop-grace-period=2s",
            // Pod watches are renewed every 2 s; one silent for 2 s + 5 s is dropped.
            "--kube-watch-timeout=2s",
        ],
        &[
            ("POD_NAME", POD),
            ("POD_NAMESPACE", NS),
            ("KUBECONFIG", kubeconfig.to_str().unwrap()),
        ],
    );

    // No Pod yet: not ready, and no environment variable is asked instead (in a pod only
    // the Pod and the runtime say which process is the main container).
    let r = agent.request("GET", "/readyz", None);
    let body = r.text();
    assert_eq!(r.status, 503, "{body}");
    assert!(body.contains("main container"), "{body}");
    assert!(
        body.contains("not found") && !body.contains("SANDBOX_MAIN_CONTAINER"),
        "{body}"
    );

    api.put_pod(pod(&first, 0));
    wait_for(T, "/readyz to say ready", || {
        (agent.request("GET", "/readyz", None).status == 200).then_some(())
    });
    api.wait_for_request(T, "a GET of the own Pod", |r| {
        r.method == "GET" && r.path == format!("/api/v1/namespaces/{NS}/pods/{POD}")
    });

    // A task runs in the main container's namespaces.
    assert_ne!(first.ns("uts"), ns_link("self", "uts"));
    assert_eq!(probe(&agent, "probe-a"), expected(&first, "main-a"));

    // A finished task that left a process running in the first container.
    agent.run_sh("leaver", "sleep 4646 & exit 0");
    assert_eq!(agent.wait_state("leaver", "terminated", T)["exitCode"], 0);
    // Its shell may exit before the backgrounded child has exec'd `sleep`: wait for it.
    let left = wait_for(T, "the leftover sleep 4646", || {
        Some(crate::support::pids_with_cmdline(&["sleep", "4646"])).filter(|p| !p.is_empty())
    });
    assert_eq!(left.len(), 1);

    // A long task in the first container; then the container is replaced (new ID, one
    // restart) while the old process is still there, so only the Pod watch can tell.
    agent.run("long", &["sleep", "4545"]);
    agent.wait_state("long", "running", T);
    assert_eq!(
        crate::support::pids_with_cmdline(&["sleep", "4545"]).len(),
        1
    );
    let watch = api.wait_for_request(T, "a watch of the own Pod", |r| {
        r.is_watch() && r.path == format!("/api/v1/namespaces/{NS}/pods")
    });
    assert_eq!(
        watch.param("fieldSelector"),
        Some(format!("metadata.name={POD}")),
        "{}",
        watch.query
    );

    // The replacement is announced while the open Pod watch has gone silent without
    // closing (a half-open connection): the agent must notice and watch again.
    api.stall_watches();
    let second = PodContainer::start("main-b");
    api.put_pod(pod(&second, 1));
    let t = agent.wait_state("long", "terminated", T);
    assert_eq!(t["reason"], "TargetRestarted", "{t}");
    assert!(
        api.requests()
            .iter()
            .filter(|r| r.is_watch() && r.path == format!("/api/v1/namespaces/{NS}/pods"))
            .count()
            >= 2,
        "the Pod was not watched again"
    );
    assert!(crate::support::pids_with_cmdline(&["sleep", "4545"]).is_empty());
    // What the finished task left in the old container is stopped too; its outcome stays.
    wait_for(T, "the finished task's leftover to be stopped", || {
        crate::support::pids_with_cmdline(&["sleep", "4646"])
            .is_empty()
            .then_some(())
    });
    let leaver = agent.get("leaver").unwrap();
    assert_eq!(
        leaver["status"]["state"]["terminated"]["reason"], "Succeeded",
        "{leaver}"
    );
    assert!(
        first.alive(),
        "the old stand-in must outlive the test of the watch path"
    );
    assert!(agent.task_dir("long").join("target-restarted").exists());
    assert!(
        agent.log_text().contains("main container replaced"),
        "{}",
        agent.log_text()
    );

    // New tasks run in the new container.
    assert_eq!(probe(&agent, "probe-b"), expected(&second, "main-b"));
    // Finished tasks were not touched by the restart.
    let a = agent.get("probe-a").unwrap();
    assert_eq!(
        a["status"]["state"]["terminated"]["reason"], "Succeeded",
        "{a}"
    );
}

#[test]
fn a_finished_tasks_leftovers_stop_when_its_container_process_dies_in_a_shared_pid_namespace() {
    assert!(nix::unistd::geteuid().is_root(), "this test needs root");
    let tmp = tempfile::tempdir().unwrap();
    let api = FakeApiServer::start();
    let kubeconfig = tmp.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig, NS);
    let main = PodContainer::start_in("main-shared", true);
    let agent = Agent::start_with_env(
        &[
            "--enable-sidecar-mode=true",
            "--main-container-name",
            "main",
            "--stop-grace-period=1s",
        ],
        &[
            ("POD_NAME", POD),
            ("POD_NAMESPACE", NS),
            ("KUBECONFIG", kubeconfig.to_str().unwrap()),
        ],
    );
    api.put_pod(pod(&main, 0));
    wait_for(T, "/readyz to say ready", || {
        (agent.request("GET", "/readyz", None).status == 200).then_some(())
    });
    agent.run_sh("leaver", "sleep 4747 & exit 0");
    assert_eq!(agent.wait_state("leaver", "terminated", T)["exitCode"], 0);
    // Its shell may exit before the backgrounded child has exec'd `sleep`: wait for it.
    let left = wait_for(T, "the leftover sleep 4747", || {
        Some(crate::support::pids_with_cmdline(&["sleep", "4747"])).filter(|p| !p.is_empty())
    });
    assert_eq!(left.len(), 1);
    assert_eq!(ns_link(left[0], "pid"), main.ns("pid"));

    // The container's process dies; its PID namespace (and, unless the agent acts, the
    // leftover) lives on. The Pod is not updated: the task's supervisor notices by itself.
    main.main.kill_process();
    wait_for(T, "the finished task's leftover to be stopped", || {
        crate::support::pids_with_cmdline(&["sleep", "4747"])
            .is_empty()
            .then_some(())
    });
    let t = agent.get("leaver").unwrap();
    assert_eq!(
        t["status"]["state"]["terminated"]["reason"], "Succeeded",
        "{t}"
    );
}
