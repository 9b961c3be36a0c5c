//! The shim's run as a state machine: events in, actions out. No I/O and no clock: the
//! driver (`Supervisor`) passes the time with each input, does what the actions say in
//! order, and feeds an action's result back (`Event`'s results) right after doing it,
//! before the next action.
//!
//! Invariants:
//! - Commands run in order: `preStart` (if any); the main command, only after a
//!   `preStart` that succeeded with no stop requested; `postStop` (if any) once nothing of
//!   the main command's stop is pending; then `Finish`, once.
//! - Stopping the task is SIGTERM, then SIGKILL rounds every `KILL_AGAIN` from the end of
//!   the grace period until nothing of it is left; begun once however many reasons come.
//!   A hook is stopped the same way, on its own.
//! - The run moves on (`advance`) after a reap or a tick, once every result the actions of
//!   that input asked for is in; never in the middle of a tick's kill rounds.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::task::model::HookName;

mod events;
#[cfg(test)]
mod tests;

use events::awaited;
pub use events::{Action, Cmd, Config, Event, Exit, MainEnd, Marks};

/// Between SIGKILL rounds while any process of the task (or of a hook) is left.
const KILL_AGAIN: Duration = Duration::from_millis(100);

/// How often a sidecar task's shim checks that the main container is still there.
const TARGET_CHECK: Duration = Duration::from_secs(1);

/// Which command of the run is current.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    PreStart,
    Main,
    PostStop,
    /// The run is over and recorded; the shim stays while the task's daemons live.
    Done,
}

/// Where stopping the task (or a hook) stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stopping {
    No,
    /// SIGTERM sent; SIGKILL at this time.
    Grace(Instant),
    /// SIGKILL sent; again at this time if anything was left.
    Killing(Instant),
    /// Nothing was left at the last round.
    Done,
}

impl Stopping {
    fn next_round(self) -> Option<Instant> {
        match self {
            Stopping::Grace(t) | Stopping::Killing(t) => Some(t),
            Stopping::No | Stopping::Done => None,
        }
    }
}

/// The main command's life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Main {
    NotStarted,
    /// Started; its timeout runs out at `deadline`.
    Running {
        deadline: Option<Instant>,
    },
    /// Its exit is recorded (or that it never ran).
    Ended,
}

/// The current (or last) hook.
#[derive(Debug)]
struct Hook {
    name: HookName,
    timeout: Option<Duration>,
    /// `Some(succeeded)` once its end is recorded.
    ended: Option<bool>,
    /// When its timeout runs out, once started.
    deadline: Option<Instant>,
    timed_out: bool,
    stop: Stopping,
}

impl Hook {
    fn running(&self) -> bool {
        self.ended.is_none()
    }

    /// When this hook next needs attention (its deadline, a kill round).
    fn next_timer(&self) -> Option<Instant> {
        let deadline = self.deadline.filter(|_| !self.timed_out && self.running());
        [self.stop.next_round(), deadline]
            .into_iter()
            .flatten()
            .min()
    }
}

pub struct Machine {
    cfg: Config,
    phase: Phase,
    main: Main,
    stopping: Stopping,
    marks: Marks,
    hook: Option<Hook>,
    /// Sidecar tasks: when to next check that the main container still runs.
    target_check: Option<Instant>,
    /// The time of the last input (results act at the time of the input they follow).
    now: Instant,
    /// Results still to come for the actions given out.
    awaiting: usize,
    /// The run is to move on once they are in.
    advance_due: bool,
}

