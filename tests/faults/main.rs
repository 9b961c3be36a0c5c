//! Fault injection against the real binary: full data dirs, clients that go away
//! mid-request, a machine out of processes, and `kill -9` of the agent, a shim and the
//! shim server at random moments during concurrent creates. The invariant throughout:
//! every accepted task runs at most once — exactly once unless its own supervisor was
//! killed — and its result is reported; nothing accepted is lost or left waiting.
//!
//! Randomised scenarios print their seed; `FAULTS_SEED=<n>` replays one.

#[path = "../support/mod.rs"]
mod support;

mod adopt;
mod common;
mod data_dir;
mod disconnect;
mod disk;
mod fds;
mod kills;
mod launch;
mod pids;
