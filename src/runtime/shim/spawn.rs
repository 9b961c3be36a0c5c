//! Starting a host task with `posix_spawn`.
//!
//! glibc implements it with a vfork-like clone: the child shares the shim's memory until
//! it execs, so no page tables are copied and neither side then faults on every page it
//! writes, which a fork would cost each task. std's `Command` would take the same path but
//! leaves the signal mask as the shim has it (signals blocked for its signalfd), so the
//! attributes are set here: empty mask, every signal back to its default action, and a
//! process group of the task's own.
//!
//! What the child would otherwise do between fork and exec happens in the shim or in the
//! attributes: the working directory is the shim's own (it changes into it first), the
//! program is looked up in the task's `PATH`, stdio are dup2 file actions.

use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::io::{self, PipeWriter};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::spawn::{PosixSpawnAttr, PosixSpawnFileActions, PosixSpawnFlags, posix_spawn};
use nix::sys::signal::SigSet;
use nix::unistd::Pid;

use crate::task::model::EnvVar;

/// The search path execvp uses when `PATH` is unset.
const DEFAULT_PATH: &str = "/bin:/usr/bin";

/// Starts `argv` with the shim's environment overlaid with `overlay`, stdin from
/// /dev/null and stdout/stderr into the given pipes. The caller has already changed into
/// the task's working directory.
pub fn spawn(
    argv: &[String],
    overlay: &[EnvVar],
    stdout: &PipeWriter,
    stderr: &PipeWriter,
) -> io::Result<Pid> {
    let env = environment(std::env::vars_os(), overlay);
    let program = resolve(&argv[0], path_of(&env).as_deref())?;
    let args = argv
        .iter()
        .map(|a| cstring(a.as_bytes()))
        .collect::<io::Result<Vec<_>>>()?;
    let envp = env
        .iter()
        .map(|(k, v)| cstring(&[k.as_bytes(), b"=", v.as_bytes()].concat()))
        .collect::<io::Result<Vec<_>>>()?;

    let null: OwnedFd = File::open("/dev/null")?.into();
    let mut actions = PosixSpawnFileActions::init()?;
    actions.add_dup2(null.as_raw_fd(), 0)?;
    actions.add_dup2(stdout.as_raw_fd(), 1)?;
    actions.add_dup2(stderr.as_raw_fd(), 2)?;

    let mut attr = PosixSpawnAttr::init()?;
    attr.set_sigmask(&SigSet::empty())?;
    attr.set_sigdefault(&SigSet::all())?;
    attr.set_pgroup(Pid::from_raw(0))?;
    attr.set_flags(
        PosixSpawnFlags::POSIX_SPAWN_SETSIGMASK
            | PosixSpawnFlags::POSIX_SPAWN_SETSIGDEF
            | PosixSpawnFlags::POSIX_SPAWN_SETPGROUP,
    )?;
    Ok(posix_spawn(
        program.as_os_str(),
        &actions,
        &attr,
        &args,
        &envp,
    )?)
}

/// `base` with each of `overlay`'s variables replacing or adding to it, in order.
fn environment(
    base: impl Iterator<Item = (OsString, OsString)>,
    overlay: &[EnvVar],
) -> Vec<(OsString, OsString)> {
    let mut env: Vec<(OsString, OsString)> = base.collect();
    for e in overlay {
        env.retain(|(k, _)| k.as_bytes() != e.name.as_bytes());
        env.push((e.name.clone().into(), e.value.clone().into()));
    }
    env
}

fn path_of(env: &[(OsString, OsString)]) -> Option<OsString> {
    env.iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.clone())
}

/// Where execvp would find `program`: itself when it names a path, else the first
/// executable file of that name in the task's `PATH`. Not found is ENOENT (exit 127, as
/// shells report it); found but never executable is EACCES (126).
fn resolve(program: &str, path: Option<&OsStr>) -> io::Result<PathBuf> {
    if program.is_empty() {
        return Err(Errno::ENOENT.into());
    }
    if program.contains('/') {
        return Ok(PathBuf::from(program));
    }
    let path = path.unwrap_or(OsStr::new(DEFAULT_PATH));
    let mut denied = false;
    for dir in path.as_bytes().split(|b| *b == b':') {
        // An empty entry is the current directory, as for execvp.
        let dir = if dir.is_empty() { b"." as &[u8] } else { dir };
        let candidate = Path::new(OsStr::from_bytes(dir)).join(program);
        match std::fs::metadata(&candidate) {
            Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => return Ok(candidate),
            Ok(m) if m.is_file() => denied = true,
            _ => {}
        }
    }
    Err(if denied { Errno::EACCES } else { Errno::ENOENT }.into())
}

fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes.to_vec()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "an argument or environment variable contains a NUL byte",
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn var(name: &str, value: &str) -> EnvVar {
        EnvVar {
            name: name.into(),
            value: value.into(),
        }
    }

    #[test]
    fn overlay_replaces_and_adds_variables() {
        let base = [("A", "1"), ("B", "2")].map(|(k, v)| (OsString::from(k), OsString::from(v)));
        let env = environment(base.into_iter(), &[var("B", "x"), var("C", "3")]);
        let pairs: Vec<(String, String)> = env
            .into_iter()
            .map(|(k, v)| (k.into_string().unwrap(), v.into_string().unwrap()))
            .collect();
        assert_eq!(
            pairs,
            [("A", "1"), ("B", "x"), ("C", "3")].map(|(k, v)| (k.to_string(), v.to_string()))
        );
    }

    #[test]
    fn programs_are_looked_up_like_execvp() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("tool");
        std::fs::write(&exe, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let plain = dir.path().join("data");
        std::fs::write(&plain, "").unwrap();
        let path = OsString::from(format!("/nonexistent:{}", dir.path().display()));

        assert_eq!(resolve("tool", Some(&path)).unwrap(), exe);
        assert_eq!(resolve("./x", Some(&path)).unwrap(), PathBuf::from("./x"));
        let code = |p: &str| resolve(p, Some(&path)).unwrap_err().raw_os_error();
        assert_eq!(code("data"), Some(libc_errno(Errno::EACCES)));
        assert_eq!(code("missing"), Some(libc_errno(Errno::ENOENT)));
        assert_eq!(code(""), Some(libc_errno(Errno::ENOENT)));
        assert!(resolve("sh", None).is_ok(), "default search path");
    }

    fn libc_errno(e: Errno) -> i32 {
        e as i32
    }
}
