//! Turning a command of the task into an `ExecPlan` (`child_setup::fork_exec` starts it): its
//! argv, its environment (a base overlaid with the task's variables), its program search
//! (the task's `PATH`), working directory and identity.
//!
//! The same plan is started in one of two places (see `place`): by the shim itself (host
//! tasks) or by the task's reaper inside the main container (sidecar tasks).

use std::collections::{HashMap, HashSet};
use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::sync::OnceLock;

use crate::runtime::child_setup::{Creds, Cwd, ExecPlan};
use crate::runtime::journal::Launch;
use crate::task::model::EnvVar;

/// The search path execvp uses when `PATH` is unset.
const DEFAULT_PATH: &[u8] = b"/bin:/usr/bin";

/// `base` with each of `overlay`'s variables replacing or adding to it, in order (a name
/// set twice keeps its last value). Linear in both sizes: a task may carry 100,000.
pub fn environment(
    base: impl Iterator<Item = (OsString, OsString)>,
    overlay: &[EnvVar],
) -> Vec<(OsString, OsString)> {
    let last: HashMap<&str, usize> = overlay
        .iter()
        .enumerate()
        .map(|(i, e)| (e.name.as_str(), i))
        .collect();
    let replaced: HashSet<&[u8]> = last.keys().map(|k| k.as_bytes()).collect();
    let mut env: Vec<(OsString, OsString)> = base
        .filter(|(k, _)| !replaced.contains(k.as_bytes()))
        .collect();
    env.extend(
        overlay
            .iter()
            .enumerate()
            .filter(|(i, e)| last.get(e.name.as_str()) == Some(i))
            .map(|(_, e)| (e.name.clone().into(), e.value.clone().into())),
    );
    env
}

/// Who a task's processes run as: every command the shim starts for a task takes it.
#[derive(Clone, Debug, PartialEq)]
pub struct Identity {
    /// `None`: the shim's own ids and capabilities.
    pub creds: Option<Creds>,
    pub no_new_privs: bool,
    /// Under the `RuntimeDefault` seccomp filter (`shim::seccomp`).
    pub seccomp: bool,
    /// `RLIMIT_NPROC` of the task's own uid (its pids limit without a pids cgroup).
    pub nproc: Option<u64>,
}

impl Identity {
    /// The identity of a task launched as `launch` says, over `base`: the main
    /// container's identity for a sidecar task (its groups and capabilities are kept), or
    /// `None` (the shim's own; a changed uid or gid then has no supplementary groups and
    /// whatever capabilities the kernel leaves it).
    pub fn of(launch: &Launch, base: Option<Creds>) -> Identity {
        let no_new_privs = !launch.allow_privilege_escalation;
        let creds = match base {
            Some(base) => {
                let (uid, gid) = launch.run_as.apply(base.uid, base.gid);
                Some(Creds { uid, gid, ..base })
            }
            None if launch.host_run_as.overlaid(launch.run_as).is_empty() => None,
            None => {
                let own = (
                    nix::unistd::geteuid().as_raw(),
                    nix::unistd::getegid().as_raw(),
                );
                let run_as = launch.host_run_as.overlaid(launch.run_as);
                let (uid, gid) = run_as.apply(own.0, own.1);
                Some(Creds {
                    uid,
                    gid,
                    groups: Vec::new(),
                    caps: None,
                })
            }
        };
        Identity {
            creds,
            no_new_privs,
            seccomp: launch.seccomp,
            nproc: None,
        }
    }
}

/// Names of the agent's own variables (what its flags read, internal ones, credentials'
/// locations): a host task inherits the agent's environment without them. Set once by
/// the shim server (the list comes from the agent's configuration), inherited by shims.
static AGENT_ONLY_ENV: OnceLock<HashSet<OsString>> = OnceLock::new();

/// Keeps `names` out of host tasks' environments (first call wins).
pub fn hide_from_tasks(names: impl IntoIterator<Item = String>) {
    let _ = AGENT_ONLY_ENV.set(names.into_iter().map(OsString::from).collect());
}

/// The environment a host task starts from: the shim's (the agent's), without the agent's
/// own variables.
pub fn host_base_env() -> impl Iterator<Item = (OsString, OsString)> {
    let hidden = AGENT_ONLY_ENV.get();
    std::env::vars_os().filter(move |(k, _)| hidden.is_none_or(|h| !h.contains(k)))
}

