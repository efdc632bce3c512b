//! Ollama's API: `POST /api/chat`, `POST /api/generate` (NDJSON streams unless
//! `stream: false`), `GET /api/tags`, `POST /api/show`, `GET /api/version`, `GET /api/ps`.
//!
//! `options` are read as Ollama reads them (`num_predict`, `temperature`, `top_k`, `top_p`,
//! `min_p`, `seed`, `stop`, `repeat_penalty`, `repeat_last_n`); `num_ctx` is served within the
//! daemon's window, which is fixed at start (a larger value is served in the window, as Ollama
//! serves a value beyond a model's trained context); other options are ignored, as Ollama
//! ignores those that do not apply. `keep_alive` is accepted: the model is always loaded.
//! What cannot be honoured is refused by name: `images`, `format`, `template`, `suffix`,
//! `context`, `think: true`.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use hyper::{Response, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};

use super::openai::{arguments_value, offered, Stop};
use super::{
    check_model, json_response, parse_body, rfc3339, streamed_response, submit, Body, Failure,
    Format, Req, Shared, Streamed,
};
use crate::api::{
    Completion, Event, FinishReason, GenerateRequest, Message, Prompt, SamplingParams, ToolCall,
};

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Options {
    num_predict: Option<i64>,
    temperature: Option<f32>,
    top_k: Option<usize>,
    top_p: Option<f32>,
    min_p: Option<f32>,
    seed: Option<i64>,
    stop: Option<Stop>,
    num_ctx: Option<u64>,
    repeat_penalty: Option<f32>,
    repeat_last_n: Option<i64>,
}

/// The fields `/api/chat` and `/api/generate` share.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Common {
    model: Option<String>,
    stream: Option<bool>,
    options: Option<Options>,
    keep_alive: Option<Value>,
    format: Option<Value>,
    think: Option<Value>,
}

fn bad(field: &str, message: String) -> Failure {
    let mut f = Failure::bad(message);
    f.param = Some(field.into());
    f
}

impl Common {
    /// Checks what cannot be honoured, and sets the request's length, sampling and stops.
    fn apply(&self, req: &mut GenerateRequest, shared: &Shared, path: &str) -> Result<(), Failure> {
        match &self.keep_alive {
            None | Some(Value::Null | Value::String(_) | Value::Number(_)) => {}
            Some(other) => {
                return Err(bad(
                    "keep_alive",
                    format!(
                        "keep_alive = {other}: allowed a duration (\"5m\") or a number of seconds"
                    ),
                ))
            }
        }
        if self
            .format
            .as_ref()
            .is_some_and(|f| !f.is_null() && f != &json!(""))
        {
            return Err(bad(
                "format",
                "format: structured output (JSON mode, schemas) is not supported".into(),
            ));
        }
        if self.think == Some(Value::Bool(true)) {
            return Err(bad(
                "think",
                "think: this daemon has no thinking mode".into(),
            ));
        }
        let limits = shared.ctx.limits();
        let none = Options::default();
        let o = self.options.as_ref().unwrap_or(&none);
        req.max_tokens = match o.num_predict {
            None => limits.default_max_tokens,
            // -1: until the model stops; -2: until the window is full. Both within the limit.
            Some(-1 | -2) => limits.max_tokens,
            Some(n) if n > 0 => n as usize,
            Some(n) => {
                return Err(bad(
                    "options.num_predict",
                    format!(
                        "options.num_predict = {n}: allowed -1, -2 or 1..={} (limits.max_tokens)",
                        limits.max_tokens
                    ),
                ))
            }
        };
        if let Some(n) = o.num_ctx {
            let window = shared.settings.model.n_ctx;
            if n > window as u64 {
                tracing::debug!(
                    path,
                    num_ctx = n,
                    window,
                    "http: options.num_ctx beyond the window; served in the window"
                );
            }
        }
        let d = SamplingParams::default();
        req.sampling = SamplingParams {
            temperature: o.temperature.unwrap_or(d.temperature),
            top_k: o.top_k.unwrap_or(d.top_k),
            top_p: o.top_p.unwrap_or(d.top_p),
            min_p: o.min_p.unwrap_or(d.min_p),
            repeat_penalty: o.repeat_penalty.unwrap_or(d.repeat_penalty),
            repeat_last_n: match o.repeat_last_n {
                None => d.repeat_last_n,
                Some(n) if n >= 0 => n as usize,
                // -1: the whole window.
                Some(_) => shared.settings.model.n_ctx,
            },
            seed: o.seed.map_or(d.seed, |s| s as u64),
        };
        req.stop = o.stop.clone().map(Stop::into_vec).unwrap_or_default();
        Ok(())
    }
}

