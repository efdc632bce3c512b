//! The int4 CPU engine: a llama/qwen2 decoder computed with this crate's kernels on weights
//! memory-mapped from a GGUF file.
//!
//! Every buffer — activations for a batch of `max_batch` tokens, the KV cache for `n_ctx`
//! positions, logits, per-thread scratch — is allocated once in [`CpuBackend::load`];
//! `forward` allocates nothing.

pub mod kv;
pub mod model;

use std::path::{Path, PathBuf};

use crate::backend::{Backend, BackendError, BackendInfo, KvType, MemoryPlan, Vocabulary};
use crate::gguf::Gguf;
use crate::kernels::matmul::{matmul, Acts, Matrix};
use crate::kernels::pool::{Pool, Shards};
use crate::kernels::quant::{dequant_q8_0, f16_to_f32, BlockQ8, QK};
use crate::kernels::{KernelKind, Kernels};
use kv::{KvCache, LayerKv};
use model::{Config, ModelError, Packs, RopeStyle, Weights};

/// How to load a model on the CPU.
#[derive(Debug, Clone)]
pub struct CpuOptions {
    /// Context window (positions in the KV cache). 0: the model's training context, capped at 4096.
    pub n_ctx: usize,
    /// Threads computing (the caller included). 0: the number of available cores.
    pub threads: usize,
    /// `None`: the fastest kernels for this CPU.
    pub kernels: Option<KernelKind>,
    /// Most tokens per forward call.
    pub max_batch: usize,
    /// Element type of the KV cache.
    pub kv_type: KvType,
    /// Most tokens whose logits one `forward` returns with `all_logits` (perplexity scores
    /// every token of a batch; generation needs the last one's only). 0: `max_batch`. Each row
    /// is `vocab` floats: 64 rows of Qwen2.5's 151,936 are 37 MiB.
    pub logit_rows: usize,
    /// Repack Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 matrices into eight-row groups at load where
    /// the kernels read that layout (x86); `false` keeps them in the mapping as they are (to
    /// compare the two).
    pub repack: bool,
}

impl Default for CpuOptions {
    fn default() -> Self {
        CpuOptions {
            n_ctx: 0,
            threads: 0,
            kernels: None,
            max_batch: 64,
            kv_type: KvType::F16,
            logit_rows: 0,
            repack: true,
        }
    }
}

/// Activation buffers for a batch of up to `max_batch` tokens.
struct State {
    /// Residual stream. (max_batch, dim)
    x: Vec<f32>,
    /// Normalised input of a block, then attention output. (max_batch, max(dim, q_dim))
    xb: Vec<f32>,
    /// Output of a projection before it is added to the stream. (max_batch, dim)
    xb2: Vec<f32>,
    /// (max_batch, q_dim)
    q: Vec<f32>,
    /// (max_batch, kv_dim)
    k: Vec<f32>,
    /// (max_batch, kv_dim)
    v: Vec<f32>,
    /// FFN gate, then gate·up. (max_batch, ffn)
    hb: Vec<f32>,
    /// FFN up. (max_batch, ffn)
    hb2: Vec<f32>,
    /// 8-bit activations of the current matmul input. (max_batch, max_cols / 32)
    xq: Vec<BlockQ8>,
    /// Attention scores and the scaled query head, one row per thread. (threads, n_ctx + head_dim)
    att: Vec<f32>,
    /// Partial attention results of each piece of work: per query head of its group, the
    /// running max, the sum of exponentials, and the unnormalized output.
    /// (max_pieces(batch, threads), group, head_dim + 2)
    parts: Vec<f32>,
    /// Dequantized weight rows, one per thread. (threads, max_cols)
    scratch: Vec<f32>,
    /// RoPE cos/sin for each token of the batch. (max_batch, head_dim / 2, 2)
    rope: Vec<f32>,
    /// (logit_rows, vocab)
    logits: Vec<f32>,
}

/// Element counts of the [`State`] buffers: computed once, for the allocation and for the
/// memory budget that is checked before it.
struct Shapes {
    f32s: [usize; 13],
    xq: usize,
}

impl Shapes {
    fn new(cfg: &Config, r: &Resolved) -> Shapes {
        let (n_ctx, threads) = (r.n_ctx, r.threads);
        let (b, dim, qd, kvd) = (r.max_batch, cfg.dim, cfg.q_dim(), cfg.kv_dim());
        let max_cols = dim.max(qd).max(cfg.ffn);
        Shapes {
            // In State's field order, x to logits.
            f32s: [
                b * dim,
                b * dim.max(qd),
                b * dim,
                b * qd,
                b * kvd,
                b * kvd,
                b * cfg.ffn,
                b * cfg.ffn,
                threads * (n_ctx + cfg.head_dim),
                max_pieces(cfg, b, threads) * cfg.n_head / cfg.n_kv_head * (cfg.head_dim + 2),
                threads * max_cols,
                b * cfg.head_dim,
                r.logit_rows * cfg.vocab,
            ],
            xq: b * max_cols / QK,
        }
    }

