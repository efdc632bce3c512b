//! The JSON protocol shared by the Unix socket and MQTT front-ends and the command-line client:
//! requests (`op` requests and generate requests) and replies, as serde types, and the one
//! place where a request is parsed and checked.
//!
//! Every problem with a request is answered, never dropped: malformed JSON or a wrong field is
//! `bad_request` naming the field, a size over a limit is `too_large` naming the limit, and the
//! reply carries the request's `id` whenever one could be read.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::reply::{CancelState, Completion, ErrorCode, Event, FinishReason, Timing, Usage};
use super::request::{
    GenerateRequest, Limits, Message, Prompt, SamplingParams, SessionRef, ToolCall,
};
pub use super::request::{MAX_ID_BYTES, MAX_STOPS, MAX_STOP_BYTES};
use super::status::Status;
use super::SessionInfo;

/// Allowed priorities; higher runs first.
pub const PRIORITY_RANGE: std::ops::RangeInclusive<i32> = -100..=100;
/// Longest deadline a request may name: one day.
pub const MAX_DEADLINE_MS: u64 = 86_400_000;

/// A generate request as it travels: what a client sends, field for field.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateBody {
    pub id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub messages: Option<Vec<Message>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_k: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_p: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repeat_penalty: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repeat_last_n: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop: Option<Vec<String>>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ignore_eos: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// With `session`: the conversation before this turn.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub history: Option<Vec<Message>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
    /// MQTT 3.1.1 reply topic; other front-ends refuse it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
    /// Tools the model may call (OpenAI's `tools` entries).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<Value>>,
}

/// The requests that are not generations: `{"op":"status"}`, `{"op":"cancel","id":…}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Operation {
    Status {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        /// MQTT 3.1.1's reply topic; other front-ends refuse it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reply_to: Option<String>,
    },
    Cancel {
        id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reply_to: Option<String>,
    },
}

/// The fields of a request that MQTT needs before, and whatever, the rest parses: the id to
/// answer with, and the 3.1.1 reply topic.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Envelope {
    #[serde(default)]
    pub id: Option<Value>,
    #[serde(default)]
    pub reply_to: Option<Value>,
}

impl Envelope {
    /// Reads the envelope of a parsed request; strings only, whatever else is there.
    pub fn of(value: &Value) -> (Option<String>, Option<String>) {
        let e = Envelope::deserialize(value).unwrap_or_default();
        let s = |v: Option<Value>| match v {
            Some(Value::String(s)) => Some(s),
            _ => None,
        };
        (s(e.id), s(e.reply_to))
    }
}

/// A reply, as one line on the socket or one MQTT message.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    /// Streamed text (requests with `stream: true`).
    Token {
        id: String,
        text: String,
    },
    /// Terminal: the completion.
    Done {
        id: String,
        text: String,
        finish_reason: FinishReason,
        usage: Usage,
        timing: Timing,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        session: Option<SessionInfo>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        tool_calls: Vec<ToolCall>,
    },
    /// Terminal: the request failed or was refused. `id` is `null` when none could be read.
    Error {
        id: Option<String>,
        code: ErrorCode,
        message: String,
    },
    /// The answer to a cancel: where the request was.
    Cancel {
        id: String,
        state: CancelState,
    },
    Status(Box<Status>),
}

impl Response {
    pub fn error(id: Option<&str>, code: ErrorCode, message: impl Into<String>) -> Response {
        Response::Error {
            id: id.map(str::to_string),
            code,
            message: message.into(),
        }
    }

    /// The reply for an event of request `id`.
    pub fn event(id: &str, event: &Event) -> Response {
        match event {
            Event::Token(text) => Response::Token {
                id: id.to_string(),
                text: text.clone(),
            },
            Event::Done(c) => Response::done(id, c),
            Event::Error(code, message) => Response::error(Some(id), *code, message.clone()),
        }
    }

    fn done(id: &str, c: &Completion) -> Response {
        let t = &c.timing;
        Response::Done {
            id: id.to_string(),
            text: c.text.clone(),
            finish_reason: c.finish_reason,
            usage: c.usage.clone(),
            timing: Timing {
                ttft_ms: round2(t.ttft_ms),
                prefill_tps: round2(t.prefill_tps),
                decode_tps: round2(t.decode_tps),
                total_ms: round2(t.total_ms),
            },
            session: c.session.clone(),
            tool_calls: c.tool_calls.clone(),
        }
    }

