//! The JSON protocol shared by the Unix socket and MQTT front-ends (DESIGN.md, "Protocol"):
//! parsing and checking a request line, and writing replies.
//!
//! Every problem with a request is answered, never dropped: malformed JSON or a wrong field is
//! `bad_request` naming the field, a size over a limit is `too_large` naming the limit, and the
//! reply carries the request's `id` whenever one could be read.

use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{json, Value};

use crate::config::Limits;
use crate::engine::chat::Message;
use crate::engine::sampler::SamplingParams;
use crate::queue::{
    CancelState, Completion, ErrorCode, Event, GenerateRequest, Prompt, SessionRef,
};

/// Longest request id, in bytes.
pub const MAX_ID_BYTES: usize = 128;
/// Most stop strings per request, and the longest one in bytes.
pub const MAX_STOPS: usize = 8;
pub const MAX_STOP_BYTES: usize = 64;
/// Allowed priorities; higher runs first.
pub const PRIORITY_RANGE: std::ops::RangeInclusive<i32> = -100..=100;
/// Longest deadline a request may name: one day.
pub const MAX_DEADLINE_MS: u64 = 86_400_000;

/// A generate request as it arrives.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire {
    id: String,
    messages: Option<Vec<Message>>,
    prompt: Option<String>,
    max_tokens: Option<usize>,
    temperature: Option<f32>,
    top_k: Option<usize>,
    top_p: Option<f32>,
    min_p: Option<f32>,
    repeat_penalty: Option<f32>,
    repeat_last_n: Option<usize>,
    seed: Option<u64>,
    stop: Option<Vec<String>>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    ignore_eos: bool,
    session: Option<String>,
    /// With `session`: the conversation before this turn.
    history: Option<Vec<Message>>,
    priority: Option<i32>,
    deadline_ms: Option<u64>,
    /// MQTT 3.1.1 reply topic; other front-ends refuse it.
    reply_to: Option<String>,
}

/// A checked generate request, ready to become a queue job.
#[derive(Debug, Clone)]
pub struct Generate {
    pub id: String,
    pub req: GenerateRequest,
    pub stream: bool,
    /// As the request named it; front-ends default it (MQTT may take it from a user property).
    pub priority: Option<i32>,
    pub deadline: Option<Instant>,
    pub reply_to: Option<String>,
}

#[derive(Debug, Clone)]
pub enum Incoming {
    Generate(Box<Generate>),
    Status,
    Cancel { id: String },
}

/// A request that cannot be accepted, with what to answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub id: Option<String>,
    pub code: ErrorCode,
    pub message: String,
}

impl Refusal {
    fn new(id: &Option<String>, code: ErrorCode, message: impl Into<String>) -> Refusal {
        Refusal {
            id: id.clone(),
            code,
            message: message.into(),
        }
    }

    pub fn to_json(&self) -> String {
        error_json(self.id.as_deref(), self.code, &self.message)
    }
}

/// Parses one request. `now` anchors `deadline_ms`; `default_deadline_ms` (0: none) applies to a
/// request that names none.
pub fn parse(
    line: &[u8],
    limits: &Limits,
    default_deadline_ms: u64,
    now: Instant,
) -> Result<Incoming, Refusal> {
    let none = None;
    let value: Value = serde_json::from_slice(line)
        .map_err(|e| Refusal::new(&none, ErrorCode::BadRequest, format!("malformed JSON: {e}")))?;
    let Value::Object(obj) = &value else {
        return Err(Refusal::new(
            &none,
            ErrorCode::BadRequest,
            "a request is a JSON object",
        ));
    };
    let id = obj.get("id").and_then(Value::as_str).map(str::to_string);
    if let Some(op) = obj.get("op") {
        let allowed = |k: &str| k == "op" || k == "id";
        if let Some(k) = obj.keys().find(|k| !allowed(k)) {
            return Err(Refusal::new(
                &id,
                ErrorCode::BadRequest,
                format!("unknown field `{k}` in an op request: allowed `op`, `id`"),
            ));
        }
        return match op.as_str() {
            Some("status") => Ok(Incoming::Status),
            Some("cancel") => match &id {
                Some(i) => Ok(Incoming::Cancel { id: i.clone() }),
                None => Err(Refusal::new(
                    &id,
                    ErrorCode::BadRequest,
                    "id: a cancel needs the id (a string) of the request to cancel",
                )),
            },
            _ => Err(Refusal::new(
                &id,
                ErrorCode::BadRequest,
                format!("op = {op}: allowed \"status\", \"cancel\""),
            )),
        };
    }
    let w: Wire = serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let message = if path == "." {
            inner.to_string()
        } else {
            format!("{path}: {inner}")
        };
        Refusal::new(&id, ErrorCode::BadRequest, message)
    })?;
    check(w, limits, default_deadline_ms, now).map(|g| Incoming::Generate(Box::new(g)))
}

