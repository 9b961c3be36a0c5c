//! Reading the journal and the rules of writing it: the agent writes the launch line
//! only into a journal no shim holds, claimed or ended; every line is appended whole or
//! not at all; the agent appends for a shim only under the journal's lock, which proves
//! that shim gone.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

use super::format::{Entry, ExitRecord, HookExit, Leftovers, Run, line, parse_run};
use super::launch::Launch;
use crate::task::layout::TaskDir;

/// The journal's mark that a shim claimed a launch of it (the task may have run): its
/// sticky bit, which means nothing on a regular file. A mode bit because it lives outside
/// the journal's lines (an emptied journal keeps it, so a task that printed nothing is
/// still known to have run) and costs no write of its own: the shim sets it just before
/// its claim line and fsyncs both at once, the fsync the claim needs anyway.
const CLAIM_MARK: u32 = 0o1000;

/// Sets or clears `CLAIM_MARK` on the open journal; the caller makes it durable.
pub fn set_claim_mark(journal: &std::fs::File, on: bool) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = journal.metadata()?.permissions().mode() & 0o7777;
    let want = if on {
        mode | CLAIM_MARK
    } else {
        mode & !CLAIM_MARK
    };
    if want == mode {
        return Ok(());
    }
    journal.set_permissions(std::fs::Permissions::from_mode(want))
}

/// Whether the journal in `dir` bears `CLAIM_MARK`. One `lstat`.
pub fn claim_marked(dir: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::symlink_metadata(TaskDir(dir).journal())
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & CLAIM_MARK != 0)
}

/// Locked (flock, exclusive) by the shim for its whole life: free means no supervisor.
pub fn shim_lock(dir: &Path) -> PathBuf {
    dir.to_path_buf()
}

/// Locked (flock, exclusive) by the shim until the exit record is written: free means the
/// task finished (or its supervisor died).
pub fn running_lock(dir: &Path) -> PathBuf {
    TaskDir(dir).journal()
}

/// Reads the journal; a missing file is an empty run. Only a regular file is read (a
/// FIFO or a symlink in its place is an error, never a wait), up to a bound.
pub fn read_run(dir: &Path) -> io::Result<Run> {
    match crate::sys::fsutil::read_regular(&TaskDir(dir).journal(), MAX_JOURNAL_BYTES) {
        Ok(text) => Ok(parse_run(&text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Run::default()),
        Err(e) => Err(e),
    }
}

/// The most of a journal that is read: a launch line is at most about a request body
/// (a few MiB), and `write_launch` replaces it rather than adding another.
const MAX_JOURNAL_BYTES: u64 = crate::sys::fsutil::MAX_RECORD_BYTES;

/// Starts the journal with the launch line, under the journal's lock (the one a shim
/// holds from before its claim to its exit line), replacing an earlier launch that no
/// shim took. Returns `false`, writing nothing, when the journal is taken: a shim holds
/// it, or one claimed a launch (and may have run it), or the run already has an exit
/// line (the agent gave the launch up): the task is never launched again, the journal
/// tells how it is. Not fsynced: after a crash it is rewritten from task.json if no shim
/// took it, and the shim's fdatasync of `claimed` makes it durable with that line. The
/// file exists already (created with the task's record, its name durable, its space
/// reserved), so the first launch creates no inode and truncates nothing.
pub fn write_launch(dir: &Path, launch: &Launch) -> io::Result<bool> {
    use nix::fcntl::{Flock, FlockArg};
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .mode(0o600) // holds the task's environment
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(TaskDir(dir).journal())?;
    let len = f.metadata()?.len();
    let Ok(mut f) = Flock::lock(f, FlockArg::LockExclusiveNonblock) else {
        return Ok(false);
    };
    if len > 0 {
        let mut text = Vec::new();
        (&*f).take(MAX_JOURNAL_BYTES).read_to_end(&mut text)?;
        let run = parse_run(&text);
        if run.claimed.is_some() || run.exit.is_some() {
            return Ok(false);
        }
        // A claim given back leaves its mark: cleared before the truncation, so that an
        // empty journal never bears the mark of a launch that ran nothing.
        set_claim_mark(&f, false)?;
        f.set_len(0)?;
        use std::io::Seek;
        f.seek(io::SeekFrom::Start(0))?;
    }
    let bytes = line(&Entry::Launch(Box::new(launch.clone())))?;
    f.write_all(&bytes)?;
    if len > 0 {
        // The truncation gave the create's reservation back; it is taken again.
        crate::sys::fsutil::reserve_space(
            &f,
            bytes.len() as u64,
            crate::task::store::JOURNAL_RESERVE,
        )?;
    }
    Ok(true)
}

/// Appends a line; with `durable`, fdatasyncs the journal (this line and all before it;
/// the file's name already is durable).
///
/// A write the disk cut short (full, over quota) is taken back, so that the next line,
/// once there is room, starts on a line of its own instead of being glued to a torn one
/// (and lost with it).
pub fn append(file: &mut std::fs::File, entry: &Entry, durable: bool) -> io::Result<()> {
    let bytes = line(entry)?;
    let mut written = 0;
    while written < bytes.len() {
        match file.write(&bytes[written..]) {
            Ok(0) => {
                take_back(file, written);
                return Err(io::ErrorKind::WriteZero.into());
            }
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                take_back(file, written);
                return Err(e);
            }
        }
    }
    if durable { file.sync_data() } else { Ok(()) }
}

