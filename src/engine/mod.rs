//! The engine: tokenizer → chat template → prefill → decode loop → text, on one [`Backend`].
//!
//! - [`tokenizer`]: ids from text and bytes from ids, from the GGUF metadata.
//! - [`chat`]: the model's Jinja chat template.
//! - [`sampler`]: next-token choice.
//! - [`stream`]: bytes of tokens to text, with stop strings and split UTF-8 held back.
//! - [`perplexity`]: llama-perplexity's measure, and KL divergence against the exact path.
//! - [`worker`]: the daemon's engine thread, running the queue's jobs one at a time.
//!
//! One engine owns one backend and is driven from one thread (the engine worker in the daemon,
//! the main thread in `edgellm ask`).
//!
//! Layer rules: the engine speaks [`crate::api`], takes jobs from [`crate::queue`], and sees
//! backends only through the [`Backend`] trait and the [`Vocabulary`] a backend hands it; it
//! never names `cpu` or `ort`. Requests reach it already validated where they were parsed.

pub mod chat;
pub mod perplexity;
pub mod sampler;
pub mod session;
pub mod stream;
pub mod tokenizer;
pub mod tools;
pub mod worker;

use std::time::Instant;

use crate::api::status::SessionStats;
use crate::api::{
    Completion, FinishReason, GenerateRequest, Message, Prompt, SessionInfo, Timing, Usage,
};
use crate::backend::{Backend, BackendError, OpenError, Vocabulary};
use chat::{ChatError, ChatTemplate, Rendered};
use sampler::Sampler;
use serde_json::Value;
use session::{Session, SessionStore};
use stream::TextStream;
use tokenizer::{Tokenizer, TokenizerError};
use tools::{ToolFormat, ToolParser};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Chat(#[from] ChatError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("prompt is {tokens} tokens; the context window holds {n_ctx} (limit: {limit} prompt tokens)")]
    PromptTooLong {
        tokens: usize,
        n_ctx: usize,
        limit: usize,
    },
    #[error("the system prompt and the last user turn are {tokens} tokens with every earlier turn dropped; the context window holds {n_ctx} (limit: {} prompt tokens)", n_ctx - 1)]
    TurnTooLong { tokens: usize, n_ctx: usize },
    #[error("prompt is empty")]
    EmptyPrompt,
    #[error("session {0:?} is not held (never started here, or evicted to stay within sessions.max_count / sessions.max_bytes); send its earlier turns in `history` to rebuild it, or `history: []` to start it")]
    SessionUnknown(String),
    #[error("{0}")]
    BadRequest(String),
    /// The sink said stop before anything ran (cancel or deadline while the prompt was
    /// prepared); [`Engine::generate`] answers it as an empty completion with this reason.
    #[error("interrupted ({})", .0.as_str())]
    Interrupted(FinishReason),
}

/// The tokenizer and chat template a backend's vocabulary gives, checked against its
/// `n_vocab` logits.
fn tokenizer_of(
    v: Vocabulary<'_>,
    n_vocab: usize,
) -> Result<(Tokenizer, Option<String>), EngineError> {
    Ok(match v {
        Vocabulary::Gguf { gguf, dir } => {
            let t = Tokenizer::from_gguf(gguf, dir)?;
            if t.n_vocab() != n_vocab {
                return Err(vocab_mismatch(t.n_vocab(), n_vocab));
            }
            let template = gguf.get_str("tokenizer.chat_template").ok();
            (t, template.map(str::to_string))
        }
        Vocabulary::Folder {
            tokenizer_json,
            bos,
            eos,
            chat_template,
        } => {
            let t = Tokenizer::from_json(&tokenizer_json, bos, &eos)?;
            // A graph's vocabulary may be padded past the tokenizer's.
            if t.n_vocab() > n_vocab {
                return Err(vocab_mismatch(t.n_vocab(), n_vocab));
            }
            (t, chat_template)
        }
    })
}

fn vocab_mismatch(tokenizer: usize, model: usize) -> EngineError {
    EngineError::Tokenizer(TokenizerError::Bad(format!(
        "tokenizer has {tokenizer} tokens, the model {model}"
    )))
}

