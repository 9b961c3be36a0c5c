//! The agent deployed the way upstream OpenSandbox deploys it (its Pool sample,
//! `kubernetes/config/samples/sandbox_v1alpha1_pool.yaml`), as pods on the tests' real
//! containerd, made through raw CRI calls as kubelet makes them:
//! - an init container of *our image* runs upstream's installer command unchanged,
//!   `cp /workspace/server /opt/opensandbox/task-executor && chmod +x ...`, into an
//!   emptyDir;
//! - the pod's main container (`sandbox`), another image under its own user, with no init
//!   and no sidecar, runs the copy with upstream's single-dash command line under `sh -c` with the
//!   redirect, `/var/lib/sandbox` on a second emptyDir;
//! - the controller's calls: `POST /setTasks` with the top-level `process` wire shape and
//!   `GET /getTasks` read back as `processStatus`.
//!
//! "Our image" is the Dockerfile's runtime layout rebuilt here (the static release binary
//! at `/workspace/server`, `/usr/local/bin/task-executor` a link to it, user 65532) over a
//! busybox layer instead of debian-slim, which has no business in a test. The binary is the
//! shipped build (`scripts/build-release`, which `scripts/test` runs first); the test fails,
//! it never skips, when that build is missing.
//!
//! Upstream's command line fixes the port, 5758, on the pod's (here: the host's) network,
//! so the tests of this file take turns through a lock file.

use std::collections::HashMap;
use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::support::containerd::{self, BUSYBOX, Image, KubeletPod, Layer};
use crate::support::http;
use crate::support::shipped::shipped_binary;
use crate::support::wait_for;
use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, ContainerState, Int64Value, KeyValue, LinuxContainerConfig,
    LinuxContainerSecurityContext, Mount, NamespaceMode, NamespaceOption,
};
use nix::fcntl::{Flock, FlockArg};
use serde_json::{Value, json};
use task_executor::runtime::container::cri::image_spec;

const NS: &str = "upstream";
/// Generous: the machine is shared with other builds and tests.
const T: Duration = Duration::from_secs(60);
const IMAGE: &str = "localhost/task-executor:upstream-test";
/// An image with no shell and no libc, as distroless static images are.
const DISTROLESS: &str = "localhost/distroless:upstream-test";
const PORT: u16 = 5758;
/// Upstream's installer, verbatim (the sample's `args: - |` block).
const INSTALL: &str = "cp /workspace/server /opt/opensandbox/task-executor && \n\
                       chmod +x /opt/opensandbox/task-executor\n";
/// Upstream's main container command, verbatim (its `- |` block).
const START: &str =
    "/opt/opensandbox/task-executor -listen-addr=0.0.0.0:5758 >/tmp/task-executor.log 2>&1\n";

/// Our image (the Dockerfile's runtime layout) and a distroless one, imported once per test.
fn import_images() {
    let binary = std::fs::read(shipped_binary()).unwrap();
    let busybox = containerd::busybox_layer().unwrap();
    let ours = Layer::default()
        .dir("workspace/", 0o755)
        .file("workspace/server", 0o755, &binary)
        .dir("usr/", 0o755)
        .dir("usr/local/", 0o755)
        .dir("usr/local/bin/", 0o755)
        .symlink("usr/local/bin/task-executor", "/workspace/server")
        .dir("var/", 0o755)
        .finish();
    let distroless = Layer::default()
        .dir("etc/", 0o755)
        .file(
            "etc/passwd",
            0o644,
            b"root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n",
        )
        .dir("tmp/", 0o1777)
        .dir("home/", 0o755)
        .finish();
    containerd::import(&[
        Image {
            name: IMAGE.into(),
            config: json!({
                "Env": ["PATH=/usr/local/bin:/bin"],
                "User": "65532:65532",
                "WorkingDir": "/workspace",
                "Entrypoint": ["task-executor", "init", "--"],
            }),
            layers: vec![busybox, ours],
        },
        Image {
            name: DISTROLESS.into(),
            config: json!({"User": "65532:65532"}),
            layers: vec![distroless],
        },
    ]);
}

/// Holds port 5758 for this test: the lock (the tests of this file take turns), and a
/// check that nothing else on the machine listens there.
fn take_port() -> Flock<File> {
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open("/tmp/task-executor-test-port-5758.lock")
        .unwrap();
    let held = Flock::lock(file, FlockArg::LockExclusive).unwrap_or_else(|(_, e)| panic!("{e}"));
    // The previous test's agent may take a moment to go with its sandbox.
    wait_for(T, "port 5758 to be free", || {
        TcpListener::bind(("0.0.0.0", PORT)).ok()
    });
    held
}

