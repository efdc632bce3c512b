//! Hyper-parameters and weights of a decoder read from GGUF metadata, validated at load.
//! Weights stay in the mapping: a [`TensorRef`] is a typed, shaped window onto it.

use crate::gguf::{Gguf, GgufError, TensorInfo};
use crate::kernels::matmul::Matrix;
use crate::kernels::packed;
use crate::kernels::pool::{Pool, Shards};
use crate::kernels::quant::{as_blocks, block_bytes, GgmlType};
use crate::kernels::Kernels;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("unsupported architecture {0:?} (supported: llama, qwen2)")]
    UnsupportedArch(String),
    #[error("metadata {key} = {value}: {msg}")]
    BadHyper {
        key: String,
        value: String,
        msg: String,
    },
    #[error("tensor {tensor:?} has shape {found:?}, expected {expected:?}")]
    BadShape {
        tensor: String,
        expected: Vec<u64>,
        found: Vec<u64>,
    },
    #[error("tensor {tensor:?} has type {ty}, which the CPU engine does not support (supported: F32, F16, Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q6_K)")]
    UnsupportedType { tensor: String, ty: &'static str },
    #[error("tensor {tensor:?} must be F32 (found {ty})")]
    NotF32 { tensor: String, ty: &'static str },
    #[error("tensor {tensor:?} is not aligned for its block type in the file")]
    Unaligned { tensor: String },
    #[error(transparent)]
    Kernels(#[from] crate::kernels::KernelError),
    #[error("cannot start worker threads: {0}")]
    Threads(std::io::Error),
    #[error("{0}")]
    Config(String),
}

/// How RoPE pairs the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs (2i, 2i+1): llama as converted to GGUF (q/k rows permuted by the converter).
    Interleaved,
    /// Halves (i, i + d/2): qwen2 ("NeoX" style).
    Halves,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Qwen2,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub arch: Arch,
    pub n_layer: usize,
    /// Embedding width.
    pub dim: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub vocab: usize,
    pub rope_theta: f32,
    pub rope_style: RopeStyle,
    pub eps: f32,
    /// Context length the model was trained for (a default for n_ctx).
    pub train_ctx: usize,
}

impl Config {
    pub fn q_dim(&self) -> usize {
        self.n_head * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.n_kv_head * self.head_dim
    }

    pub fn from_gguf(g: &Gguf) -> Result<Config, ModelError> {
        let arch_name = g.get_str("general.architecture")?;
        let arch = match arch_name {
            "llama" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            other => return Err(ModelError::UnsupportedArch(other.to_string())),
        };
        let a = arch_name;
        let int = |k: &str, lo: u64, hi: u64| -> Result<usize, ModelError> {
            let key = format!("{a}.{k}");
            let v = g.get_u64(&key)?;
            if v < lo || v > hi {
                return Err(ModelError::BadHyper {
                    key,
                    value: v.to_string(),
                    msg: format!("allowed {lo}..={hi}"),
                });
            }
            Ok(v as usize)
        };
        let n_layer = int("block_count", 1, 512)?;
        let dim = int("embedding_length", 32, 65536)?;
        let n_head = int("attention.head_count", 1, 1024)?;
        let n_kv_head = match g.get(&format!("{a}.attention.head_count_kv")) {
            Some(_) => int("attention.head_count_kv", 1, 1024)?,
            None => n_head,
        };
        let ffn = int("feed_forward_length", 32, 1 << 20)?;
        let train_ctx = int("context_length", 1, 1 << 24)?;
        let head_dim = match g.get(&format!("{a}.attention.key_length")) {
            Some(_) => int("attention.key_length", 2, 1024)?,
            None => dim / n_head,
        };
        let hyper = |key: &str, value: String, msg: &str| ModelError::BadHyper {
            key: format!("{a}.{key}"),
            value,
            msg: msg.to_string(),
        };
        if n_head % n_kv_head != 0 {
            return Err(hyper(
                "attention.head_count_kv",
                n_kv_head.to_string(),
                &format!("must divide head_count {n_head}"),
            ));
        }
        if head_dim % 2 != 0 || head_dim * n_head == 0 {
            return Err(hyper(
                "attention.key_length",
                head_dim.to_string(),
                "head dimension must be even",
            ));
        }
        for (k, v) in [
            ("embedding_length", dim),
            ("feed_forward_length", ffn),
            ("attention.head_count × head_dim", n_head * head_dim),
        ] {
            if v % 32 != 0 {
                return Err(hyper(k, v.to_string(), "must be a multiple of 32"));
            }
        }
        if let Some(v) = g.get(&format!("{a}.rope.dimension_count")) {
            let rd = v.as_u64().unwrap_or(0);
            if rd as usize != head_dim {
                return Err(hyper(
                    "rope.dimension_count",
                    rd.to_string(),
                    &format!("partial rotary embeddings are not supported (head_dim {head_dim})"),
                ));
            }
        }
        let rope_theta = match g.get(&format!("{a}.rope.freq_base")) {
            Some(_) => g.get_f64(&format!("{a}.rope.freq_base"))? as f32,
            None => 10000.0,
        };
        if !(rope_theta.is_finite() && rope_theta > 1.0) {
            return Err(hyper(
                "rope.freq_base",
                rope_theta.to_string(),
                "must be > 1",
            ));
        }
        let eps = g.get_f64(&format!("{a}.attention.layer_norm_rms_epsilon"))? as f32;
        if !(eps.is_finite() && eps > 0.0 && eps < 1.0) {
            return Err(hyper(
                "attention.layer_norm_rms_epsilon",
                eps.to_string(),
                "must be in (0, 1)",
            ));
        }
        let embd = g.require_tensor("token_embd.weight")?;
        let vocab = embd.dims.get(1).copied().unwrap_or(0) as usize;
        if let Some(v) = g.get(&format!("{a}.vocab_size")) {
            if v.as_u64() != Some(vocab as u64) {
                return Err(hyper(
                    "vocab_size",
                    format!("{v:?}"),
                    &format!("disagrees with token_embd.weight rows ({vocab})"),
                ));
            }
        }
        Ok(Config {
            arch,
            n_layer,
            dim,
            n_head,
            n_kv_head,
            head_dim,
            ffn,
            vocab,
            rope_theta,
            rope_style: match arch {
                Arch::Llama => RopeStyle::Interleaved,
                Arch::Qwen2 => RopeStyle::Halves,
            },
            eps,
            train_ctx,
        })
    }
}

/// A tensor in the mapping: `rows` × `cols` of type `ty` at `offset`, or repacked at load
/// (`packed`: its index in the [`Packs`]).
#[derive(Debug, Clone, Copy)]
pub struct TensorRef {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    pub offset: usize,
    pub len: usize,
    pub packed: Option<usize>,
}

impl TensorRef {
    pub fn mat<'a>(&self, bytes: &'a [u8], packs: &'a Packs) -> Matrix<'a> {
        let (data, packed) = match self.packed {
            Some(i) => (packs.bytes(i), true),
            None => (&bytes[self.offset..self.offset + self.len], false),
        };
        Matrix {
            ty: self.ty,
            rows: self.rows,
            cols: self.cols,
            data,
            packed,
        }
    }

    /// An F32 vector (norm weights, biases) in place.
    pub fn f32s<'a>(&self, bytes: &'a [u8]) -> &'a [f32] {
        as_blocks::<f32>(&bytes[self.offset..self.offset + self.len])
            .expect("f32 tensors validated at load")
    }
}