/// Receives generated text and may interrupt generation.
pub trait Sink {
    /// New text, in order; the concatenation is the completion's text.
    fn text(&mut self, text: &str);
    /// Checked once per token: `Some` stops generation with that reason.
    fn interrupt(&mut self) -> Option<FinishReason> {
        None
    }
    /// After every prefill chunk and token: positions of the window in use, and positions
    /// evicted so far by this request.
    fn kv(&mut self, _used: usize, _evicted: usize) {}
}

/// A sink that sends text through the tool-call parser to the client's sink.
struct Split<'a> {
    parser: &'a mut ToolParser,
    inner: &'a mut dyn Sink,
}

impl Sink for Split<'_> {
    fn text(&mut self, text: &str) {
        self.parser.push(text, self.inner);
    }
    fn interrupt(&mut self) -> Option<FinishReason> {
        self.inner.interrupt()
    }
    fn kv(&mut self, used: usize, evicted: usize) {
        self.inner.kv(used, evicted)
    }
}

/// A sink that only collects.
impl Sink for String {
    fn text(&mut self, text: &str) {
        self.push_str(text);
    }
}

/// How the context window slides when it is full: the first `n_sink` positions (attention
/// sinks, StreamingLLM) stay, the `n_discard` oldest after them are evicted, and generation goes
/// on with the rest re-based (see [`Backend::shift`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub n_sink: usize,
    pub n_discard: usize,
}

impl Window {
    /// `n_discard` 0 means a quarter of what is not a sink. `None` when the window is too small
    /// to slide.
    pub fn new(n_ctx: usize, n_sink: usize, n_discard: usize) -> Option<Window> {
        let free = n_ctx.checked_sub(n_sink + 1)?;
        let n_discard = if n_discard == 0 {
            (free / 4).max(1)
        } else {
            n_discard
        };
        (n_discard <= free && n_discard > 0).then_some(Window { n_sink, n_discard })
    }
}

pub struct Engine {
    pub backend: Box<dyn Backend>,
    pub tokenizer: Tokenizer,
    pub chat: ChatTemplate,
    sampler: Sampler,
    /// Tokens in the KV cache, in order. Capacity n_ctx.
    history: Vec<u32>,
    /// Logits of the latest position, copied out of the backend so the sampler may penalise
    /// them in place. (n_vocab)
    logits: Vec<f32>,
    /// Sliding window; `None`: generation stops with `length` when the window is full.
    window: Option<Window>,
    /// The session whose state is in the backend's cache.
    resident: Option<Session>,
    sessions: SessionStore,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("backend", &self.backend.info())
            .finish()
    }
}

/// Hands the heap's free pages back to the system. Building a tokenizer of a large vocabulary
/// (Qwen2.5's 151,936 tokens and as many merges) goes through a JSON document of it several
/// times its final size; glibc keeps the freed pages resident, 54 MiB of them on that model,
/// which a daemon whose memory is planned at start would carry for months.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap pages to the system; no allocation moves.
    unsafe {
        libc::malloc_trim(0);
    }
}

impl Engine {
    /// An engine on `backend`, with the tokenizer and chat template of its
    /// [`Vocabulary`].
    pub fn from_backend(mut backend: Box<dyn Backend>) -> Result<Engine, EngineError> {
        let n_vocab = backend.n_vocab();
        let mut built = None;
        backend.finish_load(&mut |v| built = Some(tokenizer_of(v, n_vocab)));
        let (tokenizer, template) = match built {
            Some(b) => b?,
            None => tokenizer_of(backend.vocabulary(), n_vocab)?,
        };
        let bos = tokenizer.bos.and_then(|b| tokenizer.text(b)).unwrap_or("");
        let eos = tokenizer.eos.and_then(|b| tokenizer.text(b)).unwrap_or("");
        let chat = ChatTemplate::new(template.as_deref(), bos, eos)?;
        backend.release_vocabulary();
        release_freed_memory();
        Ok(Engine::new(backend, tokenizer, chat))
    }

