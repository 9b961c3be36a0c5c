//! Starting a task, and what happens when it can't be started: a lack of resources is
//! waited out (bounded), any other failure ends the task with the reason, durably.
//!
//! A start that failed because the machine ran out of processes, file descriptors, memory
//! or disk (`RuntimeError::OutOfResources`: nothing of the task ran) leaves the task
//! `waiting` with reason `ResourcesExhausted` and a message saying what ran out, and is
//! retried with exponential backoff (0.2 s doubling to 10 s) for `start_retry` (default
//! 5 min); after that it ends `StartFailed`. The lifecycle lock is not held between
//! attempts, so a deletion in the meantime goes ahead and ends the retries.

use std::sync::Arc;
use std::time::Duration;

use backon::Retryable;

use super::entry::Entry;
use super::{Manager, backoff};
use crate::runtime::{Observed, RuntimeError};
use crate::task::model::{self, TaskState, Terminated, Waiting};

const RETRY_FIRST: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(10);
/// Between attempts to persist a final status the disk refused.
const PERSIST_RETRY_FIRST: Duration = Duration::from_millis(500);
const PERSIST_RETRY_MAX: Duration = Duration::from_secs(30);

/// A runtime call that panics (tokio's `spawn_blocking` does when the OS refuses a thread)
/// fails like any other error, so the task ends with the reason instead of staying
/// `waiting` with nobody to finish its start.
pub(super) async fn unpanicked<T>(
    call: impl std::future::Future<Output = Result<T, RuntimeError>>,
) -> Result<T, RuntimeError> {
    use futures::FutureExt;
    std::panic::AssertUnwindSafe(call)
        .catch_unwind()
        .await
        .unwrap_or_else(|panic| {
            let what = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("panic");
            Err(RuntimeError::Launch(std::io::Error::other(format!(
                "the runtime failed: {what}"
            ))))
        })
}

enum Attempt {
    /// Running, terminated, or failed for good (recorded).
    Settled,
    OutOfResources(RuntimeError),
    /// The launch was sent (or found sent) but its journal could not be read: the
    /// journal is the only authority now, so the task is adopted later, never failed.
    Unobserved(RuntimeError),
}

impl Manager {
    /// Starts (`adopt`: re-attaches to) the task. The caller holds the task's lifecycle lock
    /// and hands it over, so that it is released while a start that ran out of resources
    /// waits for its next attempt.
    pub(super) async fn start_locked(
        self: &Arc<Self>,
        entry: &Arc<Entry>,
        life: super::turn::Turn<'_>,
        adopt: bool,
    ) {
        let outcome = self.attempt(entry, adopt).await;
        drop(life);
        match outcome {
            Attempt::Settled => {}
            Attempt::OutOfResources(e) => self.retry_start(entry.clone(), e),
            Attempt::Unobserved(e) => self.retry_adopt(entry.clone(), e),
        }
    }

    /// One start; the caller holds the lifecycle lock.
    async fn attempt(self: &Arc<Self>, entry: &Arc<Entry>, adopt: bool) -> Attempt {
        let task = self.task_ref(entry);
        let result = match self.runtime_of(entry) {
            Ok(rt) if adopt => unpanicked(rt.adopt(task, self.events.clone())).await,
            Ok(rt) => unpanicked(rt.start(task, self.events.clone())).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(observed) => {
                self.apply(entry, observed);
                Attempt::Settled
            }
            Err(e @ RuntimeError::OutOfResources { .. }) => Attempt::OutOfResources(e),
            Err(e @ RuntimeError::Journal { .. }) => Attempt::Unobserved(e),
            Err(e) => {
                let t = Terminated::failed_to_start(e.task_reason(), 128, e.to_string());
                self.fail_with(entry, t).await;
                Attempt::Settled
            }
        }
    }

    /// Shows why the task waits (before the caller answers), then retries in the background.
    fn retry_start(self: &Arc<Self>, entry: Arc<Entry>, first: RuntimeError) {
        if RETRY_FIRST < self.cfg.start_retry {
            self.show_backoff(&entry, &first, RETRY_FIRST, 1);
        }
        let mgr = self.clone();
        tokio::spawn(async move {
            // The caller's attempt failed with `first`: handing it back as the first
            // result makes backon wait before the next attempt.
            let mut first = Some(first);
            let mut attempt = 1;
            let outcome = (|| {
                let (mgr, entry, first) = (mgr.clone(), entry.clone(), first.take());
                async move {
                    if let Some(e) = first {
                        return Err(e);
                    }
                    let _life = entry.lifecycle.lock().await;
                    if !mgr.still_wanted(&entry) {
                        return Ok(None);
                    }
                    // Out of resources means nothing ran: a fresh start, not an adoption.
                    match mgr.attempt(&entry, false).await {
                        Attempt::Settled => Ok(None),
                        Attempt::OutOfResources(e) => Err(e),
                        Attempt::Unobserved(e) => Ok(Some(e)),
                    }
                }
            })
            .retry(backoff::for_at_most(
                RETRY_FIRST,
                RETRY_MAX,
                mgr.cfg.start_retry,
            ))
            .sleep(tokio::time::sleep)
            .notify(|err, retry_in| {
                // The first wait was shown before the caller was answered.
                if attempt > 1 {
                    mgr.show_backoff(&entry, err, retry_in, attempt);
                }
                attempt += 1;
            })
            .await;
            match outcome {
                Ok(None) => {}
                Ok(Some(launched)) => mgr.retry_adopt(entry, launched),
                Err(err) => {
                    let _life = entry.lifecycle.lock().await;
                    if mgr.still_wanted(&entry) {
                        let why = format!(
                            "{err}; gave up after {}",
                            humantime::format_duration(mgr.cfg.start_retry)
                        );
                        let t = Terminated::failed_to_start(err.task_reason(), 128, why);
                        mgr.fail_with(&entry, t).await;
                    }
                }
            }
        });
    }

