//! Deleting a task: a durable request first, then stop and removal in the background,
//! each retried until it succeeds.

use std::sync::Arc;
use std::time::Duration;

use backon::Retryable;

use super::entry::Entry;
use super::{Manager, ManagerError, backoff};

const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);

impl Manager {
    /// Makes the deletion request durable, then finishes it in the background. Nothing in
    /// memory changes before the marker is on disk: a failure (a full disk, no thread)
    /// leaves the task as it was and a later request tries again.
    pub(super) async fn request_deletion(self: &Arc<Self>, name: &str) -> Result<(), ManagerError> {
        let Some(entry) = self.entry(name) else {
            return Ok(());
        };
        let _one_at_a_time = entry.deleting.lock().await;
        if entry.deletion_requested() {
            return Ok(()); // durable already, and being carried out
        }
        if !entry.wait_persisted().await {
            return Ok(()); // its create failed: there is nothing to delete
        }
        let n = name.to_string();
        let at = self.store.io(move |s| s.mark_deleting(&n)).await?;
        entry.parts().deletion_timestamp = Some(at);
        tracing::info!(task = name, "deletion requested");
        self.changed(name);
        self.spawn_finalize(entry.clone());
        Ok(())
    }

    pub(super) fn spawn_finalize(self: &Arc<Self>, entry: Arc<Entry>) {
        let mgr = self.clone();
        tokio::spawn(async move { mgr.finalize(entry).await });
    }

    /// Stops the task, removes its directory, then forgets it; each step is retried until
    /// it succeeds, as the deletion was promised.
    async fn finalize(&self, entry: Arc<Entry>) {
        let _life = entry.lifecycle.lock().await;
        let task = self.task_ref(&entry);
        let name = task.name.clone();
        // Both steps never give up, so no error comes back.
        let _ = (|| async {
            match self.runtime_of(&entry) {
                Ok(rt) => {
                    super::start::unpanicked(rt.stop(task.clone(), self.cfg.stop_grace)).await
                }
                Err(_) => Ok(()), // its runtime is off now: nothing of ours can be running
            }
        })
        .retry(backoff::forever(RETRY_FIRST, RETRY_MAX))
        .sleep(tokio::time::sleep)
        .notify(|e, retry_in| {
            tracing::warn!(task = %name, error = %e, retry_in = ?retry_in, "stopping the task failed");
        })
        .await;
        let _ = (|| {
            let n = name.clone();
            self.store.io(move |s| s.remove(&n))
        })
        .retry(backoff::forever(RETRY_FIRST, RETRY_MAX))
        .sleep(tokio::time::sleep)
        .notify(|e, retry_in| {
            tracing::warn!(task = %name, error = %e, retry_in = ?retry_in, "removing the task directory failed");
        })
        .await;
        self.forget(&entry);
        tracing::info!(task = %name, "task deleted");
        self.changed(&name);
    }
}
