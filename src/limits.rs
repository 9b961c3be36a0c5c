//! The open-file limit. The agent holds a socket per connection, so its soft limit is
//! raised to the hard limit at start (with the 1024 many runtimes give, ~1,000 idle
//! connections were enough to make `/health` time out). Tasks keep the limit the agent
//! was started with: programs that size tables by it or use `select(2)` expect the usual
//! value, which is why systemd and Go restore it for the processes they start.

use std::sync::OnceLock;

use nix::sys::resource::{Resource, getrlimit, setrlimit};

static ORIGINAL_SOFT: OnceLock<u64> = OnceLock::new();

/// Raises the soft RLIMIT_NOFILE to the hard limit; returns (before, after).
pub fn raise_nofile() -> std::io::Result<(u64, u64)> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    let _ = ORIGINAL_SOFT.set(soft);
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok((soft, hard))
}

/// The soft limit before `raise_nofile`, when it raised it: what tasks should get.
pub fn original_nofile() -> Option<u64> {
    let original = *ORIGINAL_SOFT.get()?;
    let (soft, _) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    (soft != original).then_some(original)
}

/// Sets the soft limit (at most the hard one): the shim server restores the original.
pub fn set_nofile_soft(soft: u64) -> std::io::Result<()> {
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    setrlimit(Resource::RLIMIT_NOFILE, soft.min(hard), hard)?;
    Ok(())
}