#[derive(Debug, Deserialize)]
struct ChatMessage {
    role: String,
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    images: Option<Vec<Value>>,
    #[serde(default)]
    tool_calls: Option<Vec<WireCall>>,
}

#[derive(Debug, Deserialize)]
struct WireCall {
    function: WireFunction,
}

#[derive(Debug, Deserialize)]
struct WireFunction {
    name: String,
    #[serde(default)]
    arguments: Value,
}

#[derive(Debug, Deserialize)]
struct ChatBody {
    #[serde(default)]
    messages: Vec<ChatMessage>,
    #[serde(default)]
    tools: Option<Vec<Value>>,
}

pub async fn chat(r: &Req, shared: &Arc<Shared>) -> Result<Response<Body>, Failure> {
    let v = r.json()?;
    let common: Common = parse_body(v.clone())?;
    let body: ChatBody = parse_body(v)?;
    let model = check_model(shared, common.model.as_deref())?;
    if body.messages.is_empty() {
        // Ollama loads the model on an empty chat; here it is always loaded.
        return Ok(loaded(&model, Kind::Chat));
    }
    let mut messages = Vec::with_capacity(body.messages.len());
    for (i, m) in body.messages.into_iter().enumerate() {
        if m.images.as_ref().is_some_and(|v| !v.is_empty()) {
            return Err(bad(
                &format!("messages[{i}].images"),
                format!("messages[{i}].images: this model reads text only"),
            ));
        }
        messages.push(Message {
            role: m.role,
            content: m.content.unwrap_or_default(),
            tool_calls: m
                .tool_calls
                .unwrap_or_default()
                .into_iter()
                .map(|c| {
                    ToolCall::new(
                        String::new(),
                        c.function.name,
                        arguments_value(c.function.arguments),
                    )
                })
                .collect(),
            tool_call_id: None,
        });
    }
    let mut req = GenerateRequest::new(Prompt::Messages(messages));
    req.tools = offered(body.tools, None)?;
    answer(r, shared, req, &common, model, Kind::Chat).await
}

#[derive(Debug, Deserialize)]
struct GenerateBody {
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    system: Option<String>,
    #[serde(default)]
    raw: bool,
    #[serde(default)]
    suffix: Option<String>,
    #[serde(default)]
    template: Option<String>,
    #[serde(default)]
    context: Option<Vec<i64>>,
    #[serde(default)]
    images: Option<Vec<Value>>,
}

pub async fn generate(r: &Req, shared: &Arc<Shared>) -> Result<Response<Body>, Failure> {
    let v = r.json()?;
    let common: Common = parse_body(v.clone())?;
    let body: GenerateBody = parse_body(v)?;
    let model = check_model(shared, common.model.as_deref())?;
    for (field, set) in [
        (
            "suffix",
            body.suffix.as_deref().is_some_and(|s| !s.is_empty()),
        ),
        (
            "template",
            body.template.as_deref().is_some_and(|s| !s.is_empty()),
        ),
        (
            "images",
            body.images.as_ref().is_some_and(|v| !v.is_empty()),
        ),
    ] {
        if set {
            return Err(bad(field, format!("{field}: not supported")));
        }
    }
    if body.context.as_ref().is_some_and(|c| !c.is_empty()) {
        return Err(bad(
            "context",
            "context: not supported; send the conversation to /api/chat".into(),
        ));
    }
    let prompt = body.prompt.unwrap_or_default();
    if prompt.is_empty() {
        return Ok(loaded(&model, Kind::Generate));
    }
    let p = if body.raw {
        Prompt::Raw(prompt)
    } else {
        let mut m = Vec::new();
        if let Some(s) = body.system.filter(|s| !s.is_empty()) {
            m.push(Message::new("system", &s));
        }
        m.push(Message::new("user", &prompt));
        Prompt::Messages(m)
    };
    let req = GenerateRequest::new(p);
    answer(r, shared, req, &common, model, Kind::Generate).await
}

