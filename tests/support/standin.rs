//! A stand-in for a pod's main container: a process in fresh PID, mount, UTS, IPC and
//! network namespaces (via util-linux `unshare`, as root), with its own hostname and a
//! directory that exists only in its mount namespace (its working directory); optionally
//! upstream's marker env var, another uid and groups, and a cgroup of its own.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use super::wait_for;

pub struct MainContainer {
    child: Child,
    /// The container's process (PID 1 of the stand-in's PID namespace unless the options
    /// ask for an `init` of its own), as the host sees it.
    pub pid: i32,
    /// The PID namespace's init when it is not the container's process.
    init: Option<i32>,
    pub hostname: String,
}

/// How a stand-in is set up beyond its hostname.
#[derive(Default)]
pub struct Options<'a> {
    /// The value of SANDBOX_MAIN_CONTAINER (upstream's lookup); none: findable only
    /// through the Pod.
    pub marker: Option<&'a str>,
    /// Run PID 1 as this uid (and gid), with these supplementary groups.
    pub uid: Option<u32>,
    pub groups: &'a [u32],
    /// More `setpriv` options for PID 1 (with `uid`), e.g. capability sets.
    pub setpriv: &'a str,
    /// Put PID 1 into this cgroup.
    pub cgroup: Option<&'a TestCgroup>,
    /// The container's process is not its PID namespace's init but a child of another
    /// (as in a pod with `shareProcessNamespace`, where the pause process is PID 1): when
    /// it dies, the PID namespace and what else runs in it live on.
    pub shared_pid_namespace: bool,
    /// And into these (other hierarchies).
    pub more_cgroups: &'a [&'a TestCgroup],
}

impl MainContainer {
    /// `name` goes into SANDBOX_MAIN_CONTAINER, so tests running in parallel don't collide.
    pub fn start(name: &str, hostname: &str) -> MainContainer {
        Self::start_with(
            hostname,
            Options {
                marker: Some(name),
                ..Default::default()
            },
        )
    }

    pub fn start_with(hostname: &str, opts: Options<'_>) -> MainContainer {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        // Finds our PID 1 among all processes, whatever else the options say.
        let tag = format!(
            "{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let join: String = opts
            .cgroup
            .iter()
            .chain(opts.more_cgroups)
            .map(|c| format!("echo 0 > {} && ", c.procs().display()))
            .collect();
        let groups = if opts.groups.is_empty() {
            "--clear-groups".to_string()
        } else {
            let list: Vec<String> = opts.groups.iter().map(u32::to_string).collect();
            format!("--groups={}", list.join(","))
        };
        let user = opts
            .uid
            .map(|u| format!("setpriv --reuid={u} --regid={u} {groups} {} ", opts.setpriv))
            .unwrap_or_default();
        let marker = opts
            .marker
            .map(|m| format!("SANDBOX_MAIN_CONTAINER={m} "))
            .unwrap_or_default();
        let container = format!(
            "exec {user}env {marker}STANDIN_TAG={tag} TARGET_VAR=hello-from-target sleep 100000"
        );
        let script = if opts.shared_pid_namespace {
            format!(
                "hostname {hostname} && mount -t tmpfs tmpfs /mnt && mkdir /mnt/only-here && \
                 cd /mnt/only-here && {{ {join}{container} & }} && exec env STANDIN_INIT={tag} sleep 100000"
            )
        } else {
            format!(
                "{join}hostname {hostname} && mount -t tmpfs tmpfs /mnt && mkdir /mnt/only-here && \
                 cd /mnt/only-here && {container}"
            )
        };
        let child = Command::new("unshare")
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
            .spawn()
            .expect("unshare (util-linux) must be installed and the tests run as root");
        let pid = find_by_env(&format!("STANDIN_TAG={tag}"), "stand-in main container");
        let init = opts
            .shared_pid_namespace
            .then(|| find_by_env(&format!("STANDIN_INIT={tag}"), "stand-in init"));
        MainContainer {
            child,
            pid,
            init,
            hostname: hostname.to_string(),
        }
    }

    /// Ends the container's process only (its PID namespace lives on with an init of its
    /// own, see `Options::shared_pid_namespace`).
    pub fn kill_process(&self) {
        let _ = Command::new("kill")
            .args(["-KILL", &self.pid.to_string()])
            .status();
    }

    /// The namespace link (e.g. "uts:[4026532123]") of the stand-in.
    pub fn ns(&self, kind: &str) -> String {
        std::fs::read_link(format!("/proc/{}/ns/{kind}", self.pid))
            .unwrap()
            .to_string_lossy()
            .into_owned()
    }

    pub fn alive(&self) -> bool {
        super::pid_alive(self.pid)
    }

    /// Ends the container: its PID 1 dies, and the kernel kills its whole PID namespace.
    pub fn stop(&mut self) {
        for pid in std::iter::once(self.pid).chain(self.init) {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The process whose environment holds `entry`.
fn find_by_env(entry: &str, what: &str) -> i32 {
    wait_for(Duration::from_secs(10), what, || {
        std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
            env.split(|b| *b == 0)
                .any(|kv| kv == entry.as_bytes())
                .then_some(pid)
        })
    })
}

impl Drop for MainContainer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A cgroup in the v1 `pids` hierarchy (mounted on every machine of this kind) or in the
/// v2 hierarchy (mounted beside the v1 ones, at /sys/fs/cgroup/unified), removed once
/// empty when dropped.
pub struct TestCgroup(PathBuf);

impl TestCgroup {
    pub fn new(name: &str) -> TestCgroup {
        Self::create(Path::new("/sys/fs/cgroup/pids").join(name))
    }

    pub fn new_v2(name: &str) -> TestCgroup {
        Self::create(Path::new("/sys/fs/cgroup/unified").join(name))
    }

    fn create(dir: PathBuf) -> TestCgroup {
        std::fs::create_dir(&dir)
            .expect("create a test cgroup (needs root and the pids and v2 hierarchies)");
        TestCgroup(dir)
    }

    pub fn dir(&self) -> &Path {
        &self.0
    }

    pub fn procs(&self) -> PathBuf {
        self.0.join("cgroup.procs")
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        for _ in 0..100 {
            if std::fs::remove_dir(&self.0).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("could not remove {}", self.0.display());
    }
}
