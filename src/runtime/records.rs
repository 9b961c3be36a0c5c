//! The files a process task's directory holds. Besides the agent's `task.json`, a run is
//! one append-only journal, `run.jsonl`, one JSON object per line: the agent writes the
//! `launch` line, under the journal's lock and only into a journal no shim holds, claimed
//! or ended (`write_launch`), with a nonce the shim started for it must find there; the
//! shim refuses a launch that is claimed, ended (the agent gave it up) or not its own, else
//! appends `claimed` and makes both durable before it starts the
//! task (from then on the task may have run, and is never started again; a shim that
//! then could not spawn it, out of processes say, appends `unclaimed`, which gives the
//! launch back), then appends `started` (its identity and the task's; durable with the exit line, as it only matters
//! while this boot lasts) and `exit` (how the task ended, fdatasync'ed). When no shim can
//! write the exit (it died, or the node restarted), the agent appends one saying so, once,
//! so the times it reports never change afterwards. Appending creates no inode, which matters:
//! creating files is the costliest step of a task's start on ext4. A torn last line (a
//! crash mid-write) is not valid JSON and is ignored. `stdout.log`/`stderr.log` appear on
//! the task's first output.
//!
//! An append the disk cuts short is taken back (`append`), so the next line starts on a
//! line of its own. The journal's space is reserved when the task is created (see
//! `store::JOURNAL_RESERVE`).
//!
//! The shim's two locks live on files that exist anyway: the task directory (held for the
//! shim's life) and `run.jsonl` (held until the exit line is written).

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::sys::procfs::ProcIdentity;
use crate::task::identity::RunAs;
use crate::task::model::{EnvVar, HookName};
use crate::task::time::Time;

pub const RUN: &str = crate::task::layout::RUN_JOURNAL;
pub const STDOUT: &str = crate::task::layout::STDOUT;
pub const STDERR: &str = crate::task::layout::STDERR;

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
    std::fs::symlink_metadata(dir.join(RUN))
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & CLAIM_MARK != 0)
}

/// Locked (flock, exclusive) by the shim for its whole life: free means no supervisor.
pub fn shim_lock(dir: &Path) -> PathBuf {
    dir.to_path_buf()
}

/// Locked (flock, exclusive) by the shim until the exit record is written: free means the
/// task finished (or its supervisor died).
pub fn running_lock(dir: &Path) -> PathBuf {
    dir.join(RUN)
}

/// One line of `run.jsonl`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Entry {
    Launch(Box<Launch>),
    Claimed(Claim),
    Unclaimed(Unclaim),
    /// Written by a command's own process before it execs (see `spawned_head`).
    Spawned(Spawned),
    Started(ShimRecord),
    Exit(ExitRecord),
    /// A hook may run from here on (durable before it is spawned): never started again.
    HookClaimed(HookClaim),
    HookStarted(HookStart),
    /// How a hook ended (durable), by its shim or, for a shim that died, by the agent.
    HookExit(HookExit),
    /// What the agent proved of a dead supervisor's task after stopping it.
    Leftovers(Leftovers),
}

/// What is known of a task's processes once the agent stopped what its dead supervisor
/// left (written once, after the exit line): "stopped" is said only when proven.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Leftovers {
    /// Its cgroup was killed and seen empty (v2 `populated 0`, v1 no process left).
    CgroupEmpty,
    /// Its cgroup was killed but not seen empty (it is ended again at DELETE).
    CgroupNotEmpty,
    /// No cgroup: the processes the journal names, their descendants and groups, were
    /// SIGKILLed; what they may have left elsewhere is not known.
    NamedKilled,
    /// No cgroup and no process named: those carrying the task's marker were SIGKILLed.
    MarkedKilled,
}

/// What the journal says so far.
#[derive(Clone, Debug, Default)]
pub struct Run {
    pub launch: Option<Launch>,
    /// A shim took the launch and may have started the task: it is never started again.
    pub claimed: Option<Claim>,
    /// The main command's process, as it named itself before it exec'ed.
    pub spawned: Option<ProcIdentity>,
    pub started: Option<ShimRecord>,
    pub exit: Option<ExitRecord>,
    pub pre_start: HookRun,
    pub post_stop: HookRun,
    /// What the agent proved after stopping a dead supervisor's task.
    pub leftovers: Option<Leftovers>,
}

/// What the journal says of one hook.
#[derive(Clone, Debug, Default)]
pub struct HookRun {
    pub claimed: bool,
    /// The hook's process, as it named itself before it exec'ed.
    pub spawned: Option<ProcIdentity>,
    pub started: Option<HookStart>,
    pub exit: Option<HookExit>,
}

