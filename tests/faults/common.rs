//! What the fault scenarios share: a tmpfs of a given size, a seeded RNG, run markers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A tmpfs mounted on a fresh temp dir, unmounted when dropped.
pub struct Tmpfs {
    pub path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    /// `options` as for `mount -o`, e.g. "size=2m" or "size=16m,nr_inodes=64".
    pub fn mount(options: &str) -> Tmpfs {
        let dir = tempfile::Builder::new()
            .prefix("te-faults-")
            .tempdir()
            .unwrap();
        let path = dir.path().join("data");
        std::fs::create_dir(&path).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(&path)
            .status()
            .expect("mount (the fault tests run as root)");
        assert!(st.success(), "mount -t tmpfs -o {options} failed");
        Tmpfs { path, _dir: dir }
    }

    /// Free bytes, as statvfs reports them to unprivileged writers.
    pub fn free_bytes(&self) -> u64 {
        let st = nix::sys::statvfs::statvfs(&self.path).unwrap();
        st.blocks_available() as u64 * st.fragment_size() as u64
    }

    pub fn free_inodes(&self) -> u64 {
        nix::sys::statvfs::statvfs(&self.path)
            .unwrap()
            .files_available() as u64
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        super::support::agent::kill_leftover_shims(&self.path);
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// xorshift64*: enough randomness for choosing moments and victims, reproducible by seed.
pub struct Rng(u64);

impl Rng {
    /// From `FAULTS_SEED`, else from the clock; printed either way.
    pub fn from_env(scenario: &str) -> Rng {
        let seed = std::env::var("FAULTS_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        eprintln!("{scenario}: seed {seed} (replay with FAULTS_SEED={seed})");
        Rng(seed.max(1))
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `lo..hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo).max(1)
    }
}

/// A shell script that records that the task ran (its name, one line per run) in a file
/// outside the data dir, then does `rest`.
pub fn marking(markers: &Path, rest: &str) -> String {
    format!(
        "echo \"$TASK_EXECUTOR_TASK\" >> {}; {rest}",
        markers.display()
    )
}

/// How many times each task ran, from the markers file.
pub fn runs(markers: &Path) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for line in std::fs::read_to_string(markers).unwrap_or_default().lines() {
        *out.entry(line.to_string()).or_default() += 1;
    }
    out
}

/// The agent's child running `shim-server`.
pub fn shim_server(agent: i32) -> Option<i32> {
    task_executor::sys::procfs::pids().into_iter().find(|pid| {
        let ppid = task_executor::sys::procfs::stat(*pid).map(|s| s.ppid);
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        ppid == Some(agent) && cmd.ends_with(b"shim-server\0")
    })
}
