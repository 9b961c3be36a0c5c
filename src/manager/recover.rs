//! Start-up: every stored task is re-attached to (or started, or its deletion finished).

use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};

use super::entry::{Entry, Persisted};
use super::events::Seen;
use super::{Manager, ManagerError};
use crate::task::model::{TaskState, reason};
use crate::task::store::TaskRecord;

/// Tasks re-attached at once.
const ADOPT_CONCURRENCY: usize = 32;
/// Tasks whose end is read in one off-loaded job (`settle_finished`), and such jobs at once.
const SETTLE_BATCH: usize = 256;
/// More than the CPUs: with a cold data dir each job mostly waits on the disk.
const SETTLE_CONCURRENCY: usize = 8;

impl Manager {
    pub(super) async fn recover_all(self: &Arc<Self>) -> Result<usize, ManagerError> {
        let records = self
            .store
            .io(|s| {
                let mut records = s.load_all()?;
                for rec in &mut records {
                    if start_error_of_a_run(s, rec) {
                        // An earlier version recorded this end for a task whose launch a
                        // shim took (it ran out of descriptors reading the journal): the
                        // journal is the authority, so the task is adopted instead.
                        tracing::warn!(task = %rec.name, "a recorded start error contradicts the run journal; the journal is followed");
                        rec.final_status = None;
                    }
                }
                Ok(records)
            })
            .await?;
        let n = records.len();
        let mut adopt = Vec::new();
        for rec in records {
            let state = match &rec.final_status {
                Some(t) => TaskState::Terminated(t.clone()),
                None => TaskState::initialized(),
            };
            let deleting = rec.deletion_timestamp.is_some();
            let has_final = rec.final_status.is_some();
            let host_uid = rec.host_uid;
            let kind = self.kind_for(&rec.spec, rec.exec_mode);
            let entry = Entry::new(rec, state, Persisted::Yes, kind);
            {
                let mut tasks = self.write_tasks();
                tasks.insert(entry.clone());
                // Its uid stays its own, and nobody else's, until it is forgotten.
                if let (Some(uid), Some(mut pool)) = (host_uid, self.uid_pool()) {
                    pool.hold(uid);
                }
            }
            if deleting {
                self.spawn_finalize(entry);
            } else if !has_final {
                adopt.push(entry);
            }
        }
        let unsettled = adopt.len();
        let adopt = self.settle_finished(adopt).await;
        let (ended, adopted) = (unsettled - adopt.len(), adopt.len());
        // Each adoption a task of its own: the runtime reads the journal partly in line,
        // and one future polling them all would do those reads on one thread.
        futures::stream::iter(adopt)
            .map(|entry| {
                let mgr = self.clone();
                tokio::spawn(async move {
                    let life = entry.lifecycle.lock().await;
                    mgr.start_locked(&entry, life, true).await;
                })
            })
            .buffer_unordered(ADOPT_CONCURRENCY)
            // A panic fails the recovery, as it did when the adoptions ran in line.
            .map(|joined| joined.map_err(|e| ManagerError::Internal(e.to_string())))
            .try_for_each(|()| async { Ok(()) })
            .await?;
        tracing::info!(
            tasks = n,
            found_ended = ended,
            adopted,
            "recovered tasks from the data dir"
        );
        Ok(n)
    }

    /// Shows the end of each task whose own files say its run is over (most tasks of a
    /// data dir, after a while), read in batches off the event loop: one job per batch
    /// rather than a handoff (and a second read of its journal) per task. Returns the
    /// others, to be adopted.
    async fn settle_finished(self: &Arc<Self>, entries: Vec<Arc<Entry>>) -> Vec<Arc<Entry>> {
        let mut batches = Vec::new();
        let mut rest = entries.into_iter().peekable();
        while rest.peek().is_some() {
            batches.push(rest.by_ref().take(SETTLE_BATCH).collect::<Vec<_>>());
        }
        let mut judged = futures::stream::iter(batches)
            .map(|batch| {
                let mgr = self.clone();
                crate::sys::offload::offload(move || {
                    batch
                        .into_iter()
                        .map(|entry| {
                            let ended = match mgr.runtime_of(&entry) {
                                Ok(rt) => rt.finished(&mgr.task_ref(&entry)),
                                // Its adoption reports why it has no runtime.
                                Err(_) => None,
                            };
                            (entry, ended)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .buffer_unordered(SETTLE_CONCURRENCY);
        let mut adopt = Vec::new();
        // Each batch applied as it comes: no batch's ends wait for all the others'.
        while let Some(batch) = judged.next().await {
            for (entry, ended) in batch {
                match ended {
                    Some(observed) => {
                        // As an adoption applies what it found: under its lifecycle lock.
                        let _life = entry.lifecycle.lock().await;
                        self.apply_seen(&entry, observed, Seen::AtStart);
                    }
                    None => adopt.push(entry),
                }
            }
        }
        adopt
    }
}

/// The record says the task failed to start, yet its journal shows a shim took its
/// launch (a `claimed` or an `exit` line of a run). Blocking; only such records are read.
fn start_error_of_a_run(store: &crate::task::store::Store, rec: &TaskRecord) -> bool {
    use crate::runtime::journal;
    rec.final_status
        .as_ref()
        .is_some_and(|t| t.reason == reason::START_ERROR)
        && rec.spec.process.is_some()
        && journal::read_run(&store.dir(&rec.name)).is_ok_and(|r| {
            r.claimed.is_some() && r.exit.as_ref().is_none_or(|x| x.start_error.is_none())
        })
}
