//! Front-ends: where requests come from and where their answers go.
//!
//! - [`cli`]: `edgellm ask` answered in-process, streamed to stdout.
//! - [`client`]: `edgellm ask` and `edgellm status` through a running daemon's socket.
//! - [`protocol`]: the JSON requests and replies every daemon front-end speaks.
//! - [`unix`]: the daemon's Unix socket.
//!
//! The daemon's front-ends are tokio tasks: they parse and check a request, put a
//! [`crate::queue::Job`] on the queue, and stream back what the engine worker sends.

pub mod cli;
pub mod client;
pub mod protocol;
pub mod unix;

use std::sync::Arc;

use crate::config::Limits;
use crate::queue::Queue;

/// What every daemon front-end shares.
pub struct Context {
    pub queue: Arc<Queue>,
    pub limits: Limits,
    /// Applied to requests that name no deadline; 0: none.
    pub default_deadline_ms: u64,
    /// Builds the status reply (`{"type":"status", …}`).
    pub status: Box<dyn Fn() -> serde_json::Value + Send + Sync>,
}

impl Context {
    pub fn status(&self) -> serde_json::Value {
        (self.status)()
    }
}
