//! `edgellm bench`: prompt processing and generation speed measured as `llama-bench -p 128
//! -n 64` measures them, so the figures compare: pp is one batch of 128 random tokens from an
//! empty cache; tg is 64 single-token steps from an empty cache. Medians over repetitions, after
//! one warm-up run.
//!
//! `--long`: per-token latency percentiles of a generation many windows long (the window
//! slides); `--session`: time to first token of a session's follow-up turn against a cold
//! request with the same conversation.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;

use edgellm::api::{GenerateRequest, Message, Prompt, SamplingParams, SessionRef};
use edgellm::backend::cpu::{CpuBackend, CpuOptions};
use edgellm::backend::{Backend, BackendError};
use edgellm::daemon::budget::{peak_rss_mib, rss_bytes};
use edgellm::engine::sampler::Rng;
use edgellm::engine::{Engine, EngineError, Window};

use super::{file_name, model_path, open_engine, ModelArgs, UsageError};

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    m: ModelArgs,
    /// Prompt tokens
    #[arg(short = 'p', long, default_value_t = 128)]
    n_prompt: usize,
    /// Generated tokens
    #[arg(short = 'n', long, default_value_t = 64)]
    n_gen: usize,
    /// Repetitions (the median is reported)
    #[arg(short = 'r', long, default_value_t = 5)]
    reps: usize,
    /// Also measure what one thread reads from memory per second (a plain read loop over 512
    /// MiB) and report generation's weight reads as a fraction of it
    #[arg(long)]
    bandwidth: bool,
    /// Per-token latency percentiles of one generation --windows windows long, through the
    /// sliding window (after it first fills)
    #[arg(long, conflicts_with = "session")]
    long: bool,
    /// Time to first token of a session's follow-up turn against a cold request with the
    /// same conversation
    #[arg(long)]
    session: bool,
    /// --long/--session: the context window
    #[arg(long, default_value_t = 2048)]
    ctx: usize,
    /// --long: generate this many windows' worth of tokens
    #[arg(long, default_value_t = 8)]
    windows: usize,
    /// --long: attention sinks, and positions evicted per slide (0: a quarter of the window)
    #[arg(long, default_value_t = 4)]
    sinks: usize,
    #[arg(long, default_value_t = 0)]
    discard: usize,
    /// --session: made-up exchanges in the conversation before the follow-up
    #[arg(long, default_value_t = 12)]
    turns: usize,
}

