//! What travels from the front-ends to the engine worker and back: a generation request, how it
//! ended, its usage and timing, and the bounded priority queue with deadlines that carries jobs
//! from the tokio front-ends to the engine thread.
//!
//! The queue is the one place that knows every accepted request until its terminal reply: it
//! answers `queue_full` and `shutting_down` at submission, `deadline` for a job whose deadline
//! passes while it waits, `cancelled` for one cancelled before it starts, and counts all of it
//! for the status reply. Replies travel on a per-front-end channel ([`ReplyTx`]) whose `send`
//! never blocks, so neither the engine nor the queue waits on a slow client.

mod jobs;

pub use jobs::{
    CancelState, Counters, ErrorCode, Event, Job, Queue, QueueStatus, Reply, ReplyTx, Running,
    Submit,
};

use serde::{Deserialize, Serialize};

use crate::engine::chat::Message;
use crate::engine::sampler::SamplingParams;

/// What to generate from.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// Chat messages, rendered with the model's chat template.
    Messages(Vec<Message>),
    /// Plain text completion, no template.
    Raw(String),
}

#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: Prompt,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation stops before the first occurrence of any of these.
    pub stop: Vec<String>,
    /// Never stop at an end-of-generation token: generate `max_tokens` (or until the window is
    /// full). For benchmarks and load tests, as llama.cpp's server's `ignore_eos`.
    pub ignore_eos: bool,
    /// The conversation this request continues.
    pub session: Option<SessionRef>,
}

/// A request's `session`: its id, and the earlier turns when the client sends them.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionRef {
    pub id: String,
    /// `Some`: the conversation before this turn, as the client has it (the session is rebuilt
    /// from it when it is not held, or held with other turns); `Some(empty)` starts a session.
    /// `None`: continue the held session, an error when none is held.
    pub history: Option<Vec<Message>>,
}

impl GenerateRequest {
    pub fn new(prompt: Prompt) -> GenerateRequest {
        GenerateRequest {
            prompt,
            max_tokens: 256,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
            ignore_eos: false,
            session: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// An end-of-generation token or a stop string.
    Stop,
    /// `max_tokens` reached, or the context window is full.
    Length,
    Cancelled,
    Deadline,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
            FinishReason::Deadline => "deadline",
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Tokens evicted from the context window while this request ran (the window slid).
    #[serde(default)]
    pub evicted_tokens: usize,
    /// Prompt tokens of the oldest turns dropped so that the prompt fits the window.
    #[serde(default)]
    pub prompt_tokens_dropped: usize,
    /// Tokens of a session's earlier turns reused from its cache instead of prefilled.
    #[serde(default)]
    pub cached_tokens: usize,
}

/// The session a reply belongs to, after its turn.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionInfo {
    pub id: String,
    pub turns: usize,
    /// Positions of the session in the cache now.
    pub cached_tokens: usize,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Timing {
    /// Request start to first generated token (prefill included).
    pub ttft_ms: f64,
    /// Prompt tokens per second during prefill.
    pub prefill_tps: f64,
    /// Generated tokens per second after the first.
    pub decode_tps: f64,
    pub total_ms: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Completion {
    pub text: String,
    pub finish_reason: FinishReason,
    pub usage: Usage,
    pub timing: Timing,
    /// Generated token ids (end-of-generation token excluded).
    #[serde(skip, default)]
    pub tokens: Vec<u32>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub session: Option<SessionInfo>,
}

impl Completion {
    /// The completion of a request that ended before it started (cancelled while queued).
    pub fn empty(finish_reason: FinishReason) -> Completion {
        Completion {
            text: String::new(),
            finish_reason,
            usage: Usage::default(),
            timing: Timing::default(),
            tokens: Vec::new(),
            session: None,
        }
    }
}
