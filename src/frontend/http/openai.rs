//! The OpenAI API: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`.
//!
//! Requests are read as OpenAI documents them; fields this daemon cannot honour are refused by
//! name (`n` other than 1, `logprobs`, `echo`, `suffix`, a `response_format` other than text),
//! penalties and `user` are accepted and ignored, unknown fields are ignored (clients send
//! many). `stream: true` answers server-sent events ending in `data: [DONE]`.

use std::sync::Arc;

use bytes::Bytes;
use hyper::{Response, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{
    check_model, json_response, parse_body, streamed_response, submit, unix_now, Body, Failure,
    Format, Req, Shared, Streamed,
};
use crate::api::{
    Completion, Event, FinishReason, GenerateRequest, Message, Prompt, SamplingParams, ToolCall,
};

/// `stop`: a string or a list of them.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct StreamOptions {
    include_usage: bool,
}

/// The sampling and length fields both endpoints share.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Common {
    model: Option<String>,
    max_tokens: Option<usize>,
    max_completion_tokens: Option<usize>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    /// llama.cpp's server's extensions, taken as it takes them.
    top_k: Option<usize>,
    min_p: Option<f32>,
    repeat_penalty: Option<f32>,
    seed: Option<i64>,
    stop: Option<Stop>,
    stream: bool,
    stream_options: Option<StreamOptions>,
    n: Option<u32>,
    logprobs: Option<Value>,
    frequency_penalty: Option<f32>,
    presence_penalty: Option<f32>,
    /// llama.cpp's server's extension, for benchmarks and load tests: generate `max_tokens`.
    ignore_eos: bool,
}

impl Common {
    /// The request's length, sampling and stop strings; refuses what cannot be honoured.
    fn apply(self, req: &mut GenerateRequest, default_max: usize) -> Result<(), Failure> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(param(
                "n",
                format!(
                    "n = {}: allowed 1 (one choice per request)",
                    self.n.unwrap_or(0)
                ),
            ));
        }
        if matches!(
            self.logprobs,
            Some(Value::Bool(true)) | Some(Value::Number(_))
        ) {
            return Err(param("logprobs", "logprobs: not supported".into()));
        }
        for (name, v) in [
            ("frequency_penalty", self.frequency_penalty),
            ("presence_penalty", self.presence_penalty),
        ] {
            if v.is_some_and(|v| !(-2.0..=2.0).contains(&v)) {
                return Err(param(name, format!("{name}: allowed -2..=2")));
            }
        }
        req.max_tokens = self
            .max_completion_tokens
            .or(self.max_tokens)
            .unwrap_or(default_max);
        let d = SamplingParams::default();
        req.sampling = SamplingParams {
            temperature: self.temperature.unwrap_or(d.temperature),
            top_k: self.top_k.unwrap_or(d.top_k),
            top_p: self.top_p.unwrap_or(d.top_p),
            min_p: self.min_p.unwrap_or(d.min_p),
            repeat_penalty: self.repeat_penalty.unwrap_or(d.repeat_penalty),
            repeat_last_n: d.repeat_last_n,
            // OpenAI's seed is any integer; its bits are the sampler's seed.
            seed: self.seed.map_or(d.seed, |s| s as u64),
        };
        req.stop = self.stop.map(Stop::into_vec).unwrap_or_default();
        req.ignore_eos = self.ignore_eos;
        Ok(())
    }
}

fn param(name: &str, message: String) -> Failure {
    let mut f = Failure::bad(message);
    f.param = Some(name.into());
    f
}

/// A message's `content`: a string, null, or a list of parts.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ChatMessage {
    role: String,
    #[serde(default)]
    content: Option<Content>,
    #[serde(default)]
    tool_calls: Option<Vec<WireToolCall>>,
    #[serde(default)]
    tool_call_id: Option<String>,
}

#[derive(Debug, Deserialize)]
struct WireToolCall {
    #[serde(default)]
    id: Option<String>,
    function: WireFunction,
}

