//! The manager's retry schedules: exponential backoff (doubling) from a first delay up to a
//! cap, through `backon`, the crate kube-runtime retries with.

use std::time::Duration;

use backon::ExponentialBuilder;

/// Retries that never give up: what was promised (a deletion, a recorded end) is
/// carried out whenever the machine lets it.
pub(super) fn forever(first: Duration, max: Duration) -> ExponentialBuilder {
    ExponentialBuilder::new()
        .with_min_delay(first)
        .with_max_delay(max)
        .with_factor(2.0)
        .without_max_times()
}

/// Retries that give up once their delays would add up to more than `total`.
pub(super) fn for_at_most(first: Duration, max: Duration, total: Duration) -> ExponentialBuilder {
    forever(first, max).with_total_delay(Some(total))
}
