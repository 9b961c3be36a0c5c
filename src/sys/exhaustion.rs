//! Which I/O errors mean "the machine ran out of something", so that every layer can say
//! so the same way: the API answers 507 for a full disk and 503 for the rest, and the
//! manager retries a task's start instead of failing it for good.

use std::io;

use nix::errno::Errno;

/// A resource the kernel refused to hand out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exhaustion {
    /// ENOSPC, EDQUOT: the data dir's file system (or its quota) is full.
    Disk,
    /// EAGAIN from fork, clone or thread creation: a pids limit (cgroup, RLIMIT_NPROC,
    /// kernel.threads-max) is reached.
    Processes,
    /// EMFILE, ENFILE: the process's or the system's file table is full.
    FileDescriptors,
    /// ENOMEM.
    Memory,
}

impl Exhaustion {
    /// Classifies an OS error; `None` for anything that is not a resource limit.
    pub fn of(e: &io::Error) -> Option<Self> {
        let errno = Errno::from_raw(e.raw_os_error()?);
        Some(match errno {
            Errno::ENOSPC | Errno::EDQUOT => Exhaustion::Disk,
            Errno::EAGAIN => Exhaustion::Processes,
            Errno::EMFILE | Errno::ENFILE => Exhaustion::FileDescriptors,
            Errno::ENOMEM => Exhaustion::Memory,
            _ => return None,
        })
    }

    /// For messages: "out of <what>".
    pub fn what(self) -> &'static str {
        match self {
            Exhaustion::Disk => "disk space in the data dir",
            Exhaustion::Processes => "processes or threads",
            Exhaustion::FileDescriptors => "file descriptors",
            Exhaustion::Memory => "memory",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_os_errors_only() {
        let os = |e: Errno| io::Error::from_raw_os_error(e as i32);
        assert_eq!(Exhaustion::of(&os(Errno::ENOSPC)), Some(Exhaustion::Disk));
        assert_eq!(Exhaustion::of(&os(Errno::EDQUOT)), Some(Exhaustion::Disk));
        assert_eq!(
            Exhaustion::of(&os(Errno::EAGAIN)),
            Some(Exhaustion::Processes)
        );
        assert_eq!(
            Exhaustion::of(&os(Errno::EMFILE)),
            Some(Exhaustion::FileDescriptors)
        );
        assert_eq!(Exhaustion::of(&os(Errno::ENOMEM)), Some(Exhaustion::Memory));
        assert_eq!(Exhaustion::of(&os(Errno::ENOENT)), None);
        assert_eq!(Exhaustion::of(&io::Error::other("EAGAIN")), None);
    }
}
