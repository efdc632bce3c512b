//! Hyper-parameters and weights of a decoder read from GGUF metadata, validated at load.
//! Weights stay in the mapping: a [`TensorRef`] is a typed, shaped window onto it.

use crate::gguf::{Gguf, GgufError, TensorInfo};
use crate::kernels::matmul::Matrix;
use crate::kernels::quant::{as_blocks, GgmlType};

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

/// A tensor in the mapping: `rows` × `cols` of type `ty` at `offset`.
#[derive(Debug, Clone, Copy)]
pub struct TensorRef {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    pub offset: usize,
    pub len: usize,
}

impl TensorRef {
    pub fn mat<'a>(&self, bytes: &'a [u8]) -> Matrix<'a> {
        Matrix {
            ty: self.ty,
            rows: self.rows,
            cols: self.cols,
            data: &bytes[self.offset..self.offset + self.len],
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
    })
}
