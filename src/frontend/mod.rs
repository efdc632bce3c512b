//! Front-ends: where requests come from and where their answers go.
//!
//! - [`cli`]: `edgellm ask` answered in-process, streamed to stdout.
//! - [`client`]: `edgellm ask` and `edgellm status` through a running daemon's socket.
//! - [`unix`]: the daemon's Unix socket.
//! - [`mqtt`]: the daemon's MQTT front-end (rumqttc; MQTT 5 or 3.1.1).
//!
//! The daemon's front-ends are tokio tasks: they parse and check a request (once, with
//! [`crate::api::wire`]), put a [`crate::queue::Job`] on the queue, and stream back what the
//! engine worker sends as [`crate::api::wire::Response`]s. They import the vocabulary, the
//! queue and the config; only `cli` (in-process `ask`) touches the engine.

pub mod cli;
pub mod client;
pub mod mqtt;
pub mod unix;

use std::sync::Arc;

use crate::api::status::Status;
use crate::api::Limits;
use crate::queue::Queue;

/// What every daemon front-end shares.
pub struct Context {
    pub queue: Arc<Queue>,
    pub limits: Limits,
    /// Applied to requests that name no deadline; 0: none.
    pub default_deadline_ms: u64,
    /// Builds the status reply.
    pub status: Box<dyn Fn() -> Status + Send + Sync>,
}

impl Context {
    pub fn status(&self) -> Status {
        (self.status)()
    }
}

/// Completes when the flag is (or turns) true, or its sender is gone.
pub(crate) async fn until_true(rx: &mut tokio::sync::watch::Receiver<bool>) {
    // The guard `wait_for` returns is not `Send`: dropped here, not held in the caller's future.
    let _ = rx.wait_for(|v| *v).await.map(|_| ());
}