#[derive(Debug)]
pub struct Layer {
    pub attn_norm: TensorRef,
    pub wq: TensorRef,
    pub wk: TensorRef,
    pub wv: TensorRef,
    pub bq: Option<TensorRef>,
    pub bk: Option<TensorRef>,
    pub bv: Option<TensorRef>,
    pub wo: TensorRef,
    pub ffn_norm: TensorRef,
    pub w_gate: TensorRef,
    pub w_up: TensorRef,
    pub w_down: TensorRef,
}

#[derive(Debug)]
pub struct Weights {
    pub token_embd: TensorRef,
    pub layers: Vec<Layer>,
    pub output_norm: TensorRef,
    /// `output.weight`, or the embeddings when they are tied.
    pub output: TensorRef,
}

impl Weights {
    pub fn from_gguf(g: &Gguf, c: &Config) -> Result<Weights, ModelError> {
        let matrix = |name: &str, cols: usize, rows: usize| -> Result<TensorRef, ModelError> {
            let t = g.require_tensor(name)?;
            check_shape(t, &[cols as u64, rows as u64])?;
            if !t.ty.supported() {
                return Err(ModelError::UnsupportedType {
                    tensor: name.into(),
                    ty: t.ty.name(),
                });
            }
            tref(t, rows, cols)
        };
        let vector = |name: &str, n: usize| -> Result<TensorRef, ModelError> {
            let t = g.require_tensor(name)?;
            check_shape(t, &[n as u64])?;
            if t.ty != GgmlType::F32 {
                return Err(ModelError::NotF32 {
                    tensor: name.into(),
                    ty: t.ty.name(),
                });
            }
            tref(t, 1, n)
        };
        let bias = |name: &str, n: usize| -> Result<Option<TensorRef>, ModelError> {
            match g.tensor(name) {
                None if c.arch == Arch::Qwen2 => {
                    Err(GgufError::MissingTensor { name: name.into() }.into())
                }
                None => Ok(None),
                Some(_) => vector(name, n).map(Some),
            }
        };
        let (dim, qd, kvd) = (c.dim, c.q_dim(), c.kv_dim());
        let mut layers = Vec::with_capacity(c.n_layer);
        for i in 0..c.n_layer {
            let p = |s: &str| format!("blk.{i}.{s}");
            layers.push(Layer {
                attn_norm: vector(&p("attn_norm.weight"), dim)?,
                wq: matrix(&p("attn_q.weight"), dim, qd)?,
                wk: matrix(&p("attn_k.weight"), dim, kvd)?,
                wv: matrix(&p("attn_v.weight"), dim, kvd)?,
                bq: bias(&p("attn_q.bias"), qd)?,
                bk: bias(&p("attn_k.bias"), kvd)?,
                bv: bias(&p("attn_v.bias"), kvd)?,
                wo: matrix(&p("attn_output.weight"), qd, dim)?,
                ffn_norm: vector(&p("ffn_norm.weight"), dim)?,
                w_gate: matrix(&p("ffn_gate.weight"), dim, c.ffn)?,
                w_up: matrix(&p("ffn_up.weight"), dim, c.ffn)?,
                w_down: matrix(&p("ffn_down.weight"), c.ffn, dim)?,
            });
        }
        let token_embd = matrix("token_embd.weight", dim, c.vocab)?;
        let output = match g.tensor("output.weight") {
            Some(_) => matrix("output.weight", dim, c.vocab)?,
            None => token_embd,
        };
        Ok(Weights {
            token_embd,
            layers,
            output_norm: vector("output_norm.weight", dim)?,
            output,
        })
    }