    fn bytes(&self) -> u64 {
        (self.f32s.iter().sum::<usize>() * 4 + self.xq * std::mem::size_of::<BlockQ8>()) as u64
    }

    fn alloc(&self) -> State {
        let v = |i: usize| vec![0f32; self.f32s[i]];
        State {
            x: v(0),
            xb: v(1),
            xb2: v(2),
            q: v(3),
            k: v(4),
            v: v(5),
            hb: v(6),
            hb2: v(7),
            xq: vec![BlockQ8::default(); self.xq],
            att: v(8),
            parts: v(9),
            scratch: v(10),
            rope: v(11),
            logits: v(12),
        }
    }
}

pub struct CpuBackend {
    gguf: Gguf,
    /// The folder of the file, where a `tokenizer.json` may stand beside it.
    dir: Option<PathBuf>,
    pub cfg: Config,
    w: Weights,
    kernels: Kernels,
    pool: Pool,
    n_ctx: usize,
    max_batch: usize,
    logit_rows: usize,
    s: State,
    kv: KvCache,
    /// Matrices repacked for the kernels (see `Weights::repack`).
    packs: Packs,
    /// The repacking is still to do: at [`Backend::finish_load`], beside the tokenizer, or
    /// else before the first step.
    repack_pending: bool,
    /// Called with the activations around every matrix product ([`Site`]): calibration.
    observer: Option<Observer>,
}

/// Where an activation is observed in [`CpuBackend::set_observer`]: the input of each group of
/// matrix products and the output of each product (before any bias).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Site {
    /// The attention norm's output: the input of q, k and v.
    AttnIn,
    Q,
    K,
    V,
    /// The attention's output: the input of o.
    AttnOut,
    O,
    /// The feed-forward norm's output: the input of gate and up.
    FfnIn,
    Gate,
    Up,
    /// silu(gate) × up: the input of down.
    FfnMid,
    Down,
    /// The final norm's output (layer `n_layer`): the input of the LM head.
    HeadIn,
    Logits,
}

/// `(layer, site, rows × cols values, cols)`.
pub type Observer = Box<dyn FnMut(usize, Site, &[f32], usize) + Send>;

impl std::fmt::Debug for CpuBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuBackend")
            .field("cfg", &self.cfg)
            .field("kernels", &self.kernels)
            .finish()
    }
}

impl CpuBackend {
    pub fn open(path: &Path, opts: &CpuOptions) -> Result<CpuBackend, ModelError> {
        let gguf = Gguf::open(path)?;
        let mut b = CpuBackend::load(gguf, opts)?;
        b.dir = path.parent().map(Path::to_path_buf);
        Ok(b)
    }

    /// The memory `load` would take with `opts`, from the model's header alone.
    pub fn plan(gguf: &Gguf, opts: &CpuOptions) -> Result<MemoryPlan, ModelError> {
        let cfg = Config::from_gguf(gguf)?;
        let w = Weights::from_gguf(gguf, &cfg)?;
        let r = resolve(&cfg, opts)?;
        let row = 2 * cfg.n_layer as u64 * opts.kv_type.row_bytes(cfg.kv_dim()) as u64;
        Ok(MemoryPlan {
            weights: w.all().iter().map(|t| t.len as u64).sum(),
            kv_cache: KvCache::bytes(opts.kv_type, cfg.n_layer, r.n_ctx, cfg.kv_dim()),
            scratch: Shapes::new(&cfg, &r).bytes(),
            n_ctx: r.n_ctx,
            threads: r.threads,
            bytes_per_position: row,
        })
    }

    /// Validates the model and allocates every buffer it will ever use.
    pub fn load(gguf: Gguf, opts: &CpuOptions) -> Result<CpuBackend, ModelError> {
        let cfg = Config::from_gguf(&gguf)?;
        let w = Weights::from_gguf(&gguf, &cfg)?;
        let kernels = Kernels::select(opts.kernels)?;
        let r = resolve(&cfg, opts)?;
        let pool = Pool::new(r.threads).map_err(ModelError::Threads)?;
        let s = Shapes::new(&cfg, &r).alloc();
        let kv = KvCache::new(opts.kv_type, cfg.n_layer, r.n_ctx, cfg.kv_dim());
        Ok(CpuBackend {
            gguf,
            dir: None,
            cfg,
            w,
            kernels,
            pool,
            n_ctx: r.n_ctx,
            max_batch: r.max_batch,
            logit_rows: r.logit_rows,
            s,
            kv,
            packs: Packs::default(),
            repack_pending: opts.repack,
            observer: None,
        })
    }

