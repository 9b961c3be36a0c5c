//! The operating system, below every other layer: what the kernel offers, wrapped once
//! and imported from everywhere, importing nothing else of the crate.
//!
//! - `procfs`: every parse of `/proc` (identities, status, stat, mountinfo, cgroups).
//! - `proc_handle`: a process named by pid plus start time, signalled only while it is
//!   still that process (a pidfd where the kernel has one).
//! - `fsutil`: whole-file replacement, directory syncs, the durable write path.
//! - `io_workers` and `offload`: blocking file work kept off the async threads.
//! - `exhaustion`: which errors mean "out of descriptors, memory or threads".
//! - `inotify`: one instance and one event thread shared by many counted watches.
//! - `socket`: the socket pair between the agent's processes.

pub mod exhaustion;
pub mod fsutil;
pub mod inotify;
pub mod io_workers;
pub mod offload;
pub mod proc_handle;
pub mod procfs;
pub mod socket;
