//! `--sidecar-join-cgroup`: moving a sidecar task's reaper (and so the task) into the main
//! container's cgroups, done by the reaper before it enters the container's namespaces.
//!
//! The paths in /proc/PID/cgroup are relative to the *reader's* cgroup namespace (a
//! sibling container's cgroup reads `/../<id>`), and a cgroup file system mount shows the
//! tree from the root of the namespace it was mounted in. So the path is read and the file
//! system mounted in one and the same cgroup namespace, which makes the two agree by
//! construction: a fresh, detached mount (`fsopen`/`fsmount`, never attached anywhere) of
//! each hierarchy, opened at the path read in that namespace.
//!
//! The namespace is the agent's own when it sees the target's cgroups (host cgroup
//! namespace: cgroup v1, or a privileged container on v2), else the target's. The kernel
//! then has the last word: on cgroup v2 mounted with `nsdelegate` (systemd hosts) a
//! process can only be moved between cgroups its namespace sees both of, so a task from a
//! sidecar with a private cgroup namespace can't join at all. Every failure is reported
//! as the task's start error; nothing is silently skipped.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use nix::sched::{CloneFlags, setns};
use rustix::fs::{Mode, OFlags, openat};
use rustix::mount::{
    FsMountFlags, FsOpenFlags, MountAttrFlags, fsconfig_create, fsconfig_set_flag,
    fsconfig_set_string, fsmount, fsopen,
};

/// One line of /proc/PID/cgroup: a hierarchy and the cgroup's path in it.
#[derive(Debug, PartialEq)]
struct Membership {
    /// v1 controllers ("cpu,cpuacct", "name=systemd"); empty for the v2 hierarchy.
    controllers: String,
    path: String,
}

fn parse(text: &str) -> Vec<Membership> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let _id = parts.next()?;
            let controllers = parts.next()?.to_string();
            let path = parts.next()?.to_string();
            Some(Membership { controllers, path })
        })
        .collect()
}

/// What the shim prepared; `join` runs in the reaper.
pub struct Join {
    target: i32,
    /// The target's cgroup namespace.
    namespace: OwnedFd,
}

impl Join {
    pub fn prepare(target: i32) -> io::Result<Join> {
        Ok(Join {
            target,
            namespace: File::open(format!("/proc/{target}/ns/cgroup"))?.into(),
        })
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.namespace.as_fd()
    }

    /// Moves the calling process into the target's cgroups and its cgroup namespace (so
    /// the task sees its cgroup as the container's own processes do). `proc` is the
    /// shim's /proc.
    pub fn join(&self, proc: BorrowedFd<'_>) -> io::Result<()> {
        let ours = self.memberships(proc)?;
        let mut why = Vec::new();
        if ours.iter().all(|m| !m.path.starts_with("/..")) {
            match move_into(&ours) {
                Ok(()) => {
                    setns(self.namespace.as_fd(), CloneFlags::CLONE_NEWCGROUP)?;
                    return Ok(());
                }
                Err(e) => why.push(format!("from the agent's cgroup namespace: {e}")),
            }
        }
        setns(self.namespace.as_fd(), CloneFlags::CLONE_NEWCGROUP)?;
        match move_into(&self.memberships(proc)?) {
            Ok(()) => Ok(()),
            Err(e) => {
                why.push(format!("from the main container's cgroup namespace: {e}"));
                Err(io::Error::other(format!(
                    "cannot join the main container's cgroups ({}); on cgroup v2 a process \
                     can only move between cgroups its cgroup namespace sees: give the \
                     agent's container the host's cgroup namespace (privileged containers \
                     get it), or run without --sidecar-join-cgroup",
                    why.join("; ")
                )))
            }
        }
    }

    fn memberships(&self, proc: BorrowedFd<'_>) -> io::Result<Vec<Membership>> {
        let f = openat(
            proc,
            format!("{}/cgroup", self.target),
            OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let mut text = String::new();
        File::from(f).read_to_string(&mut text)?;
        Ok(parse(&text))
    }
}

/// Writes this process into the cgroup of each membership, through a fresh mount of its
/// hierarchy made in the current cgroup namespace.
fn move_into(memberships: &[Membership]) -> io::Result<()> {
    if memberships.is_empty() {
        return Err(io::Error::other("the main container is in no cgroup"));
    }
    for m in memberships {
        let hierarchy = if m.controllers.is_empty() {
            "v2".to_string()
        } else {
            m.controllers.clone()
        };
        let fail = |e: io::Error| io::Error::new(e.kind(), format!("{hierarchy} {}: {e}", m.path));
        if m.path.starts_with("/..") {
            return Err(fail(io::Error::from(io::ErrorKind::NotFound)));
        }
        let root = mount(&m.controllers).map_err(fail)?;
        let rel = m.path.trim_start_matches('/');
        let procs = if rel.is_empty() {
            "cgroup.procs".to_string()
        } else {
            format!("{rel}/cgroup.procs")
        };
        let f = openat(
            &root,
            procs,
            OFlags::WRONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| fail(e.into()))?;
        // "0" moves the writing process itself.
        File::from(f).write_all(b"0").map_err(fail)?;
    }
    Ok(())
}

/// A detached mount of a cgroup hierarchy ("" for v2), rooted at the current cgroup
/// namespace's root.
fn mount(controllers: &str) -> io::Result<OwnedFd> {
    let fs = if controllers.is_empty() {
        fsopen("cgroup2", FsOpenFlags::FSOPEN_CLOEXEC)?
    } else {
        let fs = fsopen("cgroup", FsOpenFlags::FSOPEN_CLOEXEC)?;
        let mut any = false;
        for c in controllers.split(',') {
            match c.strip_prefix("name=") {
                Some(name) => fsconfig_set_string(&fs, "name", name)?,
                None => {
                    fsconfig_set_flag(&fs, c)?;
                    any = true;
                }
            }
        }
        if !any {
            fsconfig_set_flag(&fs, "none")?; // a named hierarchy without controllers
        }
        fs
    };
    fsconfig_create(&fs)?;
    Ok(fsmount(
        &fs,
        FsMountFlags::FSMOUNT_CLOEXEC,
        MountAttrFlags::empty(),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cgroup_that_cannot_be_joined_is_an_error_naming_it() {
        // Through a fresh mount of the real hierarchy (needs root, as the tests do).
        let missing = Membership {
            controllers: "pids".into(),
            path: "/task-executor-no-such-cgroup".into(),
        };
        let e = move_into(&[missing]).unwrap_err().to_string();
        assert!(e.contains("pids /task-executor-no-such-cgroup"), "{e}");
        let unseen = Membership {
            controllers: "".into(),
            path: "/../sibling".into(),
        };
        let e = move_into(&[unseen]).unwrap_err().to_string();
        assert!(e.contains("v2 /../sibling"), "{e}");
        assert!(
            move_into(&[]).is_err(),
            "no cgroup at all is no join either"
        );
    }

    #[test]
    fn parses_v1_and_v2_lines() {
        let text = "12:pids:/../sibling\n1:name=systemd:/a/b\n0::/\n";
        assert_eq!(
            parse(text),
            vec![
                Membership {
                    controllers: "pids".into(),
                    path: "/../sibling".into()
                },
                Membership {
                    controllers: "name=systemd".into(),
                    path: "/a/b".into()
                },
                Membership {
                    controllers: "".into(),
                    path: "/".into()
                },
            ]
        );
    }
}