    /// The completion a `done` reply carries (generated token ids are not on the wire).
    pub fn into_completion(self) -> Option<Completion> {
        match self {
            Response::Done {
                text,
                finish_reason,
                usage,
                timing,
                session,
                tool_calls,
                ..
            } => Some(Completion {
                text,
                finish_reason,
                usage,
                timing,
                tokens: Vec::new(),
                session,
                tool_calls,
            }),
            _ => None,
        }
    }

    pub fn is_terminal(&self) -> bool {
        matches!(self, Response::Done { .. } | Response::Error { .. })
    }

    /// One JSON line, without its newline.
    pub fn to_line(&self) -> String {
        // A reply holds strings, numbers and maps with string keys only: it always serializes.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The MQTT message: the reply with its per-request sequence number (replies to a running
    /// request have one) and the node that produced it.
    pub fn to_mqtt(&self, seq: Option<u64>, node: &str) -> String {
        #[derive(Serialize)]
        struct Sequenced<'a> {
            #[serde(flatten)]
            reply: &'a Response,
            #[serde(skip_serializing_if = "Option::is_none")]
            seq: Option<u64>,
            node: &'a str,
        }
        serde_json::to_string(&Sequenced {
            reply: self,
            seq,
            node,
        })
        .unwrap_or_default()
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
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
    Status {
        reply_to: Option<String>,
    },
    Cancel {
        id: String,
        reply_to: Option<String>,
    },
}

/// A request that cannot be accepted, with what to answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub id: Option<String>,
    pub code: ErrorCode,
    pub message: String,
}

impl Refusal {
    pub fn new(id: Option<&str>, code: ErrorCode, message: impl Into<String>) -> Refusal {
        Refusal {
            id: id.map(str::to_string),
            code,
            message: message.into(),
        }
    }

    pub fn response(&self) -> Response {
        Response::error(self.id.as_deref(), self.code, self.message.clone())
    }
}

/// Parses one request line. `now` anchors `deadline_ms`; `default_deadline_ms` (0: none) applies
/// to a request that names none.
pub fn parse(
    line: &[u8],
    limits: &Limits,
    default_deadline_ms: u64,
    now: Instant,
) -> Result<Incoming, Refusal> {
    parse_value(read_json(line)?, limits, default_deadline_ms, now)
}

/// The request's JSON, or the `bad_request` that answers a line that is not JSON.
/// A key that appears twice in one object is refused (serde_json would keep the last one
/// silently, so two readers of the same line could disagree on what it asks).
pub fn read_json(line: &[u8]) -> Result<Value, Refusal> {
    serde_json::from_slice::<Strict>(line)
        .map(|s| s.0)
        .map_err(|e| Refusal::new(None, ErrorCode::BadRequest, format!("malformed JSON: {e}")))
}

/// A JSON value read with duplicate object keys refused.
struct Strict(Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Strict, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut v = Vec::new();
        while let Some(Strict(x)) = seq.next_element()? {
            v.push(x);
        }
        Ok(Value::Array(v))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut m = serde_json::Map::new();
        while let Some(k) = map.next_key::<String>()? {
            if m.contains_key(&k) {
                return Err(serde::de::Error::custom(format!(
                    "duplicate key `{k}` in one object"
                )));
            }
            let Strict(v) = map.next_value()?;
            m.insert(k, v);
        }
        Ok(Value::Object(m))
    }
}

/// [`parse`] of a request already read as JSON (MQTT reads the envelope first).
pub fn parse_value(
    value: Value,
    limits: &Limits,
    default_deadline_ms: u64,
    now: Instant,
) -> Result<Incoming, Refusal> {
    let Value::Object(obj) = &value else {
        return Err(Refusal::new(
            None,
            ErrorCode::BadRequest,
            "a request is a JSON object",
        ));
    };
    let (id, _) = Envelope::of(&value);
    let id = id.as_deref();
    if let Some(op) = obj.get("op") {
        if let Some(k) = obj
            .keys()
            .find(|k| !matches!(k.as_str(), "op" | "id" | "reply_to"))
        {
            return Err(Refusal::new(
                id,
                ErrorCode::BadRequest,
                format!("unknown field `{k}` in an op request: allowed `op`, `id`, `reply_to`"),
            ));
        }
        if !matches!(op.as_str(), Some("status" | "cancel")) {
            return Err(Refusal::new(
                id,
                ErrorCode::BadRequest,
                format!("op = {op}: allowed \"status\", \"cancel\""),
            ));
        }
        return match Operation::deserialize(&value) {
            Ok(Operation::Status { reply_to, .. }) => Ok(Incoming::Status { reply_to }),
            Ok(Operation::Cancel { id, reply_to }) => Ok(Incoming::Cancel { id, reply_to }),
            Err(_) => Err(Refusal::new(
                id,
                ErrorCode::BadRequest,
                "id: a cancel needs the id (a string) of the request to cancel",
            )),
        };
    }
    let body: GenerateBody = serde_path_to_error::deserialize(&value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let message = if path == "." {
            inner.to_string()
        } else {
            format!("{path}: {inner}")
        };
        Refusal::new(id, ErrorCode::BadRequest, message)
    })?;
    check(body, limits, default_deadline_ms, now).map(|g| Incoming::Generate(Box::new(g)))
}

