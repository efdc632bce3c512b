//! Tool calls in a model's output: found as the text streams, taken out of the text the client
//! sees, and parsed into [`ToolCall`]s.
//!
//! The format is the one the model's chat template teaches (it shows the model how to call):
//! - [`ToolFormat::Tagged`]: `<tool_call>{"name": …, "arguments": {…}}</tool_call>`, one block per
//!   call (Qwen2.5, Hermes, and most templates with a tools section);
//! - [`ToolFormat::Mistral`]: `[TOOL_CALLS]` then a JSON array of calls;
//! - [`ToolFormat::Json`]: the whole answer is a JSON call or array of calls, optionally after
//!   `<|python_tag|>` (Llama 3.1/3.2's JSON tool calling).
//!
//! A call's JSON is `{"name": "…", "arguments": {…}}` (`parameters` is taken for `arguments`,
//! and arguments written as a JSON string are parsed). A block that does not parse stays in the
//! text, as the model wrote it: nothing the model says is dropped.

use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::Value;

use super::Sink;
use crate::api::ToolCall;

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";
const MISTRAL: &str = "[TOOL_CALLS]";
const PYTHON_TAG: &str = "<|python_tag|>";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolFormat {
    Tagged,
    Mistral,
    Json,
}

impl ToolFormat {
    /// The format a chat template teaches; `Tagged` when it shows none of the others.
    pub fn of_template(source: &str) -> ToolFormat {
        if source.contains(OPEN) {
            ToolFormat::Tagged
        } else if source.contains(MISTRAL) {
            ToolFormat::Mistral
        } else if source.contains(PYTHON_TAG) || source.contains("\"parameters\"") {
            ToolFormat::Json
        } else {
            ToolFormat::Tagged
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Nothing but whitespace yet: the answer may open with a call.
    Undecided,
    /// Text; a call may open (at the format's marker).
    Text,
    /// Inside `<tool_call>`, waiting for its end.
    InCall,
    /// The rest of the answer is a call: after Mistral's marker (`explicit`), or an answer that
    /// opens with JSON or a code fence.
    Rest { explicit: bool },
}

/// What a whole answer may open with and still be a call (small models often answer a tools
/// request with the call's JSON alone, bare or in a Markdown code fence).
const BARE_OPENINGS: [&str; 4] = ["```", "{", "[", PYTHON_TAG];

/// Splits a streamed answer into the text the client sees and the calls.
pub struct ToolParser {
    format: ToolFormat,
    /// Names of the request's tools: an answer that is only JSON is a call when it names one.
    names: Vec<String>,
    state: State,
    /// Received and not yet resolved.
    pending: String,
    /// What went to the sink: the completion's text.
    shown: String,
    /// After a call, leading whitespace of the text that follows is dropped.
    after_call: bool,
    calls: Vec<ToolCall>,
}

impl ToolParser {
    /// A parser for `format`, for a request offering `tools` (OpenAI's entries).
    pub fn new(format: ToolFormat, tools: &[Value]) -> ToolParser {
        let names = tools
            .iter()
            .filter_map(|t| {
                t.get("function")
                    .unwrap_or(t)
                    .get("name")
                    .and_then(Value::as_str)
            })
            .map(str::to_string)
            .collect();
        ToolParser {
            format,
            names,
            state: State::Undecided,
            pending: String::new(),
            shown: String::new(),
            after_call: false,
            calls: Vec::new(),
        }
    }

    fn marker(&self) -> Option<&'static str> {
        match self.format {
            ToolFormat::Tagged => Some(OPEN),
            ToolFormat::Mistral => Some(MISTRAL),
            ToolFormat::Json => None,
        }
    }

    fn show(&mut self, text: &str, out: &mut dyn Sink) {
        let text = if self.after_call {
            text.trim_start()
        } else {
            text
        };
        if !text.is_empty() {
            self.after_call = false;
            self.shown.push_str(text);
            out.text(text);
        }
    }

    /// Takes streamed text; passes on what is certainly not part of a call.
    pub fn push(&mut self, text: &str, out: &mut dyn Sink) {
        self.pending.push_str(text);
        loop {
            match self.state {
                State::Rest { .. } => return,
                State::Undecided => {
                    let t = self.pending.trim_start();
                    if t.is_empty() {
                        return;
                    }
                    let marker = self.marker();
                    if marker.is_some_and(|m| t.starts_with(m)) {
                        self.state = State::Text;
                    } else if BARE_OPENINGS.iter().any(|o| t.starts_with(o)) {
                        self.state = State::Rest { explicit: false };
                    } else if marker
                        .into_iter()
                        .chain(BARE_OPENINGS)
                        .any(|m| m.starts_with(t))
                    {
                        return;
                    } else {
                        self.state = State::Text;
                    }
                }
                State::InCall => {
                    let Some(end) = self.pending.find(CLOSE) else {
                        return;
                    };
                    let body = self.pending[..end].to_string();
                    self.pending.drain(..end + CLOSE.len());
                    self.state = State::Text;
                    match parse_calls(&body) {
                        Some(calls) => {
                            self.calls.extend(calls);
                            self.after_call = true;
                        }
                        None => self.show(&format!("{OPEN}{body}{CLOSE}"), out),
                    }
                }
                State::Text => {
                    let Some(marker) = self.marker() else {
                        // Plain text from here on.
                        let all = std::mem::take(&mut self.pending);
                        self.show(&all, out);
                        return;
                    };
                    if let Some(i) = self.pending.find(marker) {
                        let before = self.pending[..i].trim_end().to_string();
                        self.pending.drain(..i + marker.len());
                        self.show(&before, out);
                        self.state = if marker == OPEN {
                            State::InCall
                        } else {
                            State::Rest { explicit: true }
                        };
                        continue;
                    }
                    // Hold what may be the start of the marker, and trailing whitespace (dropped
                    // should a call follow).
                    let hold = held(&self.pending, marker);
                    let upto = self.pending.len() - hold;
                    if upto > 0 {
                        let ready: String = self.pending.drain(..upto).collect();
                        self.show(&ready, out);
                    }
                    return;
                }
            }
        }
    }

    /// The end of the answer: resolves what is held. Returns the text shown (the completion's
    /// text) and the calls.
    pub fn finish(mut self, out: &mut dyn Sink) -> (String, Vec<ToolCall>) {
        let rest = std::mem::take(&mut self.pending);
        match self.state {
            State::Text | State::Undecided => {
                let rest = if self.calls.is_empty() {
                    rest.as_str()
                } else {
                    rest.trim_end()
                };
                self.show(rest, out);
            }
            // A small model often ends at end-of-turn without closing the block.
            State::InCall => match parse_calls(&rest) {
                Some(calls) => self.calls.extend(calls),
                None => self.show(&format!("{OPEN}{rest}"), out),
            },
            State::Rest { explicit } => {
                let body = unfence(rest.trim());
                let body = body.strip_prefix(PYTHON_TAG).unwrap_or(body);
                let calls = parse_calls(body).filter(|calls| {
                    explicit || calls.iter().all(|c| self.names.contains(&c.function.name))
                });
                match calls {
                    Some(calls) => self.calls.extend(calls),
                    None => {
                        let marker = if explicit { MISTRAL } else { "" };
                        self.show(&format!("{marker}{rest}"), out)
                    }
                }
            }
        }
        (self.shown, self.calls)
    }
}

/// The inside of a Markdown code fence (```` ```json … ``` ````); other text as it is.
fn unfence(text: &str) -> &str {
    let Some(inner) = text.strip_prefix("```") else {
        return text;
    };
    let inner = inner.strip_suffix("```").unwrap_or(inner);
    // The fence's first line names the language.
    match inner.find('\n') {
        Some(i) if !inner[..i].contains(['{', '[']) => &inner[i + 1..],
        _ => inner,
    }
}

/// Length of the end of `pending` to hold: a prefix of `marker`, or whitespace.
fn held(pending: &str, marker: &str) -> usize {
    let mut hold = 0;
    for k in (1..marker.len()).rev() {
        if pending.ends_with(&marker[..k]) {
            hold = k;
            break;
        }
    }
    let body = &pending[..pending.len() - hold];
    hold + (body.len() - body.trim_end().len())
}

/// A call (`{"name", "arguments"}`) or an array of them; `None` when the text is not that.
pub fn parse_calls(text: &str) -> Option<Vec<ToolCall>> {
    let v: Value = serde_json::from_str(text.trim()).ok()?;
    let items = match v {
        Value::Array(a) if !a.is_empty() => a,
        v @ Value::Object(_) => vec![v],
        _ => return None,
    };
    items.into_iter().map(call_of).collect()
}

fn call_of(v: Value) -> Option<ToolCall> {
    let Value::Object(mut m) = v else {
        return None;
    };
    // Some models wrap the call as OpenAI's `{"function": {...}}`.
    if let Some(Value::Object(f)) = m.remove("function") {
        m = f;
    }
    let name = match m.remove("name") {
        Some(Value::String(n)) if !n.is_empty() => n,
        _ => return None,
    };
    let arguments = match m.remove("arguments").or_else(|| m.remove("parameters")) {
        None | Some(Value::Null) => Value::Object(Default::default()),
        Some(Value::String(s)) => serde_json::from_str(&s).unwrap_or(Value::String(s)),
        Some(a) => a,
    };
    Some(ToolCall::new(call_id(), name, arguments))
}

/// `call_` and 16 hex digits, unique in the process and unlikely to repeat across restarts.
fn call_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    // splitmix64 of the time and the count.
    let mut z = t ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    format!("call_{:016x}", z ^ (z >> 31))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `pieces`, returns (streamed chunks joined, text, calls as (name, arguments)).
    fn run(format: ToolFormat, pieces: &[&str]) -> (String, String, Vec<(String, Value)>) {
        let mut streamed = String::new();
        let tools = [
            serde_json::json!({"type": "function", "function": {"name": "turn_on"}}),
            serde_json::json!({"name": "get_weather"}),
        ];
        let mut p = ToolParser::new(format, &tools);
        for x in pieces {
            p.push(x, &mut streamed);
        }
        let (text, calls) = p.finish(&mut streamed);
        let calls = calls
            .into_iter()
            .map(|c| (c.function.name, c.function.arguments))
            .collect();
        (streamed, text, calls)
    }