impl Machine {
    /// A run not begun yet, at `now`.
    pub fn new(cfg: Config, now: Instant) -> Machine {
        Machine {
            cfg,
            phase: Phase::PreStart,
            main: Main::NotStarted,
            stopping: Stopping::No,
            marks: Marks::default(),
            hook: None,
            target_check: None,
            now,
            awaiting: 0,
            advance_due: false,
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Whether the sidecar's main container is due to be checked (and worth it: the main
    /// command runs, or what the run left behind does).
    pub fn target_check_due(&self, now: Instant, children_gone: bool) -> bool {
        self.target_check.is_some_and(|t| now >= t) && self.watching_target(children_gone)
    }

    fn watching_target(&self, children_gone: bool) -> bool {
        self.main_running() || (self.phase == Phase::Done && !children_gone)
    }

    /// When a timer next needs a `Tick`.
    pub fn next_timer(&self, children_gone: bool) -> Option<Instant> {
        let deadline = match self.main {
            Main::Running { deadline } => deadline.filter(|_| !self.marks.timed_out),
            Main::NotStarted | Main::Ended => None,
        };
        [
            deadline,
            self.stopping.next_round(),
            self.target_check
                .filter(|_| self.watching_target(children_gone)),
            self.hook.as_ref().and_then(Hook::next_timer),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    pub fn on(&mut self, ev: Event) -> Vec<Action> {
        let mut out = Vec::new();
        let result = !matches!(
            ev,
            Event::Begin { .. }
                | Event::Reaped { .. }
                | Event::StopRequested { .. }
                | Event::Tick { .. }
        );
        if result {
            self.awaiting = self.awaiting.saturating_sub(1);
        }
        match ev {
            Event::Begin { now } => {
                self.now = now;
                self.begin(&mut out);
            }
            Event::Reaped {
                now,
                exits,
                lost,
                target_dead,
            } => {
                self.now = now;
                self.reaped(now, &exits, &lost, target_dead, &mut out);
                self.advance_due = true;
            }
            Event::StopRequested { now } => {
                self.now = now;
                self.request_stop(now, &mut out);
            }
            Event::Tick { now, target_alive } => {
                self.now = now;
                self.tick(now, target_alive, &mut out);
                self.advance_due = true;
            }
            Event::HookStarted { now } => {
                if let Some(h) = self.hook.as_mut() {
                    h.deadline = h.timeout.and_then(|t| now.checked_add(t));
                }
            }
            Event::HookStartFailed => {
                if let Some(h) = self.hook.as_mut() {
                    h.ended = Some(false);
                }
            }
            Event::MainStarted { now } => {
                // A deadline past what a clock can hold is no deadline (no overflow panic).
                let deadline = self.cfg.timeout.and_then(|t| now.checked_add(t));
                self.main = Main::Running { deadline };
                self.target_check = self.cfg.sidecar.then(|| now + TARGET_CHECK);
            }
            Event::MainStartFailed => self.main = Main::Ended,
            Event::TaskLeft(left) => {
                self.stopping = if left == 0 && self.main == Main::Ended {
                    Stopping::Done
                } else {
                    Stopping::Killing(self.now + KILL_AGAIN)
                };
            }
            Event::TaskCounted(left) => {
                if left == 0 {
                    self.stopping = Stopping::Done;
                }
            }
            Event::HookLeft(left) => {
                let now = self.now;
                if let Some(h) = self.hook.as_mut() {
                    h.stop = if left == 0 && !h.running() {
                        Stopping::Done
                    } else {
                        Stopping::Killing(now + KILL_AGAIN)
                    };
                }
            }
        }
        self.awaiting += awaited(&out);
        if self.advance_due && self.awaiting == 0 {
            let from = out.len();
            self.advance(&mut out);
            self.awaiting += awaited(&out[from..]);
            self.advance_due = self.awaiting > 0;
        }
        out
    }

    fn main_running(&self) -> bool {
        matches!(self.main, Main::Running { .. })
    }

    fn begin(&mut self, out: &mut Vec<Action>) {
        match self.cfg.pre_start {
            Some(timeout) => self.start_hook(HookName::PreStart, timeout, true, out),
            None => {
                self.phase = Phase::Main;
                out.push(Action::StartMain { first: true });
            }
        }
    }

    fn start_hook(
        &mut self,
        name: HookName,
        timeout: Option<Duration>,
        first: bool,
        out: &mut Vec<Action>,
    ) {
        self.hook = Some(Hook {
            name,
            timeout,
            ended: None,
            deadline: None,
            timed_out: false,
            stop: Stopping::No,
        });
        out.push(Action::StartHook { name, first });
    }

    /// Moves the run on: the main command after a `preStart` that succeeded, the
    /// `postStop` hook once the main command's tree has ended, the end of the run. Stops
    /// at a start, whose result it needs.
    fn advance(&mut self, out: &mut Vec<Action>) {
        loop {
            match self.phase {
                Phase::PreStart => {
                    let Some(succeeded) = self.hook.as_ref().and_then(|h| h.ended) else {
                        return;
                    };
                    self.phase = Phase::Main;
                    if succeeded && !self.marks.stop_requested {
                        out.push(Action::StartMain { first: false });
                        return;
                    }
                    self.main = Main::Ended;
                    out.push(Action::RecordMain {
                        end: MainEnd::PreStartFailed,
                        marks: self.marks,
                    });
                }
                Phase::Main => {
                    if self.main != Main::Ended
                        || !matches!(self.stopping, Stopping::No | Stopping::Done)
                    {
                        return;
                    }
                    self.phase = Phase::PostStop;
                    if let Some(timeout) = self.cfg.post_stop {
                        self.start_hook(HookName::PostStop, timeout, false, out);
                        return;
                    }
                }
                Phase::PostStop => {
                    let pending = self.cfg.post_stop.is_some()
                        && !self
                            .hook
                            .as_ref()
                            .is_some_and(|h| h.name == HookName::PostStop && !h.running());
                    if pending {
                        return;
                    }
                    self.finish(out);
                }
                Phase::Done => return,
            }
        }
    }

    /// The run is over. A stop requested while the `postStop` hook ran stops what is left
    /// now.
    fn finish(&mut self, out: &mut Vec<Action>) {
        self.phase = Phase::Done;
        out.push(Action::Finish);
        if self.marks.stop_requested {
            self.begin_kill(self.now, out);
        }
    }

    /// Lost commands first (their reaper is gone), then the exits.
    fn reaped(
        &mut self,
        now: Instant,
        exits: &[Exit],
        lost: &[Cmd],
        dead: bool,
        out: &mut Vec<Action>,
    ) {
        let target_gone = self.marks.target_gone || dead;
        if lost.contains(&Cmd::Main) && self.main_running() {
            // If the container went with the reaper, the kernel killed everything in its
            // PID namespace: the task died of SIGKILL. Otherwise its exit is unknown, and
            // what can be proven the task's is stopped (its group, while unreaped).
            if !target_gone {
                out.push(Action::KillMainGroup);
            }
            self.main = Main::Ended;
            out.push(Action::RecordMain {
                end: MainEnd::Lost,
                marks: Marks {
                    target_gone,
                    ..self.marks
                },
            });
        }
        if let Some(h) = self.hook.as_mut()
            && h.running()
            && lost.contains(&Cmd::Hook(h.name))
        {
            let why = if target_gone {
                "the main container is gone"
            } else {
                "its reaper inside the main container died"
            };
            h.ended = Some(false);
            out.push(Action::RecordHook {
                code: None,
                signal: None,
                why: Some(why.to_string()),
                timed_out: h.timed_out,
            });
        }
        for exit in exits {
            self.exited(now, *exit, dead, out);
        }
    }

    fn exited(&mut self, now: Instant, exit: Exit, dead: bool, out: &mut Vec<Action>) {
        let name = match exit.cmd {
            Cmd::Main => {
                if self.main != Main::Ended {
                    out.push(Action::Drain(Cmd::Main));
                    self.main = Main::Ended;
                    let marks = Marks {
                        target_gone: self.marks.target_gone || dead,
                        ..self.marks
                    };
                    let end = MainEnd::Exited {
                        code: exit.code,
                        signal: exit.signal,
                    };
                    out.push(Action::RecordMain { end, marks });
                    self.end_with_main(now, out);
                }
                return;
            }
            Cmd::Hook(name) => name,
        };
        let Some(h) = self.hook.as_mut().filter(|h| h.name == name && h.running()) else {
            return;
        };
        if h.timed_out {
            // What the hook started after the last round goes too.
            out.push(Action::SignalHook {
                sig: Signal::SIGKILL,
                group: true,
            });
        }
        out.push(Action::Drain(exit.cmd));
        h.ended = Some(exit.code == Some(0) && exit.signal.is_none() && !h.timed_out);
        out.push(Action::RecordHook {
            code: exit.code,
            signal: exit.signal,
            why: None,
            timed_out: h.timed_out,
        });
    }

    /// `--end-task-with-main`: what the main command left running is SIGKILLed now (and
    /// again every round until none is left), as runc ends a container with its init.
    fn end_with_main(&mut self, now: Instant, out: &mut Vec<Action>) {
        if self.cfg.end_with_main && self.stopping == Stopping::No {
            out.push(Action::SignalTask(Signal::SIGKILL));
            self.stopping = Stopping::Killing(now + KILL_AGAIN);
        }
    }

    /// While `preStart` runs a stop request stops the hook (the main command then never
    /// runs); while the main command runs, its tree; while `postStop` runs, nothing yet:
    /// the hook runs to its end or timeout, then what is left is stopped.
    fn request_stop(&mut self, now: Instant, out: &mut Vec<Action>) {
        self.marks.stop_requested = true;
        match self.phase {
            Phase::PreStart => {
                if let Some(h) = self
                    .hook
                    .as_mut()
                    .filter(|h| h.running() && h.stop == Stopping::No)
                {
                    h.stop = Stopping::Grace(now + self.cfg.grace);
                    out.push(Action::SignalHook {
                        sig: Signal::SIGTERM,
                        group: true,
                    });
                }
            }
            Phase::Main | Phase::Done => self.begin_kill(now, out),
            Phase::PostStop => {}
        }
    }

    /// SIGTERM to the whole task, SIGKILL after the grace period; once only.
    fn begin_kill(&mut self, now: Instant, out: &mut Vec<Action>) {
        if self.stopping == Stopping::No {
            out.push(Action::SignalTask(Signal::SIGTERM));
            self.stopping = Stopping::Grace(now + self.cfg.grace);
        }
    }

    fn tick(&mut self, now: Instant, target_alive: Option<bool>, out: &mut Vec<Action>) {
        if let Main::Running { deadline: Some(d) } = self.main
            && !self.marks.timed_out
            && now >= d
        {
            self.marks.timed_out = true;
            self.begin_kill(now, out);
        }
        if let Some(alive) = target_alive {
            self.target_check = Some(now + TARGET_CHECK);
            if !alive && !self.marks.target_gone {
                // The container the task lives in restarted: the task goes with it, and so
                // does what a finished task left running there (in a pod's shared PID
                // namespace nothing else would end it).
                self.marks.target_gone = true;
                self.begin_kill(now, out);
            }
        }
        match self.stopping {
            // Grace is over: SIGKILL everything left, again every round until none is.
            Stopping::Grace(t) | Stopping::Killing(t) if now >= t => {
                out.push(Action::KillTaskRound)
            }
            // The main command ended within the grace period: once nothing of it is left,
            // the run goes on (a `postStop` hook) without waiting out the grace.
            Stopping::Grace(_) if self.main == Main::Ended => out.push(Action::CountTask),
            _ => {}
        }
        self.tick_hook(now, out);
    }

    fn tick_hook(&mut self, now: Instant, out: &mut Vec<Action>) {
        let Some(h) = self.hook.as_mut() else { return };
        if h.running() && !h.timed_out && h.deadline.is_some_and(|d| now >= d) {
            // Over its timeout: its whole tree is killed, and it counts as failed.
            h.timed_out = true;
            h.stop = Stopping::Killing(now + KILL_AGAIN);
            out.push(Action::SignalHook {
                sig: Signal::SIGKILL,
                group: true,
            });
            return;
        }
        if h.stop.next_round().is_some_and(|t| now >= t) {
            out.push(Action::KillHookRound { group: h.running() });
        }
    }
}
