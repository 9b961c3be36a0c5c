//! The run's transitions, without processes: each test feeds events (and the results of
//! the actions the driver would do) and checks the actions in order.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal::{SIGKILL, SIGTERM};

use super::*;

const PRE: HookName = HookName::PreStart;
const POST: HookName = HookName::PostStop;

/// A machine and the start of its clock.
struct Run {
    m: Machine,
    t0: Instant,
}

impl Run {
    fn new(cfg: Config) -> Run {
        let t0 = Instant::now();
        Run {
            m: Machine::new(cfg, t0),
            t0,
        }
    }

    fn at(&self, ms: u64) -> Instant {
        self.t0 + Duration::from_millis(ms)
    }

    fn on(&mut self, ev: Event) -> Vec<Action> {
        self.m.on(ev)
    }

    fn reaped(&mut self, ms: u64, exits: &[Exit]) -> Vec<Action> {
        let now = self.at(ms);
        self.on(Event::Reaped {
            now,
            exits: exits.to_vec(),
            lost: Vec::new(),
            target_dead: false,
        })
    }

    fn tick(&mut self, ms: u64) -> Vec<Action> {
        let now = self.at(ms);
        self.on(Event::Tick {
            now,
            target_alive: None,
        })
    }

    fn stop(&mut self, ms: u64) -> Vec<Action> {
        let now = self.at(ms);
        self.on(Event::StopRequested { now })
    }

    /// Begins a run with a `preStart` hook (no timeout) and starts it at 0 ms.
    fn pre_start_running(cfg: Config) -> Run {
        let mut r = Run::new(Config {
            pre_start: Some(None),
            ..cfg
        });
        let now = r.at(0);
        assert_eq!(
            r.on(Event::Begin { now }),
            [Action::StartHook {
                name: PRE,
                first: true
            }]
        );
        assert_eq!(r.on(Event::HookStarted { now }), []);
        assert_eq!(r.m.phase(), Phase::PreStart);
        r
    }

    /// Begins the run and starts its main command at 0 ms.
    fn main_running(cfg: Config) -> Run {
        let mut r = Run::new(cfg);
        let now = r.at(0);
        assert_eq!(
            r.on(Event::Begin { now }),
            [Action::StartMain { first: true }]
        );
        assert_eq!(r.on(Event::MainStarted { now }), []);
        assert_eq!(r.m.phase(), Phase::Main);
        r
    }
}

fn grace() -> Config {
    Config {
        grace: Duration::from_millis(1000),
        ..Config::default()
    }
}

/// With a `postStop` hook (no timeout).
fn with_post_stop() -> Config {
    Config {
        post_stop: Some(None),
        ..grace()
    }
}

/// A sidecar task (its main container is checked).
fn sidecar() -> Config {
    Config {
        sidecar: true,
        ..grace()
    }
}

fn exit(cmd: Cmd, code: i32) -> Exit {
    Exit {
        cmd,
        code: Some(code),
        signal: None,
    }
}

fn killed(cmd: Cmd, sig: Signal) -> Exit {
    Exit {
        cmd,
        code: None,
        signal: Some(sig as i32),
    }
}

fn main_exit(code: Option<i32>, signal: Option<i32>, marks: Marks) -> Action {
    Action::RecordMain {
        end: MainEnd::Exited { code, signal },
        marks,
    }
}

fn hook_end(code: Option<i32>, signal: Option<i32>, timed_out: bool) -> Action {
    Action::RecordHook {
        code,
        signal,
        why: None,
        timed_out,
    }
}

fn pre_start_failed(marks: Marks) -> Action {
    Action::RecordMain {
        end: MainEnd::PreStartFailed,
        marks,
    }
}

const STOPPED: Marks = Marks {
    stop_requested: true,
    timed_out: false,
    target_gone: false,
};

#[test]
fn a_run_without_hooks_starts_main_records_its_exit_and_finishes() {
    let mut r = Run::main_running(grace());
    assert_eq!(
        r.m.next_timer(false),
        None,
        "no timeout, no stop: nothing to wake for"
    );
    assert_eq!(r.reaped(5, &[]), [], "nothing exited yet");
    assert_eq!(r.tick(5), []);
    assert_eq!(
        r.reaped(10, &[exit(Cmd::Main, 3)]),
        [
            Action::Drain(Cmd::Main),
            main_exit(Some(3), None, Marks::default()),
            Action::Finish,
        ]
    );
    assert_eq!(r.m.phase(), Phase::Done);
    assert_eq!(
        r.reaped(20, &[exit(Cmd::Main, 0)]),
        [],
        "one exit line only"
    );
}