fn check(
    w: GenerateBody,
    limits: &Limits,
    default_deadline_ms: u64,
    now: Instant,
) -> Result<Generate, Refusal> {
    let id = Some(w.id.as_str());
    let bad = |m: String| Refusal::new(id, ErrorCode::BadRequest, m);
    if w.id.is_empty() || w.id.len() > MAX_ID_BYTES {
        return Err(bad(format!(
            "id: {} bytes; allowed 1..={MAX_ID_BYTES}",
            w.id.len()
        )));
    }
    let prompt = match (w.messages, w.prompt) {
        (Some(m), None) => Prompt::Messages(m),
        (None, Some(p)) => Prompt::Raw(p),
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
    let session =
        match (w.session, w.history) {
            (Some(sid), history) => Some(SessionRef {
                id: sid,
                owner: String::new(),
                history,
            }),
            (None, Some(_)) => return Err(bad(
                "history: only with session; without one, send the whole conversation in messages"
                    .into(),
            )),
            (None, None) => None,
        };
    let req = GenerateRequest {
        prompt,
        max_tokens,
        sampling,
        stop: w.stop.unwrap_or_default(),
        ignore_eos: w.ignore_eos,
        session,
        tools: w.tools.unwrap_or_default(),
    };
    req.validate(limits)
        .map_err(|(code, m)| Refusal::new(id, code, m))?;
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
        req,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_refusals_name_the_field_and_the_limit() {
        let limits = Limits::default();
        let now = Instant::now();
        let refuse = |line: &str| match parse(line.as_bytes(), &limits, 0, now) {
            Ok(i) => panic!("accepted {line}: {i:?}"),
            Err(r) => r,
        };
        let r = refuse("{\"id\": \"a\", ");
        assert_eq!((r.code, r.id.as_deref()), (ErrorCode::BadRequest, None));
        assert!(r.message.contains("malformed JSON"), "{}", r.message);
        let r = refuse(r#"{"id":"a","prompt":"x","max_tokens":-1}"#);
        assert_eq!(r.id.as_deref(), Some("a"));
        assert!(r.message.starts_with("max_tokens:"), "{}", r.message);
        let r = refuse(r#"{"id":"a","prompt":"x","temprature":1}"#);
        assert!(r.message.contains("temprature"), "{}", r.message);
        let r = refuse(r#"{"id":"a","messages":[{"role":"user","content":3}]}"#);
        assert!(
            r.message.starts_with("messages[0].content"),
            "{}",
            r.message
        );
        let r = refuse(r#"{"id":"a","prompt":"x","max_tokens":100000}"#);
        assert_eq!(r.code, ErrorCode::TooLarge);
        assert!(r.message.contains("limit is 1024"), "{}", r.message);
        let r = refuse(r#"{"id":"a","prompt":"x","top_p":0}"#);
        assert!(r.message.contains("top_p"), "{}", r.message);
        let r = refuse(r#"{"id":"a"}"#);
        assert!(r.message.contains("messages"), "{}", r.message);
        let r = refuse(r#"{"id":"","prompt":"x"}"#);
        assert!(r.message.starts_with("id:"), "{}", r.message);
        let r = refuse(r#"{"id":"a","prompt":"x","priority":1000}"#);
        assert!(r.message.contains("priority = 1000"), "{}", r.message);
        let r = refuse(r#"{"op":"reboot"}"#);
        assert!(r.message.contains("status"), "{}", r.message);
        let r = refuse("[1,2]");
        assert_eq!(r.code, ErrorCode::BadRequest);
        // Unknown fields inside messages, unknown roles and duplicate keys are refused, as the
        // README says unknown fields are, naming what is wrong.
        let r = refuse(r#"{"id":"a","messages":[{"role":"user","content":"x","name":"bob"}]}"#);
        assert!(
            r.message.starts_with("messages[0]") && r.message.contains("name"),
            "{}",
            r.message
        );
        let r = refuse(r#"{"id":"a","messages":[{"role":"wizard","content":"x"}]}"#);
        assert!(
            r.message.starts_with("messages[0].role = \"wizard\"")
                && r.message.contains("\"user\""),
            "{}",
            r.message
        );
        let r = refuse(
            r#"{"id":"a","session":"s","history":[{"role":"root","content":"x"}],"messages":[{"role":"user","content":"x"}]}"#,
        );
        assert!(r.message.starts_with("history[0].role"), "{}", r.message);
        let r = refuse(r#"{"id":"a","prompt":"x","max_tokens":1,"max_tokens":900}"#);
        assert!(
            r.message.contains("duplicate key `max_tokens`"),
            "{}",
            r.message
        );
        let r = refuse(r#"{"id":"a","messages":[{"role":"user","role":"system","content":"x"}]}"#);
        assert!(r.message.contains("duplicate key `role`"), "{}", r.message);
        let many: Vec<String> = (0..257)
            .map(|i| format!(r#"{{"role":"user","content":"{i}"}}"#))
            .collect();
        let r = refuse(&format!(r#"{{"id":"a","messages":[{}]}}"#, many.join(",")));
        assert_eq!(r.code, ErrorCode::TooLarge);
        assert!(r.message.contains("limits.max_messages"), "{}", r.message);

        match parse(
            br#"{"id":"r1","messages":[{"role":"user","content":"hi"}],"max_tokens":7,"temperature":0,"stop":["\n"],"stream":true,"priority":3,"deadline_ms":500}"#,
            &limits,
            0,
            now,
        ) {
            Ok(Incoming::Generate(g)) => {
                assert_eq!(g.id, "r1");
                assert_eq!(g.req.max_tokens, 7);
                assert_eq!(g.req.stop, vec!["\n".to_string()]);
                assert!(g.stream);
                assert_eq!(g.priority, Some(3));
                assert_eq!(g.deadline, Some(now + Duration::from_millis(500)));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse(br#"{"op":"cancel","id":"r1"}"#, &limits, 0, now),
            Ok(Incoming::Cancel { id, .. }) if id == "r1"
        ));
    }

    /// Replies are the same JSON they were when built by hand: `type` tags, `null` ids, `seq`
    /// added for MQTT, and a round trip through the client's reading.
    #[test]
    fn replies_serialize_as_the_documented_lines() {
        let e = Response::error(None, ErrorCode::TooLarge, "too big");
        assert_eq!(
            e.to_line(),
            r#"{"type":"error","id":null,"code":"too_large","message":"too big"}"#
        );
        let t = Response::event("r1", &Event::Token("hi".into()));
        assert_eq!(t.to_line(), r#"{"type":"token","id":"r1","text":"hi"}"#);
        assert_eq!(
            t.to_mqtt(Some(3), "n1"),
            r#"{"type":"token","id":"r1","text":"hi","seq":3,"node":"n1"}"#
        );
        assert_eq!(
            e.to_mqtt(None, "n1"),
            r#"{"type":"error","id":null,"code":"too_large","message":"too big","node":"n1"}"#
        );
        let c = Response::Cancel {
            id: "r1".into(),
            state: CancelState::Running,
        };
        assert_eq!(
            c.to_line(),
            r#"{"type":"cancel","id":"r1","state":"running"}"#
        );
        let mut done = Completion::empty(FinishReason::Length);
        done.text = "ok".into();
        done.timing.ttft_ms = 1.23456;
        let line = Response::event("r2", &Event::Done(Box::new(done))).to_line();
        let v: Value = serde_json::from_str(&line).expect("json");
        assert_eq!(v["type"], "done");
        assert_eq!(v["finish_reason"], "length");
        assert_eq!(v["timing"]["ttft_ms"], 1.23);
        assert!(v.get("session").is_none(), "{line}");
        let back: Response = serde_json::from_str(&line).expect("reads back");
        let c = back.into_completion().expect("a completion");
        assert_eq!(
            (c.text.as_str(), c.finish_reason),
            ("ok", FinishReason::Length)
        );
        let status = Response::Status(Box::default()).to_line();
        assert!(status.starts_with(r#"{"type":"status","#), "{status}");
        assert!(matches!(
            serde_json::from_str::<Response>(&status),
            Ok(Response::Status(_))
        ));
    }
}
