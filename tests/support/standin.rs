//! A stand-in for a pod's main container: a process in fresh PID, mount, UTS, IPC and
//! network namespaces (via util-linux `unshare`, as root), with its own hostname, a
//! directory that exists only in its mount namespace, and upstream's marker env var.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::wait_for;

pub struct MainContainer {
    child: Child,
    /// PID 1 of the stand-in's PID namespace, as the host sees it.
    pub pid: i32,
    pub hostname: String,
}

impl MainContainer {
    /// `name` goes into SANDBOX_MAIN_CONTAINER, so tests running in parallel don't collide.
    pub fn start(name: &str, hostname: &str) -> MainContainer {
        Self::start_as(name, hostname, None, None)
    }

    /// Like `start`, with the container's PID 1 running as `uid` (gid the same) and moved
    /// into the cgroup whose `cgroup.procs` file is `cgroup_procs`.
    pub fn start_as(
        name: &str,
        hostname: &str,
        uid: Option<u32>,
        cgroup_procs: Option<&std::path::Path>,
    ) -> MainContainer {
        let join = cgroup_procs
            .map(|p| format!("echo 0 > {} && ", p.display()))
            .unwrap_or_default();
        let user = uid
            .map(|u| format!("setpriv --reuid={u} --regid={u} --clear-groups "))
            .unwrap_or_default();
        let script = format!(
            "{join}hostname {hostname} && mount -t tmpfs tmpfs /mnt && mkdir /mnt/only-here && \
             exec {user}env SANDBOX_MAIN_CONTAINER={name} TARGET_VAR=hello-from-target sleep 100000"
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
        let marker = format!("SANDBOX_MAIN_CONTAINER={name}");
        let pid = wait_for(Duration::from_secs(10), "stand-in main container", || {
            std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
                let pid: i32 = e.file_name().to_str()?.parse().ok()?;
                let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
                env.split(|b| *b == 0)
                    .any(|kv| kv == marker.as_bytes())
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
