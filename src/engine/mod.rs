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

pub mod chat;
pub mod perplexity;
pub mod sampler;
pub mod stream;
pub mod tokenizer;
pub mod worker;

use std::path::Path;
use std::time::Instant;

use crate::backend::cpu::model::ModelError;
use crate::backend::cpu::{CpuBackend, CpuOptions};
use crate::backend::{Backend, BackendError};
use crate::queue::{Completion, FinishReason, GenerateRequest, Prompt, Timing, Usage};
use chat::{ChatError, ChatTemplate};
use sampler::Sampler;
use stream::TextStream;
use tokenizer::{Tokenizer, TokenizerError};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    #[error(transparent)]
    Model(#[from] ModelError),
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
    #[error("prompt is empty")]
    EmptyPrompt,
    #[error("{0}")]
    BadRequest(String),
}

/// Receives generated text and may interrupt generation.
pub trait Sink {
    /// New text, in order; the concatenation is the completion's text.
    fn text(&mut self, text: &str);
    /// Checked once per token: `Some` stops generation with that reason.
    fn interrupt(&mut self) -> Option<FinishReason> {
        None
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
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("backend", &self.backend.info())
            .finish()
    }
}

impl Engine {
    /// Loads a GGUF model on the int4 CPU engine.
    pub fn load_cpu(path: &Path, opts: &CpuOptions) -> Result<Engine, EngineError> {
        let backend = CpuBackend::open(path, opts)?;
        let tokenizer = Tokenizer::from_gguf(backend.gguf(), path.parent())?;
        if tokenizer.n_vocab() != backend.n_vocab() {
            return Err(EngineError::Tokenizer(TokenizerError::Bad(format!(
                "tokenizer has {} tokens, the model {}",
                tokenizer.n_vocab(),
                backend.n_vocab()
            ))));
        }
        let template = backend.gguf().get_str("tokenizer.chat_template").ok();
        let bos = tokenizer.bos.and_then(|b| tokenizer.text(b)).unwrap_or("");
        let eos = tokenizer.eos.and_then(|b| tokenizer.text(b)).unwrap_or("");
        let chat = ChatTemplate::new(template, bos, eos)?;
        Ok(Engine::new(Box::new(backend), tokenizer, chat))
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
        }
    }

    /// Lets generation go past the window's end by sliding it (`None`: stop at the end).
    pub fn set_window(&mut self, window: Option<Window>) {
        self.window = window;
    }

    /// Prompt text as the model sees it (template applied to messages).
    pub fn prompt_text(&self, prompt: &Prompt) -> Result<String, EngineError> {
        Ok(match prompt {
            Prompt::Messages(m) => {
                if m.is_empty() {
                    return Err(EngineError::EmptyPrompt);
                }
                self.chat.render(m)?
            }
            Prompt::Raw(s) => s.clone(),
        })
    }

    pub fn prompt_tokens(&self, prompt: &Prompt) -> Result<Vec<u32>, EngineError> {
        let text = self.prompt_text(prompt)?;
        let ids = self.tokenizer.encode_prompt(&text)?;
        if ids.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        Ok(ids)
    }

    /// Generates a completion, streaming its text to `sink`.
    pub fn generate(
        &mut self,
        req: &GenerateRequest,
        sink: &mut dyn Sink,
    ) -> Result<Completion, EngineError> {
        let start = Instant::now();
        req.sampling.validate().map_err(EngineError::BadRequest)?;
        let prompt = self.prompt_tokens(&req.prompt)?;
        let n_ctx = self.backend.n_ctx();
        // At least one position must be left to generate into.
        if prompt.len() >= n_ctx {
            return Err(EngineError::PromptTooLong {
                tokens: prompt.len(),
                n_ctx,
                limit: n_ctx - 1,
            });
        }
        self.sampler.reset(req.sampling.clone());
        self.history.clear();
        self.backend.reset();

        // Prefill in chunks; only the last chunk's last logits matter. The sink is asked between
        // chunks too, so a cancel or a deadline stops a long prompt, and a watchdog sees progress.
        let chunk = self.backend.max_batch();
        let mut pos = 0;
        let mut finish = FinishReason::Length;
        let mut stopped_early = false;
        for part in prompt.chunks(chunk) {
            if let Some(r) = sink.interrupt() {
                finish = r;
                stopped_early = true;
                break;
            }
            let l = self.backend.forward(part, pos, false)?;
            if pos + part.len() == prompt.len() {
                self.logits.copy_from_slice(l);
            }
            pos += part.len();
        }
        self.history.extend_from_slice(&prompt);
        let prefill_done = Instant::now();

        let mut stream = TextStream::new(&req.stop);
        let mut generated: Vec<u32> = Vec::with_capacity(req.max_tokens.min(n_ctx));
        let mut first_token_at = None;
        let mut logits_ready = true;
        let mut evicted = 0;
        while !stopped_early && generated.len() < req.max_tokens {
            if let Some(r) = sink.interrupt() {
                finish = r;
                break;
            }
            if !logits_ready {
                if pos >= n_ctx {
                    let Some(w) = self.window else {
                        finish = FinishReason::Length;
                        break;
                    };
                    self.backend.shift(w.n_sink, w.n_discard, pos)?;
                    // history[..pos] mirrors the cache; its last entry is not cached yet.
                    self.history.drain(w.n_sink..w.n_sink + w.n_discard);
                    pos -= w.n_discard;
                    evicted += w.n_discard;
                }
                let last = self.history[self.history.len() - 1];
                let l = self.backend.forward(&[last], pos, false)?;
                self.logits.copy_from_slice(l);
                pos += 1;
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
        let first = first_token_at.unwrap_or(end);
        let decode_s = (end - first).as_secs_f64();
        let prefill_s = (prefill_done - start).as_secs_f64();
        Ok(Completion {
            text: stream.into_text(),
            finish_reason: finish,
            usage: Usage {
                prompt_tokens: prompt.len(),
                completion_tokens: generated.len(),
                evicted_tokens: evicted,
            },
            timing: Timing {
                ttft_ms: (first - start).as_secs_f64() * 1e3,
                prefill_tps: if prefill_s > 0.0 {
                    prompt.len() as f64 / prefill_s
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
        })
    }
}
