//! The library's minimal HTTP client.
pub use task_executor::client::*;
