//! Blocking work off the event loop, without a panic when the OS refuses a thread.
//!
//! tokio's `spawn_blocking` panics ("OS can't spawn worker thread") when it needs a new
//! thread and a pids limit is reached; in a request handler that drops the connection, in
//! an exit waiter it loses the task's outcome. `offload` runs the job on the event loop's
//! own thread instead: slower for a moment, never lost. The store's writes have fixed
//! threads of their own (`io_workers`); these jobs are short reads and scans.

use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::{Arc, Mutex, PoisonError};

/// Runs `f` on tokio's blocking pool, or inline when the pool can't get a thread.
pub async fn offload<F, R>(f: F) -> R
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    // The job stays reachable from here: a refused spawn drops tokio's copy unrun.
    let slot = Arc::new(Mutex::new(Some(f)));
    let pooled = slot.clone();
    let spawned = catch_unwind(AssertUnwindSafe(|| {
        tokio::task::spawn_blocking(move || take(&pooled).map(|f| f()))
    }));
    match spawned {
        Ok(handle) => match handle.await {
            Ok(Some(r)) => return r,
            // The job panicked: the caller sees the panic, as it would without us.
            Err(e) if e.is_panic() => resume_unwind(e.into_panic()),
            // Cancelled at runtime shutdown before it ran: run it here.
            Ok(None) | Err(_) => {}
        },
        Err(_) => {
            tracing::warn!("no thread for blocking work (out of processes?): running it inline");
        }
    }
    match take(&slot) {
        Some(f) => f(),
        // Unreachable: the job either ran (and returned above) or is still in the slot.
        None => unreachable!("an offloaded job ran but its result was lost"),
    }
}

fn take<F>(slot: &Mutex<Option<F>>) -> Option<F> {
    slot.lock().unwrap_or_else(PoisonError::into_inner).take()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn runs_the_job_and_returns_its_result() {
        assert_eq!(offload(|| 6 * 7).await, 42);
    }

    #[tokio::test]
    async fn a_panicking_job_panics_its_caller() {
        let r = tokio::spawn(offload(|| -> u8 { panic!("job failed") })).await;
        assert!(r.unwrap_err().is_panic());
    }
}
