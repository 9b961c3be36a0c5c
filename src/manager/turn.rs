//! The per-task async locks (`Entry::lifecycle`, `Entry::deleting`): one bit each, their
//! waiters woken through `Notify`s shared by all. A `tokio::sync::Mutex` cost every task
//! 40 bytes, twice, for locks that are seldom contended (a delete waiting for a start, a
//! recovery step); 100,000 finished tasks held 7.6 MiB of them. A release wakes the
//! waiters of every lock that shares its `Notify`, each of which tries its own lock
//! again: spread over `STRIPES`, so that even thousands of waiters (a sync deleting
//! tasks while they start) are woken a few dozen at a time, not all at each release.

use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Notify;

const STRIPES: usize = 64;

/// Told when a turn of a lock of their stripe ends.
static ENDED: [Notify; STRIPES] = [const { Notify::const_new() }; STRIPES];

/// An async lock without a value.
#[derive(Default)]
pub(super) struct TurnLock(AtomicBool);

/// Holding a `TurnLock`; dropping it (also with the future that held it) releases it.
#[must_use]
pub(super) struct Turn<'a>(&'a TurnLock);

/// Waits until `ready` gives a value, looking again each time `told` is notified: the
/// wait of a state kept in an atomic, its changes told through a `Notify` shared by many.
pub(super) async fn when<T>(told: &Notify, mut ready: impl FnMut() -> Option<T>) -> T {
    loop {
        // Registered before looking, so a change between the two wakes it.
        let notified = told.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if let Some(v) = ready() {
            return v;
        }
        notified.await;
    }
}

impl TurnLock {
    pub(super) async fn lock(&self) -> Turn<'_> {
        when(self.ended(), || {
            self.0
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
                .then(|| Turn(self)) // not `then_some`: a `Turn` made and dropped releases the lock
        })
        .await
    }

    /// The `Notify` of this lock's stripe, by its address: a lock can't move while
    /// anyone holds it or waits for it (both borrow it).
    fn ended(&self) -> &'static Notify {
        &ENDED[(std::ptr::from_ref(self) as usize >> 3) % STRIPES]
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        self.0.0.store(false, Ordering::Release);
        self.0.ended().notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_holder_at_a_time_and_every_waiter_gets_its_turn() {
        let lock = Arc::new(TurnLock::default());
        let inside = Arc::new(AtomicUsize::new(0));
        let turns = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let (lock, inside, turns) = (lock.clone(), inside.clone(), turns.clone());
                tokio::spawn(async move {
                    for _ in 0..50 {
                        let _turn = lock.lock().await;
                        assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0, "two holders");
                        tokio::task::yield_now().await;
                        inside.fetch_sub(1, Ordering::SeqCst);
                        turns.fetch_add(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(turns.load(Ordering::SeqCst), 400);
    }

    #[tokio::test]
    async fn a_waiter_wakes_when_the_holder_is_dropped_and_a_cancelled_one_holds_nothing() {
        let lock = Arc::new(TurnLock::default());
        let held = lock.lock().await;
        // A waiter given up while waiting leaves no trace.
        let given_up = tokio::time::timeout(Duration::from_millis(20), lock.lock()).await;
        assert!(given_up.is_err(), "the lock is held");
        let waiter = {
            let lock = lock.clone();
            tokio::spawn(async move {
                let _turn = lock.lock().await;
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "it waits while the turn is held");
        drop(held);
        tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .expect("woken by the release")
            .unwrap();
        // A holder whose future is dropped releases the lock.
        let holder = {
            let lock = lock.clone();
            tokio::spawn(async move {
                let _turn = lock.lock().await;
                std::future::pending::<()>().await;
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        holder.abort();
        let _ = holder.await;
        let _turn = tokio::time::timeout(Duration::from_secs(10), lock.lock())
            .await
            .expect("free once its holder was cancelled");
    }
}
