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
//!
//! * `format`: the lines and what a journal's lines say together (`Run`);
//! * `launch`: the launch line, everything a shim needs to start the task;
//! * `file`: reading the journal, and the rules of writing it (who may write the launch,
//!   how a line is appended, the agent's lines for a shim that died), its locks and mark;
//! * `protocol`: what a shim says to the agent on its notify pipe, beside the journal;
//! * `watch`: one inotify instance for the release of every adopted task's journal;
//! * `follow`: the agent following a task through its journal until its run is over.

mod file;
pub mod follow;
mod format;
mod launch;
pub mod protocol;
// One inotify instance for every adopted task's journal: no descriptor per task.
pub mod watch;

pub use file::{
    append, claim_marked, lock_held, read_run, record_hook_outcome, record_leftovers,
    record_outcome, running_lock, set_claim_mark, shim_lock, write_launch,
};
pub use format::{
    Claim, Entry, ExitRecord, HookClaim, HookExit, HookRun, HookStart, Leftovers, Run,
    SPAWNED_TAIL, ShimRecord, Spawned, Unclaim, Unrecorded, spawned_head,
};
pub use launch::{HookLaunch, HookPlace, Launch, Target, boot_id};