    /// Observes the activations of every step from now on (`None`: stop). Calibration runs
    /// with `all_logits`, so that every position reaches the head.
    pub fn set_observer(&mut self, observer: Option<Observer>) {
        self.observer = observer;
    }

    /// Repacks the weights now if that is still to do.
    fn finish_repack(&mut self) {
        if std::mem::take(&mut self.repack_pending) {
            self.packs = self
                .w
                .repack(&self.gguf, &self.kernels, &mut self.pool, None);
        }
    }

    pub fn gguf(&self) -> &Gguf {
        &self.gguf
    }

    pub fn kernels(&self) -> KernelKind {
        self.kernels.kind
    }

    fn state_bytes(&self) -> u64 {
        let r = Resolved {
            n_ctx: self.n_ctx,
            threads: self.pool.n_threads(),
            max_batch: self.max_batch,
            logit_rows: self.logit_rows,
        };
        Shapes::new(&self.cfg, &r).bytes() + self.kv.byte_len()
    }
}

/// The sizes `CpuOptions` ask for, zeros resolved and limits checked.
struct Resolved {
    n_ctx: usize,
    threads: usize,
    max_batch: usize,
    logit_rows: usize,
}

/// Context window, threads and batch size that `opts` ask of this model, checked.
fn resolve(cfg: &Config, opts: &CpuOptions) -> Result<Resolved, ModelError> {
    let threads = if opts.threads == 0 {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    } else {
        opts.threads
    };
    if threads > 256 {
        return Err(ModelError::Config(format!(
            "threads = {threads}: allowed 1..=256"
        )));
    }
    let n_ctx = if opts.n_ctx == 0 {
        cfg.train_ctx.min(4096)
    } else {
        opts.n_ctx
    };
    if !(1..=1 << 20).contains(&n_ctx) {
        return Err(ModelError::Config(format!(
            "n_ctx = {n_ctx}: allowed 1..=1048576"
        )));
    }
    if opts.kv_type == KvType::Q8_0 && (!cfg.head_dim.is_multiple_of(QK) || cfg.head_dim > 16 * QK)
    {
        return Err(ModelError::Config(format!(
            "kv_type = q8_0 needs a head size that is a multiple of {QK}, at most {}; this model's is {}",
            16 * QK,
            cfg.head_dim
        )));
    }
    let max_batch = opts.max_batch.clamp(1, 4096);
    let logit_rows = match opts.logit_rows {
        0 => max_batch,
        n => n.min(max_batch),
    };
    Ok(Resolved {
        n_ctx,
        threads,
        max_batch,
        logit_rows,
    })
}

