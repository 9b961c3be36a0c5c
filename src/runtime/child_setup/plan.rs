//! What a task's process is started with (`ExecPlan`), prepared by the caller before the
//! clone, and how its start can fail.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

/// Where a task's process starts.
pub enum Cwd {
    /// The caller's own working directory.
    Inherit,
    /// A path, resolved by the child (inside the main container for sidecar tasks).
    Path(CString),
    /// An open directory (the main container's working directory).
    Fd(OwnedFd),
}

/// The identity a task's process takes before exec.
#[derive(Clone, Debug, PartialEq)]
pub struct Creds {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups, exactly (empty: none).
    pub groups: Vec<u32>,
    /// Capability sets to take with the ids (a sidecar task takes the main container's);
    /// `None`: what the kernel leaves after the id change (none for a non-root uid).
    pub caps: Option<CapSets>,
}

pub use crate::sys::procfs::CapSets;

/// Everything a task's process needs up to its exec, prepared by the caller: the child
/// only makes system calls on it, and allocates nothing.
pub struct ExecPlan {
    /// Paths to try in order: execvp's search, done by the child after it changed its
    /// directory and identity, so relative entries and permissions are the task's.
    pub(super) programs: Vec<CString>,
    pub(super) argv: Vec<CString>,
    pub(super) envp: Vec<CString>,
    pub(super) cwd: Cwd,
    pub(super) creds: Option<Creds>,
    /// Set `no_new_privs` before exec: setuid binaries and file capabilities grant
    /// nothing.
    pub(super) no_new_privs: bool,
    /// Seccomp filters installed just before exec, in order (see `shim::seccomp`).
    pub(super) seccomp: Vec<seccompiler::BpfProgram>,
    /// `RLIMIT_NPROC` (soft and hard), set before the identity change: the most processes
    /// (threads) the uid it takes may have.
    pub(super) nproc: Option<u64>,
}

/// The step at which a task's process could not be started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Changing into the working directory.
    WorkingDir,
    /// Process group, stdio, signals.
    Setup,
    /// Taking the task's identity (ids, groups, capabilities, `no_new_privs`).
    Identity,
    /// The program itself (not found: ENOENT, not executable: EACCES, ...).
    Exec,
    /// Creating the process.
    Clone,
}

#[derive(Debug)]
pub struct SpawnError {
    pub step: Step,
    pub error: io::Error,
}

impl ExecPlan {
    /// `program` is either a path (tried as is) or a name looked up in `search_path`
    /// (the task's PATH, colon-separated; empty entries are the working directory).
    pub fn new(
        program: &[u8],
        search_path: &[u8],
        argv: Vec<CString>,
        envp: Vec<CString>,
        cwd: Cwd,
        creds: Option<Creds>,
        no_new_privs: bool,
    ) -> io::Result<ExecPlan> {
        let nul = |_| io::Error::new(io::ErrorKind::InvalidInput, "a path contains a NUL byte");
        let programs = if program.is_empty() {
            Vec::new() // like execvp: ENOENT
        } else if program.contains(&b'/') {
            vec![CString::new(program).map_err(nul)?]
        } else {
            search_path
                .split(|b| *b == b':')
                .map(|dir| {
                    let mut p = if dir.is_empty() {
                        b".".to_vec()
                    } else {
                        dir.to_vec()
                    };
                    p.push(b'/');
                    p.extend_from_slice(program);
                    CString::new(p).map_err(nul)
                })
                .collect::<io::Result<_>>()?
        };
        Ok(ExecPlan {
            programs,
            argv,
            envp,
            cwd,
            creds,
            no_new_privs,
            seccomp: Vec::new(),
            nproc: None,
        })
    }

    /// Limits the processes of the uid the plan runs as (`RLIMIT_NPROC`, soft and hard).
    pub fn with_nproc(mut self, nproc: Option<u64>) -> Self {
        self.nproc = nproc;
        self
    }

    /// Installs these seccomp filters just before exec (needs `no_new_privs`).
    pub fn with_seccomp(mut self, filters: Vec<seccompiler::BpfProgram>) -> Self {
        self.seccomp = filters;
        self
    }
}

impl ExecPlan {
    /// Descriptors the plan holds (a working directory), which a process that keeps the
    /// plan must keep open.
    pub fn fds(&self) -> Vec<RawFd> {
        match &self.cwd {
            Cwd::Fd(fd) => vec![fd.as_raw_fd()],
            _ => Vec::new(),
        }
    }
}
