//! Adopting a process task found in the data dir after a restart: its journal says
//! whether it never ran (it is started), runs or ran (it is followed), or is being
//! started by a shim right now (looked at again later, never waited for). A task that
//! shows signs of a run its journal does not name is never run again.

use std::io;
use std::path::Path;

use super::ProcessRuntime;
use crate::runtime::journal::follow::{observe, settle_durably};
use crate::runtime::journal::{self, Launch, Unrecorded, lock_held};
use crate::runtime::{EventSink, Observed, RuntimeError, TaskRef, outcome};
use crate::task::layout::{self, TaskDir};

impl ProcessRuntime {
    /// Picks up a task found in the data dir after a restart: `None` when it never
    /// started (the caller starts it), else how it is or ended.
    pub(crate) async fn recover(
        &self,
        task: TaskRef,
        events: EventSink,
    ) -> Option<Result<Observed, RuntimeError>> {
        match start_state(&task.dir) {
            StartState::NotStarted if ran_without_journal(&task.dir) => {
                // Its journal was emptied or lost, yet it bears a claim's mark or the task
                // left output: it ran (maybe still runs, unsupervised). Reported as lost, never run again.
                let t = task.clone();
                Some(
                    crate::sys::offload::offload(move || {
                        tracing::error!(task = %t.name, "the task's launch was claimed but its run journal says nothing; it is not run again");
                        settle_durably(&t, Unrecorded::SupervisorLost, &journal::Run::default())
                    })
                    .await,
                )
            }
            StartState::NotStarted => None,
            StartState::Started => Some(observe(task, events, None).await),
            // Its shim says soon: the caller adopts it again later (the task shows as
            // waiting meanwhile).
            StartState::Starting => Some(Err(RuntimeError::Journal {
                path: TaskDir(&task.dir).journal().display().to_string(),
                source: io::Error::other("its supervisor is still starting it"),
            })),
        }
    }
}

impl ProcessRuntime {
    /// The task's end, when its journal holds it (see `Runtime::finished`): what `recover`
    /// then reports, from one read of the journal. A journal that can't be read, or
    /// names no finished run, says nothing here: `recover` judges it.
    pub(crate) fn finished_run(&self, task: &TaskRef) -> Option<Observed> {
        let run = journal::read_run(&task.dir).ok()?;
        run.finished().then(|| outcome::observed(&run, task))
    }
}

/// The journal names no launch, yet it bears the mark of a claim or the task's output
/// (its logs, their index) is there: what only a run leaves.
fn ran_without_journal(dir: &Path) -> bool {
    let journal_says_nothing = journal::read_run(dir).is_ok_and(|r| r.launch.is_none());
    journal_says_nothing
        && (journal::claim_marked(dir)
            || [layout::STDOUT, layout::STDERR, layout::OUTPUT_INDEX]
                .iter()
                .any(|f| dir.join(f).exists()))
}

/// What the journal says about a task found after a restart.
enum StartState {
    /// No shim took its launch: it never ran, and is started now.
    NotStarted,
    /// A shim took it (or the node restarted since): how it went is in the journal.
    Started,
    /// A shim holds the task but has not yet said whether it runs it (no claim, or no
    /// `started` line after its claim): looked at again later, never waited for here, so
    /// that a restart's recovery (and the API behind it) is not held up.
    Starting,
}

/// Never waits: one read of the journal and one lock probe.
fn start_state(dir: &Path) -> StartState {
    let run = journal::read_run(dir).unwrap_or_default();
    let rebooted = run.launch.as_ref().is_some_and(Launch::from_earlier_boot);
    if run.started.is_some() || run.exit.is_some() || rebooted {
        return StartState::Started;
    }
    if !lock_held(&journal::shim_lock(dir)) {
        return if run.claimed.is_some() {
            StartState::Started
        } else {
            StartState::NotStarted
        };
    }
    let hooks = run
        .launch
        .as_ref()
        .is_some_and(|l| l.pre_start.is_some() || l.post_stop.is_some());
    match (&run.launch, &run.claimed) {
        // A journal emptied under a running shim: it runs the task, and nothing more will
        // be learnt of its start.
        (None, _) => StartState::Started,
        // Its hooks' steps are followed through the journal (a `preStart` may run long).
        (Some(_), Some(_)) if hooks => StartState::Started,
        // Between its claim and its `started` line, or before its claim: moments.
        (Some(_), _) => StartState::Starting,
    }
}
