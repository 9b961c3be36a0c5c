//! Tasks: the model every layer shares, name rules, times, and the durable store. The
//! bottom layer: it imports nothing else of the crate.

pub mod exhaustion;
pub mod fsutil;
pub mod io_workers;
pub mod model;
pub mod name;
pub mod store;
pub mod time;