#[test]
fn hooks_run_in_order_around_main() {
    let mut r = Run::pre_start_running(with_post_stop());
    assert_eq!(
        r.reaped(1, &[exit(Cmd::Hook(PRE), 0)]),
        [
            Action::Drain(Cmd::Hook(PRE)),
            hook_end(Some(0), None, false),
            Action::StartMain { first: false },
        ]
    );
    assert_eq!(r.on(Event::MainStarted { now: r.at(1) }), []);
    assert_eq!(r.m.phase(), Phase::Main);
    assert_eq!(
        r.reaped(2, &[exit(Cmd::Main, 0)]),
        [
            Action::Drain(Cmd::Main),
            main_exit(Some(0), None, Marks::default()),
            Action::StartHook {
                name: POST,
                first: false
            },
        ]
    );
    assert_eq!(r.on(Event::HookStarted { now: r.at(2) }), []);
    assert_eq!(r.m.phase(), Phase::PostStop);
    assert_eq!(
        r.reaped(3, &[exit(Cmd::Hook(POST), 1)]),
        [
            Action::Drain(Cmd::Hook(POST)),
            hook_end(Some(1), None, false),
            Action::Finish,
        ],
        "a failed postStop still ends the run"
    );
}

#[test]
fn a_failed_pre_start_means_main_never_runs_but_post_stop_does() {
    let cfg = with_post_stop();
    let mut r = Run::pre_start_running(cfg);
    assert_eq!(
        r.reaped(1, &[exit(Cmd::Hook(PRE), 2)]),
        [
            Action::Drain(Cmd::Hook(PRE)),
            hook_end(Some(2), None, false),
            pre_start_failed(Marks::default()),
            Action::StartHook {
                name: POST,
                first: false
            },
        ]
    );
}

#[test]
fn a_pre_start_that_cannot_start_fails_the_run_at_the_next_reap() {
    let cfg = Config {
        pre_start: Some(None),
        ..grace()
    };
    let mut r = Run::new(cfg);
    r.on(Event::Begin { now: r.at(0) });
    assert_eq!(
        r.on(Event::HookStartFailed),
        [],
        "the first start's result does not move the run on by itself"
    );
    assert_eq!(
        r.reaped(1, &[]),
        [pre_start_failed(Marks::default()), Action::Finish]
    );
}

#[test]
fn a_main_that_cannot_start_goes_on_to_post_stop() {
    let cfg = with_post_stop();
    let mut r = Run::new(cfg);
    assert_eq!(
        r.on(Event::Begin { now: r.at(0) }),
        [Action::StartMain { first: true }]
    );
    assert_eq!(r.on(Event::MainStartFailed), []);
    assert_eq!(
        r.reaped(1, &[]),
        [Action::StartHook {
            name: POST,
            first: false
        }]
    );
    assert_eq!(r.on(Event::HookStartFailed), [Action::Finish]);
}

#[test]
fn a_stop_is_sigterm_then_sigkill_rounds_until_nothing_is_left() {
    let mut r = Run::main_running(grace());
    assert_eq!(r.stop(0), [Action::SignalTask(SIGTERM)]);
    assert_eq!(r.stop(10), [], "a second request changes nothing");
    assert_eq!(r.m.next_timer(false), Some(r.at(1000)));
    assert_eq!(r.tick(999), [], "within the grace period");
    assert_eq!(r.tick(1000), [Action::KillTaskRound]);
    assert_eq!(r.on(Event::TaskLeft(2)), []);
    assert_eq!(r.m.next_timer(false), Some(r.at(1100)));
    assert_eq!(r.tick(1050), []);
    assert_eq!(r.tick(1100), [Action::KillTaskRound]);
    assert_eq!(
        r.on(Event::TaskLeft(0)),
        [],
        "main not reaped yet: rounds go on"
    );
    assert_eq!(
        r.reaped(1150, &[killed(Cmd::Main, SIGKILL)]),
        [
            Action::Drain(Cmd::Main),
            main_exit(None, Some(SIGKILL as i32), STOPPED),
        ],
        "the run waits for the rounds to end"
    );
    assert_eq!(r.tick(1200), [Action::KillTaskRound]);
    assert_eq!(r.on(Event::TaskLeft(0)), [Action::Finish]);
    assert_eq!(r.m.next_timer(false), None);
    assert_eq!(r.stop(1300), [], "stopped once");
}

#[test]
fn main_exiting_within_the_grace_period_ends_the_stop_once_nothing_is_left() {
    let cfg = with_post_stop();
    let mut r = Run::main_running(cfg);
    assert_eq!(r.stop(0), [Action::SignalTask(SIGTERM)]);
    assert_eq!(
        r.reaped(20, &[exit(Cmd::Main, 143)]),
        [
            Action::Drain(Cmd::Main),
            main_exit(Some(143), None, STOPPED)
        ]
    );
    assert_eq!(r.tick(30), [Action::CountTask]);
    assert_eq!(r.on(Event::TaskCounted(1)), [], "a daemon is left");
    assert_eq!(r.tick(40), [Action::CountTask]);
    assert_eq!(
        r.on(Event::TaskCounted(0)),
        [Action::StartHook {
            name: POST,
            first: false
        }],
        "postStop without waiting out the grace"
    );
}

