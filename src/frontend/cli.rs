//! `edgellm ask`: one request, answered in-process, the answer streamed to stdout as it is
//! generated and nothing else; a one-line summary on stderr.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::api::{Completion, FinishReason, GenerateRequest};
use crate::engine::{Engine, EngineError, Sink};

/// Writes each piece of text as it comes and flushes, so a reader sees tokens as they arrive.
struct Stdout<'a, W: Write> {
    out: W,
    error: Option<std::io::Error>,
    cancel: &'a AtomicBool,
}

impl<W: Write> Sink for Stdout<'_, W> {
    fn text(&mut self, text: &str) {
        if self.error.is_none() {
            if let Err(e) = self
                .out
                .write_all(text.as_bytes())
                .and_then(|_| self.out.flush())
            {
                self.error = Some(e);
            }
        }
    }

    fn interrupt(&mut self) -> Option<FinishReason> {
        // A closed stdout (e.g. `| head`) ends generation instead of computing for nobody.
        if self.error.is_some() || self.cancel.swap(false, Ordering::Relaxed) {
            return Some(FinishReason::Cancelled);
        }
        None
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AskError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("writing the answer: {0}")]
    Io(#[from] std::io::Error),
}

/// Generates the answer to `req`, streaming it to `out`; ends the answer with a newline.
pub fn ask<W: Write>(
    engine: &mut Engine,
    req: &GenerateRequest,
    out: W,
) -> Result<Completion, AskError> {
    ask_until(engine, req, out, &AtomicBool::new(false))
}

/// As [`ask`], and the answer ends `cancelled` when `cancel` is set (it is cleared then).
pub fn ask_until<W: Write>(
    engine: &mut Engine,
    req: &GenerateRequest,
    out: W,
    cancel: &AtomicBool,
) -> Result<Completion, AskError> {
    let mut sink = Stdout {
        out,
        error: None,
        cancel,
    };
    let c = engine.generate(req, &mut sink)?;
    if let Some(e) = sink.error {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            return Err(e.into());
        }
    } else {
        sink.out.write_all(b"\n")?;
        sink.out.flush()?;
    }
    Ok(c)
}

/// The stderr summary line.
pub fn summary(c: &Completion) -> String {
    format!(
        "[{} prompt tokens, {} generated, finish {}; ttft {:.0} ms, prefill {:.1} tok/s, generation {:.1} tok/s]",
        c.usage.prompt_tokens,
        c.usage.completion_tokens,
        c.finish_reason.as_str(),
        c.timing.ttft_ms,
        c.timing.prefill_tps,
        c.timing.decode_tps
    )
}
