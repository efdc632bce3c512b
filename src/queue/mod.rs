//! What travels from the front-ends to the engine worker and back: a generation request, how it
//! ended, and its usage and timing. The bounded priority queue with deadlines that carries these
//! between tokio front-ends and the engine thread sits here too, with the daemon.

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
}

impl GenerateRequest {
    pub fn new(prompt: Prompt) -> GenerateRequest {
        GenerateRequest {
            prompt,
            max_tokens: 256,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
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

#[derive(Debug, Clone, Default, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Timing {
    /// Request start to first generated token (prefill included).
    pub ttft_ms: f64,
    /// Prompt tokens per second during prefill.
    pub prefill_tps: f64,
    /// Generated tokens per second after the first.
    pub decode_tps: f64,
    pub total_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Completion {
    pub text: String,
    pub finish_reason: FinishReason,
    pub usage: Usage,
    pub timing: Timing,
    /// Generated token ids (end-of-generation token excluded).
    #[serde(skip)]
    pub tokens: Vec<u32>,
}
