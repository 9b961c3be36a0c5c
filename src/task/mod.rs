//! Tasks: the model every layer shares, name rules, times, and the durable store. The
//! bottom layer: it imports nothing else of the crate.

pub mod exhaustion;
pub mod fields;
pub mod fsutil;
pub mod identity;
pub mod io_workers;
pub mod lifecycle;
pub mod model;
pub mod name;
pub mod offload;
pub mod policy;
pub mod resources;
pub mod store;
pub mod template;
pub mod time;