#[derive(Debug, Deserialize)]
struct WireFunction {
    name: String,
    /// OpenAI sends a JSON text; an object is taken too.
    #[serde(default)]
    arguments: Value,
}

#[derive(Debug, Deserialize)]
struct ChatBody {
    messages: Vec<ChatMessage>,
    #[serde(default)]
    tools: Option<Vec<Value>>,
    #[serde(default)]
    tool_choice: Option<Value>,
    #[serde(default)]
    response_format: Option<Value>,
}

/// Tool-call arguments as templates want them: an object parsed from OpenAI's JSON text.
pub fn arguments_value(v: Value) -> Value {
    match v {
        Value::String(s) => serde_json::from_str(&s).unwrap_or(Value::String(s)),
        Value::Null => json!({}),
        v => v,
    }
}

fn messages(list: Vec<ChatMessage>) -> Result<Vec<Message>, Failure> {
    list.into_iter()
        .enumerate()
        .map(|(i, m)| {
            let content = match m.content {
                None => String::new(),
                Some(Content::Text(t)) => t,
                Some(Content::Parts(parts)) => {
                    let mut text = String::new();
                    for (k, p) in parts.into_iter().enumerate() {
                        match (p.kind.as_str(), p.text) {
                            ("text", Some(t)) => text.push_str(&t),
                            (kind, _) => {
                                return Err(param(
                                    &format!("messages[{i}].content[{k}]"),
                                    format!(
                                        "messages[{i}].content[{k}].type = {kind:?}: only \"text\" parts are supported (with their text)"
                                    ),
                                ))
                            }
                        }
                    }
                    text
                }
            };
            // OpenAI's newer name for the system role.
            let role = if m.role == "developer" {
                "system".to_string()
            } else {
                m.role
            };
            let tool_calls = m
                .tool_calls
                .unwrap_or_default()
                .into_iter()
                .map(|c| {
                    ToolCall::new(
                        c.id.unwrap_or_default(),
                        c.function.name,
                        arguments_value(c.function.arguments),
                    )
                })
                .collect();
            Ok(Message {
                role,
                content,
                tool_calls,
                tool_call_id: m.tool_call_id,
            })
        })
        .collect()
}

/// The tools a request offers, after `tool_choice` ("none" offers none; one named function
/// offers only it).
pub fn offered(tools: Option<Vec<Value>>, choice: Option<&Value>) -> Result<Vec<Value>, Failure> {
    let tools = tools.unwrap_or_default();
    match choice {
        None | Some(Value::Null) => Ok(tools),
        Some(Value::String(s)) if s == "auto" || s == "required" => Ok(tools),
        Some(Value::String(s)) if s == "none" => Ok(Vec::new()),
        Some(Value::Object(o)) => {
            let name = o
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    param(
                        "tool_choice",
                        "tool_choice: an object names a function: {\"type\": \"function\", \"function\": {\"name\": …}}".into(),
                    )
                })?;
            let one: Vec<Value> = tools
                .into_iter()
                .filter(|t| t.get("function").and_then(|f| f.get("name")) == Some(&json!(name)))
                .collect();
            if one.is_empty() {
                return Err(param(
                    "tool_choice",
                    format!("tool_choice: no tool named {name:?} in tools"),
                ));
            }
            Ok(one)
        }
        Some(other) => Err(param(
            "tool_choice",
            format!(
                "tool_choice = {other}: allowed \"none\", \"auto\", \"required\" or a function"
            ),
        )),
    }
}

pub async fn chat(r: &Req, shared: &Arc<Shared>) -> Result<Response<Body>, Failure> {
    let v = r.json()?;
    let common: Common = parse_body(v.clone())?;
    let body: ChatBody = parse_body(v)?;
    let model = check_model(shared, common.model.as_deref())?;
    if let Some(f) = &body.response_format {
        if f.get("type").and_then(Value::as_str) != Some("text") {
            return Err(param(
                "response_format",
                "response_format: only {\"type\": \"text\"} is supported".into(),
            ));
        }
    }
    let mut req = GenerateRequest::new(Prompt::Messages(messages(body.messages)?));
    req.tools = offered(body.tools, body.tool_choice.as_ref())?;
    answer(r, shared, req, common, model, Kind::Chat).await
}