/// Which endpoint answers: `/api/chat` puts the text in `message`, `/api/generate` in
/// `response`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Generate,
}

impl Kind {
    /// A reply object for `model` carrying `text` (and, in a chat, `calls`).
    fn reply(self, model: &str, text: &str, calls: &[ToolCall]) -> Value {
        let mut v = json!({"model": model, "created_at": rfc3339(SystemTime::now())});
        match self {
            Kind::Chat => v["message"] = message(text, calls),
            Kind::Generate => v["response"] = json!(text),
        }
        v
    }
}

/// Sets the request's options, queues it, and answers: a stream of JSON lines, or one object.
async fn answer(
    r: &Req,
    shared: &Arc<Shared>,
    mut req: GenerateRequest,
    common: &Common,
    model: String,
    kind: Kind,
) -> Result<Response<Body>, Failure> {
    common.apply(&mut req, shared, &r.path)?;
    let stream = common.stream.unwrap_or(true);
    let mut job = submit(r, shared, req, stream, model)?;
    if stream {
        let fmt = Ndjson {
            model: job.model.clone(),
            kind,
        };
        return Ok(streamed_response(
            "application/x-ndjson",
            Streamed::new(job, Box::new(fmt), None),
        ));
    }
    let c = job.completion().await?;
    let mut out = kind.reply(&job.model, &c.text, &c.tool_calls);
    add_stats(&mut out, &c);
    Ok(json_response(StatusCode::OK, &out))
}

/// The answer to a request that only asks for the model to be loaded.
fn loaded(model: &str, kind: Kind) -> Response<Body> {
    let mut out = kind.reply(model, "", &[]);
    out["done"] = json!(true);
    out["done_reason"] = json!("load");
    json_response(StatusCode::OK, &out)
}

/// An assistant message, with its tool calls as Ollama sends them (arguments an object).
fn message(text: &str, calls: &[ToolCall]) -> Value {
    let mut m = json!({"role": "assistant", "content": text});
    if !calls.is_empty() {
        m["tool_calls"] = Value::Array(
            calls
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let args = match &c.function.arguments {
                        Value::Object(_) => c.function.arguments.clone(),
                        other => json!({ "value": other }),
                    };
                    json!({"id": c.id, "function": {"index": i, "name": c.function.name, "arguments": args}})
                })
                .collect(),
        );
    }
    m
}

fn done_reason(c: &Completion) -> &'static str {
    match c.finish_reason {
        FinishReason::Stop | FinishReason::Cancelled => "stop",
        FinishReason::Length | FinishReason::Deadline => "length",
    }
}

/// Adds the closing fields to `v`: `done`, the reason, counts and durations in nanoseconds.
fn add_stats(v: &mut Value, c: &Completion) {
    let ns = |ms: f64| (ms.max(0.0) * 1e6) as u64;
    let t = &c.timing;
    for (k, x) in [
        ("done", json!(true)),
        ("done_reason", json!(done_reason(c))),
        ("total_duration", json!(ns(t.total_ms))),
        ("load_duration", json!(0)),
        ("prompt_eval_count", json!(c.usage.prompt_tokens)),
        ("prompt_eval_duration", json!(ns(t.ttft_ms))),
        ("eval_count", json!(c.usage.completion_tokens)),
        ("eval_duration", json!(ns(t.total_ms - t.ttft_ms))),
    ] {
        v[k] = x;
    }
}