    pub fn new(backend: Box<dyn Backend>, tokenizer: Tokenizer, chat: ChatTemplate) -> Engine {
        let n_vocab = backend.n_vocab();
        let n_ctx = backend.n_ctx();
        Engine {
            backend,
            tokenizer,
            chat,
            sampler: Sampler::new(Default::default(), n_vocab),
            // The last sampled token is kept without a position of its own: n_ctx + 1.
            history: Vec::with_capacity(n_ctx + 1),
            logits: vec![0.0; n_vocab],
            window: None,
            resident: None,
            sessions: SessionStore::default(),
        }
    }

    /// Lets generation go past the window's end by sliding it (`None`: stop at the end).
    /// A backend that cannot slide (an ONNX graph whose rotary edgellm cannot read) keeps no
    /// window: its generations stop with `length` when the window is full.
    pub fn set_window(&mut self, window: Option<Window>) {
        self.window = window.filter(|_| self.backend.can_shift());
    }

    /// Prompt text as the model sees it (template applied to messages, offering `tools`).
    pub fn prompt_text(&self, prompt: &Prompt, tools: &[Value]) -> Result<String, EngineError> {
        Ok(match prompt {
            Prompt::Messages(m) => {
                if m.is_empty() {
                    return Err(EngineError::EmptyPrompt);
                }
                self.chat.render(m, tools)?
            }
            Prompt::Raw(s) => s.clone(),
        })
    }

    /// The prompt ids of a chat as a request's are made: the template's structure yields
    /// control tokens, the messages' content is tokenized as text.
    pub fn chat_ids(&mut self, messages: &[Message]) -> Result<Vec<u32>, EngineError> {
        let r = self.chat.render_marked(messages, &[])?;
        Ok(self.tokenize_chat(&r, true, &mut String::new())?.0)
    }

    /// Takes `other`'s window and session limits (the sessions themselves stay behind: their
    /// caches belong to the other backend).
    pub fn adopt_settings(&mut self, other: &Engine) {
        self.window = other.window.filter(|_| self.backend.can_shift());
        let st = other.sessions.stats(0);
        self.sessions = SessionStore::new(st.max_count, st.max_bytes);
        self.resident = None;
    }

    /// Keeps up to `max_count` sessions in `max_bytes` between their turns (0: sessions off).
    pub fn set_sessions(&mut self, max_count: usize, max_bytes: u64) {
        self.resident = None;
        self.sessions = SessionStore::new(max_count, max_bytes);
    }

    /// Sessions held and their bytes.
    pub fn session_stats(&self) -> SessionStats {
        self.sessions.stats(usize::from(self.resident.is_some()))
    }

    /// Positions the cache may hold for a prompt that leaves room for an answer of up to
    /// `max_tokens` (a quarter of the window at most, at least one position).
    fn prompt_budget(&self, max_tokens: usize) -> usize {
        let n_ctx = self.backend.n_ctx();
        n_ctx - max_tokens.clamp(1, (n_ctx / 4).max(1))
    }

    /// Tokens of a rendered chat, content tokenized as text (with BOS when it is a `prompt`'s
    /// start and the model asks for one); [`EngineError::Interrupted`] when `sink` says stop
    /// between sections (it beats the engine's heartbeat as it is asked).
    fn tokenize_chat(
        &mut self,
        r: &Rendered,
        prompt: bool,
        sink: &mut dyn Sink,
    ) -> Result<(Vec<u32>, Vec<usize>), EngineError> {
        let mut why = None;
        let mut stop = || {
            why = sink.interrupt();
            why.is_some()
        };
        let out = self
            .tokenizer
            .encode_marked(&r.text, &r.ranges(), prompt, &mut stop)?;
        match (out, why) {
            (Some(t), _) => Ok(t),
            (None, Some(w)) => Err(EngineError::Interrupted(w)),
            (None, None) => Err(EngineError::Interrupted(FinishReason::Cancelled)),
        }
    }

