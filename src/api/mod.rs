//! The ground floor: the vocabulary every other layer speaks, and nothing of this crate below
//! it. Front-ends parse into these types, the queue carries them, the engine answers with them.
//!
//! - [`request`]: messages, sampling, the generate request and its limits (checked once, where
//!   a request is parsed: [`GenerateRequest::validate`]).
//! - [`reply`]: the completion, finish reasons, usage and timing, events, error codes.
//! - [`status`]: what the `status` reply reports.
//! - [`wire`]: the JSON protocol as serde types (`#[serde(tag = "op")]` requests,
//!   `#[serde(tag = "type")]` replies), shared by the daemon's front-ends and the client.

pub mod reply;
pub mod request;
pub mod status;
pub mod wire;

pub use reply::{
    CancelState, Completion, ErrorCode, Event, FinishReason, SessionInfo, Timing, Usage,
};
pub use request::{
    FunctionCall, GenerateRequest, Limits, Message, Prompt, SamplingParams, SessionRef, ToolCall,
};