fn check(
    w: Wire,
    limits: &Limits,
    default_deadline_ms: u64,
    now: Instant,
) -> Result<Generate, Refusal> {
    let id = Some(w.id.clone());
    let bad = |m: String| Refusal::new(&id, ErrorCode::BadRequest, m);
    if w.id.is_empty() || w.id.len() > MAX_ID_BYTES {
        return Err(bad(format!(
            "id: {} bytes; allowed 1..={MAX_ID_BYTES}",
            w.id.len()
        )));
    }
    let prompt = match (w.messages, w.prompt) {
        (Some(m), None) => {
            if m.is_empty() {
                return Err(bad("messages: empty; give at least one message".into()));
            }
            if let Some((i, _)) = m.iter().enumerate().find(|(_, m)| m.role.is_empty()) {
                return Err(bad(format!("messages[{i}].role: empty")));
            }
            Prompt::Messages(m)
        }
        (None, Some(p)) => {
            if p.is_empty() {
                return Err(bad("prompt: empty".into()));
            }
            Prompt::Raw(p)
        }
        (Some(_), Some(_)) => {
            return Err(bad("messages and prompt: give one of them, not both".into()))
        }
        (None, None) => {
            return Err(bad(
                "messages: missing; give `messages` (chat) or `prompt` (raw completion)".into(),
            ))
        }
    };
    let max_tokens = w.max_tokens.unwrap_or(limits.default_max_tokens);
    if max_tokens == 0 {
        return Err(bad("max_tokens = 0: allowed at least 1".into()));
    }
    if max_tokens > limits.max_tokens {
        return Err(Refusal::new(
            &id,
            ErrorCode::TooLarge,
            format!(
                "max_tokens = {max_tokens}: the limit is {} (limits.max_tokens)",
                limits.max_tokens
            ),
        ));
    }
    let stop = w.stop.unwrap_or_default();
    if stop.len() > MAX_STOPS {
        return Err(Refusal::new(
            &id,
            ErrorCode::TooLarge,
            format!("stop: {} strings; the limit is {MAX_STOPS}", stop.len()),
        ));
    }
    if let Some((i, s)) = stop
        .iter()
        .enumerate()
        .find(|(_, s)| s.is_empty() || s.len() > MAX_STOP_BYTES)
    {
        return Err(bad(format!(
            "stop[{i}]: {} bytes; allowed 1..={MAX_STOP_BYTES}",
            s.len()
        )));
    }
    let d = SamplingParams::default();
    let sampling = SamplingParams {
        temperature: w.temperature.unwrap_or(d.temperature),
        top_k: w.top_k.unwrap_or(d.top_k),
        top_p: w.top_p.unwrap_or(d.top_p),
        min_p: w.min_p.unwrap_or(d.min_p),
        repeat_penalty: w.repeat_penalty.unwrap_or(d.repeat_penalty),
        repeat_last_n: w.repeat_last_n.unwrap_or(d.repeat_last_n),
        seed: w.seed.unwrap_or(d.seed),
    };
    sampling.validate().map_err(bad)?;
    let session =
        match (w.session, w.history) {
            (Some(sid), history) => {
                let ok = |c: char| c.is_ascii_alphanumeric() || "-_.:@".contains(c);
                if sid.is_empty() || sid.len() > MAX_ID_BYTES || !sid.chars().all(ok) {
                    return Err(bad(format!(
                        "session: {sid:?}; allowed 1..={MAX_ID_BYTES} letters, digits and -_.:@"
                    )));
                }
                if !matches!(prompt, Prompt::Messages(_)) {
                    return Err(bad(
                        "session: a session continues a chat; send messages, not prompt".into(),
                    ));
                }
                if let Some((i, _)) = history
                    .iter()
                    .flatten()
                    .enumerate()
                    .find(|(_, m)| m.role.is_empty())
                {
                    return Err(bad(format!("history[{i}].role: empty")));
                }
                Some(SessionRef { id: sid, history })
            }
            (None, Some(_)) => return Err(bad(
                "history: only with session; without one, send the whole conversation in messages"
                    .into(),
            )),
            (None, None) => None,
        };
    let priority = w.priority;
    if let Some(p) = priority {
        check_priority(p).map_err(bad)?;
    }
    let deadline_ms = match w.deadline_ms {
        Some(0) => return Err(bad("deadline_ms = 0: allowed 1..=86400000".into())),
        Some(ms) if ms > MAX_DEADLINE_MS => {
            return Err(bad(format!(
                "deadline_ms = {ms}: allowed 1..={MAX_DEADLINE_MS}"
            )))
        }
        Some(ms) => ms,
        None => default_deadline_ms,
    };
    let deadline = (deadline_ms > 0).then(|| now + Duration::from_millis(deadline_ms));
    Ok(Generate {
        id: w.id,
        req: GenerateRequest {
            prompt,
            max_tokens,
            sampling,
            stop,
            ignore_eos: w.ignore_eos,
            session,
        },
        stream: w.stream,
        priority,
        deadline,
        reply_to: w.reply_to,
    })
}

