//! Perplexity as llama.cpp's `llama-perplexity` computes it: the text is cut into
//! non-overlapping chunks of `n_ctx` tokens, each evaluated from an empty cache, and each token of
//! a chunk's second half is scored on the logits of the token before it. With a second (exact)
//! backend it also measures the mean KL divergence of the first from the second and how often
//! both pick the same top token, as `llama-perplexity --kl-divergence` does.

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
            .max_batch()
            .min(exact.as_ref().map_or(usize::MAX, |e| e.max_batch()));
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
