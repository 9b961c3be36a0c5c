//! Tasks: the model every layer shares, name rules, times, and the durable store. Above
//! `sys` only: it imports nothing else of the crate.

pub mod fields;
pub mod identity;
pub mod layout;
pub mod lifecycle;
pub mod model;
pub mod name;
pub mod policy;
pub mod resources;
pub mod store;
pub mod template;
pub mod time;
