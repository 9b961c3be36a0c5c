//! The journal's lines (one JSON object each) and what they say together: a `Run`,
//! folded from the complete lines in order, a torn one ignored.

use std::io;

use serde::{Deserialize, Serialize};

use super::launch::Launch;
use crate::sys::procfs::ProcIdentity;
use crate::task::model::HookName;
use crate::task::time::Time;

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

pub(super) fn parse_run(text: &[u8]) -> Run {
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

/// The line `entry` is in the journal, with its `\n`.
pub(super) fn line(entry: &Entry) -> io::Result<Vec<u8>> {
    let mut bytes = serde_json::to_vec(entry).map_err(io::Error::other)?;
    bytes.push(b'\n');
    Ok(bytes)
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