#[test]
fn a_stop_during_post_stop_waits_for_it_then_stops_what_is_left() {
    let cfg = with_post_stop();
    let mut r = Run::main_running(cfg);
    r.reaped(10, &[exit(Cmd::Main, 0)]);
    r.on(Event::HookStarted { now: r.at(10) });
    assert_eq!(r.stop(20), [], "postStop runs on");
    assert_eq!(r.tick(5000), [], "no grace runs meanwhile");
    assert_eq!(
        r.reaped(6000, &[exit(Cmd::Hook(POST), 0)]),
        [
            Action::Drain(Cmd::Hook(POST)),
            hook_end(Some(0), None, false),
            Action::Finish,
            Action::SignalTask(SIGTERM),
        ]
    );
    assert_eq!(r.tick(7000), [Action::KillTaskRound]);
    assert_eq!(r.on(Event::TaskLeft(0)), []);
    assert_eq!(r.m.next_timer(false), None, "nothing was left");
}

#[test]
fn a_stop_during_pre_start_stops_the_hook_and_main_never_runs() {
    let mut r = Run::pre_start_running(grace());
    assert_eq!(
        r.stop(10),
        [Action::SignalHook {
            sig: SIGTERM,
            group: true
        }]
    );
    assert_eq!(r.stop(20), [], "its stop is begun once");
    assert_eq!(r.tick(1010), [Action::KillHookRound { group: true }]);
    assert_eq!(r.on(Event::HookLeft(1)), []);
    assert_eq!(
        r.reaped(1050, &[killed(Cmd::Hook(PRE), SIGKILL)]),
        [
            Action::Drain(Cmd::Hook(PRE)),
            hook_end(None, Some(SIGKILL as i32), false),
            pre_start_failed(STOPPED),
            Action::Finish,
            Action::SignalTask(SIGTERM),
        ]
    );
    assert_eq!(
        r.tick(1110),
        [Action::CountTask, Action::KillHookRound { group: false }],
        "the task's stop counts what is left; the reaped hook's group is not signalled"
    );
    assert_eq!(r.on(Event::TaskCounted(0)), []);
    assert_eq!(r.on(Event::HookLeft(0)), []);
    assert_eq!(r.m.next_timer(false), None, "both stops are over");
}

#[test]
fn a_succeeding_pre_start_after_a_stop_still_fails_the_run() {
    let mut r = Run::pre_start_running(grace());
    r.stop(10);
    assert_eq!(
        r.reaped(20, &[exit(Cmd::Hook(PRE), 0)]),
        [
            Action::Drain(Cmd::Hook(PRE)),
            hook_end(Some(0), None, false),
            pre_start_failed(STOPPED),
            Action::Finish,
            Action::SignalTask(SIGTERM),
        ]
    );
}

#[test]
fn a_hook_over_its_timeout_is_killed_and_fails() {
    let cfg = Config {
        pre_start: Some(Some(Duration::from_millis(2000))),
        ..grace()
    };
    let mut r = Run::new(cfg);
    r.on(Event::Begin { now: r.at(0) });
    r.on(Event::HookStarted { now: r.at(100) });
    assert_eq!(r.m.next_timer(false), Some(r.at(2100)), "from its spawn");
    assert_eq!(r.tick(2099), []);
    assert_eq!(
        r.tick(2100),
        [Action::SignalHook {
            sig: SIGKILL,
            group: true
        }]
    );
    assert_eq!(
        r.reaped(2150, &[exit(Cmd::Hook(PRE), 0)]),
        [
            Action::SignalHook {
                sig: SIGKILL,
                group: true
            },
            Action::Drain(Cmd::Hook(PRE)),
            hook_end(Some(0), None, true),
            pre_start_failed(Marks::default()),
            Action::Finish,
        ],
        "exit code 0 after the timeout is still a failure"
    );
}

#[test]
fn main_over_its_timeout_is_stopped_and_marked() {
    let cfg = Config {
        timeout: Some(Duration::from_millis(5000)),
        ..grace()
    };
    let mut r = Run::main_running(cfg);
    assert_eq!(r.m.next_timer(false), Some(r.at(5000)));
    assert_eq!(r.tick(4999), []);
    assert_eq!(r.tick(5000), [Action::SignalTask(SIGTERM)]);
    assert_eq!(r.m.next_timer(false), Some(r.at(6000)), "then the grace");
    assert_eq!(
        r.stop(5500),
        [],
        "a stop request adds nothing to a stop under way"
    );
    let marks = Marks {
        timed_out: true,
        ..STOPPED
    };
    assert_eq!(
        r.reaped(5600, &[killed(Cmd::Main, SIGTERM)]),
        [
            Action::Drain(Cmd::Main),
            main_exit(None, Some(SIGTERM as i32), marks),
        ]
    );
}

