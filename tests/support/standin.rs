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
    /// PID 1 of the stand-in's PID namespace, as the host sees it.
    pub pid: i32,
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
        let script = format!(
            "{join}hostname {hostname} && mount -t tmpfs tmpfs /mnt && mkdir /mnt/only-here && \
             cd /mnt/only-here && \
             exec {user}env {marker}STANDIN_TAG={tag} TARGET_VAR=hello-from-target sleep 100000"
        );
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
        let want = format!("STANDIN_TAG={tag}");
        let pid = wait_for(Duration::from_secs(10), "stand-in main container", || {
            std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
                let pid: i32 = e.file_name().to_str()?.parse().ok()?;
                let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
                env.split(|b| *b == 0)
                    .any(|kv| kv == want.as_bytes())
                    .then_some(pid)
            })
        });
        MainContainer {
            child,
            pid,
            hostname: hostname.to_string(),
        }
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
        let _ = Command::new("kill")
            .args(["-KILL", &self.pid.to_string()])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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