    /// Tokens of `messages`, dropping the oldest turns while they exceed `budget`: the system
    /// prompt (a first message of role "system") and the last user turn (and what follows it)
    /// always stay. Returns the kept messages, their text and tokens, and the tokens dropped.
    /// Only when even those do not fit the window is it an error.
    ///
    /// Linear in the chat's size: the chat is rendered and tokenized once, each message's share
    /// of the tokens read off the token offsets, and as many of the oldest turns dropped at once
    /// as free the excess; the rest is rendered and tokenized again to check (once more at most
    /// in practice, when a template adds text where turns were dropped). `sink` may interrupt
    /// between steps.
    fn fit_messages(
        &mut self,
        messages: &[Message],
        tools: &[Value],
        budget: usize,
        sink: &mut dyn Sink,
    ) -> Result<(Vec<Message>, String, Vec<u32>, usize), EngineError> {
        if messages.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        let first = usize::from(messages[0].role == "system");
        let mut last_user = messages
            .iter()
            .rposition(|m| m.role == "user")
            .unwrap_or(messages.len() - 1)
            .max(first);
        let mut kept = messages.to_vec();
        let mut r = self.chat.render_marked(&kept, tools)?;
        let (mut ids, mut starts) = self.tokenize_chat(&r, true, sink)?;
        let full = ids.len();
        while ids.len() > budget && first < last_user {
            let counts = tokens_per_message(&r, &starts, kept.len());
            let excess = ids.len() - budget;
            let (mut k, mut freed) = (0, 0);
            while first + k < last_user && (k == 0 || freed < excess) {
                freed += counts[first + k];
                k += 1;
            }
            kept.drain(first..first + k);
            last_user -= k;
            if let Some(why) = sink.interrupt() {
                return Err(EngineError::Interrupted(why));
            }
            r = self.chat.render_marked(&kept, tools)?;
            (ids, starts) = self.tokenize_chat(&r, true, sink)?;
        }
        let n_ctx = self.backend.n_ctx();
        if ids.len() >= n_ctx {
            return Err(EngineError::TurnTooLong {
                tokens: ids.len(),
                n_ctx,
            });
        }
        let dropped = full.saturating_sub(ids.len());
        Ok((kept, r.text, ids, dropped))
    }

    /// Saves the resident session's cache into the store, so the backend can serve another.
    fn park(&mut self) -> Result<(), EngineError> {
        if let Some(mut s) = self.resident.take() {
            s.kv.clear();
            self.backend.save(s.cached, &mut s.kv)?;
            s.kv.shrink_to_fit();
            for id in self.sessions.put(s, 0) {
                tracing::info!(session = %id, "session evicted (sessions.max_count / max_bytes)");
            }
        }
        Ok(())
    }

