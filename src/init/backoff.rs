//! When to start the agent again after it died: at once, then with capped exponential
//! backoff while it keeps dying, and at once again after it ran well for a while.

use std::time::Duration;

/// The first delay once an immediate restart did not help; doubled per further failure.
const FIRST_DELAY: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// The longest pause between two starts.
    pub max_delay: Duration,
    /// An agent that ran at least this long counts as healthy: its death is restarted at
    /// once, as if it were the first.
    pub reset_after: Duration,
}

#[derive(Debug)]
pub struct Backoff {
    policy: Policy,
    /// Deaths in a row, each after a run shorter than `reset_after`.
    failures: u32,
}

impl Backoff {
    pub fn new(policy: Policy) -> Self {
        Backoff {
            policy,
            failures: 0,
        }
    }

    /// The delay before the next start of an agent that died after running for `ran`.
    pub fn next_delay(&mut self, ran: Duration) -> Duration {
        if ran >= self.policy.reset_after {
            self.failures = 0;
        }
        let delay = match self.failures {
            0 => Duration::ZERO,
            n => FIRST_DELAY
                .saturating_mul(1u32 << (n - 1).min(20))
                .min(self.policy.max_delay),
        };
        self.failures = self.failures.saturating_add(1);
        delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: Policy = Policy {
        max_delay: Duration::from_secs(10),
        reset_after: Duration::from_secs(60),
    };

    fn secs(d: Duration) -> u64 {
        d.as_secs()
    }

    #[test]
    fn at_once_then_doubling_up_to_the_cap() {
        let mut b = Backoff::new(POLICY);
        let short = Duration::from_millis(50);
        let delays: Vec<u64> = (0..8).map(|_| secs(b.next_delay(short))).collect();
        assert_eq!(delays, [0, 1, 2, 4, 8, 10, 10, 10]);
    }

    #[test]
    fn a_healthy_run_resets_the_backoff() {
        let mut b = Backoff::new(POLICY);
        let short = Duration::from_millis(50);
        for _ in 0..4 {
            b.next_delay(short);
        }
        assert_eq!(secs(b.next_delay(Duration::from_secs(60))), 0);
        assert_eq!(secs(b.next_delay(short)), 1);
    }

    #[test]
    fn many_failures_stay_at_the_cap() {
        let mut b = Backoff::new(POLICY);
        for _ in 0..1000 {
            assert!(b.next_delay(Duration::ZERO) <= POLICY.max_delay);
        }
    }
}