    #[test]
    fn tagged_calls_are_taken_out_of_the_text_whatever_the_token_cuts() {
        let out = "Sure.\n<tool_call>\n{\"name\": \"turn_on\", \"arguments\": {\"name\": \"kitchen light\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"turn_off\", \"arguments\": \"{\\\"name\\\": \\\"tv\\\"}\"}\n</tool_call>";
        for cut in 1..out.len() {
            if !out.is_char_boundary(cut) {
                continue;
            }
            let (streamed, text, calls) = run(ToolFormat::Tagged, &[&out[..cut], &out[cut..]]);
            assert_eq!(text, "Sure.", "cut at {cut}");
            assert_eq!(streamed, text, "cut at {cut}");
            assert_eq!(
                calls,
                vec![
                    (
                        "turn_on".into(),
                        serde_json::json!({"name": "kitchen light"})
                    ),
                    ("turn_off".into(), serde_json::json!({"name": "tv"})),
                ],
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn an_unclosed_call_at_the_end_still_counts_and_a_bad_one_stays_text() {
        let (_, text, calls) = run(
            ToolFormat::Tagged,
            &["<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n"],
        );
        assert_eq!(text, "");
        assert_eq!(calls.len(), 1);
        let bad = "<tool_call>{not json}</tool_call> and <tool_ more";
        let (streamed, text, calls) = run(ToolFormat::Tagged, &[bad]);
        assert_eq!(text, bad);
        assert_eq!(streamed, bad);
        assert!(calls.is_empty());
        // A call without a name is not a call.
        let (_, text, calls) = run(ToolFormat::Tagged, &["<tool_call>{\"arguments\": {}}"]);
        assert_eq!(text, "<tool_call>{\"arguments\": {}}");
        assert!(calls.is_empty());
    }

    #[test]
    fn plain_answers_stream_as_they_come() {
        let mut p = ToolParser::new(ToolFormat::Tagged, &[]);
        let mut streamed = String::new();
        p.push("Hello there, ", &mut streamed);
        assert_eq!(streamed, "Hello there,", "only the trailing space is held");
        p.push("friend <tool", &mut streamed);
        assert_eq!(streamed, "Hello there, friend");
        p.push("box>", &mut streamed);
        assert_eq!(streamed, "Hello there, friend <toolbox>");
        let (text, calls) = p.finish(&mut streamed);
        assert_eq!(text, streamed);
        assert!(calls.is_empty());
    }

    #[test]
    fn json_and_mistral_formats() {
        let (_, text, calls) = run(
            ToolFormat::Json,
            &[
                " {\"name\": \"get_weather\", ",
                "\"parameters\": {\"city\": \"Oslo\"}}",
            ],
        );
        assert_eq!(text, "");
        assert_eq!(
            calls,
            vec![("get_weather".into(), serde_json::json!({"city": "Oslo"}))]
        );
        let (streamed, text, calls) = run(ToolFormat::Json, &["It is sunny {or not}"]);
        assert_eq!(
            (streamed.as_str(), text.as_str()),
            ("It is sunny {or not}", "It is sunny {or not}")
        );
        assert!(calls.is_empty());
        let (_, text, calls) = run(
            ToolFormat::Mistral,
            &["[TOOL_CALLS] [{\"name\": \"a\", \"arguments\": {}}, {\"name\": \"b\", \"arguments\": {\"x\": 1}}]"],
        );
        assert_eq!(text, "");
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[1], ("b".into(), serde_json::json!({"x": 1})));
    }

    #[test]
    fn an_answer_that_is_only_a_call_of_an_offered_tool_is_a_call() {
        // What Qwen2.5-Coder-0.5B answers, greedily, to "Turn on the kitchen light".
        let fenced = "```json\n{\n  \"name\": \"turn_on\",\n  \"arguments\": {\n    \"name\": \"kitchen_light\"\n  }\n}\n```";
        let (streamed, text, calls) = run(
            ToolFormat::Tagged,
            &[&fenced[..2], &fenced[2..9], &fenced[9..]],
        );
        assert_eq!((streamed.as_str(), text.as_str()), ("", ""));
        assert_eq!(
            calls,
            vec![(
                "turn_on".into(),
                serde_json::json!({"name": "kitchen_light"})
            )]
        );
        // JSON naming no offered tool is an answer, shown whole.
        let other = "{\"name\": \"Ada\", \"arguments\": {}}";
        let (streamed, text, calls) = run(ToolFormat::Tagged, &[other]);
        assert_eq!((streamed.as_str(), text.as_str()), (other, other));
        assert!(calls.is_empty());
        let code = "```python\nprint(1)\n```";
        let (_, text, calls) = run(ToolFormat::Tagged, &[code]);
        assert_eq!(text, code);
        assert!(calls.is_empty());
    }

    #[test]
    fn formats_are_read_off_templates() {
        assert_eq!(
            ToolFormat::of_template("x <tool_call>\\n{...}</tool_call>"),
            ToolFormat::Tagged
        );
        assert_eq!(
            ToolFormat::of_template("[TOOL_CALLS] ..."),
            ToolFormat::Mistral
        );
        assert_eq!(
            ToolFormat::of_template("<|python_tag|> ... tools"),
            ToolFormat::Json
        );
        assert_ne!(call_id(), call_id());
    }
}