    /// Repacks every matrix the kernels `k` read in eight-row groups (see
    /// [`crate::kernels::packed`]) into memory of its own, on the pool's threads, and gives the
    /// mapped pages it came from back to the system. The embeddings are repacked only when they
    /// are also the output matrix (rows are then read back from the packed groups); alone, they
    /// are read a row per token and stay in the mapping.
    ///
    /// `beside`, if given, runs on a thread of its own meanwhile, which then helps with the
    /// repacking; where no thread can be had, it is not run.
    pub fn repack(
        &mut self,
        g: &Gguf,
        k: &Kernels,
        pool: &mut Pool,
        beside: Option<&mut (dyn FnMut() + Send)>,
    ) -> Packs {
        let mut packs = Packs::default();
        if !k.packs || k.exact() {
            if let Some(f) = beside {
                f();
            }
            return packs;
        }
        let want = |t: &TensorRef| packed::packable(t.ty) && t.rows.is_multiple_of(packed::ROWS);
        let tied = self.output.offset == self.token_embd.offset;
        let mut refs: Vec<&mut TensorRef> = Vec::new();
        for l in &mut self.layers {
            refs.extend([
                &mut l.wq,
                &mut l.wk,
                &mut l.wv,
                &mut l.wo,
                &mut l.w_gate,
                &mut l.w_up,
                &mut l.w_down,
            ]);
        }
        refs.push(&mut self.output);
        refs.retain(|t| want(t));
        // Units of at most 64 groups (of any tensor), claimed by the threads in turn.
        const UNIT: usize = 64;
        let mut units: Vec<(usize, usize, usize)> = Vec::new();
        let mut words = 0;
        for (i, t) in refs.iter().enumerate() {
            let groups = t.rows / packed::ROWS;
            for g0 in (0..groups).step_by(UNIT) {
                units.push((i, g0, (g0 + UNIT).min(groups)));
            }
            packs.ranges.push(words..words + t.len / 8);
            words += t.len / 8;
        }
        packs.buf = huge_zeroed(words);
        let bytes = g.bytes();
        let t0 = std::time::Instant::now();
        {
            let out = Shards::new(&mut packs.buf);
            let (refs, ranges) = (&refs, &packs.ranges);
            let pack = |u: usize| {
                let (i, g0, g1) = units[u];
                let t = &refs[i];
                let group_bytes = t.len / (t.rows / packed::ROWS);
                let words = group_bytes / 8;
                // SAFETY: the tensors' ranges are disjoint, and units cover disjoint group
                // ranges of each.
                let out = unsafe { out.part(ranges[i].start + g0 * words, (g1 - g0) * words) };
                let out = bytemuck_u8(out);
                let src = &bytes[t.offset..t.offset + t.len];
                packed::pack_groups(t.ty, t.cols, src, g0, g1, out);
                // The source rows are not read again: their pages go now, so that the mapped
                // and the packed copy of a tensor are not both resident at once.
                g.release_range(t.offset + g0 * group_bytes, (g1 - g0) * group_bytes);
            };
            // The pool's threads and the one beside claim units from one counter.
            let next = AtomicUsize::new(0);
            let drain = || loop {
                let u = next.fetch_add(1, Relaxed);
                if u >= units.len() {
                    break;
                }
                pack(u);
            };
            std::thread::scope(|s| {
                let side = beside.and_then(|f| {
                    let spawned = std::thread::Builder::new()
                        .name("edgellm-load".into())
                        .spawn_scoped(s, || {
                            f();
                            drain();
                        });
                    match spawned {
                        Ok(h) => Some(h),
                        Err(e) => {
                            tracing::debug!(error = %e, "no loader thread; repacking on the pool alone");
                            None
                        }
                    }
                });
                pool.run(pool.n_threads(), &|_, _| drain());
                if let Some(Err(p)) = side.map(|h| h.join()) {
                    std::panic::resume_unwind(p);
                }
            });
        }
        for (i, t) in refs.into_iter().enumerate() {
            // Whole pages the units' edges shared.
            g.release_range(t.offset, t.len);
            t.packed = Some(i);
        }
        if tied {
            self.token_embd.packed = self.output.packed;
        }
        tracing::debug!(
            matrices = packs.count(),
            mib = packs.total_bytes() as f64 / (1 << 20) as f64,
            ms = t0.elapsed().as_secs_f64() * 1e3,
            "weights repacked in eight-row groups"
        );
        packs
    }

