//! The agent where it really runs: as a container of a pod, under `task-executor init` as
//! the container's first process (the image's entrypoint), on the tests' containerd.
//!
//! The pod is a CRI sandbox with host network, made through raw CRI calls as kubelet makes
//! it. The agent's container runs the busybox test image with the tests' build of the
//! binary and the host's libraries bind-mounted read-only; its data dir is a hostPath, so
//! the test reads what the agent wrote. Two layouts, as the chart has them:
//! - sidecar mode: the PID namespace shared by the pod's containers
//!   (`shareProcessNamespace`), where containerd's runc shim kills every process of the
//!   container's cgroup when the container's first process exits;
//! - host mode: a PID namespace of the container's own, the init its PID 1, run as the
//!   chart runs it (uid 65532, no capabilities, read-only root file system).
//!
//! Each shows: `kill -9` of the agent process keeps the container and its running task,
//! which the restarted agent re-adopts and reports with its real exit code; a container
//! restart (StopContainer, then a new container, as kubelet does it) stops the running
//! task gracefully and the next agent reports the exit its supervisor recorded; the init
//! killed stops everything unrecorded, reported `SupervisorLost`. Nothing runs twice.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::support::agent::{Agent, BIN, free_addr};
use crate::support::containerd::{self, BUSYBOX, KubeletPod, host_binary_mounts};
use crate::support::http;
use crate::support::init::{argv, children_of, oom_score_adj, signal};
use crate::support::wait_for;
use k8s_cri::v1::{
    Capability, ContainerConfig, ContainerMetadata, ContainerState, Int64Value, KeyValue,
    LinuxContainerConfig, LinuxContainerSecurityContext, Mount, NamespaceMode, NamespaceOption,
};
use task_executor::runtime::container::cri::image_spec;

const NS: &str = "tests";
/// Generous: the machine is shared with other builds and tests.
const T: Duration = Duration::from_secs(60);
const AGENT_BIN: &str = "/usr/local/bin/task-executor";
const DATA_DIR: &str = "/var/lib/sandbox/tasks";
/// A hostPath in every container of the pod, for the tasks' go signals and run counts.
const SIGNALS: &str = "/signals";
/// The chart's unprivileged user (host mode).
const NON_ROOT: i64 = 65532;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Sidecar,
    Host,
}

struct PodUnderTest {
    mode: Mode,
    addr: SocketAddr,
    data: PathBuf,
    signals: PathBuf,
    /// Declared before `pod`: dropped first, while the sandbox still holds the processes.
    agent: Agent,
    pod: KubeletPod,
    agent_id: String,
    attempt: u32,
    _dirs: tempfile::TempDir,
}

impl PodUnderTest {
    fn start(mode: Mode) -> PodUnderTest {
        assert!(nix::unistd::geteuid().is_root(), "this test needs root");
        containerd::shared();
        let name = format!("in-pod-{mode:?}-{}", std::process::id()).to_lowercase();
        let pid_mode = match mode {
            Mode::Sidecar => NamespaceMode::Pod,
            Mode::Host => NamespaceMode::Container,
        };
        let pod = KubeletPod::start_with(&name, NS, None, pid_mode);
        let dirs = tempfile::Builder::new()
            .prefix("te-in-pod-")
            .tempdir()
            .unwrap();
        let data = dirs.path().join("data");
        let signals = dirs.path().join("signals");
        for d in [&data, &signals] {
            std::fs::create_dir(d).unwrap();
        }
        std::fs::set_permissions(&signals, std::fs::Permissions::from_mode(0o777)).unwrap();
        if mode == Mode::Host {
            let id = Some(nix::unistd::Uid::from_raw(NON_ROOT as u32));
            let gid = Some(nix::unistd::Gid::from_raw(NON_ROOT as u32));
            nix::unistd::chown(&data, id, gid).unwrap();
        }
        if mode == Mode::Sidecar {
            pod.run_container(main_container(&signals));
        }
        let addr = free_addr();
        let log = pod.log_dir().join("task-executor-0.log");
        let mut p = PodUnderTest {
            mode,
            addr,
            agent: Agent::attached(addr, &data, &log),
            data,
            signals,
            agent_id: String::new(),
            attempt: 0,
            pod,
            _dirs: dirs,
        };
        p.agent_id = p.pod.run_container(p.agent_container());
        p.wait_healthy();
        p
    }