    /// Works out what to run for `req`: the session it continues (made resident), the tokens
    /// to feed, and where in the cache they start.
    fn prepare(
        &mut self,
        req: &GenerateRequest,
        sink: &mut dyn Sink,
    ) -> Result<Prepared, EngineError> {
        let budget = self.prompt_budget(req.max_tokens);
        let Some(sref) = &req.session else {
            self.park()?;
            let (text, ids, dropped) = match &req.prompt {
                Prompt::Raw(t) => {
                    let ids = self.tokenizer.encode_prompt(t)?;
                    if ids.is_empty() {
                        return Err(EngineError::EmptyPrompt);
                    }
                    let n_ctx = self.backend.n_ctx();
                    if ids.len() >= n_ctx {
                        return Err(EngineError::PromptTooLong {
                            tokens: ids.len(),
                            n_ctx,
                            limit: n_ctx - 1,
                        });
                    }
                    (t.clone(), ids, 0)
                }
                Prompt::Messages(m) => {
                    let (_, text, ids, dropped) = self.fit_messages(m, &req.tools, budget, sink)?;
                    (text, ids, dropped)
                }
            };
            return Ok(Prepared::fresh(None, Vec::new(), text, ids, dropped));
        };
        if !self.sessions.enabled() {
            return Err(EngineError::BadRequest(
                "session: sessions are off on this daemon (sessions.max_count = 0)".into(),
            ));
        }
        let Prompt::Messages(new) = &req.prompt else {
            return Err(EngineError::BadRequest(
                "session: a session continues a chat; send messages, not prompt".into(),
            ));
        };
        if self
            .resident
            .as_ref()
            .is_none_or(|r| r.id != sref.id || r.owner != sref.owner)
        {
            self.park()?;
            if let Some(mut s) = self.sessions.take(&sref.owner, &sref.id) {
                self.backend.load(s.cached, &s.kv)?;
                // Resident: its state lives in the backend now.
                s.kv = Vec::new();
                self.resident = Some(s);
            }
        }
        let held = self.resident.take();
        let (prev, held) = match (&sref.history, held) {
            (Some(h), Some(s)) if s.messages == *h => (h.clone(), Some(s)),
            (Some(h), _) => (h.clone(), None),
            (None, Some(s)) => (s.messages.clone(), Some(s)),
            (None, None) => return Err(EngineError::SessionUnknown(sref.id.clone())),
        };
        for id in self.sessions.make_room(0) {
            tracing::info!(session = %id, "session evicted (sessions.max_count)");
        }
        let mut all = prev;
        all.extend(new.iter().cloned());
        if let Some(s) = held {
            let r = self.chat.render_marked(&all, &req.tools)?;
            if let Some(suffix) = r.text.strip_prefix(s.text.as_str()) {
                // The new turn's text, with its content ranges moved to the suffix.
                let skip = s.text.len();
                let part = Rendered {
                    text: suffix.to_string(),
                    content: r
                        .content
                        .iter()
                        .filter(|(_, c)| c.end > skip)
                        .map(|(i, c)| (*i, c.start.max(skip) - skip..c.end - skip))
                        .collect(),
                };
                // The suffix continues the cached prompt: no BOS.
                let suffix_ids = match self.tokenize_chat(&part, false, sink) {
                    Ok((ids, _)) => ids,
                    Err(e) => {
                        // Interrupted: the session stays as it was.
                        self.resident = Some(s);
                        return Err(e);
                    }
                };
                let mut feed = s.tokens[s.cached..].to_vec();
                feed.extend(suffix_ids);
                // With a window the cache slides to take the turn; without one it must fit.
                let n_ctx = self.backend.n_ctx();
                let room = match self.window {
                    Some(w) => n_ctx - w.n_sink,
                    None => n_ctx.saturating_sub(s.cached + 1),
                };
                if feed.len() < room.min(budget) {
                    return Ok(Prepared {
                        pos: s.cached,
                        prompt_tokens: feed.len(),
                        feed,
                        dropped: 0,
                        reused: s.cached,
                        messages: all,
                        text: r.text,
                        session: Some(s),
                    });
                }
            }
            tracing::debug!(session = %s.id, "session cache not reusable; prefilling the conversation again");
        }
        let (kept, text, ids, dropped) = self.fit_messages(&all, &req.tools, budget, sink)?;
        let session = Session::new(&sref.owner, &sref.id);
        Ok(Prepared::fresh(Some(session), kept, text, ids, dropped))
    }

    /// Runs `tokens` from position `*pos`, in chunks, sliding the window when it is full.
    /// Returns the logits of the last token in `self.logits`, or the reason generation was
    /// interrupted between chunks.
    fn feed(
        &mut self,
        tokens: &[u32],
        pos: &mut usize,
        evicted: &mut usize,
        sink: &mut dyn Sink,
    ) -> Result<Option<FinishReason>, EngineError> {
        let n_ctx = self.backend.n_ctx();
        let batch = self.backend.max_batch();
        let mut done = 0;
        while done < tokens.len() {
            if let Some(r) = sink.interrupt() {
                return Ok(Some(r));
            }
            if *pos >= n_ctx {
                self.slide(pos, evicted)?;
            }
            let n = batch.min(tokens.len() - done).min(n_ctx - *pos);
            let part = &tokens[done..done + n];
            let l = self.backend.forward(part, *pos, false)?;
            if done + n == tokens.len() {
                self.logits.copy_from_slice(l);
            }
            *pos += n;
            done += n;
            sink.kv(*pos, *evicted);
        }
        Ok(None)
    }