impl Run {
    pub fn hook(&self, name: HookName) -> &HookRun {
        match name {
            HookName::PreStart => &self.pre_start,
            HookName::PostStop => &self.post_stop,
        }
    }

    fn hook_mut(&mut self, name: HookName) -> &mut HookRun {
        match name {
            HookName::PreStart => &mut self.pre_start,
            HookName::PostStop => &mut self.post_stop,
        }
    }

    /// The run is over: the main command's exit is recorded and, if the task has a
    /// `postStop` hook, so is the hook's end. (Written by the shim just before it releases
    /// the journal's lock, or by the agent for a shim that died.)
    pub fn finished(&self) -> bool {
        // A run its shim never claimed ran nothing, so it has no `postStop` to wait for.
        let post_stop_pending = self.launch.as_ref().is_some_and(|l| l.post_stop.is_some())
            && self.claimed.is_some()
            && self.post_stop.exit.is_none();
        self.exit.is_some() && !post_stop_pending
    }
}

/// Reads the journal; a missing file is an empty run. Only a regular file is read (a
/// FIFO or a symlink in its place is an error, never a wait), up to a bound.
pub fn read_run(dir: &Path) -> io::Result<Run> {
    match crate::sys::fsutil::read_regular(&dir.join(RUN), MAX_JOURNAL_BYTES) {
        Ok(text) => Ok(parse_run(&text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Run::default()),
        Err(e) => Err(e),
    }
}

/// The most of a journal that is read: a launch line is at most about a request body
/// (a few MiB), and `write_launch` replaces it rather than adding another.
const MAX_JOURNAL_BYTES: u64 = crate::sys::fsutil::MAX_RECORD_BYTES;

fn parse_run(text: &[u8]) -> Run {
    let mut run = Run::default();
    for line in text.split(|b| *b == b'\n') {
        // Only complete, valid lines count: a torn write is not a record.
        match serde_json::from_slice::<Entry>(line) {
            Ok(Entry::Launch(l)) => run.launch = Some(*l),
            Ok(Entry::Claimed(c)) => run.claimed = Some(c),
            Ok(Entry::Unclaimed(_)) => {
                run.claimed = None;
                run.spawned = None;
            }
            Ok(Entry::Spawned(s)) => match s.hook {
                None => run.spawned = Some(s.process),
                Some(h) => run.hook_mut(h).spawned = Some(s.process),
            },
            Ok(Entry::Started(s)) => run.started = Some(s),
            Ok(Entry::Exit(x)) => run.exit = Some(x),
            Ok(Entry::HookClaimed(c)) => run.hook_mut(c.hook).claimed = true,
            Ok(Entry::HookStarted(h)) => {
                let name = h.hook;
                run.hook_mut(name).started = Some(h);
            }
            Ok(Entry::HookExit(x)) => {
                let r = run.hook_mut(x.hook);
                if r.exit.is_none() {
                    r.exit = Some(x);
                }
            }
            Ok(Entry::Leftovers(l)) => run.leftovers = Some(l),
            Err(_) => {}
        }
    }
    run
}

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
        .open(dir.join(RUN))?;
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
        .open(dir.join(RUN))?;
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

fn line(entry: &Entry) -> io::Result<Vec<u8>> {
    let mut bytes = serde_json::to_vec(entry).map_err(io::Error::other)?;
    bytes.push(b'\n');
    Ok(bytes)
}
/// The first thing a shim writes to the agent's notify pipe, before anything else it does:
/// EOF without it means no shim ever ran (the fork server died with the request queued),
/// so nothing of the task started and it may be launched again.
pub const SHIM_HELLO: &str = "shim\n";

/// The line a shim (or the shim server) that could not start the task writes to the
/// agent's notify pipe: `error: MESSAGE`, or `error errno=N: MESSAGE` when nothing of the
/// task was started and the cause is that OS error, so the agent can tell "out of
/// processes" (start it again later) from a failure that must not be retried.
pub fn start_failure_line(e: &io::Error, nothing_started: bool) -> String {
    match e.raw_os_error().filter(|_| nothing_started) {
        Some(errno) => format!("error errno={errno}: {e}\n"),
        None => format!("error: {e}\n"),
    }
}

/// Parses `start_failure_line`: the errno (when nothing started) and the message.
pub fn parse_start_failure(line: &str) -> Option<(Option<i32>, &str)> {
    if let Some(msg) = line.strip_prefix("error: ") {
        return Some((None, msg.trim_end()));
    }
    let rest = line.strip_prefix("error errno=")?;
    let (errno, msg) = rest.split_once(": ")?;
    Some((Some(errno.parse().ok()?), msg.trim_end()))
}

/// Written by the agent before it stops a sidecar task because the main container was
/// replaced; the exit then reads as `TargetRestarted`.
pub const TARGET_RESTARTED: &str = "target-restarted";

/// Everything the shim needs to start the task; written by the agent, mode 0600 since it
/// holds the task's environment.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Launch {
    pub argv: Vec<String>,
    pub env: Vec<EnvVar>,
    pub working_dir: Option<String>,
    pub timeout_ms: Option<u64>,
    pub grace_ms: u64,
    /// Per stream; the log keeps at most this much (current file plus one rotated file).
    pub max_log_bytes: u64,
    /// Sidecar mode: run inside this process's namespaces, with its environment as base.
    pub target: Option<Target>,
    /// The boot this launch was written in. A launch from an earlier boot with no exit
    /// line was cut short by a node restart: the task may have run, so it is reported,
    /// never started again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
    /// Identity overrides for the task's processes (its securityContext over the agent's
    /// default), applied by the shim over its own identity or the main container's.
    #[serde(default, skip_serializing_if = "RunAs::is_empty")]
    pub run_as: RunAs,
    /// Who commands in the agent's own container run as unless `run_as` says otherwise
    /// (the task's uid from `--task-uid-range`, else `--task-run-as-user`); a hook of a
    /// `Remote` task may run there too.
    #[serde(default, skip_serializing_if = "RunAs::is_empty")]
    pub host_run_as: RunAs,
    /// The task may gain privileges (setuid binaries); otherwise it runs with
    /// `no_new_privs`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_privilege_escalation: bool,
    /// Unique to this launch: the shim started for it is told it and claims the launch
    /// only if the journal still holds this one (a shim that comes late, after the agent
    /// replaced or gave up the launch, runs nothing). Absent in older agents' launches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonce: Option<String>,
    /// Every command of the task runs under the `RuntimeDefault` seccomp filter.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub seccomp: bool,
    /// Runs to completion before the main command; the main command runs only if it
    /// succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_start: Option<HookLaunch>,
    /// Runs once the main command has ended (or could not start, or `preStart` failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post_stop: Option<HookLaunch>,
    /// Where the shim makes the task's cgroup (`None`: the agent can make none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub containment: Option<super::containment::Parent>,
    /// What the main command left running is SIGKILLed when it exits.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub end_with_main: bool,
    /// The task's limits and the cgroups that count its usage (`None`: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<super::limits::LaunchLimits>,
}