#[derive(Debug, Deserialize)]
struct CompletionBody {
    prompt: PromptField,
    #[serde(default)]
    echo: bool,
    #[serde(default)]
    suffix: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum PromptField {
    One(String),
    Many(Vec<String>),
}

pub async fn completions(r: &Req, shared: &Arc<Shared>) -> Result<Response<Body>, Failure> {
    let v = r.json()?;
    let common: Common = parse_body(v.clone())?;
    let body: CompletionBody = parse_body(v)?;
    let model = check_model(shared, common.model.as_deref())?;
    if body.echo {
        return Err(param("echo", "echo: not supported".into()));
    }
    if body.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(param("suffix", "suffix: not supported".into()));
    }
    let prompt = match body.prompt {
        PromptField::One(p) => p,
        PromptField::Many(mut v) if v.len() == 1 => v.remove(0),
        PromptField::Many(v) => {
            return Err(param(
                "prompt",
                format!("prompt: {} prompts; allowed one per request", v.len()),
            ))
        }
    };
    let req = GenerateRequest::new(Prompt::Raw(prompt));
    answer(r, shared, req, common, model, Kind::Text).await
}

/// Which endpoint answers: chat completions (`message`, streamed as `delta`s) or text
/// completions (`text`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Text,
}

impl Kind {
    fn object(self, stream: bool) -> &'static str {
        match (self, stream) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Text, _) => "text_completion",
        }
    }
}

/// Sets the request's length and sampling, queues it, and answers: server-sent events, or one
/// object.
async fn answer(
    r: &Req,
    shared: &Arc<Shared>,
    mut req: GenerateRequest,
    common: Common,
    model: String,
    kind: Kind,
) -> Result<Response<Body>, Failure> {
    let stream = common.stream;
    let usage = common
        .stream_options
        .as_ref()
        .is_some_and(|o| o.include_usage);
    common.apply(&mut req, shared.ctx.limits().default_max_tokens)?;
    let mut job = submit(r, shared, req, stream, model)?;
    let prefix = match kind {
        Kind::Chat => "chatcmpl",
        Kind::Text => "cmpl",
    };
    let fmt = Sse {
        kind,
        id: format!("{prefix}-{}", job.id),
        model: job.model.clone(),
        created: unix_now(),
        usage,
    };
    if stream {
        let head = (kind == Kind::Chat)
            .then(|| fmt.chunk(fmt.choice(json!({"role": "assistant", "content": ""}), None)));
        return Ok(streamed_response(
            "text/event-stream",
            Streamed::new(job, Box::new(fmt), head),
        ));
    }
    let c = job.completion().await?;
    let mut choice = json!({"index": 0, "logprobs": null, "finish_reason": finish_reason(&c)});
    match kind {
        Kind::Chat => {
            let calls = wire_calls(&c.tool_calls);
            let content = if c.text.is_empty() && !calls.is_empty() {
                Value::Null
            } else {
                Value::String(c.text.clone())
            };
            let mut message = json!({"role": "assistant", "content": content});
            if !calls.is_empty() {
                message["tool_calls"] = Value::Array(calls);
            }
            choice["message"] = message;
        }
        Kind::Text => choice["text"] = json!(c.text),
    }
    let mut out = fmt.envelope(kind.object(false), json!([choice]));
    out["usage"] = usage_of(&c);
    Ok(json_response(StatusCode::OK, &out))
}

fn fingerprint() -> String {
    format!("edgellm-{}", env!("CARGO_PKG_VERSION"))
}

/// OpenAI's finish reasons: a stop (or a cancel) is "stop", or "tool_calls" when the model
/// called; the window, `max_tokens` or the deadline is "length".
fn finish_reason(c: &Completion) -> &'static str {
    match c.finish_reason {
        _ if !c.tool_calls.is_empty() => "tool_calls",
        FinishReason::Stop | FinishReason::Cancelled => "stop",
        FinishReason::Length | FinishReason::Deadline => "length",
    }
}