impl Backend for CpuBackend {
    fn vocabulary(&self) -> Vocabulary<'_> {
        Vocabulary::Gguf {
            gguf: &self.gguf,
            dir: self.dir.as_deref(),
        }
    }

    fn info(&self) -> BackendInfo {
        let mut types: Vec<(String, usize)> = Vec::new();
        let all = self.w.all();
        for t in &all {
            let name = t.ty.name().to_string();
            match types.iter_mut().find(|(n, _)| *n == name) {
                Some((_, c)) => *c += 1,
                None => types.push((name, 1)),
            }
        }
        BackendInfo {
            backend: "cpu-int4".into(),
            compute: self.kernels.kind.name().into(),
            threads: self.pool.n_threads(),
            n_ctx: self.n_ctx,
            n_vocab: self.cfg.vocab,
            max_batch: self.max_batch,
            tensor_types: types,
            kv_type: self.kv.ty().name().into(),
            weight_bytes: all.iter().map(|t| t.len as u64).sum(),
            state_bytes: self.state_bytes(),
            token_read_bytes: Some(self.w.token_read_bytes()),
            repacked_matrices: self.packs.count(),
            placement: None,
        }
    }

    fn n_vocab(&self) -> usize {
        self.cfg.vocab
    }

    fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    fn max_batch(&self) -> usize {
        self.max_batch
    }

    fn max_logit_rows(&self) -> usize {
        self.logit_rows
    }

    fn finish_load(&mut self, beside: &mut (dyn FnMut(Vocabulary<'_>) + Send)) {
        if !self.repack_pending {
            return beside(self.vocabulary());
        }
        self.repack_pending = false;
        let CpuBackend {
            gguf,
            dir,
            w,
            kernels,
            pool,
            packs,
            ..
        } = self;
        let vocabulary = || Vocabulary::Gguf {
            gguf,
            dir: dir.as_deref(),
        };
        *packs = w.repack(gguf, kernels, pool, Some(&mut || beside(vocabulary())));
    }

    fn release_vocabulary(&mut self) {
        self.gguf.release_vocabulary();
    }

    fn reset(&mut self) {
        // Positions are written before they are read (causal attention reads 0..=pos, all
        // written by this or earlier calls), so nothing needs clearing.
    }

    /// Keys are cached after RoPE, so moving one from position p to p − d means rotating it by
    /// −d: RoPE's rotations compose, R(−d)·R(p)·k = R(p − d)·k. The alternative, caching keys
    /// before RoPE and rotating every cached key at every step, costs a rotation per key per
    /// token; this costs one per key per shift, and keeps attention's inner loop unchanged.
    /// Values carry no position and only move.
    fn shift(&mut self, keep: usize, discard: usize, len: usize) -> Result<(), BackendError> {
        if discard == 0 || keep + discard > len || len > self.n_ctx {
            return Err(BackendError::BadShift {
                keep,
                discard,
                len,
                n_ctx: self.n_ctx,
            });
        }
        let c = &self.cfg;
        let hd = c.head_dim;
        // cos/sin of the rotation by −discard, in the first row of the RoPE buffer (which the
        // next forward call overwrites anyway).
        let (cs, rest) = self.s.rope.split_at_mut(hd);
        rope_row(c, -(discard as f32), cs);
        let _ = rest;
        let style = c.rope_style;
        self.kv.move_rows(
            &mut self.pool,
            keep + discard,
            keep,
            len - keep - discard,
            &mut self.s.scratch,
            &|row| {
                for head in row.chunks_exact_mut(hd) {
                    apply_rope(style, head, cs);
                }
            },
        );
        Ok(())
    }

    fn saved_bytes(&self, len: usize) -> usize {
        self.kv.saved_bytes(len)
    }

    fn save(&self, len: usize, out: &mut Vec<u8>) -> Result<(), BackendError> {
        if len > self.n_ctx {
            return Err(BackendError::ContextFull {
                pos: 0,
                end: len,
                n_ctx: self.n_ctx,
            });
        }
        self.kv.save(len, out);
        Ok(())
    }

    fn load(&mut self, len: usize, data: &[u8]) -> Result<(), BackendError> {
        let want = self.kv.saved_bytes(len);
        if len > self.n_ctx || data.len() != want {
            return Err(BackendError::BadState {
                len,
                got: data.len(),
                want,
            });
        }
        self.kv.load(len, data);
        Ok(())
    }

    fn forward(
        &mut self,
        tokens: &[u32],
        pos: usize,
        all_logits: bool,
    ) -> Result<&[f32], BackendError> {
        let vocab = self.cfg.vocab;
        super::check_forward(tokens, pos, self.max_batch, self.n_ctx, vocab)?;
        let n = tokens.len();
        if all_logits && n > self.logit_rows {
            return Err(BackendError::TooManyLogits {
                n,
                max: self.logit_rows,
            });
        }
        self.finish_repack();
        self.run(tokens, pos, all_logits);
        let out = if all_logits {
            &self.s.logits[..n * vocab]
        } else {
            &self.s.logits[..vocab]
        };
        Ok(out)
    }
}

impl CpuBackend {
    fn run(&mut self, tokens: &[u32], pos: usize, all_logits: bool) {
        let CpuBackend {
            gguf,
            cfg: c,
            w,
            kernels: k,
            pool,
            n_ctx,
            s,
            kv,
            packs,
            observer,
            ..
        } = self;
        let mut see = |li: usize, site: Site, v: &[f32], cols: usize| {
            if let Some(f) = observer.as_mut() {
                f(li, site, v, cols);
            }
        };
        let bytes = gguf.bytes();
        let n = tokens.len();
        let (dim, qd, kvd, hd) = (c.dim, c.q_dim(), c.kv_dim(), c.head_dim);
        let n_ctx = *n_ctx;

        let embd = w.token_embd.mat(bytes, packs);
        for (t, &tok) in tokens.iter().enumerate() {
            embd.dequantize_row(tok as usize, &mut s.x[t * dim..(t + 1) * dim]);
        }
        rope_table(c, pos, n, &mut s.rope);

        for (li, l) in w.layers.iter().enumerate() {
            // Attention block.
            let attn_norm = l.attn_norm.f32s(bytes);
            rmsnorm(&mut s.xb[..n * dim], &s.x[..n * dim], attn_norm, c.eps);
            let (wq, wk, wv) = (
                l.wq.mat(bytes, packs),
                l.wk.mat(bytes, packs),
                l.wv.mat(bytes, packs),
            );
            project(
                pool,
                k,
                &s.xb[..n * dim],
                dim,
                &mut s.xq,
                &mut [
                    (&wq, &mut s.q[..]),
                    (&wk, &mut s.k[..]),
                    (&wv, &mut s.v[..]),
                ],
                &mut s.scratch,
            );
            see(li, Site::AttnIn, &s.xb[..n * dim], dim);
            see(li, Site::Q, &s.q[..n * qd], qd);
            see(li, Site::K, &s.k[..n * kvd], kvd);
            see(li, Site::V, &s.v[..n * kvd], kvd);
            for (b, out, width) in [
                (l.bq, &mut s.q, qd),
                (l.bk, &mut s.k, kvd),
                (l.bv, &mut s.v, kvd),
            ] {
                if let Some(b) = b {
                    let b = b.f32s(bytes);
                    for row in out[..n * width].chunks_exact_mut(width) {
                        add(row, b);
                    }
                }
            }
            for t in 0..n {
                let rope = &s.rope[t * hd..(t + 1) * hd];
                for h in s.q[t * qd..(t + 1) * qd].chunks_exact_mut(hd) {
                    apply_rope(c.rope_style, h, rope);
                }
                for h in s.k[t * kvd..(t + 1) * kvd].chunks_exact_mut(hd) {
                    apply_rope(c.rope_style, h, rope);
                }
            }
            kv.write(li, pos, &s.k[..n * kvd], &s.v[..n * kvd]);
            attention(
                pool,
                k,
                c,
                pos,
                n,
                &s.q,
                kv.layer(li),
                &mut s.att,
                &mut s.parts,
                n_ctx,
                &mut s.xb,
            );
            let wo = l.wo.mat(bytes, packs);
            project(
                pool,
                k,
                &s.xb[..n * qd],
                qd,
                &mut s.xq,
                &mut [(&wo, &mut s.xb2[..])],
                &mut s.scratch,
            );
            see(li, Site::AttnOut, &s.xb[..n * qd], qd);
            see(li, Site::O, &s.xb2[..n * dim], dim);
            add(&mut s.x[..n * dim], &s.xb2[..n * dim]);

            // Feed-forward block (SwiGLU).
            let ffn_norm = l.ffn_norm.f32s(bytes);
            rmsnorm(&mut s.xb[..n * dim], &s.x[..n * dim], ffn_norm, c.eps);
            let (wg, wu) = (l.w_gate.mat(bytes, packs), l.w_up.mat(bytes, packs));
            project(
                pool,
                k,
                &s.xb[..n * dim],
                dim,
                &mut s.xq,
                &mut [(&wg, &mut s.hb[..]), (&wu, &mut s.hb2[..])],
                &mut s.scratch,
            );
            see(li, Site::FfnIn, &s.xb[..n * dim], dim);
            see(li, Site::Gate, &s.hb[..n * c.ffn], c.ffn);
            see(li, Site::Up, &s.hb2[..n * c.ffn], c.ffn);
            let nf = n * c.ffn;
            for (g, u) in s.hb[..nf].iter_mut().zip(&s.hb2[..nf]) {
                *g = *g / (1.0 + (-*g).exp()) * u;
            }
            let wd = l.w_down.mat(bytes, packs);
            project(
                pool,
                k,
                &s.hb[..nf],
                c.ffn,
                &mut s.xq,
                &mut [(&wd, &mut s.xb2[..])],
                &mut s.scratch,
            );
            see(li, Site::FfnMid, &s.hb[..nf], c.ffn);
            see(li, Site::Down, &s.xb2[..n * dim], dim);
            add(&mut s.x[..n * dim], &s.xb2[..n * dim]);
        }

        // Output: every token's logits, or the last one's.
        let first = if all_logits { 0 } else { n - 1 };
        let m = n - first;
        rmsnorm(
            &mut s.xb[..m * dim],
            &s.x[first * dim..n * dim],
            w.output_norm.f32s(bytes),
            c.eps,
        );
        let wout = w.output.mat(bytes, packs);
        project(
            pool,
            k,
            &s.xb[..m * dim],
            dim,
            &mut s.xq,
            &mut [(&wout, &mut s.logits[..])],
            &mut s.scratch,
        );
        see(c.n_layer, Site::HeadIn, &s.xb[..m * dim], dim);
        see(c.n_layer, Site::Logits, &s.logits[..m * c.vocab], c.vocab);
    }
}

/// Multiplies the rows of `x` (tokens × `cols`) by each matrix of `jobs`, after quantizing them
/// to 8 bits for the integer kernels (exact mode keeps f32 only).
fn project(
    pool: &mut Pool,
    k: &Kernels,
    x: &[f32],
    cols: usize,
    xq: &mut [BlockQ8],
    jobs: &mut [(&Matrix, &mut [f32])],
    scratch: &mut [f32],
) {
    let nq = x.len() / QK;
    if !k.exact() {
        (k.quantize_q8)(x, &mut xq[..nq]);
    }
    let acts = Acts {
        n: x.len() / cols,
        cols,
        f: x,
        q: &xq[..nq],
    };
    matmul(pool, k, &acts, jobs, scratch);
}

fn add(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// RMSNorm of each row of `x` (rows of `w.len()`), into `out`. The sum of squares is taken in
/// f64, as ggml does, so long rows lose nothing.
fn rmsnorm(out: &mut [f32], x: &[f32], w: &[f32], eps: f32) {
    let d = w.len();
    for (o, xr) in out.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
        let ss: f64 = xr.iter().map(|&v| (v as f64) * (v as f64)).sum();
        let mean = (ss / d as f64) as f32;
        let scale = 1.0 / (mean + eps).sqrt();
        for ((o, &v), &wi) in o.iter_mut().zip(xr).zip(w) {
            *o = v * scale * wi;
        }
    }
}

/// cos/sin of every rotated pair for positions `pos..pos + n`: theta_i = p · base^(-2i/d),
/// computed by repeated multiplication in f32 as ggml does (the exact path must agree with it).
fn rope_table(c: &Config, pos: usize, n: usize, out: &mut [f32]) {
    let hd = c.head_dim;
    for t in 0..n {
        rope_row(c, (pos + t) as f32, &mut out[t * hd..(t + 1) * hd]);
    }
}

/// cos/sin of every rotated pair for one (possibly negative) position `p`, as [`rope_table`].
fn rope_row(c: &Config, p: f32, out: &mut [f32]) {
    rope_angles(c.rope_theta, c.head_dim, p, out)
}

/// cos/sin of every rotated pair of a head of `hd` values at position `p` for rotary base
/// `theta`, interleaved (`cos₀ sin₀ cos₁ sin₁ …`), as the engine computes them.
pub fn rope_angles(theta: f32, hd: usize, p: f32, out: &mut [f32]) {
    let scale = theta.powf(-2.0 / hd as f32);
    let mut theta = p;
    for i in 0..hd / 2 {
        let (sin, cos) = theta.sin_cos();
        out[2 * i] = cos;
        out[2 * i + 1] = sin;
        theta *= scale;
    }
}

fn apply_rope(style: RopeStyle, h: &mut [f32], cs: &[f32]) {
    let half = h.len() / 2;
    let cs = &cs[..2 * half];
    match style {
        RopeStyle::Interleaved => {
            for (p, c) in h.chunks_exact_mut(2).zip(cs.chunks_exact(2)) {
                let (x0, x1) = (p[0], p[1]);
                p[0] = x0 * c[0] - x1 * c[1];
                p[1] = x0 * c[1] + x1 * c[0];
            }
        }
        RopeStyle::Halves => {
            let (a, b) = h.split_at_mut(half);
            for ((x0, x1), c) in a.iter_mut().zip(b.iter_mut()).zip(cs.chunks_exact(2)) {
                let (v0, v1) = (*x0, *x1);
                *x0 = v0 * c[0] - v1 * c[1];
                *x1 = v0 * c[1] + v1 * c[0];
            }
        }
    }
}

/// Causal grouped-query attention of `n` tokens at positions `pos..` over the cached keys and
/// values. Output: `out` (n, q_dim).
///
/// Exact mode computes each (token, head) in one pass, as ggml does without flash attention.
/// Otherwise the positions each token attends to are cut into pieces (more pieces when there
/// are few tokens, so that a single decoded token still keeps every thread busy): each piece
/// scores its keys, takes `exp(s − max)` and its sum, and accumulates its values, on the
/// vector kernels; the pieces of a head are then merged, rescaling each by `exp(max − M)`. The
/// threads claim pieces in turn as they finish them.
#[allow(clippy::too_many_arguments)]
fn attention(
    pool: &mut Pool,
    k: &Kernels,
    c: &Config,
    pos: usize,
    n: usize,
    q: &[f32],
    cache: LayerKv<'_>,
    att: &mut [f32],
    parts: &mut [f32],
    n_ctx: usize,
    out: &mut [f32],
) {
    if k.exact() {
        return attention_exact(pool, k, c, pos, n, q, cache, att, n_ctx, out);
    }
    let (hd, qd, kvd) = (c.head_dim, c.q_dim(), c.kv_dim());
    let (n_kv, group) = (c.n_kv_head, c.n_head / c.n_kv_head);
    let scale = 1.0 / (hd as f32).sqrt();
    let nt = pool.n_threads();
    let per = pieces_per_token(n, n_kv, nt);
    // Pieces of token t: never more than it has positions / MIN_PIECE (and at least one).
    let pieces = |t: usize| per.min((pos + t + 1).div_ceil(MIN_PIECE));
    let total: usize = (0..n).map(pieces).sum();
    let width = group * (hd + 2);
    let parts_sh = Shards::new(&mut parts[..total * n_kv * width]);
    let att = Shards::new(att);
    let (kb, hb) = (kvd / QK, hd / QK);
    // Pieces are claimed in turn as threads finish (as the matmuls' are).
    pool.run(total * n_kv, &|item, tid| {
        // SAFETY: thread `tid` alone uses row `tid` of the scratch.
        let row = unsafe { att.part(tid * (n_ctx + hd), n_ctx + hd) };
        let (scores, qs) = row.split_at_mut(n_ctx);
        let mut qq = [BlockQ8::default(); 16];
        let g = item % n_kv;
        // The token and piece of this item (one piece per token when `per` is 1, so no
        // search).
        let (mut t, mut piece) = (0, item / n_kv);
        if per == 1 {
            (t, piece) = (piece, 0);
        } else {
            while piece >= pieces(t) {
                piece -= pieces(t);
                t += 1;
            }
        }
        let len = pos + t + 1;
        let np = pieces(t);
        let (j0, j1) = (piece * len / np, (piece + 1) * len / np);
        let sc = &mut scores[..j1 - j0];
        // SAFETY: piece `item` owns its slot of `parts`.
        let slot = unsafe { parts_sh.part(item * width, width) };
        for (r, res) in slot.chunks_exact_mut(hd + 2).enumerate() {
            let h = g * group + r;
            for (d, &x) in qs
                .iter_mut()
                .zip(&q[t * qd + h * hd..t * qd + (h + 1) * hd])
            {
                *d = x * scale;
            }
            match cache {
                LayerKv::F32 { k: kc, .. } => {
                    (k.scores_f32)(&qs[..hd], &kc[j0 * kvd + g * hd..], kvd, sc);
                }
                LayerKv::F16 { k: kc, .. } => {
                    (k.scores_f16)(&qs[..hd], &kc[j0 * kvd + g * hd..], kvd, sc);
                }
                LayerKv::Q8 { k: kc, .. } => {
                    let qq = &mut qq[..hb];
                    (k.quantize_q8)(&qs[..hd], qq);
                    for (j, s) in sc.iter_mut().enumerate() {
                        let at = (j0 + j) * kb + g * hb;
                        *s = (k.dot_q8_0)(&kc[at..at + hb], qq);
                    }
                }
            }
            let max = sc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum = (k.exp_sum)(sc, max);
            let (head, o) = res.split_at_mut(2);
            head[0] = max;
            head[1] = sum;
            o.fill(0.0);
            match cache {
                LayerKv::F32 { v: vc, .. } => {
                    (k.acc_f32)(sc, &vc[j0 * kvd + g * hd..], kvd, o);
                }
                LayerKv::F16 { v: vc, .. } => {
                    (k.acc_f16)(sc, &vc[j0 * kvd + g * hd..], kvd, o);
                }
                LayerKv::Q8 { v: vc, .. } => {
                    (k.acc_q8_0)(sc, &vc[j0 * kb + g * hb..], kb, o);
                }
            }
        }
    });
    // Merge the pieces of every (token, head).
    let mut first = 0;
    for t in 0..n {
        let np = pieces(t);
        for g in 0..n_kv {
            for r in 0..group {
                let h = g * group + r;
                let at = |i: usize| ((first + i) * n_kv + g) * width + r * (hd + 2);
                let m = (0..np)
                    .map(|i| parts[at(i)])
                    .fold(f32::NEG_INFINITY, f32::max);
                let o = &mut out[t * qd + h * hd..t * qd + (h + 1) * hd];
                o.fill(0.0);
                let mut sum = 0f32;
                for i in 0..np {
                    let p = &parts[at(i)..at(i) + hd + 2];
                    let w = (p[0] - m).exp();
                    sum += w * p[1];
                    for (oi, &x) in o.iter_mut().zip(&p[2..]) {
                        *oi += w * x;
                    }
                }
                let inv = 1.0 / sum;
                for oi in o.iter_mut() {
                    *oi *= inv;
                }
            }
        }
        first += np;
    }
}

/// The fewest positions a piece of attention work covers.
const MIN_PIECE: usize = 64;

/// How many pieces each token's attention is cut into: enough for 8 per thread in all, one
/// when the tokens alone give that many.
fn pieces_per_token(n: usize, n_kv: usize, threads: usize) -> usize {
    let want = 8 * threads;
    let have = (n * n_kv).max(1);
    if have >= want {
        1
    } else {
        want.div_ceil(have)
    }
}

/// The most pieces (times kv heads) one attention call makes: with one piece per token,
/// `batch · n_kv`; otherwise fewer than `8 · threads + batch · n_kv`, which is below
/// `16 · threads`.
fn max_pieces(c: &Config, batch: usize, threads: usize) -> usize {
    (batch * c.n_kv_head).max(16 * threads)
}

/// Exact mode's attention: one pass per (token, head), the scores normalized before the values
/// are summed, scalar arithmetic in ggml's order.
#[allow(clippy::too_many_arguments)]
fn attention_exact(
    pool: &mut Pool,
    k: &Kernels,
    c: &Config,
    pos: usize,
    n: usize,
    q: &[f32],
    cache: LayerKv<'_>,
    att: &mut [f32],
    n_ctx: usize,
    out: &mut [f32],
) {
    let (hd, qd, kvd) = (c.head_dim, c.q_dim(), c.kv_dim());
    let group = c.n_head / c.n_kv_head;
    let scale = 1.0 / (hd as f32).sqrt();
    let units = n * c.n_head;
    let att = Shards::new(att);
    let out = Shards::new(&mut out[..n * qd]);
    let (per, hb) = (kvd / QK, hd / QK);
    pool.run(units, &|u, tid| {
        // SAFETY: thread `tid` alone uses scratch row `tid`: scores, then a key widened from f16.
        let row = unsafe { att.part(tid * (n_ctx + hd), n_ctx + hd) };
        let (scores, krow) = row.split_at_mut(n_ctx);
        let mut qq = [BlockQ8::default(); 16];
        let mut vrow = [0f32; QK];
        let (t, h) = (u / c.n_head, u % c.n_head);
        let g = h / group;
        let qh = &q[t * qd + h * hd..t * qd + (h + 1) * hd];
        let len = pos + t + 1;
        let sc = &mut scores[..len];
        match cache {
            LayerKv::F32 { k: kc, .. } => {
                for (j, s) in sc.iter_mut().enumerate() {
                    let kj = &kc[j * kvd + g * hd..j * kvd + (g + 1) * hd];
                    *s = (k.dot_f32)(qh, kj) * scale;
                }
            }
            LayerKv::F16 { k: kc, .. } => {
                for (j, s) in sc.iter_mut().enumerate() {
                    let kj = &kc[j * kvd + g * hd..j * kvd + (g + 1) * hd];
                    for (x, &h) in krow.iter_mut().zip(kj) {
                        *x = f16_to_f32(h);
                    }
                    *s = (k.dot_f32)(qh, krow) * scale;
                }
            }
            LayerKv::Q8 { k: kc, .. } => {
                let qq = &mut qq[..hb];
                (k.quantize_q8)(qh, qq);
                for (j, s) in sc.iter_mut().enumerate() {
                    let kj = &kc[j * per + g * hb..j * per + (g + 1) * hb];
                    *s = (k.dot_q8_0)(kj, qq) * scale;
                }
            }
        }
        let max = sc.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for s in sc.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        let inv = 1.0 / sum;
        // SAFETY: unit (t, h) owns this head's slot of token t's output row.
        let o = unsafe { out.part(t * qd + h * hd, hd) };
        o.fill(0.0);
        match cache {
            LayerKv::F32 { v: vc, .. } => {
                for (j, &s) in sc.iter().enumerate() {
                    let p = s * inv;
                    let vj = &vc[j * kvd + g * hd..j * kvd + (g + 1) * hd];
                    for (oi, vi) in o.iter_mut().zip(vj) {
                        *oi += p * vi;
                    }
                }
            }
            LayerKv::F16 { v: vc, .. } => {
                for (j, &s) in sc.iter().enumerate() {
                    let p = s * inv;
                    let vj = &vc[j * kvd + g * hd..j * kvd + (g + 1) * hd];
                    for (oi, &vi) in o.iter_mut().zip(vj) {
                        *oi += p * f16_to_f32(vi);
                    }
                }
            }
            LayerKv::Q8 { v: vc, .. } => {
                for (j, &s) in sc.iter().enumerate() {
                    let p = s * inv;
                    let vj = &vc[j * per + g * hb..j * per + (g + 1) * hb];
                    for (ob, b) in o.chunks_exact_mut(QK).zip(vj) {
                        dequant_q8_0(std::slice::from_ref(b), &mut vrow);
                        for (oi, vi) in ob.iter_mut().zip(&vrow) {
                            *oi += p * vi;
                        }
                    }
                }
            }
        }
    });
}