/// `edgellm bench`: one JSON object on stdout.
pub fn run(a: BenchArgs) -> Result<()> {
    if a.long || a.session {
        let path = model_path(a.m.model.as_deref())?;
        let name = file_name(&path);
        let opts = a.m.cpu(a.ctx, CpuOptions::default().max_batch);
        let backend = CpuBackend::open(&path, &opts)
            .with_context(|| format!("loading {}", path.display()))?;
        let mut engine = Engine::from_backend(Box::new(backend))
            .with_context(|| format!("loading {}", path.display()))?;
        let n_ctx = engine.backend.n_ctx();
        let out = if a.long {
            let (sinks, discard) = (a.sinks, a.discard);
            let window = Window::new(n_ctx, sinks, discard).ok_or_else(|| {
                UsageError(format!(
                    "--sinks {sinks} --discard {discard}: must leave room in the window of {n_ctx}"
                ))
            })?;
            serde_json::to_string(&run_long(&mut engine, &name, window, a.windows.max(1))?)?
        } else {
            serde_json::to_string(&run_session(&mut engine, &name, a.turns, a.reps)?)?
        };
        println!("{out}");
        return Ok(());
    }
    let (n_prompt, n_gen, reps) = (a.n_prompt, a.n_gen, a.reps);
    if n_prompt == 0 || n_gen == 0 || reps == 0 {
        bail!(UsageError(
            "--n-prompt, --n-gen and --reps must be at least 1".into()
        ));
    }
    // A window that holds prompt and generation, one batch per prompt.
    let mut spec = a.m.spec(n_prompt.max(n_gen), n_prompt)?;
    spec.ort.max_batch = n_prompt;
    let t0 = Instant::now();
    let mut loaded = open_engine(&spec, "measuring")?;
    let load_ms = t0.elapsed().as_secs_f64() * 1e3;
    // The first token after loading, on pages of the model not yet touched.
    let b = loaded.engine.backend.as_mut();
    b.forward(&[0], 0, false)?;
    let first_ms = t0.elapsed().as_secs_f64() * 1e3;
    b.reset();
    let name = file_name(&loaded.path);
    let bar = super::progress::counter("measuring", reps as u64 + 1, "runs");
    let r = measure(b, &name, n_prompt, n_gen, reps, &mut || bar.inc(1));
    bar.finish_and_clear();
    let mut r = r?;
    r.load_ms = Some(load_ms);
    r.load_to_first_token_ms = Some(first_ms);
    if a.bandwidth {
        let read = read_bandwidth();
        r.read_gbps = Some(read);
        r.decode_of_read = r.decode_gbps.map(|d| d / read);
    }
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub model: String,
    /// "cpu-int4" or "ort".
    pub backend: String,
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
    /// Resident set size after the last run: what the process holds once loading is over.
    pub rss_mib: f64,
    /// Opening the model: mapping, checks, tokenizer, buffers.
    pub load_ms: Option<f64>,
    /// From the start of loading to the logits of one token.
    pub load_to_first_token_ms: Option<f64>,
    /// Weights read per second while generating: the bytes one token reads × `tg_tps`.
    pub decode_gbps: Option<f64>,
    /// `--bandwidth`: what one thread reads per second from memory in a plain read loop
    /// (best of 3 passes over 512 MiB), and `decode_gbps` as a fraction of it.
    pub read_gbps: Option<f64>,
    pub decode_of_read: Option<f64>,
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

pub fn measure(
    backend: &mut dyn Backend,
    name: &str,
    n_prompt: usize,
    n_gen: usize,
    reps: usize,
    on_run: &mut dyn FnMut(),
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
        on_run();
    }
    let pp_s = median(&mut pp);
    let tg_s = median(&mut tg);
    let info = backend.info();
    Ok(BenchReport {
        model: name.to_string(),
        backend: info.backend,
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
        rss_mib: rss_bytes() as f64 / (1u64 << 20) as f64,
        load_ms: None,
        load_to_first_token_ms: None,
        decode_gbps: info
            .token_read_bytes
            .map(|b| b as f64 * n_gen as f64 / tg_s / 1e9),
        read_gbps: None,
        decode_of_read: None,
    })
}

/// GB/s that one thread reads from memory: a sum over 512 MiB (far beyond any cache), with
/// 256-bit loads where the CPU has them, best of 3 passes.
pub fn read_bandwidth() -> f64 {
    const BYTES: usize = 512 << 20;
    let words: Vec<u64> = (0..BYTES / 8).map(|i| i as u64).collect();
    let mut best = f64::MAX;
    let mut sink = 0u64;
    for _ in 0..3 {
        let t = Instant::now();
        sink = sink.wrapping_add(read_sum(&words));
        best = best.min(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(sink);
    BYTES as f64 / best / 1e9
}

fn read_sum(words: &[u64]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 detected just above.
        return unsafe { read_sum_avx2(words) };
    }
    // Eight independent lanes: the compiler vectorizes this (NEON on aarch64).
    let mut acc = [0u64; 8];
    for c in words.chunks_exact(8) {
        for (a, w) in acc.iter_mut().zip(c) {
            *a = a.wrapping_add(*w);
        }
    }
    acc.iter().fold(0, |s, a| s.wrapping_add(*a))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn read_sum_avx2(words: &[u64]) -> u64 {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_setzero_si256(); 4];
    let p = words.as_ptr() as *const __m256i;
    for i in 0..words.len() / 16 {
        for (j, a) in acc.iter_mut().enumerate() {
            // SAFETY: 16 words (4 vectors) per i, i < len / 16: inside `words`.
            *a = _mm256_add_epi64(*a, unsafe { _mm256_loadu_si256(p.add(4 * i + j)) });
        }
    }
    let mut lanes = [0u64; 4];
    let s = _mm256_add_epi64(
        _mm256_add_epi64(acc[0], acc[1]),
        _mm256_add_epi64(acc[2], acc[3]),
    );
    // SAFETY: 4 u64 lanes into a 4-word array.
    unsafe { _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, s) };
    lanes.iter().fold(0, |s, a| s.wrapping_add(*a))
}

