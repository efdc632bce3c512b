//! `edgellm perplexity`: the perplexity of a text file as llama-perplexity computes it, on
//! either backend; or (`--stream`) through a sliding KV cache.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;

use edgellm::backend::cpu::{CpuBackend, CpuOptions};
use edgellm::backend::Backend;
use edgellm::engine::perplexity::{perplexity, perplexity_stream, StreamOpts};
use edgellm::kernels::KernelKind;

use super::{open_engine, ModelArgs, UsageError};

#[derive(Args)]
pub struct PerplexityArgs {
    #[command(flatten)]
    m: ModelArgs,
    file: PathBuf,
    /// Chunk size in tokens
    #[arg(long, default_value_t = 512)]
    ctx: usize,
    /// Also run the exact f32 path and report mean KL divergence and top-1 agreement
    #[arg(long)]
    compare_exact: bool,
    /// Also run the int4 engine on the GGUF with its own (fast) kernels and report the
    /// same: how the ORT backend and the int4 engine agree as each runs by default
    #[arg(long, conflicts_with = "compare_exact")]
    compare_int4: bool,
    /// Score only the first N chunks
    #[arg(long)]
    chunks: Option<usize>,
    /// Score the text as one stream through a sliding KV cache of --window positions
    #[arg(long)]
    stream: bool,
    /// --stream: the window W (positions in the cache)
    #[arg(long, default_value_t = 256, requires = "stream")]
    window: usize,
    /// --stream: attention sinks kept at the start of the cache
    #[arg(long, default_value_t = 4, requires = "stream")]
    sinks: usize,
    /// --stream: positions evicted per slide (1: every token sees W - 1 before it)
    #[arg(long, default_value_t = 1, requires = "stream")]
    discard: usize,
    /// --stream: also score every 4th target with its last W tokens recomputed from scratch
    #[arg(long, requires = "stream")]
    recompute: bool,
    /// --recompute: score every Nth target instead of every 4th
    #[arg(long, default_value_t = 4, requires = "recompute")]
    recompute_every: usize,
    /// --stream: use only the first N tokens of the text
    #[arg(long, requires = "stream")]
    tokens: Option<usize>,
}

pub fn run(a: PerplexityArgs) -> Result<()> {
    let text = std::fs::read_to_string(&a.file)
        .with_context(|| format!("reading {}", a.file.display()))?;
    if a.stream {
        return stream(&a, &text);
    }
    let ctx = a.ctx;
    let mut spec = a.m.spec(ctx, ctx.min(128))?;
    // Perplexity scores every token of a batch: logits for all of them.
    spec.cpu.logit_rows = 0;
    let mut engine = open_engine(&spec, "measuring")?.engine;
    let tok = &engine.tokenizer;
    let mut tokens = tok.encode(&text)?;
    if let Some(n) = a.chunks {
        tokens.truncate(n * ctx);
    }
    let bos = if tok.add_bos { tok.bos } else { None };
    // The path compared against: the int4 engine on the GGUF, with its reference kernels
    // (--compare-exact) or the ones it chose (--compare-int4).
    let compare = a.compare_exact || a.compare_int4;
    let mut exact = match (compare, &spec.gguf) {
        (true, Some(path)) => Some(CpuBackend::open(
            path,
            &CpuOptions {
                kernels: if a.compare_exact {
                    Some(KernelKind::Reference)
                } else {
                    spec.cpu.kernels
                },
                ..spec.cpu.clone()
            },
        )?),
        (true, None) => bail!(UsageError(format!(
            "{} needs the GGUF model (the default one is missing)",
            if a.compare_exact {
                "--compare-exact"
            } else {
                "--compare-int4"
            }
        ))),
        _ => None,
    };
    let info = engine.backend.info();
    eprintln!(
        "perplexity: {} tokens, {} chunks of {ctx}, {} ({}){}",
        tokens.len(),
        tokens.len() / ctx.max(1),
        info.backend,
        info.compute,
        if a.compare_exact {
            ", against reference"
        } else if a.compare_int4 {
            ", against the int4 engine"
        } else {
            ""
        }
    );
    let bar = super::progress::counter("PPL", (tokens.len() / ctx.max(1)) as u64, "chunks");
    let r = perplexity(
        engine.backend.as_mut(),
        exact.as_mut().map(|e| e as &mut dyn Backend),
        &tokens,
        ctx,
        bos,
        &mut |c, n, p| report(&bar, c, n, p),
    );
    bar.finish_and_clear();
    let r = r?;
    eprintln!("Final estimate: PPL = {:.4} +/- {:.5}", r.ppl, r.ppl_stderr);
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}

/// `--stream`: the text as one stream through the sliding window.
fn stream(a: &PerplexityArgs, text: &str) -> Result<()> {
    let (window, sinks, discard) = (a.window, a.sinks, a.discard);
    let mut spec = a.m.spec(window, window.min(64))?;
    spec.cpu.logit_rows = 0;
    let mut engine = open_engine(&spec, "measuring")?.engine;
    let mut tokens = engine.tokenizer.encode(text)?;
    if let Some(n) = a.tokens {
        tokens.truncate(n);
    }
    eprintln!(
        "perplexity --stream: {} tokens, window {window}, {sinks} sinks, evicting {discard} at a time{}",
        tokens.len(),
        if a.recompute {
            format!(", recompute every {}th target", a.recompute_every)
        } else {
            String::new()
        }
    );
    let bar = super::progress::counter("PPL", tokens.len() as u64, "tokens");
    let r = perplexity_stream(
        engine.backend.as_mut(),
        &tokens,
        StreamOpts {
            window,
            sinks,
            discard,
            recompute_every: if a.recompute {
                a.recompute_every.max(1)
            } else {
                0
            },
        },
        &mut |d, n, p| report(&bar, d, n, p),
    );
    bar.finish_and_clear();
    let r = r?;
    eprintln!("Final estimate: PPL = {:.4} +/- {:.5}", r.ppl, r.ppl_stderr);
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}

/// Progress: on a terminal a bar; else llama-perplexity's `[done/total] ppl` lines.
fn report(bar: &indicatif::ProgressBar, done: usize, total: usize, ppl: f64) {
    if bar.is_hidden() {
        eprintln!("[{done}/{total}] {ppl:.4}");
    } else {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
        bar.set_message(format!("PPL {ppl:.4}"));
    }
}