    /// Evicts `n_discard` positions after the sinks (the window must slide: `None` is an
    /// error here, callers check first).
    fn slide(&mut self, pos: &mut usize, evicted: &mut usize) -> Result<(), EngineError> {
        let n_ctx = self.backend.n_ctx();
        let w = self.window.ok_or(BackendError::ContextFull {
            pos: *pos,
            end: *pos + 1,
            n_ctx,
        })?;
        self.backend.shift(w.n_sink, w.n_discard, *pos)?;
        // history[..pos] mirrors the cache; what follows is not cached yet.
        self.history.drain(w.n_sink..w.n_sink + w.n_discard);
        *pos -= w.n_discard;
        *evicted += w.n_discard;
        Ok(())
    }

    /// Generates a completion, streaming its text to `sink`.
    pub fn generate(
        &mut self,
        req: &GenerateRequest,
        sink: &mut dyn Sink,
    ) -> Result<Completion, EngineError> {
        match self.generate_inner(req, sink) {
            // Stopped (cancel, deadline) while the prompt was prepared: nothing ran.
            Err(EngineError::Interrupted(why)) => Ok(Completion::empty(why)),
            Err(e) => {
                // The cache no longer matches any session's record of it.
                self.resident = None;
                Err(e)
            }
            ok => ok,
        }
    }

    fn generate_inner(
        &mut self,
        req: &GenerateRequest,
        sink: &mut dyn Sink,
    ) -> Result<Completion, EngineError> {
        let start = Instant::now();
        if !req.tools.is_empty() && !self.chat.takes_tools() {
            return Err(EngineError::BadRequest(
                "tools: this model's chat template has no place for tools; send the request without them".into(),
            ));
        }
        let p = self.prepare(req, sink)?;
        let n_ctx = self.backend.n_ctx();
        self.sampler.reset(req.sampling.clone());
        let mut pos = p.pos;
        match &p.session {
            Some(s) if p.pos > 0 => {
                self.history.clear();
                self.history.extend_from_slice(&s.tokens[..s.cached]);
            }
            _ => {
                self.history.clear();
                self.backend.reset();
            }
        }
        let mut evicted = 0;
        let mut finish = FinishReason::Length;
        // The history mirrors the cache as the feed goes: a slide during it drains the right
        // tokens.
        self.history.extend_from_slice(&p.feed);
        let interrupted = self.feed(&p.feed, &mut pos, &mut evicted, sink)?;
        let stopped_early = interrupted.is_some();
        if let Some(r) = interrupted {
            finish = r;
        }
        let prefill_done = Instant::now();

        let mut stream = TextStream::new(&req.stop);
        // With tools, the text goes through the tool-call parser on its way to the client.
        let mut parser = (!req.tools.is_empty())
            .then(|| ToolParser::new(ToolFormat::of_template(&self.chat.source), &req.tools));
        let client = sink;
        let mut split;
        let sink: &mut dyn Sink = match &mut parser {
            Some(p) => {
                split = Split {
                    parser: p,
                    inner: &mut *client,
                };
                &mut split
            }
            None => &mut *client,
        };
        let mut generated: Vec<u32> = Vec::with_capacity(req.max_tokens.min(n_ctx));
        let mut first_token_at = None;
        let mut logits_ready = true;
        while !stopped_early && generated.len() < req.max_tokens {
            if let Some(r) = sink.interrupt() {
                finish = r;
                break;
            }
            if !logits_ready {
                if pos >= n_ctx {
                    if self.window.is_none() {
                        finish = FinishReason::Length;
                        break;
                    }
                    self.slide(&mut pos, &mut evicted)?;
                }
                let last = self.history[self.history.len() - 1];
                let l = self.backend.forward(&[last], pos, false)?;
                self.logits.copy_from_slice(l);
                pos += 1;
                sink.kv(pos, evicted);
            }
            logits_ready = false;
            if req.ignore_eos {
                for &t in &self.tokenizer.eog {
                    if let Some(l) = self.logits.get_mut(t as usize) {
                        *l = f32::NEG_INFINITY;
                    }
                }
            }
            let token = self.sampler.sample(&mut self.logits, &self.history);
            if first_token_at.is_none() {
                first_token_at = Some(Instant::now());
            }
            if self.tokenizer.is_eog(token) {
                finish = FinishReason::Stop;
                break;
            }
            generated.push(token);
            self.history.push(token);
            if stream.push(self.tokenizer.piece(token), sink) {
                finish = FinishReason::Stop;
                break;
            }
        }
        stream.finish(sink);
        let end = Instant::now();
        let (text, tool_calls) = match parser {
            Some(p) => p.finish(client),
            None => (stream.into_text(), Vec::new()),
        };
        let session = p.session.map(|mut s| {
            let mut reply = Vec::new();
            for &t in &generated {
                reply.extend_from_slice(self.tokenizer.piece(t));
            }
            s.text = p.text;
            s.text.push_str(&String::from_utf8_lossy(&reply));
            s.messages = p.messages;
            s.messages.push(Message {
                tool_calls: tool_calls.clone(),
                ..Message::new("assistant", &text)
            });
            s.tokens.clear();
            s.tokens.extend_from_slice(&self.history);
            s.cached = pos.min(self.history.len());
            s.turns += 1;
            s
        });
        let session_info = session.as_ref().map(|s| SessionInfo {
            id: s.id.clone(),
            turns: s.turns,
            cached_tokens: s.cached,
        });
        self.resident = session;
        let first = first_token_at.unwrap_or(end);
        let decode_s = (end - first).as_secs_f64();
        let prefill_s = (prefill_done - start).as_secs_f64();
        Ok(Completion {
            text,
            finish_reason: finish,
            usage: Usage {
                prompt_tokens: p.prompt_tokens,
                completion_tokens: generated.len(),
                evicted_tokens: evicted,
                prompt_tokens_dropped: p.dropped,
                cached_tokens: p.reused,
            },
            timing: Timing {
                ttft_ms: (first - start).as_secs_f64() * 1e3,
                prefill_tps: if prefill_s > 0.0 {
                    p.feed.len() as f64 / prefill_s
                } else {
                    0.0
                },
                decode_tps: if generated.len() > 1 && decode_s > 0.0 {
                    (generated.len() - 1) as f64 / decode_s
                } else {
                    0.0
                },
                total_ms: (end - start).as_secs_f64() * 1e3,
            },
            tokens: generated,
            session: session_info,
            tool_calls,
        })
    }
}

