//! A spare shim: forked by the shim server ahead of the next launch, with the task
//! cgroups that launch will need already made (and the cgroup v1 ones already joined).
//!
//! Why: moving a process into a cgroup waits for an RCU grace period (the kernel's
//! cgroup thread-group lock, see `child_setup::clone3`); on a host with v1 memory and pids
//! hierarchies beside v2, each shim moves itself into two, which made a task started on
//! an otherwise idle agent wait ~20 ms. A spare does that, its fork and the cgroups'
//! `mkdir`s while nothing waits for it; the launch then only writes the task's limits.
//!
//! What it prepares follows the *shape* of the last launch the server handed on (the
//! parents of its cgroups): the shape is the agent's configuration, the same for every
//! task but those with limits of other controllers. A launch of another shape uses none
//! of it: the spare removes what it made and goes the usual way. The cgroups are named
//! after the spare (`containment::task_cgroup_name`), as a shim's are, so those of a
//! spare killed with `-9` are swept when the agent starts, as a dead shim's are.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::runtime::containment::{self, Kind, Parent};
use crate::runtime::limits;
use crate::sys::procfs::ProcIdentity;

/// The parents of a launch's task cgroups, and whether its shim joins its containment
/// cgroup (a task with a reaper in the main container, or v1 containment).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Shape {
    containment: Option<Parent>,
    enters: bool,
    v1: Vec<PathBuf>,
}

impl Shape {
    /// The shape of the launch in the journal of task directory `dir` (its first line),
    /// read without following a symlink or blocking; `None` when there is none to read.
    pub fn of_journal(dir: &Path) -> Option<Shape> {
        #[derive(Deserialize)]
        struct Line {
            launch: LaunchShape,
        }
        #[derive(Deserialize)]
        struct LaunchShape {
            #[serde(default)]
            containment: Option<Parent>,
            #[serde(default)]
            limits: Option<LimitsShape>,
            #[serde(default)]
            target: Option<serde::de::IgnoredAny>,
        }
        #[derive(Deserialize)]
        struct LimitsShape {
            #[serde(default)]
            v1: Vec<PathBuf>,
        }
        let path = crate::task::layout::TaskDir(dir).journal();
        let text =
            crate::sys::fsutil::read_regular(&path, crate::sys::fsutil::MAX_RECORD_BYTES).ok()?;
        let first = text.split(|b| *b == b'\n').next()?;
        let launch = serde_json::from_slice::<Line>(first).ok()?.launch;
        // Hooks in the main container need a reaper too; such launches are rare, and a
        // shape that guesses wrong costs only what was prepared.
        let enters = launch.target.is_some()
            || launch
                .containment
                .as_ref()
                .is_some_and(|p| p.kind != Kind::V2);
        Some(Shape {
            containment: launch.containment,
            enters,
            v1: launch.limits.map(|l| l.v1).unwrap_or_default(),
        })
    }

    fn is_empty(&self) -> bool {
        self.containment.is_none() && self.v1.is_empty()
    }
}

/// What a spare made before its launch came; what the launch does not take is removed
/// when this is dropped.
#[derive(Debug, Default)]
pub struct Prepared {
    containment: Option<(Parent, PathBuf, bool)>,
    /// Made and joined, in the shape's order.
    v1: Vec<PathBuf>,
}

impl Prepared {
    /// Nothing prepared: a shim forked for its launch.
    pub fn none() -> Self {
        Prepared::default()
    }

