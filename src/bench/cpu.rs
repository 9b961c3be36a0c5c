//! What a phase of `task-executor bench` cost the whole machine in CPU time (every
//! process: the bench's own clients, the agent, its shims, the tasks), from /proc/stat
//! before and after it.
//!
//! Why: on a machine this small, the rate of tasks is bounded by CPU per task once no CPU
//! is idle, and by waiting (the disk, a lock) while some is. The share of busy CPU says
//! which of the two a rate shows; the CPU per task says what a task costs whatever the
//! rate, and varies less between runs and machines of a kind than the rate does.

use std::io;
use std::time::Instant;

use super::BenchError;

/// The machine's CPU counters at one moment, in clock ticks summed over its CPUs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    busy: u64,
    total: u64,
    at: Instant,
}

impl Sample {
    pub fn now() -> Result<Sample, BenchError> {
        let text = std::fs::read_to_string("/proc/stat")?;
        let (busy, total) =
            parse(&text).ok_or_else(|| BenchError::Setup("no cpu line in /proc/stat".into()))?;
        Ok(Sample {
            busy,
            total,
            at: Instant::now(),
        })
    }
}

/// What the machine did between two samples.
#[derive(Clone, Copy, Debug)]
pub struct Used {
    /// CPU time of every process and of the kernel, in milliseconds.
    pub busy_ms: f64,
    /// Of all the CPUs' time, the share that was busy (0 to 1).
    pub busy_share: f64,
    pub wall_secs: f64,
}

impl Used {
    pub fn between(a: &Sample, b: &Sample) -> Result<Used, BenchError> {
        let ticks = tick_ms()?;
        let busy = b.busy.saturating_sub(a.busy);
        let total = b.total.saturating_sub(a.total).max(1);
        Ok(Used {
            busy_ms: busy as f64 * ticks,
            busy_share: busy as f64 / total as f64,
            wall_secs: b.at.duration_since(a.at).as_secs_f64(),
        })
    }

    /// CPU milliseconds for each of `done` things done.
    pub fn per(&self, done: f64) -> f64 {
        self.busy_ms / done.max(1.0)
    }
}

/// Runs `f` and says what the machine's CPUs did meanwhile.
pub fn measured<T>(f: impl FnOnce() -> Result<T, BenchError>) -> Result<(T, Used), BenchError> {
    let a = Sample::now()?;
    let out = f()?;
    let b = Sample::now()?;
    Ok((out, Used::between(&a, &b)?))
}

/// Milliseconds in one of /proc/stat's clock ticks (`USER_HZ`).
fn tick_ms() -> Result<f64, BenchError> {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(hz)) if hz > 0 => Ok(1000.0 / hz as f64),
        _ => Err(BenchError::Io(io::Error::other("no CLK_TCK"))),
    }
}

/// Busy and total ticks of the `cpu` line (all CPUs): user, nice, system, idle, iowait,
/// irq, softirq, steal. `guest` time is already counted in `user`, so it is left out;
/// idle and iowait are not busy.
fn parse(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    let [user, nice, system, idle, iowait, irq, softirq, steal] = v.try_into().ok()?;
    let busy = user + nice + system + irq + softirq + steal;
    Some((busy, busy + idle + iowait))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_time_is_all_but_idle_and_iowait_and_guest_is_not_counted_twice() {
        let stat = "cpu  100 5 50 800 40 3 2 1 30 0\ncpu0 50 2 25 400 20 1 1 0 15 0\nintr 1\n";
        assert_eq!(parse(stat), Some((161, 1001)));
        assert_eq!(parse("intr 1\n"), None, "no cpu line");
        assert_eq!(parse("cpu  1 2 3\n"), None, "a line too short");
    }

    #[test]
    fn a_busy_loop_shows_as_busy_cpu() {
        let ((), used) = measured(|| {
            let t = Instant::now();
            let mut x = 0u64;
            while t.elapsed().as_millis() < 300 {
                x = std::hint::black_box(x.wrapping_add(1));
            }
            Ok(())
        })
        .unwrap();
        // At least most of the loop's own 300 ms (other processes may add to it).
        assert!(used.busy_ms >= 200.0, "{used:?}");
        assert!(used.busy_share > 0.0 && used.busy_share <= 1.0, "{used:?}");
        assert!(used.wall_secs >= 0.3, "{used:?}");
        assert!((used.per(2.0) - used.busy_ms / 2.0).abs() < 1e-9);
    }
}