    /// The agent's container as the chart would have it, with the image's entrypoint.
    fn agent_container(&self) -> ContainerConfig {
        let mut env = vec![
            ("LISTEN_ADDR", self.addr.to_string()),
            ("DATA_DIR", DATA_DIR.to_string()),
            ("LOG_LEVEL", "debug".into()),
            ("LOG_FORMAT", "json".into()),
            ("STOP_GRACE_PERIOD", "3s".into()),
        ];
        let mut sc = LinuxContainerSecurityContext {
            readonly_rootfs: true,
            ..Default::default()
        };
        match self.mode {
            Mode::Sidecar => {
                env.push(("ENABLE_SIDECAR_MODE", "true".into()));
                env.push(("MAIN_CONTAINER_NAME", "main".into()));
                sc.namespace_options = Some(namespaces(NamespaceMode::Pod));
                sc.run_as_user = Some(Int64Value { value: 0 });
                sc.capabilities = Some(Capability {
                    add_capabilities: ["SYS_ADMIN", "SYS_PTRACE", "SYS_CHROOT"]
                        .map(String::from)
                        .to_vec(),
                    ..Default::default()
                });
            }
            Mode::Host => {
                sc.namespace_options = Some(namespaces(NamespaceMode::Container));
                sc.run_as_user = Some(Int64Value { value: NON_ROOT });
                sc.run_as_group = Some(Int64Value { value: NON_ROOT });
                sc.no_new_privs = true;
                sc.capabilities = Some(Capability {
                    drop_capabilities: vec!["ALL".into()],
                    ..Default::default()
                });
            }
        }
        let mut mounts = host_binary_mounts(Path::new(BIN), AGENT_BIN);
        mounts.push(rw(&self.data, DATA_DIR));
        mounts.push(rw(&self.signals, SIGNALS));
        ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: "task-executor".into(),
                attempt: self.attempt,
            }),
            image: Some(image_spec(BUSYBOX)),
            // The Dockerfile's ENTRYPOINT, which the chart's `command` repeats.
            command: [AGENT_BIN, "init", "--"].map(String::from).to_vec(),
            envs: env
                .into_iter()
                .map(|(key, value)| KeyValue {
                    key: key.into(),
                    value,
                })
                .collect(),
            mounts,
            labels: HashMap::from([(
                "io.kubernetes.container.name".into(),
                "task-executor".into(),
            )]),
            log_path: format!("task-executor-{}.log", self.attempt),
            linux: Some(LinuxContainerConfig {
                security_context: Some(sc),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// Every attempt's container log, for failure messages.
    fn logs(&self) -> String {
        (0..=self.attempt)
            .map(|n| {
                let path = self.pod.log_dir().join(format!("task-executor-{n}.log"));
                let text = std::fs::read_to_string(path).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                format!(
                    "--- attempt {n} ---\n{}",
                    lines[lines.len().saturating_sub(60)..].join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn wait_healthy(&self) {
        let addr = self.addr;
        let deadline = std::time::Instant::now() + T;
        loop {
            if http::request(addr, "GET", "/health", None).is_ok_and(|r| r.status == 200) {
                return;
            }
            let st = self.pod.container_status(&self.agent_id);
            assert!(
                st.state == ContainerState::ContainerRunning as i32
                    && std::time::Instant::now() < deadline,
                "the agent does not answer (container state {}, exit code {}):\n{}",
                st.state,
                st.exit_code,
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The container's first process (the init), as the host sees it.
    fn init_pid(&self) -> i32 {
        self.pod.container_pid(&self.agent_id)
    }

    /// The agent process under the init: its child that is not the shim server.
    fn agent_pid(&self) -> Option<i32> {
        children_of(self.init_pid())
            .into_iter()
            .find(|(_, argv)| argv.get(1).is_none_or(|a| a != "shim-server"))
            .map(|(p, _)| p)
    }

    /// Kubelet's restart of the container: the old one stopped (or already dead), a new
    /// one created with the next attempt number on the same volumes.
    fn recreate_agent_container(&mut self) {
        self.attempt += 1;
        self.agent.log = self
            .pod
            .log_dir()
            .join(format!("task-executor-{}.log", self.attempt));
        self.agent_id = self.pod.run_container(self.agent_container());
        self.wait_healthy();
    }

    fn wait_exited(&self) -> i32 {
        wait_for(T, "the agent's container to exit", || {
            let st = self.pod.container_status(&self.agent_id);
            (st.state == ContainerState::ContainerExited as i32).then_some(st.exit_code)
        })
    }

    /// A task whose every start appends to `<name>.runs`, which runs `body`.
    fn run_counted(&self, name: &str, body: &str) {
        self.agent
            .run_sh(name, &format!("echo run >> {SIGNALS}/{name}.runs; {body}"));
        self.agent.wait_state(name, "running", T);
    }

    fn runs(&self, name: &str) -> String {
        std::fs::read_to_string(self.signals.join(format!("{name}.runs"))).unwrap_or_default()
    }
}

fn namespaces(pid: NamespaceMode) -> NamespaceOption {
    NamespaceOption {
        network: NamespaceMode::Node as i32,
        pid: pid as i32,
        ipc: NamespaceMode::Pod as i32,
        ..Default::default()
    }
}

fn rw(host: &Path, at: &str) -> Mount {
    Mount {
        container_path: at.into(),
        host_path: host.display().to_string(),
        ..Default::default()
    }
}

/// The sandbox's workload for sidecar mode, found by the agent through its env.
fn main_container(signals: &Path) -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: "main".into(),
            attempt: 0,
        }),
        image: Some(image_spec(BUSYBOX)),
        command: ["sh", "-c", "exec sleep 1000000"]
            .map(String::from)
            .to_vec(),
        envs: vec![KeyValue {
            key: "SANDBOX_MAIN_CONTAINER".into(),
            value: "main".into(),
        }],
        mounts: vec![rw(signals, SIGNALS)],
        labels: HashMap::from([("io.kubernetes.container.name".into(), "main".into())]),
        log_path: "main.log".into(),
        linux: Some(LinuxContainerConfig {
            security_context: Some(LinuxContainerSecurityContext {
                namespace_options: Some(namespaces(NamespaceMode::Pod)),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn agent_crash_and_container_restarts_in_a_pod(mode: Mode) {
    let mut p = PodUnderTest::start(mode);

    // 1. kill -9 of the agent process, not the container's init: same container, the
    //    running task goes on, the next agent re-adopts it and sees its real exit.
    p.run_counted(
        "survivor",
        &format!("while [ ! -e {SIGNALS}/go ]; do sleep 0.05; done; echo finished; exit 7"),
    );
    let started = p.agent.get("survivor").unwrap()["status"]["state"]["running"].clone();
    let init = p.init_pid();
    let agent = wait_for(T, "the agent under the init", || p.agent_pid());
    assert_eq!(argv(agent)[0], AGENT_BIN, "{:?}", argv(agent));
    assert!(!argv(agent).contains(&"init".to_string()));
    assert!(oom_score_adj(agent) > oom_score_adj(init) || oom_score_adj(init) == 1000);
    signal(agent, "KILL");
    wait_for(T, "a new agent in the same container", || {
        let st = p.pod.container_status(&p.agent_id);
        assert_eq!(
            st.state,
            ContainerState::ContainerRunning as i32,
            "the container ended with the agent (exit code {}), and every task with it:\n{}",
            st.exit_code,
            p.logs()
        );
        p.agent_pid().filter(|a| *a != agent)
    });
    p.wait_healthy();
    assert_eq!(
        p.init_pid(),
        init,
        "the container's first process is the same"
    );
    let again = p.agent.wait_state("survivor", "running", T);
    assert_eq!(again, started, "re-adopted, not restarted");
    std::fs::write(p.signals.join("go"), b"").unwrap();
    let t = p.agent.wait_state("survivor", "terminated", T);
    assert_eq!(
        (t["exitCode"].as_i64(), t["reason"].as_str()),
        (Some(7), Some("Failed")),
        "{t}\n{}",
        p.logs()
    );
    assert_eq!(p.agent.stdout("survivor"), "finished\n");

    // 2. The container restarted as kubelet does it (image change, failed liveness probe,
    //    `kill 1`): the init stops the agent, then has the running task stopped gracefully;
    //    the next container's agent reports the exit that was recorded.
    p.run_counted(
        "stopped",
        "trap 'echo got TERM; exit 3' TERM; while true; do sleep 0.05; done",
    );
    p.pod.stop_container(&p.agent_id, Duration::from_secs(30));
    assert_eq!(p.wait_exited(), 0, "the agent's status\n{}", p.logs());
    p.recreate_agent_container();
    let s = p.agent.wait_state("stopped", "terminated", T);
    assert_eq!(
        (s["exitCode"].as_i64(), s["reason"].as_str()),
        (Some(3), Some("Failed")),
        "{s}\n{}",
        p.logs()
    );
    assert!(
        s["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("stopped on request")),
        "{s}"
    );
    assert_eq!(p.agent.stdout("stopped"), "got TERM\n");

    // 3. The init itself killed (as an OOM kill of it would): everything in the container
    //    dies unrecorded; the next agent says so and does not run the task again.
    p.run_counted("lost", "while true; do sleep 0.05; done");
    signal(p.init_pid(), "KILL");
    assert_eq!(p.wait_exited(), 137);
    p.recreate_agent_container();
    let l = p.agent.wait_state("lost", "terminated", T);
    assert_eq!(
        (l["exitCode"].as_i64(), l["reason"].as_str()),
        (Some(137), Some("SupervisorLost")),
        "{l}\n{}",
        p.logs()
    );

    // What ended before a restart keeps its status, and nothing ran twice.
    let t = p.agent.wait_state("survivor", "terminated", T);
    assert_eq!(t["exitCode"], 7);
    assert_eq!(
        p.agent.wait_state("stopped", "terminated", T)["exitCode"],
        3
    );
    for name in ["survivor", "stopped", "lost"] {
        assert_eq!(p.runs(name), "run\n", "{name} ran once");
    }
}

#[test]
fn sidecar_mode_with_a_shared_pid_namespace() {
    agent_crash_and_container_restarts_in_a_pod(Mode::Sidecar);
}

#[test]
fn host_mode_with_the_init_as_pid_1() {
    agent_crash_and_container_restarts_in_a_pod(Mode::Host);
}