    /// Makes the cgroups of `shape` for the calling process (`me`), and joins those it
    /// would join at its launch. A step that fails leaves nothing of itself: the launch
    /// then makes it the usual way, and reports the error if it fails again.
    pub fn make(shape: &Shape, me: &ProcIdentity) -> Self {
        let name = containment::task_cgroup_name(me);
        let mut made = Prepared::none();
        if let Some(parent) = &shape.containment {
            let dir = if shape.enters {
                containment::create_and_enter(parent, &name)
            } else {
                containment::create(parent, &name)
            };
            match dir {
                Ok(dir) => made.containment = Some((parent.clone(), dir, shape.enters)),
                Err(e) => {
                    tracing::debug!(error = %e, "spare shim: containment cgroup not prepared")
                }
            }
        }
        if !shape.v1.is_empty() {
            let plan = limits::LaunchLimits {
                v1: shape.v1.clone(),
                ..Default::default()
            };
            // No limit yet (the launch writes them): this only makes and joins.
            match limits::enter(&plan, None, &name) {
                Ok(dirs) => made.v1 = dirs,
                Err(e) => tracing::debug!(error = %e, "spare shim: v1 cgroups not prepared"),
            }
        }
        made
    }

    /// The containment cgroup made under `parent`, if one was there with the shim in it
    /// as `entered` says; one made otherwise is removed.
    pub fn take_containment(&mut self, parent: Option<&Parent>, entered: bool) -> Option<PathBuf> {
        let (made_in, dir, is_in) = self.containment.take()?;
        if parent == Some(&made_in) && is_in == entered {
            return Some(dir);
        }
        remove_containment(&dir, is_in);
        None
    }

    /// The v1 cgroups made (and joined) under `parents`, in their order, if exactly
    /// those were; otherwise what was made is left and removed.
    pub fn take_v1(&mut self, parents: &[PathBuf]) -> Option<Vec<PathBuf>> {
        let made = std::mem::take(&mut self.v1);
        if made.is_empty() {
            return None;
        }
        let same = made.len() == parents.len()
            && made.iter().zip(parents).all(|(d, p)| d.parent() == Some(p));
        if same {
            return Some(made);
        }
        limits::leave_and_remove(&made);
        None
    }
}

impl Drop for Prepared {
    fn drop(&mut self) {
        if let Some((_, dir, entered)) = self.containment.take() {
            remove_containment(&dir, entered);
        }
        limits::leave_and_remove(&std::mem::take(&mut self.v1));
    }
}

fn remove_containment(dir: &Path, entered: bool) {
    if entered {
        containment::leave_and_remove(dir);
    } else {
        let _ = std::fs::remove_dir(dir);
    }
}

/// The spare's life, in the forked process: prepare for `shape`, then wait on `sock` for
/// the server to hand on a launch (one message, as the agent sends the server, with the
/// notify pipe attached), and be its shim. The server gone (EOF) ends it, its cgroups
/// removed.
pub fn serve(
    sock: std::os::fd::OwnedFd,
    shape: Shape,
    forker: &crate::runtime::child_setup::ForkServer,
) -> i32 {
    use std::os::fd::AsFd;
    // Off the agent's socket (stdin) at once: the agent must see the server's end close
    // when the server dies, whatever spares live on.
    if let Ok(null) = std::fs::File::open("/dev/null") {
        let _ = nix::unistd::dup2_stdin(null.as_fd());
    }
    let _ = nix::unistd::setsid(); // as a shim: signals to the server's group don't reach it
    let prepared = match ProcIdentity::of(std::process::id() as i32) {
        Some(me) if !shape.is_empty() => Prepared::make(&shape, &me),
        _ => Prepared::none(),
    };
    let mut buf = vec![0u8; 8192];
    let (n, fds) = match crate::runtime::child_setup::recv_with_fds(sock.as_fd(), &mut buf) {
        Ok(r) => r,
        Err(_) => return 0,
    };
    let Some(notify) = fds.into_iter().next().filter(|_| n > 0) else {
        return 0; // the server is gone: `prepared` removes the cgroups
    };
    let (dir, nonce) = super::server::parse_request(&buf[..n]);
    let shim = super::server::Shim {
        notify,
        report: sock,
        prepared,
    };
    super::server::become_shim(&dir, nonce.as_deref(), shim, forker)
}