fn usage_of(c: &Completion) -> Value {
    let u = &c.usage;
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    })
}

/// Tool calls as OpenAI sends them: `arguments` a JSON text.
fn wire_calls(calls: &[ToolCall]) -> Vec<Value> {
    calls
        .iter()
        .enumerate()
        .map(|(i, c)| {
            json!({
                "index": i,
                "id": c.id,
                "type": "function",
                "function": {
                    "name": c.function.name,
                    "arguments": match &c.function.arguments {
                        Value::String(s) => s.clone(),
                        v => v.to_string(),
                    },
                },
            })
        })
        .collect()
}

fn sse(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

fn error_event(code: crate::api::ErrorCode, message: &str) -> Bytes {
    sse(&Failure::of(code, message.to_string()).body(super::Api::OpenAi))
}

/// A streamed answer, as server-sent events.
struct Sse {
    kind: Kind,
    id: String,
    model: String,
    created: u64,
    /// `stream_options.include_usage`: every chunk has `usage: null`, a last one the usage.
    usage: bool,
}

impl Sse {
    /// The fields every object of the answer carries, around `choices`.
    fn envelope(&self, object: &str, choices: Value) -> Value {
        json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": fingerprint(),
            "choices": choices,
        })
    }

    /// A streamed choice: chat's `delta`, a completion's `text`.
    fn choice(&self, content: Value, finish: Option<&str>) -> Value {
        let mut c = json!({"index": 0});
        c[match self.kind {
            Kind::Chat => "delta",
            Kind::Text => "text",
        }] = content;
        c["logprobs"] = Value::Null;
        c["finish_reason"] = json!(finish);
        c
    }

    /// One event of one choice.
    fn chunk(&self, choice: Value) -> Bytes {
        let mut v = self.envelope(self.kind.object(true), json!([choice]));
        if self.usage {
            v["usage"] = Value::Null;
        }
        sse(&v)
    }
}

impl Format for Sse {
    fn event(&mut self, event: &Event) -> Option<Bytes> {
        let chat = self.kind == Kind::Chat;
        match event {
            Event::Token(t) => {
                let content = if chat {
                    json!({"content": t})
                } else {
                    json!(t)
                };
                Some(self.chunk(self.choice(content, None)))
            }
            Event::Done(c) => {
                let mut out = Vec::new();
                let calls = wire_calls(&c.tool_calls);
                if chat && !calls.is_empty() {
                    let delta = json!({"tool_calls": calls});
                    out.extend_from_slice(&self.chunk(self.choice(delta, None)));
                }
                let last = if chat { json!({}) } else { json!("") };
                out.extend_from_slice(&self.chunk(self.choice(last, Some(finish_reason(c)))));
                if self.usage {
                    let mut u = self.envelope(self.kind.object(true), json!([]));
                    u["usage"] = usage_of(c);
                    out.extend_from_slice(&sse(&u));
                }
                Some(Bytes::from(out))
            }
            Event::Error(code, m) => Some(error_event(*code, m)),
        }
    }

    fn end(&mut self) -> Option<Bytes> {
        Some(Bytes::from_static(b"data: [DONE]\n\n"))
    }
}

pub fn models(shared: &Shared) -> Response<Body> {
    let card = &shared.settings.model;
    let data: Vec<Value> = card.names().map(|n| model_entry(shared, n)).collect();
    json_response(StatusCode::OK, &json!({"object": "list", "data": data}))
}

fn model_entry(shared: &Shared, name: &str) -> Value {
    json!({
        "id": name,
        "object": "model",
        "created": shared.settings.model.modified_unix(),
        "owned_by": "edgellm",
    })
}

pub fn model(shared: &Shared, id: &str) -> Result<Response<Body>, Failure> {
    let name = check_model(shared, Some(id))?;
    Ok(json_response(StatusCode::OK, &model_entry(shared, &name)))
}