struct Ndjson {
    model: String,
    kind: Kind,
}

fn line(v: &Value) -> Vec<u8> {
    let mut b = v.to_string().into_bytes();
    b.push(b'\n');
    b
}

impl Format for Ndjson {
    fn event(&mut self, event: &Event) -> Option<Bytes> {
        match event {
            Event::Token(t) => {
                let mut v = self.kind.reply(&self.model, t, &[]);
                v["done"] = json!(false);
                Some(Bytes::from(line(&v)))
            }
            Event::Done(c) => {
                let mut out = Vec::new();
                if self.kind == Kind::Chat && !c.tool_calls.is_empty() {
                    let mut call = self.kind.reply(&self.model, "", &c.tool_calls);
                    call["done"] = json!(false);
                    out.extend(line(&call));
                }
                let mut v = self.kind.reply(&self.model, "", &[]);
                add_stats(&mut v, c);
                out.extend(line(&v));
                Some(Bytes::from(out))
            }
            Event::Error(_, m) => Some(Bytes::from(line(&json!({ "error": m })))),
        }
    }
}

fn details(shared: &Shared) -> Value {
    let c = &shared.settings.model;
    json!({
        "parent_model": "",
        "format": "gguf",
        "family": c.family,
        "families": [c.family],
        "parameter_size": c.parameter_size,
        "quantization_level": c.quantization,
    })
}

fn modified(shared: &Shared) -> String {
    rfc3339(
        shared
            .settings
            .model
            .modified
            .unwrap_or(SystemTime::UNIX_EPOCH),
    )
}

pub fn tags(shared: &Shared) -> Response<Body> {
    let c = &shared.settings.model;
    let models: Vec<Value> = c
        .names()
        .map(|n| {
            json!({
                "name": n,
                "model": n,
                "modified_at": modified(shared),
                "size": c.size,
                "digest": c.digest,
                "details": details(shared),
            })
        })
        .collect();
    json_response(StatusCode::OK, &json!({ "models": models }))
}

pub fn ps(shared: &Shared) -> Response<Body> {
    let c = &shared.settings.model;
    // Loaded for as long as the daemon runs: a time far ahead, as Ollama shows keep_alive -1.
    let forever = SystemTime::now() + Duration::from_secs(100 * 365 * 86_400);
    let models: Vec<Value> = c
        .names()
        .take(1)
        .map(|n| {
            json!({
                "name": n,
                "model": n,
                "size": c.size,
                "digest": c.digest,
                "details": details(shared),
                "expires_at": rfc3339(forever),
                "size_vram": 0,
                "context_length": c.n_ctx,
            })
        })
        .collect();
    json_response(StatusCode::OK, &json!({ "models": models }))
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ShowBody {
    model: Option<String>,
    name: Option<String>,
}

pub fn show(r: &Req, shared: &Shared) -> Result<Response<Body>, Failure> {
    let body: ShowBody = parse_body(r.json()?)?;
    let asked = body.model.or(body.name);
    if asked.as_deref().is_none_or(str::is_empty) {
        return Err(bad(
            "model",
            "model: missing; name the model to show".into(),
        ));
    }
    let name = check_model(shared, asked.as_deref())?;
    let c = &shared.settings.model;
    let mut capabilities = vec!["completion"];
    if c.tools {
        capabilities.push("tools");
    }
    let mut info = serde_json::Map::new();
    info.insert("general.architecture".into(), json!(c.family));
    info.insert(format!("{}.context_length", c.family), json!(c.n_ctx));
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "modelfile": format!("# served by edgellm {}\nFROM {name}\n", env!("CARGO_PKG_VERSION")),
            "parameters": format!("num_ctx {}", c.n_ctx),
            "template": c.template,
            "details": details(shared),
            "model_info": info,
            "capabilities": capabilities,
            "modified_at": modified(shared),
        }),
    ))
}

pub fn version() -> Response<Body> {
    json_response(
        StatusCode::OK,
        &json!({ "version": env!("CARGO_PKG_VERSION") }),
    )
}
