//! What a client asks for: chat messages or a raw prompt, how to sample, when to stop, the
//! session it continues, and the limits every request is checked against where it is parsed.

use serde::{Deserialize, Serialize};

use super::reply::ErrorCode;

/// Longest request id (and session id), in bytes.
pub const MAX_ID_BYTES: usize = 128;
/// Most stop strings per request, and the longest one in bytes.
pub const MAX_STOPS: usize = 8;
pub const MAX_STOP_BYTES: usize = 64;

/// The roles a message may have: what the chat templates of the supported models know.
pub const ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Message {
    pub role: String,
    pub content: String,
    /// An assistant turn's calls of the request's tools (rendered back through the template).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// A `tool` turn: the call it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
        }
    }
}

/// Most tools a request may offer.
pub const MAX_TOOLS: usize = 64;

/// A call of one of the request's tools, in the shape chat templates expect (OpenAI's, with
/// `arguments` an object rather than a JSON string).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolCall {
    #[serde(default)]
    pub id: String,
    #[serde(rename = "type", default = "function_type")]
    pub kind: String,
    pub function: FunctionCall,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionCall {
    pub name: String,
    /// A JSON object (what the model wrote), or whatever other JSON value it wrote.
    #[serde(default)]
    pub arguments: serde_json::Value,
}

fn function_type() -> String {
    "function".into()
}

impl ToolCall {
    pub fn new(id: String, name: String, arguments: serde_json::Value) -> ToolCall {
        ToolCall {
            id,
            kind: function_type(),
            function: FunctionCall { name, arguments },
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingParams {
    /// 0 is greedy.
    pub temperature: f32,
    /// 0 disables.
    pub top_k: usize,
    /// 1 disables.
    pub top_p: f32,
    /// 0 disables.
    pub min_p: f32,
    /// 1 disables.
    pub repeat_penalty: f32,
    /// How many recent tokens the penalty looks at.
    pub repeat_last_n: usize,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.7,
            top_k: 40,
            top_p: 0.9,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: 0,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> SamplingParams {
        SamplingParams {
            temperature: 0.0,
            ..Default::default()
        }
    }

    /// Checks ranges; the error names the field and what is allowed.
    pub fn validate(&self) -> Result<(), String> {
        let t = self.temperature;
        if !(t.is_finite() && (0.0..=100.0).contains(&t)) {
            return Err(format!("temperature = {t}: allowed 0..=100"));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p = {}: allowed (0, 1]", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(format!("min_p = {}: allowed [0, 1]", self.min_p));
        }
        if !(self.repeat_penalty.is_finite() && self.repeat_penalty > 0.0) {
            return Err(format!(
                "repeat_penalty = {}: allowed > 0",
                self.repeat_penalty
            ));
        }
        Ok(())
    }
}

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
    /// Tools the model may call (OpenAI's `tools` entries), passed to the chat template; calls
    /// in the output come back parsed in [`crate::api::Completion::tool_calls`].
    pub tools: Vec<serde_json::Value>,
}

/// A request's `session`: its id, and the earlier turns when the client sends them.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionRef {
    pub id: String,
    /// Whose session it is: the front-end sets it from the peer's identity (never from the
    /// request), and sessions of different owners never meet, whatever their ids.
    pub owner: String,
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
            tools: Vec::new(),
        }
    }

    /// Checks the request against `limits`: the one check every front-end runs where it
    /// parses a request (the engine takes what passed). The error is the code to answer and a
    /// message that names the field and what is allowed.
    pub fn validate(&self, limits: &Limits) -> Result<(), (ErrorCode, String)> {
        let bad = |m: String| Err((ErrorCode::BadRequest, m));
        match &self.prompt {
            Prompt::Messages(m) => {
                if m.is_empty() {
                    return bad("messages: empty; give at least one message".into());
                }
                check_roles(m, "messages")?;
            }
            Prompt::Raw(p) => {
                if p.is_empty() {
                    return bad("prompt: empty".into());
                }
            }
        }
        if self.max_tokens == 0 {
            return bad("max_tokens = 0: allowed at least 1".into());
        }
        if self.max_tokens > limits.max_tokens {
            return Err((
                ErrorCode::TooLarge,
                format!(
                    "max_tokens = {}: the limit is {} (limits.max_tokens)",
                    self.max_tokens, limits.max_tokens
                ),
            ));
        }
        if self.stop.len() > MAX_STOPS {
            return Err((
                ErrorCode::TooLarge,
                format!(
                    "stop: {} strings; the limit is {MAX_STOPS}",
                    self.stop.len()
                ),
            ));
        }
        if let Some((i, s)) = self
            .stop
            .iter()
            .enumerate()
            .find(|(_, s)| s.is_empty() || s.len() > MAX_STOP_BYTES)
        {
            return bad(format!(
                "stop[{i}]: {} bytes; allowed 1..={MAX_STOP_BYTES}",
                s.len()
            ));
        }
        if let Err(m) = self.sampling.validate() {
            return bad(m);
        }
        if self.tools.len() > MAX_TOOLS {
            return Err((
                ErrorCode::TooLarge,
                format!("tools: {}; the limit is {MAX_TOOLS}", self.tools.len()),
            ));
        }
        if !self.tools.is_empty() && !matches!(self.prompt, Prompt::Messages(_)) {
            return bad("tools: tools are offered in a chat; send messages, not prompt".into());
        }
        if let Some(SessionRef {
            id: sid, history, ..
        }) = &self.session
        {
            let ok = |c: char| c.is_ascii_alphanumeric() || "-_.:@".contains(c);
            if sid.is_empty() || sid.len() > MAX_ID_BYTES || !sid.chars().all(ok) {
                return bad(format!(
                    "session: {sid:?}; allowed 1..={MAX_ID_BYTES} letters, digits and -_.:@"
                ));
            }
            if !matches!(self.prompt, Prompt::Messages(_)) {
                return bad(
                    "session: a session continues a chat; send messages, not prompt".into(),
                );
            }
            if let Some(h) = history {
                check_roles(h, "history")?;
            }
        }
        let n = match &self.prompt {
            Prompt::Messages(m) => m.len(),
            Prompt::Raw(_) => 0,
        } + self
            .session
            .as_ref()
            .and_then(|s| s.history.as_ref())
            .map_or(0, Vec::len);
        if n > limits.max_messages {
            return Err((
                ErrorCode::TooLarge,
                format!(
                    "messages: {n} (with history); the limit is {} (limits.max_messages)",
                    limits.max_messages
                ),
            ));
        }
        Ok(())
    }
}

fn check_roles(messages: &[Message], field: &str) -> Result<(), (ErrorCode, String)> {
    match messages
        .iter()
        .enumerate()
        .find(|(_, m)| !ROLES.contains(&m.role.as_str()))
    {
        Some((i, m)) => Err((
            ErrorCode::BadRequest,
            format!(
                "{field}[{i}].role = {:?}: allowed {}",
                m.role,
                ROLES.map(|r| format!("{r:?}")).join(", ")
            ),
        )),
        None => Ok(()),
    }
}

/// Per-request limits (`[limits]` in the config), checked where a request is parsed.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    pub max_tokens: usize,
    pub default_max_tokens: usize,
    pub max_line_bytes: usize,
    /// Messages a request may name, `history` included.
    pub max_messages: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_tokens: 1024,
            default_max_tokens: 256,
            max_line_bytes: 65536,
            max_messages: 256,
        }
    }
}
