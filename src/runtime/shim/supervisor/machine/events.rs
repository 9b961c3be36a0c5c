//! What goes into the run's machine (its configuration, events) and what comes out
//! (actions, and what they record).

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::task::model::HookName;

/// What the launch says the run is.
#[derive(Clone, Debug, Default)]
pub struct Config {
    /// `Some`: the task has a `preStart` hook, with this timeout.
    pub pre_start: Option<Option<Duration>>,
    /// `Some`: the task has a `postStop` hook, with this timeout.
    pub post_stop: Option<Option<Duration>>,
    /// The main command's timeout.
    pub timeout: Option<Duration>,
    /// Between SIGTERM and SIGKILL.
    pub grace: Duration,
    /// A sidecar task: the main container it runs in is checked every `TARGET_CHECK`.
    pub sidecar: bool,
    /// `--end-task-with-main`: the main command's exit kills what it left running.
    pub end_with_main: bool,
}

/// Why the run ended as it did, as its exit line says.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Marks {
    pub stop_requested: bool,
    pub timed_out: bool,
    /// The main container of a sidecar task is gone.
    pub target_gone: bool,
}

/// A command of the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cmd {
    Main,
    Hook(HookName),
}

/// How a command ended, as reaped (or reported by the reaper in the main container).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exit {
    pub cmd: Cmd,
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

/// How the main command's run ended, for its exit line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MainEnd {
    Exited {
        code: Option<i32>,
        signal: Option<i32>,
    },
    /// Its reaper is gone without reporting its exit (see `Supervisor::main_lost`).
    Lost,
    /// The `preStart` hook failed (or was stopped): the main command never ran.
    PreStartFailed,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    // Inputs, from the driver.
    /// The run begins with its first command.
    Begin { now: Instant },
    /// A round of reaping: the commands' exits, the commands whose reaper is gone without
    /// reporting their exit, and (probed only with either) whether the main container of
    /// a sidecar task is dead.
    Reaped {
        now: Instant,
        exits: Vec<Exit>,
        lost: Vec<Cmd>,
        target_dead: bool,
    },
    /// A stop request (DELETE, or the init stopping the container).
    StopRequested { now: Instant },
    /// Timers are looked at; `target_alive` is the main container's check when it was
    /// due (`target_check_due`).
    Tick {
        now: Instant,
        target_alive: Option<bool>,
    },

    // Results of actions.
    /// Of `StartHook`: spawned (and its `HookStarted` line written) at `now`.
    HookStarted { now: Instant },
    /// Of `StartHook`: it could not be started (its end is recorded).
    HookStartFailed,
    /// Of `StartMain`: spawned (and its `started` line written) at `now`.
    MainStarted { now: Instant },
    /// Of `StartMain`: it could not be started (recorded as the run's exit).
    MainStartFailed,
    /// Of `KillTaskRound`: how many processes of the task were left.
    TaskLeft(usize),
    /// Of `CountTask`.
    TaskCounted(usize),
    /// Of `KillHookRound`: how many processes of the hook were left.
    HookLeft(usize),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Claim and start a hook; result `HookStarted` or `HookStartFailed`. `first`: out of
    /// resources, nothing of the task ran, and the launch is given back.
    StartHook { name: HookName, first: bool },
    /// Start the main command; result `MainStarted` or `MainStartFailed`.
    StartMain { first: bool },
    /// Signal every process of the task.
    SignalTask(Signal),
    /// SIGKILL every process of the task; result `TaskLeft`.
    KillTaskRound,
    /// Count what is left of the task; result `TaskCounted`.
    CountTask,
    /// Signal the current hook's tree (`group`: its process group too, while unreaped).
    SignalHook { sig: Signal, group: bool },
    /// SIGKILL the current hook's tree; result `HookLeft`.
    KillHookRound { group: bool },
    /// SIGKILL the main command's process group (its leader is unreaped).
    KillMainGroup,
    /// Log what the command's pipes already hold, before its end is recorded.
    Drain(Cmd),
    /// Write the main command's exit line (durably).
    RecordMain { end: MainEnd, marks: Marks },
    /// Write the current hook's end (durably); `why` when it never ran or was lost.
    RecordHook {
        code: Option<i32>,
        signal: Option<i32>,
        why: Option<String>,
        timed_out: bool,
    },
    /// The run is over: release the reaper, the journal's lock and the agent's pipe.
    Finish,
}

impl Action {
    /// Whether the driver feeds a result back.
    pub(super) fn has_result(&self) -> bool {
        matches!(
            self,
            Action::StartHook { .. }
                | Action::StartMain { .. }
                | Action::KillTaskRound
                | Action::CountTask
                | Action::KillHookRound { .. }
        )
    }
}

/// How many of these actions have a result to come.
pub(super) fn awaited(actions: &[Action]) -> usize {
    actions.iter().filter(|a| a.has_result()).count()
}