impl Launch {
    pub fn hook(&self, name: HookName) -> Option<&HookLaunch> {
        match name {
            HookName::PreStart => self.pre_start.as_ref(),
            HookName::PostStop => self.post_stop.as_ref(),
        }
    }
}

/// A lifecycle hook as its shim runs it: with the task's environment and working
/// directory, in its own place.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HookLaunch {
    pub argv: Vec<String>,
    /// `None`: no limit (launches of earlier versions always have one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    pub place: HookPlace,
}

/// Where a hook runs.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum HookPlace {
    /// In the agent's container (`Local`).
    Local,
    /// Inside the main container (`Remote`).
    Remote(Target),
    /// `Remote`, but the main container was not found when the task was launched: the
    /// hook fails with this message.
    Unreachable(String),
}
impl Launch {
    pub fn from_earlier_boot(&self) -> bool {
        matches!((self.boot_id.as_deref(), boot_id()), (Some(then), Some(now)) if then != now)
    }
}

/// This boot's id (the kernel's random `boot_id`); `None` where the kernel has none.
pub fn boot_id() -> Option<&'static str> {
    static ID: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    })
    .as_deref()
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Target {
    pub container: String,
    pub process: ProcIdentity,
    /// Also join the target's cgroups (limits and accounting of the main container).
    #[serde(default)]
    pub join_cgroup: bool,
    /// Run as the target's uid, gid, groups and capabilities instead of the sidecar's.
    #[serde(default)]
    pub run_as_target_user: bool,
}

/// A hook's claim: from here on it may have run.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HookClaim {
    pub hook: HookName,
}

/// A command's process, named by itself between its clone and its exec, so the journal
/// names every process of the task that could have run anything, even when the shim dies
/// before its `started` / `hookStarted` line: the agent can stop it by this identity
/// (pid and start time, from `/proc/PID/stat`, readable whatever the process's uid).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Spawned {
    /// `None`: the main command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook: Option<HookName>,
    pub process: ProcIdentity,
}

