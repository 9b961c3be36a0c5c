//! A fixed set of threads, started with the store, that run its blocking file-system work.
//!
//! tokio's `spawn_blocking` creates threads on demand and panics when the OS refuses one
//! ("OS can't spawn worker thread") — which is exactly when a pids limit is reached, and
//! it took DELETE down with it. These threads exist from the start, so a request never
//! needs a new thread; a job that finds them gone gets an error, never a panic. A job runs
//! to its end even when its caller stops waiting (a client that disconnects), so no file
//! is left half-written by a cancelled request.

use std::io;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

type Job = Box<dyn FnOnce() + Send + 'static>;

#[derive(Debug)]
pub struct IoWorkers {
    jobs: Mutex<mpsc::Sender<Job>>,
}

impl IoWorkers {
    /// Starts `threads` workers; fails (at start-up, not on a request) if the OS can't.
    pub fn start(threads: usize, name: &str) -> io::Result<Arc<Self>> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                // Store jobs are shallow (a few syscalls and a small JSON document).
                .stack_size(512 * 1024)
                .spawn(move || worker(&rx))?;
        }
        Ok(Arc::new(IoWorkers {
            jobs: Mutex::new(tx),
        }))
    }

    /// Runs `f` on a worker and waits for its result.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        let sent = self
            .jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(job);
        if sent.is_err() {
            return Err(io::Error::other("the store's I/O threads are gone"));
        }
        rx.await
            .unwrap_or_else(|_| Err(io::Error::other("a store I/O job panicked")))
    }
}

fn worker(rx: &Mutex<mpsc::Receiver<Job>>) {
    loop {
        // The lock is held only while taking a job, not while running it.
        let job = match rx.lock().unwrap_or_else(|p| p.into_inner()).recv() {
            Ok(job) => job,
            Err(_) => return, // every sender is gone: the store was dropped
        };
        // A panicking job loses its result (its caller gets an error), not the worker.
        let _ = catch_unwind(AssertUnwindSafe(job));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn runs_jobs_and_survives_a_panicking_one() {
        let w = IoWorkers::start(2, "test-io").unwrap();
        assert_eq!(w.run(|| Ok(2 + 2)).await.unwrap(), 4);
        let err = w
            .run(|| -> io::Result<()> { panic!("job failed") })
            .await
            .unwrap_err();
        assert!(err.to_string().contains("panicked"), "{err}");
        let results = futures::future::join_all((0..16).map(|i| w.run(move || Ok(i * 2)))).await;
        let sum: i32 = results.into_iter().map(Result::unwrap).sum();
        assert_eq!(sum, (0..16).map(|i| i * 2).sum::<i32>());
    }

    #[tokio::test]
    async fn a_job_whose_caller_left_still_runs_to_its_end() {
        let w = IoWorkers::start(1, "test-io").unwrap();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let fut = w.run(move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            done_tx.send(()).unwrap();
            Ok(())
        });
        // Poll once so the job is queued, then drop the caller.
        let _ = futures::poll!(Box::pin(fut));
        done_rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the job ran although its caller went away");
    }
}