/// Cuts the last `written` bytes (a torn line of ours) off the journal. Shrinking needs no
/// space, so it works on a full disk.
fn take_back(file: &std::fs::File, written: usize) {
    if written == 0 {
        return;
    }
    if let Ok(m) = file.metadata() {
        let _ = file.set_len(m.len().saturating_sub(written as u64));
    }
}

/// Appends the exit line of a run no shim can finish (its supervisor died, the node
/// restarted), durably, unless one is there already; returns the exit line in effect and
/// whether this call wrote it. Holding the journal's lock while doing so proves no shim
/// writes to it.
pub fn record_outcome(dir: &Path, rec: &ExitRecord) -> io::Result<(ExitRecord, bool)> {
    let mut f = lock_journal(dir)?;
    if let Some(x) = read_run(dir)?.exit {
        return Ok((x, false));
    }
    append(&mut f, &Entry::Exit(rec.clone()), true)?;
    Ok((rec.clone(), true))
}

/// Appends the end of a hook no shim can finish (its supervisor died), durably, unless
/// one is there already; returns the line in effect. As for `record_outcome`, holding the
/// journal's lock proves no shim writes to it.
pub fn record_hook_outcome(dir: &Path, rec: &HookExit) -> io::Result<HookExit> {
    let mut f = lock_journal(dir)?;
    if let Some(x) = read_run(dir)?.hook(rec.hook).exit.clone() {
        return Ok(x);
    }
    append(&mut f, &Entry::HookExit(rec.clone()), true)?;
    Ok(rec.clone())
}

/// Appends what stopping a dead supervisor's task proved (durably: the task's message
/// reads the same after a restart).
pub fn record_leftovers(dir: &Path, what: Leftovers) -> io::Result<()> {
    let mut f = lock_journal(dir)?;
    append(&mut f, &Entry::Leftovers(what), true)
}

/// The journal, locked, for a caller that knows its shim is gone: another such caller, or
/// a process of the task between its clone and its exec (it shares the shim's open
/// journal until then), may hold the lock a moment.
fn lock_journal(dir: &Path) -> io::Result<nix::fcntl::Flock<std::fs::File>> {
    use nix::fcntl::{Flock, FlockArg};
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(TaskDir(dir).journal())?;
    let mut tries = 0;
    loop {
        match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
            Ok(locked) => return Ok(locked),
            Err((back, _)) if tries < 100 => {
                f = back;
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err((_, e)) => {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    format!("the run journal is locked: {e}"),
                ));
            }
        }
    }
}

/// Whether a shim holds the lock on `path`. Only a missing file or a lock granted counts
/// as "no": anything else (out of descriptors, say) is no proof the shim is gone.
pub fn lock_held(path: &Path) -> bool {
    match crate::sys::fsutil::open_nonblocking(path) {
        Err(e) => e.kind() != io::ErrorKind::NotFound,
        Ok(f) => Flock::lock(f, FlockArg::LockSharedNonblock).is_err(),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::runtime::journal::{Claim, ExitRecord, Unclaim, boot_id};
    use crate::sys::procfs::ProcIdentity;
    use crate::task::identity::RunAs;

    #[test]
    fn torn_last_line_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let launch = Launch {
            argv: vec!["true".into()],
            env: vec![],
            working_dir: None,
            timeout_ms: None,
            grace_ms: 1,
            max_log_bytes: 1,
            target: None,
            boot_id: boot_id().map(str::to_string),
            pre_start: None,
            post_stop: None,
            run_as: RunAs::default(),
            host_run_as: RunAs::default(),
            allow_privilege_escalation: false,
            nonce: None,
            containment: None,
            end_with_main: false,
            seccomp: false,
            limits: None,
        };
        assert!(!launch.from_earlier_boot());
        assert!(write_launch(dir.path(), &launch).unwrap());
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(TaskDir(dir.path()).journal())
            .unwrap();
        append(
            &mut f,
            &Entry::Exit(ExitRecord {
                exit_code: Some(3),
                ..Default::default()
            }),
            true,
        )
        .unwrap();
        f.write_all(b"{\"exit\":{\"exitCode\":4").unwrap(); // crash mid-write
        let run = read_run(dir.path()).unwrap();
        assert_eq!(run.launch.unwrap().argv, ["true"]);
        assert_eq!(run.exit.unwrap().exit_code, Some(3));
        assert!(run.started.is_none());
    }

    #[test]
    fn a_claim_given_back_no_longer_stands() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = std::fs::File::create(TaskDir(dir.path()).journal()).unwrap();
        let claim = Entry::Claimed(Claim {
            shim: ProcIdentity::without_inode(7, 9),
            nonce: None,
            cgroup: None,
            limits: Vec::new(),
        });
        append(&mut f, &claim, false).unwrap();
        assert!(read_run(dir.path()).unwrap().claimed.is_some());
        let back = Entry::Unclaimed(Unclaim {
            why: "Resource temporarily unavailable (os error 11)".into(),
        });
        append(&mut f, &back, false).unwrap();
        assert!(read_run(dir.path()).unwrap().claimed.is_none());
        append(&mut f, &claim, false).unwrap();
        assert!(
            read_run(dir.path()).unwrap().claimed.is_some(),
            "a later claim stands"
        );
    }
}