fn emptydir(parent: &Path, name: &str) -> PathBuf {
    let dir = parent.join(name);
    std::fs::create_dir(&dir).unwrap();
    // kubelet makes emptyDirs world-writable.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    dir
}

fn mount(host: &Path, container: &str) -> Mount {
    Mount {
        container_path: container.into(),
        host_path: host.display().to_string(),
        ..Default::default()
    }
}

fn container(
    name: &str,
    image: &str,
    command: &[&str],
    user: Option<i64>,
    mounts: Vec<Mount>,
) -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(image_spec(image)),
        command: command.iter().map(|s| s.to_string()).collect(),
        envs: vec![KeyValue {
            key: "SANDBOX_MAIN_CONTAINER".into(),
            value: "main".into(),
        }],
        mounts,
        labels: HashMap::from([("io.kubernetes.container.name".into(), name.into())]),
        log_path: format!("{name}.log"),
        linux: Some(LinuxContainerConfig {
            security_context: Some(LinuxContainerSecurityContext {
                namespace_options: Some(NamespaceOption {
                    network: NamespaceMode::Node as i32,
                    pid: NamespaceMode::Container as i32,
                    ipc: NamespaceMode::Pod as i32,
                    ..Default::default()
                }),
                run_as_user: user.map(|value| Int64Value { value }),
                run_as_group: user.map(|value| Int64Value { value }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

struct UpstreamPod {
    pod: KubeletPod,
    main_id: String,
    storage: PathBuf,
    addr: SocketAddr,
    _port: Flock<File>,
    _dirs: tempfile::TempDir,
}

impl UpstreamPod {
    /// The Pool sample's pod: the installer init container, then `sandbox` running `command`
    /// as `user` (the image's user when none).
    fn start(tag: &str, main_image: &str, command: &[&str], user: Option<i64>) -> UpstreamPod {
        assert!(nix::unistd::geteuid().is_root(), "this test needs root");
        import_images();
        let port = take_port();
        let name = format!("pool-{tag}-{}", std::process::id());
        let pod = KubeletPod::start_with(&name, NS, None, NamespaceMode::Container);
        let dirs = tempfile::Builder::new()
            .prefix("te-upstream-")
            .tempdir()
            .unwrap();
        std::fs::set_permissions(dirs.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let bin = emptydir(dirs.path(), "opensandbox-bin");
        let storage = emptydir(dirs.path(), "sandbox-storage");

        // The installer: our image, its own user, upstream's command.
        let installer = pod.run_container(container(
            "task-executor-installer",
            IMAGE,
            &["/bin/sh", "-c", INSTALL],
            None,
            vec![mount(&bin, "/opt/opensandbox")],
        ));
        let status = wait_for(T, "the installer to exit", || {
            let s = pod.container_status(&installer);
            (s.state == ContainerState::ContainerExited as i32).then_some(s)
        });
        let log = std::fs::read_to_string(pod.log_dir().join("task-executor-installer.log"))
            .unwrap_or_default();
        assert_eq!(status.exit_code, 0, "installer failed: {log}");
        let copied = bin.join("task-executor");
        let mode = std::fs::metadata(&copied).unwrap().permissions().mode();
        assert_eq!(
            mode & 0o111,
            0o111,
            "{} not executable: {mode:o}",
            copied.display()
        );

        let logs = emptydir(dirs.path(), "sandbox-logs");
        let main_id = pod.run_container(container(
            "sandbox",
            main_image,
            command,
            user,
            vec![
                mount(&bin, "/opt/opensandbox"),
                mount(&storage, "/var/lib/sandbox"),
                mount(&logs, "/workspace/logs"),
            ],
        ));
        let p = UpstreamPod {
            pod,
            main_id,
            storage,
            addr: SocketAddr::from(([127, 0, 0, 1], PORT)),
            _port: port,
            _dirs: dirs,
        };
        wait_for(
            T,
            "the agent in the main container to answer /health",
            || {
                let running = p.pod.container_status(&p.main_id).state
                    == ContainerState::ContainerRunning as i32;
                assert!(running, "the main container exited: {}", p.agent_log());
                http::request(p.addr, "GET", "/health", None)
                    .ok()
                    .filter(|r| r.status == 200)
            },
        );
        p
    }

    /// What the agent wrote: the redirect's file inside the running main container, and
    /// the container's CRI log (the agent's output when it runs without a shell).
    fn agent_log(&self) -> String {
        let status = self.pod.container_status(&self.main_id);
        let mut out = String::new();
        if status.state == ContainerState::ContainerRunning as i32 {
            let pid = self.pod.container_pid(&self.main_id);
            let redirected = format!("/proc/{pid}/root/tmp/task-executor.log");
            out += &std::fs::read_to_string(redirected).unwrap_or_default();
        } else {
            // Its file system, and the redirect's file with it, is gone.
            out += &format!("main container exited, code {}\n", status.exit_code);
        }
        out + &std::fs::read_to_string(self.pod.log_dir().join("sandbox.log")).unwrap_or_default()
    }

    /// `POST /setTasks` as the BatchSandbox controller sends it.
    fn set_tasks(&self, tasks: Value) {
        let body = serde_json::to_vec(&tasks).unwrap();
        let r = http::request(self.addr, "POST", "/setTasks", Some(&body)).unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    }

    /// The task's `processStatus.terminated` from `GET /getTasks`, once there.
    fn terminated(&self, name: &str) -> Value {
        wait_for(T, &format!("{name} to terminate"), || {
            let r = http::request(self.addr, "GET", "/getTasks", None).unwrap();
            assert_eq!(r.status, 200, "{}", r.text());
            let tasks = r.json();
            let task = tasks
                .as_array()?
                .iter()
                .find(|t| t["name"] == name)?
                .clone();
            let t = &task["processStatus"]["terminated"];
            (!t.is_null()).then(|| t.clone())
        })
    }

    /// The task's stdout, from the data dir on the `sandbox-storage` emptyDir.
    fn stdout(&self, name: &str) -> String {
        std::fs::read_to_string(self.storage.join("tasks").join(name).join("stdout.log"))
            .unwrap_or_else(|e| panic!("stdout of {name}: {e}\n{}", self.agent_log()))
    }

    /// A task that prints who and where it runs, through the controller's calls.
    fn run_id_task(&self) -> String {
        self.set_tasks(json!([{
            "name": "whoami",
            "process": {"command": ["sh", "-c", "echo $(id -u):$(id -g) $(ls /opt/opensandbox)"]},
        }]));
        let t = self.terminated("whoami");
        assert_eq!(t["exitCode"], 0, "{t}\n{}", self.agent_log());
        assert_eq!(t["reason"], "Succeeded", "{t}");
        self.stdout("whoami")
    }
}

#[test]
fn pool_sample_as_root_in_a_busybox_main_container() {
    let p = UpstreamPod::start("root", BUSYBOX, &["/bin/sh", "-c", START], Some(0));
    // The task ran in the main container (it sees the installed binary) as its user.
    let out = p.run_id_task();
    assert_eq!(out, "0:0 task-executor\n");
    // The agent's own output went where upstream's redirect sends it.
    let log = p.agent_log();
    assert!(log.contains("0.0.0.0:5758"), "agent log: {log}");
    // A second sync as the controller sends it: the finished task stays listed, a new one
    // runs, and the data dir is upstream's.
    p.set_tasks(json!([
        {"name": "whoami", "process": {"command": ["true"]}},
        {"name": "second", "process": {"command": ["sh", "-c", "exit 3"]}},
    ]));
    let t = p.terminated("second");
    assert_eq!(t["exitCode"], 3, "{t}");
    assert_eq!(t["reason"], "Failed", "{t}");
    assert!(p.storage.join("tasks/second").is_dir());
}

#[test]
fn pool_sample_as_a_non_root_user() {
    let p = UpstreamPod::start("nonroot", BUSYBOX, &["/bin/sh", "-c", START], Some(1000));
    let out = p.run_id_task();
    assert_eq!(out, "1000:1000 task-executor\n");
    let log = p.agent_log();
    assert!(log.contains("0.0.0.0:5758"), "agent log: {log}");
}

#[test]
fn copied_binary_runs_in_a_distroless_image_as_pid_1() {
    // No shell to redirect with: the copied binary is the container's command and PID 1,
    // as in upstream's recycle sample (`exec`), under the image's non-root user.
    let p = UpstreamPod::start(
        "distroless",
        DISTROLESS,
        &[
            "/opt/opensandbox/task-executor",
            "-listen-addr=0.0.0.0:5758",
        ],
        None,
    );
    p.set_tasks(json!([{
        "name": "version",
        "process": {"command": ["/opt/opensandbox/task-executor", "--version"]},
    }]));
    let t = p.terminated("version");
    assert_eq!(t["exitCode"], 0, "{t}\n{}", p.agent_log());
    assert!(
        p.stdout("version").starts_with("task-executor "),
        "{}",
        p.stdout("version")
    );
    let pid = p.pod.container_pid(&p.main_id);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(uid.split_whitespace().nth(1) == Some("65532"), "{uid}");
}
