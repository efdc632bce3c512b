//! Front-ends: where requests come from and where their answers go.
//!
//! - [`cli`]: `edgellm ask`, in-process generation streamed to stdout.
//!
//! The daemon's Unix socket and MQTT front-ends join here; all of them hand the engine a
//! [`crate::queue::GenerateRequest`] and stream back what it produces.

pub mod cli;
