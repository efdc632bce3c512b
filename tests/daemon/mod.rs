//! The daemon: config, protocol and queue in-process, then the real `edgellm serve` binary over
//! a real Unix socket, with a NOTIFY_SOCKET listener standing in for systemd, and the units
//! checked by `systemd-analyze`.

mod errors;
pub mod harness;
mod lib_level;
mod peers;
mod service;
mod signals;