    /// Adopts the task again, with backoff, until its journal can be read: a launch was
    /// sent, so it may run, and only its journal can say how it ended (an end recorded
    /// here instead, say `StartError` for running out of descriptors while reading it,
    /// would be a wrong answer for good). No end of retrying: nothing is given up.
    fn retry_adopt(self: &Arc<Self>, entry: Arc<Entry>, first: RuntimeError) {
        let mgr = self.clone();
        tokio::spawn(async move {
            let mut first = Some(first);
            // Never gives up, so no error comes back.
            let _ = (|| {
                let (mgr, entry, first) = (mgr.clone(), entry.clone(), first.take());
                async move {
                    if let Some(e) = first {
                        return Err(e);
                    }
                    let _life = entry.lifecycle.lock().await;
                    if !mgr.still_wanted(&entry) {
                        return Ok(());
                    }
                    match mgr.attempt(&entry, true).await {
                        Attempt::Settled => Ok(()),
                        Attempt::OutOfResources(e) | Attempt::Unobserved(e) => Err(e),
                    }
                }
            })
            .retry(backoff::forever(RETRY_FIRST, RETRY_MAX))
            .sleep(tokio::time::sleep)
            .notify(|err, retry_in| {
                tracing::warn!(task = %entry.name(), error = %err, retry_in = ?retry_in, "the task's run journal can't be read or says nothing settled yet; it is adopted again later");
            })
            .await;
        });
    }

    /// Neither deleted nor replaced by a newer task of the same name.
    fn still_wanted(&self, entry: &Arc<Entry>) -> bool {
        !entry.deletion_requested()
            && self
                .entry(entry.name())
                .is_some_and(|e| Arc::ptr_eq(&e, entry))
    }

    fn show_backoff(&self, entry: &Entry, err: &RuntimeError, retry_in: Duration, attempt: u32) {
        let name = entry.name();
        {
            let mut parts = entry.parts();
            if !matches!(parts.state, TaskState::Waiting(_)) {
                return;
            }
            parts.state = TaskState::Waiting(Waiting {
                reason: Some(model::reason::RESOURCES_EXHAUSTED.into()),
                message: Some(format!(
                    "{err}; retrying in {} (attempt {attempt})",
                    humantime::format_duration(retry_in)
                )),
            });
        }
        tracing::warn!(
            task = %name, error = %err, retry_in = ?retry_in, attempt,
            "task start ran out of resources; it waits and is retried"
        );
        self.changed(name);
    }

    /// The task could not be run: keep the reason, durably (retried in the background
    /// while the disk refuses it), and show it. The caller holds the lifecycle lock.
    pub(super) async fn fail_with(self: &Arc<Self>, entry: &Arc<Entry>, t: Terminated) {
        entry.parts().final_status = Some(Box::new(t.clone()));
        let rec = entry.record();
        if let Err(e) = self.store.io(move |s| s.update(&rec)).await {
            tracing::error!(task = %entry.name(), error = %e, "could not persist the start failure; retrying");
            self.persist_later(entry.clone());
        }
        self.apply(entry, Observed::Terminated(t));
    }

    fn persist_later(self: &Arc<Self>, entry: Arc<Entry>) {
        let mgr = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(PERSIST_RETRY_FIRST).await;
            // Never gives up, so no error comes back.
            let _ = (|| {
                let (mgr, entry) = (mgr.clone(), entry.clone());
                async move {
                    let _life = entry.lifecycle.lock().await;
                    if !mgr.still_wanted(&entry) {
                        return Ok(());
                    }
                    let rec = entry.record();
                    mgr.store.io(move |s| s.update(&rec)).await?;
                    tracing::info!(task = %entry.name(), "start failure persisted");
                    Ok(())
                }
            })
            .retry(backoff::forever(PERSIST_RETRY_FIRST * 2, PERSIST_RETRY_MAX))
            .sleep(tokio::time::sleep)
            .notify(|e: &std::io::Error, retry_in| {
                tracing::warn!(task = %entry.name(), error = %e, retry_in = ?retry_in, "persisting the start failure failed");
            })
            .await;
        });
    }
}