/// Tokens of each of `n` messages in a rendering: a token belongs to the message whose content
/// is the first to end after the token starts (so the structure before a message's content is
/// the message's); tokens after the last content (the assistant's opening) to none.
fn tokens_per_message(r: &Rendered, starts: &[usize], n: usize) -> Vec<usize> {
    let mut counts = vec![0; n];
    let ends: Vec<(usize, usize)> = r.content.iter().map(|(i, c)| (c.end, *i)).collect();
    for &s in starts {
        let k = ends.partition_point(|&(end, _)| end <= s);
        if let Some(&(_, i)) = ends.get(k) {
            if let Some(c) = counts.get_mut(i) {
                *c += 1;
            }
        }
    }
    counts
}

/// What [`Engine::prepare`] worked out for a request.
struct Prepared {
    /// The session the request continues or starts (resident while it runs).
    session: Option<Session>,
    /// Where the feed starts: the session's cached positions, or 0.
    pos: usize,
    /// Tokens to run before generating.
    feed: Vec<u32>,
    /// Prompt tokens of this request (what is fed).
    prompt_tokens: usize,
    /// Tokens of the oldest turns dropped to fit the window.
    dropped: usize,
    /// Cached positions of the session reused instead of prefilled.
    reused: usize,
    /// The conversation up to this turn (sessions).
    messages: Vec<Message>,
    /// The rendered prompt text.
    text: String,
}

impl Prepared {
    fn fresh(
        session: Option<Session>,
        messages: Vec<Message>,
        text: String,
        ids: Vec<u32>,
        dropped: usize,
    ) -> Prepared {
        Prepared {
            session,
            pos: 0,
            prompt_tokens: ids.len(),
            feed: ids,
            dropped,
            reused: 0,
            messages,
            text,
        }
    }
}