#[test]
fn end_with_main_kills_what_main_left_until_none_is_left() {
    let cfg = Config {
        end_with_main: true,
        ..grace()
    };
    let mut r = Run::main_running(cfg);
    assert_eq!(
        r.reaped(10, &[exit(Cmd::Main, 0)]),
        [
            Action::Drain(Cmd::Main),
            main_exit(Some(0), None, Marks::default()),
            Action::SignalTask(SIGKILL),
        ]
    );
    assert_eq!(r.tick(110), [Action::KillTaskRound]);
    assert_eq!(r.on(Event::TaskLeft(1)), []);
    assert_eq!(r.tick(210), [Action::KillTaskRound]);
    assert_eq!(r.on(Event::TaskLeft(0)), [Action::Finish]);
}

#[test]
fn a_lost_reaper_makes_main_exit_unknown_unless_the_container_went_with_it() {
    let cfg = sidecar();
    for dead in [false, true] {
        let mut r = Run::main_running(cfg.clone());
        let mut want = vec![];
        if !dead {
            want.push(Action::KillMainGroup);
        }
        want.push(Action::RecordMain {
            end: MainEnd::Lost,
            marks: Marks {
                target_gone: dead,
                ..Marks::default()
            },
        });
        want.push(Action::Finish);
        let now = r.at(10);
        let lost = vec![Cmd::Main, Cmd::Hook(POST)];
        let got = r.on(Event::Reaped {
            now,
            exits: vec![],
            lost,
            target_dead: dead,
        });
        assert_eq!(got, want, "container dead: {dead}");
    }
}

#[test]
fn a_lost_hook_ends_failed_with_why() {
    let cfg = sidecar();
    let mut r = Run::pre_start_running(cfg);
    let now = r.at(10);
    let got = r.on(Event::Reaped {
        now,
        exits: vec![],
        lost: vec![Cmd::Hook(PRE)],
        target_dead: true,
    });
    assert_eq!(
        got,
        [
            Action::RecordHook {
                code: None,
                signal: None,
                why: Some("the main container is gone".into()),
                timed_out: false,
            },
            pre_start_failed(Marks::default()),
            Action::Finish,
        ]
    );
}

#[test]
fn a_sidecar_whose_container_is_gone_is_stopped_and_marked() {
    let cfg = sidecar();
    let mut r = Run::main_running(cfg);
    assert!(!r.m.target_check_due(r.at(999), false));
    assert!(r.m.target_check_due(r.at(1000), false));
    let alive = Event::Tick {
        now: r.at(1000),
        target_alive: Some(true),
    };
    assert_eq!(r.on(alive), []);
    assert!(
        !r.m.target_check_due(r.at(1999), false),
        "checked again a second later"
    );
    let gone = Event::Tick {
        now: r.at(2000),
        target_alive: Some(false),
    };
    assert_eq!(r.on(gone), [Action::SignalTask(SIGTERM)]);
    let marks = Marks {
        target_gone: true,
        ..Marks::default()
    };
    assert_eq!(
        r.reaped(2100, &[killed(Cmd::Main, SIGTERM)]),
        [
            Action::Drain(Cmd::Main),
            main_exit(None, Some(SIGTERM as i32), marks),
        ]
    );
    assert_eq!(r.tick(2200), [Action::CountTask]);
    assert_eq!(r.on(Event::TaskCounted(0)), [Action::Finish]);
    assert!(
        r.m.target_check_due(r.at(3000), false),
        "what the task left is watched while it lives"
    );
    assert!(!r.m.target_check_due(r.at(3000), true));
}

#[test]
fn the_run_moves_on_only_once_every_round_of_a_tick_is_counted() {
    // A stopped preStart whose tree outlives it, and the task's own stop after the run:
    // one tick is due for both rounds.
    let cfg = with_post_stop();
    let mut r = Run::pre_start_running(cfg);
    r.stop(0);
    r.tick(1000);
    r.on(Event::HookLeft(1));
    assert_eq!(
        r.reaped(1000, &[killed(Cmd::Hook(PRE), SIGKILL)]),
        [
            Action::Drain(Cmd::Hook(PRE)),
            hook_end(None, Some(SIGKILL as i32), false),
            pre_start_failed(STOPPED),
            Action::StartHook {
                name: POST,
                first: false
            },
        ]
    );
    assert_eq!(r.on(Event::HookStarted { now: r.at(1000) }), []);
    assert_eq!(
        r.tick(1100),
        [],
        "the postStop hook is not stopped by the earlier request"
    );
}
