//! What comes back: the completion of a request and how it ended, the events a job sends to its
//! front-end while it runs, and the protocol's error codes.

use serde::{Deserialize, Serialize};

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
    /// Calls of the request's tools the model made (taken out of `text`).
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub tool_calls: Vec<crate::api::ToolCall>,
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
            tool_calls: Vec::new(),
        }
    }
}

/// Error codes of the protocol's `error` replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    TooLarge,
    QueueFull,
    ShuttingDown,
    /// The deadline passed while the request waited; it never started.
    Deadline,
    /// The peer is not allowed to use the daemon.
    Forbidden,
    /// A request continues a session that is not held and sends no history to rebuild it.
    SessionUnknown,
    /// A connection beyond `socket.max_connections` or `socket.max_connections_per_uid`.
    TooManyConnections,
    /// A connection with nothing in flight stayed silent past `socket.idle_timeout_ms`.
    IdleTimeout,
    Internal,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::QueueFull => "queue_full",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::Deadline => "deadline",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::SessionUnknown => "session_unknown",
            ErrorCode::TooManyConnections => "too_many_connections",
            ErrorCode::IdleTimeout => "idle_timeout",
            ErrorCode::Internal => "internal",
        }
    }
}

/// What the engine or the queue sends back about a job.
#[derive(Debug, Clone)]
pub enum Event {
    /// Streamed text (only for `stream: true`).
    Token(String),
    /// Terminal: the completion.
    Done(Box<Completion>),
    /// Terminal: the request failed or was refused.
    Error(ErrorCode, String),
}

impl Event {
    pub fn is_terminal(&self) -> bool {
        !matches!(self, Event::Token(_))
    }
}

/// Where a cancelled id was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CancelState {
    /// Removed from the queue; it was answered `done` with `finish_reason: "cancelled"`.
    Queued,
    /// The engine stops it before its next token.
    Running,
    Unknown,
}