/// A priority's range check; the message names the field and the range.
pub fn check_priority(p: i32) -> Result<(), String> {
    if PRIORITY_RANGE.contains(&p) {
        Ok(())
    } else {
        Err(format!(
            "priority = {p}: allowed {}..={}",
            PRIORITY_RANGE.start(),
            PRIORITY_RANGE.end()
        ))
    }
}

/// The answer to `{"op":"cancel","id":…}`: where the request was.
pub fn cancel_json(id: &str, state: CancelState) -> String {
    json!({"id": id, "type": "cancel", "state": state}).to_string()
}

pub fn error_json(id: Option<&str>, code: ErrorCode, message: &str) -> String {
    error_value(id, code, message).to_string()
}

fn error_value(id: Option<&str>, code: ErrorCode, message: &str) -> Value {
    json!({"id": id, "type": "error", "code": code.as_str(), "message": message})
}

/// The reply line for an event of request `id`.
pub fn event_json(id: &str, event: &Event) -> String {
    event_value(id, event).to_string()
}

/// The reply for an event of request `id`, as a JSON value (MQTT adds `seq`).
pub fn event_value(id: &str, event: &Event) -> Value {
    match event {
        Event::Token(text) => json!({"id": id, "type": "token", "text": text}),
        Event::Done(c) => done_value(id, c),
        Event::Error(code, message) => error_value(Some(id), *code, message),
    }
}

fn done_value(id: &str, c: &Completion) -> Value {
    let mut v = json!({
        "id": id,
        "type": "done",
        "text": c.text,
        "finish_reason": c.finish_reason.as_str(),
        "usage": c.usage,
        "timing": {
            "ttft_ms": round2(c.timing.ttft_ms),
            "prefill_tps": round2(c.timing.prefill_tps),
            "decode_tps": round2(c.timing.decode_tps),
            "total_ms": round2(c.timing.total_ms),
        },
    });
    if let Some(s) = &c.session {
        v["session"] = json!(s);
    }
    v
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}
