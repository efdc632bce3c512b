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
pub mod http;
pub mod mqtt;
pub mod unix;

use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::api::status::Status;
use crate::api::Limits;
use crate::config::SocketConfig;
use crate::queue::{Caller, Queue};

/// Who may use the socket, who may act on every peer's work, and how many connections are
/// served: the `[socket]` keys that SIGHUP reloads.
#[derive(Debug, Clone, PartialEq)]
pub struct Access {
    pub allowed_uids: Vec<u32>,
    pub allowed_gids: Vec<u32>,
    pub admin_uids: Vec<u32>,
    pub admin_gids: Vec<u32>,
    pub max_connections: usize,
    pub max_connections_per_uid: usize,
    pub idle_timeout: Duration,
}

impl Access {
    /// The access settings of the `[socket]` table.
    pub fn of(s: &SocketConfig) -> Access {
        Access {
            allowed_uids: s.allowed_uids.clone(),
            allowed_gids: s.allowed_gids.clone(),
            admin_uids: s.admin_uids.clone(),
            admin_gids: s.admin_gids.clone(),
            max_connections: s.max_connections,
            max_connections_per_uid: s.max_connections_per_uid,
            idle_timeout: Duration::from_millis(s.idle_timeout_ms),
        }
    }

    /// A peer is let in by its uid, its primary gid or one of its supplementary groups.
    pub fn allows(&self, uid: u32, gids: &[u32]) -> bool {
        (self.allowed_uids.is_empty() && self.allowed_gids.is_empty())
            || self.allowed_uids.contains(&uid)
            || gids.iter().any(|g| self.allowed_gids.contains(g))
    }

    /// An admin may cancel any request and sees every id in `status`.
    pub fn is_admin(&self, uid: u32, gids: &[u32]) -> bool {
        self.admin_uids.contains(&uid) || gids.iter().any(|g| self.admin_gids.contains(g))
    }
}

/// What SIGHUP may change while the daemon runs.
#[derive(Debug, Clone, PartialEq)]
pub struct Live {
    pub limits: Limits,
    /// Applied to requests that name no deadline; 0: none.
    pub default_deadline_ms: u64,
    pub access: Access,
}

/// What every daemon front-end shares.
pub struct Context {
    pub queue: Arc<Queue>,
    live: RwLock<Live>,
    /// Builds the status reply.
    status: Box<dyn Fn() -> Status + Send + Sync>,
}

impl Context {
    pub fn new(
        queue: Arc<Queue>,
        live: Live,
        status: Box<dyn Fn() -> Status + Send + Sync>,
    ) -> Context {
        Context {
            queue,
            live: RwLock::new(live),
            status,
        }
    }

    /// The settings in force now.
    pub fn live(&self) -> Live {
        self.live.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Puts new settings in force (SIGHUP); requests already accepted keep what they got.
    pub fn set_live(&self, live: Live) {
        *self.live.write().unwrap_or_else(|p| p.into_inner()) = live;
    }

    pub fn limits(&self) -> Limits {
        self.live
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .limits
            .clone()
    }

    /// The whole status, running request's id included (the daemon's own STATUS= line).
    pub fn status(&self) -> Status {
        (self.status)()
    }

    /// The status as `caller` may see it: the running request's id only when it is the
    /// caller's peer's (or the caller is an admin).
    pub fn status_for(&self, caller: Caller<'_>) -> Status {
        let mut s = self.status();
        if let Some(r) = &mut s.queue.running {
            if !caller.admin && r.owner != *caller.owner.peer {
                r.id = None;
                if let Some(kv) = &mut s.kv {
                    kv.id = None;
                }
            }
        }
        s
    }
}

/// Completes when the flag is (or turns) true, or its sender is gone.
pub(crate) async fn until_true(rx: &mut tokio::sync::watch::Receiver<bool>) {
    // The guard `wait_for` returns is not `Send`: dropped here, not held in the caller's future.
    let _ = rx.wait_for(|v| *v).await.map(|_| ());
}