/// `edgellm bench --long`: one request generating `windows` × n_ctx tokens through the sliding
/// window (the daemon's engine path: sampling, window slides), with each token's latency taken
/// after the window first filled.
#[derive(Debug, Clone, Serialize)]
pub struct LongReport {
    pub model: String,
    pub kernels: String,
    pub threads: usize,
    pub kv_type: String,
    pub n_ctx: usize,
    pub n_sink: usize,
    pub n_discard: usize,
    pub tokens: usize,
    /// Tokens timed: those generated after the window first filled.
    pub timed: usize,
    pub evicted: usize,
    pub slides: usize,
    pub tps: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    /// p99 / median: at most 1.5 means no per-slide spikes in the tail.
    pub p99_over_p50: f64,
    /// Median latency of the tokens whose step slid the window (the slide's cost is in it),
    /// and its ratio to the median token: what a slide adds, apart from any other noise.
    pub slide_p50_ms: f64,
    pub slide_over_p50: f64,
    /// p99 / median of the tokens without a slide: the tail that is not the slides'.
    pub p99_over_p50_without_slides: f64,
    pub peak_rss_mib: f64,
}

/// Records when each token's forward finished: the latencies of steps that slid the window
/// apart from the others.
struct Clock {
    last: Option<Instant>,
    full: bool,
    n_ctx: usize,
    evicted: usize,
    rest: Vec<f64>,
    slide: Vec<f64>,
}

