//! Sidecar mode with the main container found through the Pod: the real agent binary, a
//! stand-in "main container" (a process in fresh pid/mount/uts/ipc/net namespaces, in a
//! cgroup whose path names its container ID) and an in-process fake API server that serves
//! the Pod. Needs root (namespaces, cgroups), which the CI machines have.
//!
//! No real API server can be installed here (no kube-apiserver, envtest, kind, k3s or kwok
//! is obtainable on these machines), so `support::fake_apiserver` stands in for it.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};
use support::agent::Agent;
use support::fake_apiserver::FakeApiServer;
use support::wait_for;

const NS: &str = "sandbox";
const POD: &str = "sandbox-pod-7";
const T: Duration = Duration::from_secs(30);
/// A v1 hierarchy that every kernel here mounts.
const CGROUP_ROOT: &str = "/sys/fs/cgroup/pids";

/// A stand-in for the main container: `unshare`d namespaces, pid 1 `sleep`, placed in
/// `/sys/fs/cgroup/pids/task-executor-test-<id>`. Drop kills it and removes the cgroup.
struct PodContainer {
    id: String,
    pid: i32,
    cgroup: PathBuf,
    unshare: Child,
}

impl PodContainer {
    fn start(hostname: &str) -> PodContainer {
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
        let cgroup = Path::new(CGROUP_ROOT).join(format!("task-executor-test-{id}"));
        std::fs::create_dir(&cgroup).expect("create a test cgroup (needs root and cgroup v1 pids)");
        let procs = cgroup.join("cgroup.procs");
        let script = format!(
            "echo $$ > {} && hostname {hostname} && exec sleep 1000",
            procs.display()
        );
        let spawned = Command::new("unshare")
            .args([
                "--pid",
                "--fork",
                "--mount",
                "--uts",
                "--ipc",
                "--net",
                "--mount-proc",
                "sh",
                "-c",
                &script,
            ])
            .stdin(Stdio::null())
            .spawn();
        let unshare = match spawned {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_dir(&cgroup);
                panic!("unshare: {e}");
            }
        };
        let mut mc = PodContainer {
            id,
            pid: 0,
            cgroup,
            unshare,
        };
        mc.pid = wait_for(
            Duration::from_secs(10),
            "the stand-in to enter its cgroup",
            || {
                let text = std::fs::read_to_string(&procs).ok()?;
                let pid: i32 = text.lines().next()?.trim().parse().ok()?;
                // Wait for the exec, so its namespaces and hostname are final.
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
                (comm.trim() == "sleep").then_some(pid)
            },
        );
        mc
    }

    fn container_id(&self) -> String {
        format!("containerd://{}", self.id)
    }

    fn ns(&self, name: &str) -> String {
        ns_link(self.pid, name)
    }

    fn alive(&self) -> bool {
        task_executor::runtime::procfs::stat(self.pid).is_some_and(|s| s.state != 'Z')
    }
}

impl Drop for PodContainer {
    fn drop(&mut self) {
        // Killing pid 1 of the namespace kills everything in it (tasks included).
        if self.pid > 0 {
            let _ = kill(Pid::from_raw(self.pid), Signal::SIGKILL);
        }
        let _ = self.unshare.kill();
        let _ = self.unshare.wait();
        for _ in 0..100 {
            let empty = std::fs::read_to_string(self.cgroup.join("cgroup.procs"))
                .map(|t| t.trim().is_empty())
                .unwrap_or(true);
            if empty && std::fs::remove_dir(&self.cgroup).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("could not remove {}", self.cgroup.display());
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
    agent.run(name, &["sh", "-c", PROBE]);
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
        ],
        &[
            ("POD_NAME", POD),
            ("POD_NAMESPACE", NS),
            ("KUBECONFIG", kubeconfig.to_str().unwrap()),
        ],
    );

    // No Pod yet, and no process has SANDBOX_MAIN_CONTAINER=main: not ready.
    let r = agent.request("GET", "/readyz", None);
    let body = r.text();
    assert_eq!(r.status, 503, "{body}");
    assert!(body.contains("main container"), "{body}");
    assert!(
        body.contains("not found") && body.contains("SANDBOX_MAIN_CONTAINER"),
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

    // A long task in the first container; then the container is replaced (new ID, one
    // restart) while the old process is still there, so only the Pod watch can tell.
    agent.run("long", &["sleep", "4545"]);
    agent.wait_state("long", "running", T);
    assert_eq!(support::pids_with_cmdline(&["sleep", "4545"]).len(), 1);
    let watch = api.wait_for_request(T, "a watch of the own Pod", |r| {
        r.is_watch() && r.path == format!("/api/v1/namespaces/{NS}/pods")
    });
    assert!(
        watch
            .query
            .contains(&format!("fieldSelector=metadata.name%3D{POD}")),
        "{}",
        watch.query
    );

    let second = PodContainer::start("main-b");
    api.put_pod(pod(&second, 1));
    let t = agent.wait_state("long", "terminated", T);
    assert_eq!(t["reason"], "TargetRestarted", "{t}");
    assert!(support::pids_with_cmdline(&["sleep", "4545"]).is_empty());
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