/// The plan for `argv` with environment `env`, looked up in its `PATH` as execvp would.
pub fn plan(
    argv: &[String],
    env: &[(OsString, OsString)],
    cwd: Cwd,
    identity: &Identity,
) -> io::Result<ExecPlan> {
    let path = env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_bytes())
        .unwrap_or(DEFAULT_PATH);
    let args = argv
        .iter()
        .map(|a| cstring(a.as_bytes()))
        .collect::<io::Result<Vec<_>>>()?;
    let envp = env
        .iter()
        .map(|(k, v)| {
            let mut kv = Vec::with_capacity(k.len() + v.len() + 1);
            kv.extend_from_slice(k.as_bytes());
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            cstring(&kv)
        })
        .collect::<io::Result<Vec<_>>>()?;
    let program = argv.first().map(String::as_bytes).unwrap_or_default();
    let plan = ExecPlan::new(
        program,
        path,
        args,
        envp,
        cwd,
        identity.creds.clone(),
        identity.no_new_privs,
    )?
    .with_nproc(identity.nproc);
    Ok(match identity.seccomp {
        true => plan.with_seccomp(super::seccomp::runtime_default()?),
        false => plan,
    })
}

/// A working directory as the task gave it, if it gave one.
pub fn working_dir(dir: Option<&str>) -> io::Result<Option<Cwd>> {
    dir.filter(|d| !d.is_empty())
        .map(|d| cstring(OsStr::new(d).as_bytes()).map(Cwd::Path))
        .transpose()
}

fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "an argument or environment variable contains a NUL byte",
        )
    })
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;
    use std::time::Instant;

    use super::*;
    use crate::runtime::child_setup::{Step, fork_exec};

    fn var(name: &str, value: &str) -> EnvVar {
        EnvVar {
            name: name.into(),
            value: value.into(),
        }
    }

    fn pairs(env: Vec<(OsString, OsString)>) -> Vec<(String, String)> {
        env.into_iter()
            .map(|(k, v)| (k.into_string().unwrap(), v.into_string().unwrap()))
            .collect()
    }

    #[test]
    fn overlay_replaces_and_adds_variables() {
        let base = [("A", "1"), ("B", "2")].map(|(k, v)| (OsString::from(k), OsString::from(v)));
        let env = environment(
            base.into_iter(),
            &[var("B", "x"), var("C", "3"), var("A", "y"), var("C", "4")],
        );
        assert_eq!(
            pairs(env),
            [("B", "x"), ("A", "y"), ("C", "4")].map(|(k, v)| (k.to_string(), v.to_string()))
        );
    }

    #[test]
    fn overlaying_many_variables_is_linear() {
        let base = (0..100_000).map(|i| (OsString::from(format!("B{i}")), OsString::from("b")));
        let overlay: Vec<EnvVar> = (0..100_000).map(|i| var(&format!("V{i}"), "v")).collect();
        let t = Instant::now();
        let env = environment(base, &overlay);
        let took = t.elapsed();
        assert_eq!(env.len(), 200_000);
        println!("100,000 + 100,000 variables overlaid in {took:?}");
    }

    /// Spawns `argv` with the given PATH and returns the error step and errno, if any.
    fn try_spawn(argv: &[&str], path: &str) -> Result<(), (Step, i32)> {
        let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
        let env = vec![(OsString::from("PATH"), OsString::from(path))];
        let keep = Identity {
            creds: None,
            no_new_privs: false,
            seccomp: false,
            nproc: None,
        };
        let plan = plan(&argv, &env, Cwd::Inherit, &keep).unwrap();
        let null = std::fs::File::open("/dev/null").unwrap();
        let (a, b, c) = (
            null.try_clone().unwrap(),
            null.try_clone().unwrap(),
            null.try_clone().unwrap(),
        );
        match fork_exec(&plan, [a.as_fd(), b.as_fd(), c.as_fd()], None) {
            Ok(pid) => {
                nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None).unwrap();
                Ok(())
            }
            Err(e) => Err((e.step, e.error.raw_os_error().unwrap())),
        }
    }

    #[test]
    fn programs_are_looked_up_like_execvp() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("tool");
        std::fs::write(&exe, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(dir.path().join("data"), "").unwrap();
        let path = format!("/nonexistent:{}", dir.path().display());

        assert_eq!(try_spawn(&["tool"], &path), Ok(()));
        assert_eq!(try_spawn(&["true"], "/usr/bin:/bin"), Ok(()));
        assert_eq!(try_spawn(&["data"], &path), Err((Step::Exec, libc::EACCES)));
        assert_eq!(
            try_spawn(&["missing"], &path),
            Err((Step::Exec, libc::ENOENT))
        );
        assert_eq!(
            try_spawn(&["true"], "/nonexistent"),
            Err((Step::Exec, libc::ENOENT))
        );
    }
}