impl edgellm::engine::Sink for Clock {
    fn text(&mut self, _: &str) {}
    fn kv(&mut self, used: usize, evicted: usize) {
        let now = Instant::now();
        if self.full {
            if let Some(l) = self.last {
                let ms = (now - l).as_secs_f64() * 1e3;
                if evicted > self.evicted {
                    self.slide.push(ms);
                } else {
                    self.rest.push(ms);
                }
            }
        }
        self.full |= used >= self.n_ctx;
        self.evicted = evicted;
        self.last = Some(now);
    }
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub fn run_long(
    engine: &mut Engine,
    name: &str,
    window: Window,
    windows: usize,
) -> Result<LongReport, EngineError> {
    let info = engine.backend.info();
    let n_ctx = info.n_ctx;
    engine.set_window(Some(window));
    let mut req = GenerateRequest::new(Prompt::Raw("Once upon a time".into()));
    req.max_tokens = windows * n_ctx;
    req.ignore_eos = true;
    req.sampling = SamplingParams {
        temperature: 0.8,
        seed: 7,
        ..Default::default()
    };
    let mut clock = Clock {
        last: None,
        full: false,
        n_ctx,
        evicted: 0,
        rest: Vec::with_capacity(req.max_tokens),
        slide: Vec::new(),
    };
    let t0 = Instant::now();
    let c = engine.generate(&req, &mut clock)?;
    let secs = t0.elapsed().as_secs_f64();
    let (mut rest, mut slide) = (clock.rest, clock.slide);
    let mut lat = [rest.as_slice(), slide.as_slice()].concat();
    for v in [&mut lat, &mut rest, &mut slide] {
        v.sort_by(|a, b| a.total_cmp(b));
    }
    let p50 = percentile(&lat, 0.5);
    let p99 = percentile(&lat, 0.99);
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    let slide_p50 = percentile(&slide, 0.5);
    Ok(LongReport {
        model: name.into(),
        kernels: info.compute,
        threads: info.threads,
        kv_type: info.kv_type,
        n_ctx,
        n_sink: window.n_sink,
        n_discard: window.n_discard,
        tokens: c.usage.completion_tokens,
        timed: lat.len(),
        evicted: c.usage.evicted_tokens,
        slides: c.usage.evicted_tokens / window.n_discard.max(1),
        tps: c.usage.completion_tokens as f64 / secs,
        p50_ms: p50,
        p90_ms: percentile(&lat, 0.9),
        p99_ms: p99,
        p999_ms: percentile(&lat, 0.999),
        max_ms: lat.last().copied().unwrap_or(0.0),
        p99_over_p50: ratio(p99, p50),
        slide_p50_ms: slide_p50,
        slide_over_p50: ratio(slide_p50, p50),
        p99_over_p50_without_slides: ratio(percentile(&rest, 0.99), percentile(&rest, 0.5)),
        peak_rss_mib: peak_rss_mib(),
    })
}

/// `edgellm bench --session`: time to first token of a follow-up turn in a session, against a
/// cold request carrying the same conversation whole.
#[derive(Debug, Clone, Serialize)]
pub struct SessionReport {
    pub model: String,
    pub kernels: String,
    pub threads: usize,
    pub n_ctx: usize,
    /// Prompt tokens of the cold request (the whole conversation).
    pub history_tokens: usize,
    /// Tokens the follow-up reused from the session's cache, and prefilled.
    pub cached_tokens: usize,
    pub follow_up_prompt_tokens: usize,
    pub reps: usize,
    /// Medians over `reps`.
    pub cold_ttft_ms: f64,
    /// The session resident in the cache (the previous request was its own).
    pub follow_up_ttft_ms: f64,
    /// The session saved and loaded back (another request ran between the turns).
    pub follow_up_parked_ttft_ms: f64,
    pub follow_up_over_cold: f64,
    pub parked_over_cold: f64,
}

/// A conversation of `turns` made-up exchanges (deterministic), as a client would keep it.
pub fn made_up_history(turns: usize) -> Vec<Message> {
    const W: [&str; 16] = [
        "river", "garden", "lamp", "winter", "engine", "window", "market", "letter", "storm",
        "harbour", "kitchen", "signal", "forest", "bridge", "candle", "station",
    ];
    let mut rng = Rng::new(11);
    let mut word = || W[(rng.next_u64() % W.len() as u64) as usize];
    let mut h = vec![Message::new(
        "system",
        "You are a helpful assistant on a small board.",
    )];
    for i in 0..turns {
        h.push(Message::new(
            "user",
            &format!(
                "Question {i}: what links the {} and the {}?",
                word(),
                word()
            ),
        ));
        let mut a = String::new();
        for _ in 0..6 {
            a.push_str(&format!(
                "The {} is near the {} by the {}. ",
                word(),
                word(),
                word()
            ));
        }
        h.push(Message::new("assistant", a.trim_end()));
    }
    h
}

pub fn run_session(
    engine: &mut Engine,
    name: &str,
    turns: usize,
    reps: usize,
) -> Result<SessionReport, EngineError> {
    let info = engine.backend.info();
    engine.set_sessions(4, 1 << 30);
    let history = made_up_history(turns);
    let req = |messages: Vec<Message>, session: Option<(&str, Option<Vec<Message>>)>| {
        let mut r = GenerateRequest::new(Prompt::Messages(messages));
        r.max_tokens = 8;
        r.ignore_eos = true;
        r.sampling = SamplingParams::greedy();
        r.session = session.map(|(id, history)| SessionRef {
            owner: String::new(),
            id: id.into(),
            history,
        });
        r
    };
    let first = Message::new("user", "Summarise that in one line.");
    let follow = Message::new("user", "And what comes next?");
    let (mut cold, mut warm, mut parked) = (Vec::new(), Vec::new(), Vec::new());
    let (mut history_tokens, mut cached, mut prefilled) = (0, 0, 0);
    let mut sink = String::new();
    for rep in 0..=reps {
        // The session: built from the client's history, one turn, then the follow-up.
        let id = format!("bench-{rep}");
        let t1 = engine.generate(
            &req(vec![first.clone()], Some((&id, Some(history.clone())))),
            &mut sink,
        )?;
        let f = engine.generate(&req(vec![follow.clone()], Some((&id, None))), &mut sink)?;
        // Another request between the turns parks the session in the store.
        engine.generate(&req(vec![Message::new("user", "Hi.")], None), &mut sink)?;
        let p = engine.generate(&req(vec![follow.clone()], Some((&id, None))), &mut sink)?;
        // Cold: the same conversation as the follow-up saw it, sent whole.
        let mut whole = history.clone();
        whole.push(first.clone());
        whole.push(Message::new("assistant", &t1.text));
        whole.push(follow.clone());
        let c = engine.generate(&req(whole, None), &mut sink)?;
        if rep > 0 {
            cold.push(c.timing.ttft_ms);
            warm.push(f.timing.ttft_ms);
            parked.push(p.timing.ttft_ms);
        }
        history_tokens = c.usage.prompt_tokens;
        cached = f.usage.cached_tokens;
        prefilled = f.usage.prompt_tokens;
    }
    let (c, w, p) = (median(&mut cold), median(&mut warm), median(&mut parked));
    Ok(SessionReport {
        model: name.into(),
        kernels: info.compute,
        threads: info.threads,
        n_ctx: info.n_ctx,
        history_tokens,
        cached_tokens: cached,
        follow_up_prompt_tokens: prefilled,
        reps,
        cold_ttft_ms: c,
        follow_up_ttft_ms: w,
        follow_up_parked_ttft_ms: p,
        follow_up_over_cold: w / c,
        parked_over_cold: p / c,
    })
}
