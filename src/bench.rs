//! `edgellm bench`: prompt processing and generation speed measured as `llama-bench -p 128
//! -n 64` measures them, so the figures compare: pp is one batch of 128 random tokens from an
//! empty cache; tg is 64 single-token steps from an empty cache. Medians over repetitions, after
//! one warm-up run.

use std::time::Instant;

use serde::Serialize;

use crate::backend::cpu::CpuBackend;
use crate::backend::{Backend, BackendError};
use crate::engine::sampler::Rng;

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub model: String,
    pub tensor_types: Vec<(String, usize)>,
    pub threads: usize,
    pub kernels: String,
    pub n_prompt: usize,
    pub n_gen: usize,
    pub reps: usize,
    /// Prompt tokens per second.
    pub pp_tps: f64,
    /// Generated tokens per second.
    pub tg_tps: f64,
    /// Time to the first token's logits for an `n_prompt`-token prompt.
    pub ttft_ms: f64,
    pub peak_rss_mib: f64,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// A `kB` field of /proc/self/status, in bytes; 0 where /proc is absent.
fn status_kb(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Peak resident set size of this process (VmHWM), in MiB.
pub fn peak_rss_mib() -> f64 {
    status_kb("VmHWM:") as f64 / (1u64 << 20) as f64
}

/// Resident set size of this process now (VmRSS), in bytes.
pub fn rss_bytes() -> u64 {
    status_kb("VmRSS:")
}

pub fn run(
    backend: &mut CpuBackend,
    name: &str,
    n_prompt: usize,
    n_gen: usize,
    reps: usize,
) -> Result<BenchReport, BackendError> {
    let vocab = backend.n_vocab() as u64;
    let mut rng = Rng::new(1234);
    let prompt: Vec<u32> = (0..n_prompt)
        .map(|_| (rng.next_u64() % vocab) as u32)
        .collect();
    let batch = backend.max_batch();
    let mut pp = Vec::new();
    let mut tg = Vec::new();
    for rep in 0..=reps {
        backend.reset();
        let t0 = Instant::now();
        let mut pos = 0;
        for part in prompt.chunks(batch) {
            backend.forward(part, pos, false)?;
            pos += part.len();
        }
        let pp_s = t0.elapsed().as_secs_f64();
        backend.reset();
        let t1 = Instant::now();
        let mut tok = (rng.next_u64() % vocab) as u32;
        for i in 0..n_gen {
            backend.forward(&[tok], i, false)?;
            tok = (rng.next_u64() % vocab) as u32;
        }
        let tg_s = t1.elapsed().as_secs_f64();
        if rep > 0 {
            pp.push(pp_s);
            tg.push(tg_s);
        }
    }
    let pp_s = median(&mut pp);
    let tg_s = median(&mut tg);
    let info = backend.info();
    Ok(BenchReport {
        model: name.to_string(),
        tensor_types: info.tensor_types,
        threads: info.threads,
        kernels: info.compute,
        n_prompt,
        n_gen,
        reps,
        pp_tps: n_prompt as f64 / pp_s,
        tg_tps: n_gen as f64 / tg_s,
        ttft_ms: pp_s * 1e3,
        peak_rss_mib: peak_rss_mib(),
    })
}
