//! Perplexity as llama.cpp's `llama-perplexity` computes it: the text is cut into
//! non-overlapping chunks of `n_ctx` tokens, each evaluated from an empty cache, and each token of
//! a chunk's second half is scored on the logits of the token before it. With a second (exact)
//! backend it also measures the mean KL divergence of the first from the second and how often
//! both pick the same top token, as `llama-perplexity --kl-divergence` does.
//!
//! [`perplexity_stream`] measures the sliding window instead: the text as one stream through a
//! cache of W positions with attention sinks, against the window recomputed from scratch.

use serde::Serialize;

use crate::backend::{Backend, BackendError};

#[derive(Debug, Clone, Serialize)]
pub struct PplResult {
    pub ppl: f64,
    /// Standard error of the perplexity estimate.
    pub ppl_stderr: f64,
    /// Scored tokens.
    pub tokens: usize,
    pub chunks: usize,
    /// Perplexity of the exact path, when compared.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ppl_exact: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mean_kld: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub same_top1_pct: Option<f64>,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PplError {
    #[error("text has {tokens} tokens; at least 2 × n_ctx = {need} are needed for one chunk")]
    TooShort { tokens: usize, need: usize },
    #[error("n_ctx = {n_ctx} must be at least 8 and fit the backend's window of {window}")]
    BadCtx { n_ctx: usize, window: usize },
    #[error("sinks {sinks} + discard {discard} must be less than the window {window}, and discard at least 1")]
    BadWindow {
        sinks: usize,
        discard: usize,
        window: usize,
    },
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// log-softmax of the logit of `target`, and the log-sum-exp, in f64.
fn log_softmax_at(logits: &[f32], target: usize) -> (f64, f64) {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    let lse = max + sum.ln();
    (logits[target] as f64 - lse, lse)
}

/// Runs the measure. `bos`: replaces each chunk's first token when the model adds BOS (as
/// llama-perplexity does). `progress(chunk, ppl_so_far)` is called after each chunk.
pub fn perplexity(
    model: &mut dyn Backend,
    mut exact: Option<&mut dyn Backend>,
    tokens: &[u32],
    n_ctx: usize,
    bos: Option<u32>,
    progress: &mut dyn FnMut(usize, usize, f64),
) -> Result<PplResult, PplError> {
    let window = model
        .n_ctx()
        .min(exact.as_ref().map_or(usize::MAX, |e| e.n_ctx()));
    if n_ctx < 8 || n_ctx > window {
        return Err(PplError::BadCtx { n_ctx, window });
    }
    let n_chunks = tokens.len() / n_ctx;
    if n_chunks == 0 {
        return Err(PplError::TooShort {
            tokens: tokens.len(),
            need: 2 * n_ctx,
        });
    }
    let vocab = model.n_vocab();
    let first = n_ctx / 2;
    let (mut nll, mut nll2, mut count) = (0f64, 0f64, 0usize);
    let (mut kld_sum, mut same_top1, mut nll_exact) = (0f64, 0usize, 0f64);
    let mut chunk_tokens = vec![0u32; n_ctx];
    let mut exact_rows: Vec<f32> = Vec::new();
    for c in 0..n_chunks {
        chunk_tokens.copy_from_slice(&tokens[c * n_ctx..(c + 1) * n_ctx]);
        if let Some(b) = bos {
            chunk_tokens[0] = b;
        }
        model.reset();
        if let Some(e) = exact.as_deref_mut() {
            e.reset();
        }
        let batch = model
            .max_logit_rows()
            .min(exact.as_ref().map_or(usize::MAX, |e| e.max_logit_rows()));
        let mut pos = 0;
        while pos < n_ctx {
            let end = (pos + batch).min(n_ctx);
            let part = &chunk_tokens[pos..end];
            if let Some(e) = exact.as_deref_mut() {
                let l = e.forward(part, pos, true)?;
                exact_rows.clear();
                exact_rows.extend_from_slice(l);
            }
            let logits = model.forward(part, pos, true)?;
            for (i, row) in logits.chunks_exact(vocab).enumerate() {
                let j = pos + i;
                if j < first || j + 1 >= n_ctx {
                    continue;
                }
                let target = tokens[c * n_ctx + j + 1] as usize;
                let (lp, lse) = log_softmax_at(row, target);
                nll -= lp;
                nll2 += lp * lp;
                count += 1;
                if exact.is_some() {
                    let erow = &exact_rows[i * vocab..(i + 1) * vocab];
                    let emax = erow.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
                    let esum: f64 = erow.iter().map(|&l| (l as f64 - emax).exp()).sum();
                    let e_lse = emax + esum.ln();
                    let mut kl = 0f64;
                    for (&le, &lm) in erow.iter().zip(row) {
                        let lpe = le as f64 - e_lse;
                        kl += lpe.exp() * (lpe - (lm as f64 - lse));
                    }
                    kld_sum += kl;
                    nll_exact -= erow[target] as f64 - e_lse;
                    if crate::engine::sampler::argmax(erow) == crate::engine::sampler::argmax(row) {
                        same_top1 += 1;
                    }
                }
            }
            pos = end;
        }
        progress(c + 1, n_chunks, (nll / count as f64).exp());
    }
    let mean = nll / count as f64;
    let ppl = mean.exp();
    let var = nll2 / count as f64 - mean * mean;
    let ppl_stderr = if var > 0.0 && count > 1 {
        (var / (count - 1) as f64).sqrt() * ppl
    } else {
        0.0
    };
    Ok(PplResult {
        ppl,
        ppl_stderr,
        tokens: count,
        chunks: n_chunks,
        ppl_exact: exact.as_ref().map(|_| (nll_exact / count as f64).exp()),
        mean_kld: exact.as_ref().map(|_| kld_sum / count as f64),
        same_top1_pct: exact
            .as_ref()
            .map(|_| 100.0 * same_top1 as f64 / count as f64),
    })
}

/// How [`perplexity_stream`] runs.
#[derive(Debug, Clone, Copy)]
pub struct StreamOpts {
    /// The window W: positions in the cache (the backend's `n_ctx` must be W).
    pub window: usize,
    /// Attention sinks kept at the start of the cache.
    pub sinks: usize,
    /// Positions evicted per slide (1: a true sliding window, each token sees W − 1 before it).
    pub discard: usize,
    /// Score every `sample`-th target position also with the last W tokens recomputed from
    /// scratch (0: no recompute).
    pub recompute_every: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct StreamResult {
    pub window: usize,
    pub sinks: usize,
    pub discard: usize,
    /// Perplexity of every target after the first W tokens, through the sliding cache.
    pub ppl: f64,
    pub ppl_stderr: f64,
    pub tokens: usize,
    /// Positions evicted over the run.
    pub evicted: usize,
    /// On the sampled positions only (every `recompute_every`-th target): the sliding cache's
    /// perplexity, and the recomputed window's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ppl_sampled: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ppl_recompute: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sampled_tokens: Option<usize>,
}

/// Mean and standard error of a perplexity from per-token negative log-likelihoods.
fn ppl_of(nll: &[f64]) -> (f64, f64) {
    let n = nll.len().max(1) as f64;
    let mean = nll.iter().sum::<f64>() / n;
    let var = nll.iter().map(|x| x * x).sum::<f64>() / n - mean * mean;
    let ppl = mean.exp();
    let se = if var > 0.0 && nll.len() > 1 {
        (var / (n - 1.0)).sqrt() * ppl
    } else {
        0.0
    };
    (ppl, se)
}

/// Scores `tokens` as a stream through a sliding KV cache of `opts.window` positions, the way
/// the daemon's window slides: when the cache is full, the first `sinks` positions stay, the
/// `discard` oldest after them are evicted and the rest re-based. Every target after the first
/// W tokens is scored on the logits of the token before it. The tokens between slides run as
/// one batch, which is exactly token by token (attention is causal), only faster.
///
/// With `recompute_every` > 0, every such target position t (t ≡ 0 mod it) is scored again
/// from a fresh cache holding only tokens t − W..t: the window recomputed, the baseline the
/// sliding cache approximates. `progress(done, total, ppl_so_far)` is called now and then.
pub fn perplexity_stream(
    model: &mut dyn Backend,
    tokens: &[u32],
    opts: StreamOpts,
    progress: &mut dyn FnMut(usize, usize, f64),
) -> Result<StreamResult, PplError> {
    let w = opts.window;
    if w < 8 || w != model.n_ctx() {
        return Err(PplError::BadCtx {
            n_ctx: w,
            window: model.n_ctx(),
        });
    }
    if opts.discard == 0 || opts.sinks + opts.discard >= w {
        return Err(PplError::BadWindow {
            sinks: opts.sinks,
            discard: opts.discard,
            window: w,
        });
    }
    if tokens.len() <= w + 1 {
        return Err(PplError::TooShort {
            tokens: tokens.len(),
            need: w + 2,
        });
    }
    let vocab = model.n_vocab();
    let batch = model.max_logit_rows();
    let sampled = |t: usize| opts.recompute_every > 0 && t.is_multiple_of(opts.recompute_every);
    let mut nll = Vec::with_capacity(tokens.len() - w);
    let mut nll_sampled = Vec::new();
    let (mut pos, mut evicted, mut i) = (0usize, 0usize, 0usize);
    model.reset();
    // Token i goes to position pos; its logits score token i + 1.
    while i + 1 < tokens.len() {
        if pos == w {
            model.shift(opts.sinks, opts.discard, pos)?;
            pos -= opts.discard;
            evicted += opts.discard;
        }
        let n = batch.min(w - pos).min(tokens.len() - 1 - i);
        let logits = model.forward(&tokens[i..i + n], pos, true)?;
        for (k, row) in logits.chunks_exact(vocab).enumerate() {
            let target = i + k + 1;
            if target < w {
                continue;
            }
            let (lp, _) = log_softmax_at(row, tokens[target] as usize);
            nll.push(-lp);
            if sampled(target) {
                nll_sampled.push(-lp);
            }
        }
        pos += n;
        i += n;
        if i % 512 < n {
            progress(i, tokens.len(), ppl_of(&nll).0);
        }
    }
    let (ppl, ppl_stderr) = ppl_of(&nll);
    let mut r = StreamResult {
        window: w,
        sinks: opts.sinks,
        discard: opts.discard,
        ppl,
        ppl_stderr,
        tokens: nll.len(),
        evicted,
        ppl_sampled: None,
        ppl_recompute: None,
        sampled_tokens: None,
    };
    if opts.recompute_every > 0 {
        let targets: Vec<usize> = (w..tokens.len()).filter(|&t| sampled(t)).collect();
        let mut nll_re = Vec::with_capacity(targets.len());
        for (k, &t) in targets.iter().enumerate() {
            model.reset();
            let mut p = 0;
            let mut last = Vec::new();
            for part in tokens[t - w..t].chunks(model.max_batch()) {
                let l = model.forward(part, p, false)?;
                p += part.len();
                if p == w {
                    last = l.to_vec();
                }
            }
            nll_re.push(-log_softmax_at(&last, tokens[t] as usize).0);
            if k % 64 == 63 {
                progress(k + 1, targets.len(), ppl_of(&nll_re).0);
            }
        }
        r.ppl_sampled = Some(ppl_of(&nll_sampled).0);
        r.ppl_recompute = Some(ppl_of(&nll_re).0);
        r.sampled_tokens = Some(targets.len());
    }
    Ok(r)
}
