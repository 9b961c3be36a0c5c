//! Starting the agent and the shim server from the init.
//!
//! The init blocks every signal (it reads them from a signalfd), and a child inherits the
//! mask and std's `Command` leaves it as it is. So children are started with
//! `posix_spawn` and attributes that give them an empty mask and every signal's default
//! action (whatever the init's own parent left ignored), in a process group of their own,
//! so that a terminal's ^C reaches only the init, which forwards it.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::spawn::{PosixSpawnAttr, PosixSpawnFileActions, PosixSpawnFlags, posix_spawn};
use nix::sys::signal::SigSet;
use nix::unistd::Pid;

/// What a child gets on stdin.
pub enum Stdin<'a> {
    Null,
    Fd(&'a OwnedFd),
}

/// Starts `exe` with `args`, the init's environment plus `env`, stdin as given, stdout
/// /dev/null when `quiet` (else the init's), stderr the init's.
pub fn start_child(
    exe: &Path,
    args: &[OsString],
    env: &[(&str, &str)],
    stdin: Stdin<'_>,
    quiet: bool,
) -> io::Result<Pid> {
    let argv = std::iter::once(exe.as_os_str())
        .chain(args.iter().map(OsString::as_os_str))
        .map(|a| cstring(a.as_bytes()))
        .collect::<io::Result<Vec<_>>>()?;
    let mut vars: Vec<(OsString, OsString)> = std::env::vars_os()
        .filter(|(k, _)| !env.iter().any(|(name, _)| k == OsStr::new(name)))
        .collect();
    vars.extend(env.iter().map(|(k, v)| (k.into(), v.into())));
    let envp = vars
        .iter()
        .map(|(k, v)| cstring(&[k.as_bytes(), b"=", v.as_bytes()].concat()))
        .collect::<io::Result<Vec<_>>>()?;

    let null: OwnedFd = std::fs::File::options()
        .read(true)
        .write(true)
        .open("/dev/null")?
        .into();
    let mut actions = PosixSpawnFileActions::init()?;
    match stdin {
        Stdin::Null => actions.add_dup2(null.as_raw_fd(), 0)?,
        Stdin::Fd(fd) => actions.add_dup2(fd.as_raw_fd(), 0)?,
    }
    if quiet {
        actions.add_dup2(null.as_raw_fd(), 1)?;
    }
    let mut attr = PosixSpawnAttr::init()?;
    attr.set_sigmask(&SigSet::empty())?;
    attr.set_sigdefault(&SigSet::all())?;
    attr.set_pgroup(Pid::from_raw(0))?;
    attr.set_flags(
        PosixSpawnFlags::POSIX_SPAWN_SETSIGMASK
            | PosixSpawnFlags::POSIX_SPAWN_SETSIGDEF
            | PosixSpawnFlags::POSIX_SPAWN_SETPGROUP,
    )?;
    Ok(posix_spawn(exe.as_os_str(), &actions, &attr, &argv, &envp)?)
}

fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes.to_vec()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "an argument or environment variable contains a NUL byte",
        )
    })
}
