//! An agent that can run nothing: for fuzzing its API, which means running arbitrary
//! commands as root. It runs in fresh mount and PID namespaces (util-linux `unshare`),
//! chrooted into a private tmpfs that holds only its own binary (under a random
//! directory), the shared libraries that binary needs, `/proc`, `/dev/null` and its data
//! dir, with an empty environment. Any command a task names is absent (a ProcessStartFailed), the
//! task sees none of the host's processes or files, and everything is gone when the
//! namespaces end (killing `unshare` kills the PID namespace's init, the agent, and with
//! it every process in it).

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::agent::{BIN, free_addr};
use super::http;
use super::wait_for;

pub struct JailedAgent {
    child: Child,
    pub addr: SocketAddr,
    pub log: std::path::PathBuf,
    _tmp: tempfile::TempDir,
}

/// Absolute paths of the shared libraries `bin` loads (with the loader), per `ldd`.
fn libraries(bin: &str) -> Vec<String> {
    let out = Command::new("ldd").arg(bin).output().expect("ldd");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
        .map(str::to_string)
        .collect()
}

impl JailedAgent {
    pub fn start(args: &[&str]) -> JailedAgent {
        let tmp = tempfile::Builder::new()
            .prefix("te-jail-")
            .tempdir()
            .expect("tempdir");
        let root = tmp.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let log = tmp.path().join("agent.log");
        let addr = free_addr();
        let hidden = format!("/opt-{:x}", std::process::id() ^ 0x5a5a_5a5a);
        let mut script = format!(
            "set -e; R={root}; mount -t tmpfs -o size=256m,mode=755 tmpfs \"$R\"; \
             mkdir -p \"$R/proc\" \"$R/dev\" \"$R/data\" \"$R{hidden}\"; \
             cp {BIN} \"$R{hidden}/task-executor\"; \
             touch \"$R/dev/null\" && mount --bind /dev/null \"$R/dev/null\"; ",
            root = root.display()
        );
        for lib in libraries(BIN) {
            script.push_str(&format!(
                "mkdir -p \"$R$(dirname {lib})\"; cp -L {lib} \"$R{lib}\"; "
            ));
        }
        script.push_str(&format!(
            "mount -t proc proc \"$R/proc\"; \
             C=$(command -v chroot); exec env -i LOG_LEVEL=debug \"$C\" \"$R\" {hidden}/task-executor \
             --data-dir /data --listen-addr {addr} {}",
            args.join(" ")
        ));
        let logf = std::fs::File::create(&log).unwrap();
        let child = Command::new("unshare")
            .args([
                "--mount",
                "--pid",
                "--fork",
                "--kill-child",
                "sh",
                "-c",
                &script,
            ])
            .stdin(Stdio::null())
            .stdout(logf.try_clone().unwrap())
            .stderr(logf)
            .spawn()
            .expect("unshare (util-linux) must be installed and the tests run as root");
        let mut jailed = JailedAgent {
            child,
            addr,
            log,
            _tmp: tmp,
        };
        wait_for(Duration::from_secs(30), "jailed agent /health", || {
            if let Ok(Some(st)) = jailed.child.try_wait() {
                panic!("jailed agent exited with {st}: {}", jailed.log_text());
            }
            http::request(addr, "GET", "/health", None)
                .ok()
                .filter(|r| r.status == 200)
        });
        jailed
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for JailedAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