    /// Bytes of weights a one-token step reads: every layer's matrices and the output matrix
    /// (norms, biases and one embedding row are noise beside them).
    pub fn token_read_bytes(&self) -> u64 {
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                l.wq.len + l.wk.len + l.wv.len + l.wo.len + l.w_gate.len + l.w_up.len + l.w_down.len
            })
            .sum();
        (layers + self.output.len) as u64
    }

    /// Every tensor used, once.
    pub fn all(&self) -> Vec<TensorRef> {
        let mut v = vec![self.token_embd, self.output_norm];
        if self.output.offset != self.token_embd.offset {
            v.push(self.output);
        }
        for l in &self.layers {
            v.extend([
                l.attn_norm,
                l.wq,
                l.wk,
                l.wv,
                l.wo,
                l.ffn_norm,
                l.w_gate,
                l.w_up,
                l.w_down,
            ]);
            v.extend([l.bq, l.bk, l.bv].into_iter().flatten());
        }
        v
    }
}

/// Matrices repacked at load, one after another in one buffer (8-byte aligned, like a
/// mapping) in the order a step reads them: layer by layer, then the output matrix. The
/// hardware prefetcher then runs on from one matrix into the next, instead of starting cold
/// at each (a one-token step is a read of the whole buffer, front to back).
#[derive(Default)]
pub struct Packs {
    buf: Vec<u64>,
    /// Each matrix's words in `buf`.
    ranges: Vec<std::ops::Range<usize>>,
}

impl Packs {
    pub fn bytes(&self, i: usize) -> &[u8] {
        block_bytes(&self.buf[self.ranges[i].clone()])
    }

    pub fn total_bytes(&self) -> u64 {
        self.buf.len() as u64 * 8
    }

    pub fn count(&self) -> usize {
        self.ranges.len()
    }
}

/// `words` zeroed words, in transparent huge pages where the system gives them on request: a
/// repacked model is hundreds of MiB written once at load, which 4 KiB pages would fault in
/// one at a time.
fn huge_zeroed(words: usize) -> Vec<u64> {
    let v = vec![0u64; words];
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = (v.as_ptr() as usize).next_multiple_of(HUGE);
        let end = (v.as_ptr() as usize + words * 8) / HUGE * HUGE;
        if end > start {
            // SAFETY: advice on whole pages inside this Vec's allocation; MADV_HUGEPAGE changes
            // how they are backed, never their contents.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
            }
        }
    }
    v
}

fn bytemuck_u8(words: &mut [u64]) -> &mut [u8] {
    // SAFETY: the same memory viewed as bytes (u8 has no alignment or validity requirements);
    // the borrow is unique.
    unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr() as *mut u8, words.len() * 8) }
}

fn check_shape(t: &TensorInfo, expected: &[u64]) -> Result<(), ModelError> {
    if t.dims != expected {
        return Err(ModelError::BadShape {
            tensor: t.name.clone(),
            expected: expected.to_vec(),
            found: t.dims.clone(),
        });
    }
    Ok(())
}

fn tref(t: &TensorInfo, rows: usize, cols: usize) -> Result<TensorRef, ModelError> {
    // Block structs hold u16 fields (f32 for F32 tensors): the data must be aligned for them
    // to be viewed in place. GGUF aligns tensor data to 32 bytes, so this only fails on a
    // file with a custom small alignment.
    let need = match t.ty {
        GgmlType::F32 => 4,
        _ => 2,
    };
    if !t.offset.is_multiple_of(need) {
        return Err(ModelError::Unaligned {
            tensor: t.name.clone(),
        });
    }
    Ok(TensorRef {
        ty: t.ty,
        rows,
        cols,
        offset: t.offset as usize,
        len: t.n_bytes as usize,
        packed: None,
    })
}