/// The line the process of a command writes about itself: this head, its identity as
/// `ProcIdentity`'s JSON (`{"pid":N,"startTime":T}`), then `SPAWNED_TAIL`
/// (`child_setup::Announce`).
pub fn spawned_head(hook: Option<HookName>) -> Vec<u8> {
    match hook {
        None => br#"{"spawned":{"process":"#.to_vec(),
        Some(h) => format!(r#"{{"spawned":{{"hook":"{}","process":"#, h.as_str()).into_bytes(),
    }
}

pub const SPAWNED_TAIL: &[u8] = b"}}\n";

/// A hook's process, once started.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HookStart {
    pub hook: HookName,
    pub process: ProcIdentity,
    pub started_at: Time,
}

/// How a hook ended.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HookExit {
    pub hook: HookName,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    pub finished_at: Time,
    /// Its timeout passed: its process tree was killed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub timed_out: bool,
    /// It could not be started (or its main container was not there): why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_error: Option<String>,
    /// The last few KiB of its combined output (valid UTF-8).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub output: String,
    /// Written by the agent: the hook's supervisor died before recording its end (or
    /// before starting it); it is not run again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unrecorded: Option<Unrecorded>,
}

impl HookExit {
    pub fn succeeded(&self) -> bool {
        self.exit_code == Some(0)
            && self.signal.is_none()
            && !self.timed_out
            && self.start_error.is_none()
            && self.unrecorded.is_none()
    }
}

/// The shim that took the launch.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Claim {
    pub shim: ProcIdentity,
    /// The launch's `nonce` it took (absent in journals of older shims).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonce: Option<String>,
    /// The task's cgroup, made before the claim: everything of the task is in it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<std::path::PathBuf>,
    /// The task's cgroups in cgroup v1 controller hierarchies (memory, cpu, pids), made
    /// before the claim, with its limits: everything of the task is in them too.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub limits: Vec<std::path::PathBuf>,
}

impl Claim {
    /// Every cgroup of the task: its containment cgroup and its v1 ones.
    pub fn cgroups(&self) -> Vec<std::path::PathBuf> {
        self.cgroup.iter().chain(&self.limits).cloned().collect()
    }
}

/// The shim that took the launch spawned nothing of the task (why: the error), so the
/// launch may be started again.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Unclaim {
    pub why: String,
}

/// The shim's identity, and the task's main process once it exists.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ShimRecord {
    pub shim: ProcIdentity,
    pub main: Option<ProcIdentity>,
    pub started_at: Option<Time>,
}

/// How the task ended, written once, atomically, by the shim.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ExitRecord {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub started_at: Option<Time>,
    pub finished_at: Option<Time>,
    #[serde(default)]
    pub timed_out: bool,
    #[serde(default)]
    pub stop_requested: bool,
    /// The sidecar target died while the task ran (main container restarted).
    #[serde(default)]
    pub target_gone: bool,
    /// The program could not be started (exec or working-dir failure).
    pub start_error: Option<String>,
    /// The `preStart` hook failed (or was stopped): the main command never ran.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pre_start_failed: bool,
    /// Written by the agent when no shim could record the exit: why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unrecorded: Option<Unrecorded>,
    /// What the task's cgroups counted when its main command ended (or its shim was
    /// found dead); `oomKills` set when the kernel's OOM killer ended any of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<crate::task::model::ResourceUsage>,
}

/// Why a run's exit was not recorded by its shim.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Unrecorded {
    /// The shim (or the reaper it had inside the main container) died.
    SupervisorLost,
    /// The node restarted after the launch.
    NodeRestarted,
}

#[cfg(test)]
mod tests {
    use super::*;

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
            .open(dir.path().join(RUN))
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
        let mut f = std::fs::File::create(dir.path().join(RUN)).unwrap();
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

    #[test]
    fn start_failure_lines_carry_the_errno_only_when_nothing_started() {
        let eagain = io::Error::from_raw_os_error(11);
        let line = start_failure_line(&eagain, true);
        assert_eq!(
            parse_start_failure(&line),
            Some((Some(11), eagain.to_string().as_str()))
        );
        let line = start_failure_line(&eagain, false);
        assert_eq!(parse_start_failure(&line).unwrap().0, None);
        let other = io::Error::other("no launch record");
        assert_eq!(
            parse_start_failure(&start_failure_line(&other, true)),
            Some((None, "no launch record"))
        );
        assert_eq!(parse_start_failure("started\n"), None);
    }

    #[test]
    fn a_launch_of_another_boot_is_recognised() {
        let mut launch: Launch = serde_json::from_str(
            r#"{"argv":["true"],"env":[],"graceMs":1,"maxLogBytes":1,"bootId":"other"}"#,
        )
        .unwrap();
        assert!(boot_id().is_some(), "Linux has a boot id");
        assert!(launch.from_earlier_boot());
        launch.boot_id = None; // written by an agent that did not record it: no claim
        assert!(!launch.from_earlier_boot());
    }
}
