//! Backends run the model: token ids in, logits out, with the KV cache kept inside the backend.
//!
//! - [`cpu`]: the int4 CPU engine on a memory-mapped GGUF (this crate's own kernels).
//! - [`ort`]: ONNX Runtime through an execution provider chain, on an ONNX decoder folder.
//! - [`open`](open()): which backend a [`LoadSpec`] asks for, opened, and the fallback from ONNX
//!   Runtime to the int4 engine.
//!
//! This layer owns what every backend shares: the [`Backend`] trait, [`MemoryPlan`], the
//! options that are closed sets ([`BackendChoice`], [`KvType`], [`Provider`]) and the
//! [`Vocabulary`] a backend hands the engine to build its tokenizer from. It imports the
//! kernels and the GGUF reader below it, nothing above. The engine sees only [`Backend`].

pub mod cpu;
mod load;
pub mod ort;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::gguf::Gguf;
use crate::kernels::quant::{BlockQ8_0, QK};

pub use load::{cpu_plan, is_onnx_dir, open, open_cpu, plan, LoadSpec, OpenError, Opened};

/// Which backend runs the model (`model.backend`, `--backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// The int4 engine on a GGUF.
    Cpu,
    /// ONNX Runtime on an ONNX folder, the int4 engine taking over when it cannot run.
    Ort,
    /// `ort` when an ONNX folder is configured, else `cpu`.
    #[default]
    Auto,
}

/// An ONNX Runtime execution provider edgellm can register (`ort.providers`, `--providers`).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    Qnn,
    Cuda,
    Tensorrt,
    Xnnpack,
    Cpu,
}

impl Provider {
    pub const ALL: [Provider; 5] = [
        Provider::Qnn,
        Provider::Cuda,
        Provider::Tensorrt,
        Provider::Xnnpack,
        Provider::Cpu,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Provider::Qnn => "qnn",
            Provider::Cuda => "cuda",
            Provider::Tensorrt => "tensorrt",
            Provider::Xnnpack => "xnnpack",
            Provider::Cpu => "cpu",
        }
    }
}

impl std::fmt::Display for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Element type of the KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum KvType {
    F32,
    /// Half the bytes of f32, what llama.cpp caches by default.
    #[default]
    F16,
    #[serde(alias = "q8")]
    #[value(name = "q8_0", alias = "q8")]
    Q8_0,
}

impl KvType {
    pub fn name(self) -> &'static str {
        match self {
            KvType::F32 => "f32",
            KvType::F16 => "f16",
            KvType::Q8_0 => "q8_0",
        }
    }

    /// Bytes of one cached row of `kv_dim` values.
    pub fn row_bytes(self, kv_dim: usize) -> usize {
        match self {
            KvType::F32 => kv_dim * 4,
            KvType::F16 => kv_dim * 2,
            KvType::Q8_0 => kv_dim / QK * std::mem::size_of::<BlockQ8_0>(),
        }
    }
}

/// What a backend will hold in memory, known before anything big is allocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MemoryPlan {
    /// Tensor bytes in the mapped file (resident as they are read).
    pub weights: u64,
    pub kv_cache: u64,
    /// Activations, attention scores, logits, per-thread scratch.
    pub scratch: u64,
    pub n_ctx: usize,
    pub threads: usize,
    /// Bytes of one cached position (keys and values of every layer): a session's cost per
    /// token.
    pub bytes_per_position: u64,
}

/// Where the engine finds a model's tokenizer and chat template.
pub enum Vocabulary<'a> {
    /// The GGUF's metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`); `dir` is the
    /// folder of the file, where a `tokenizer.json` may stand beside it.
    Gguf {
        gguf: &'a Gguf,
        dir: Option<&'a Path>,
    },
    /// A model folder's `tokenizer.json`, the ids that begin and end a sequence, and its chat
    /// template (`None`: ChatML).
    Folder {
        tokenizer_json: PathBuf,
        bos: Option<u32>,
        eos: Vec<u32>,
        chat_template: Option<String>,
    },
}

/// What a backend reports about itself (status, `edgellm bench`, logs).
#[derive(Debug, Clone, serde::Serialize)]
pub struct BackendInfo {
    /// "cpu-int4" (this crate's engine), "ort".
    pub backend: String,
    /// Kernels or execution provider in use ("avx2", "neon-dotprod", "reference", "cuda", ...).
    pub compute: String,
    pub threads: usize,
    pub n_ctx: usize,
    pub n_vocab: usize,
    pub max_batch: usize,
    /// Tensor types of the weights and how many tensors of each.
    pub tensor_types: Vec<(String, usize)>,
    /// Element type of the KV cache ("f32", "q8_0").
    pub kv_type: String,
    /// Bytes of weights (mapped) and of the KV cache and scratch (allocated once).
    pub weight_bytes: u64,
    pub state_bytes: u64,
    /// Bytes of weights one generated token reads (every layer's matrices and the output
    /// matrix; one row of the embeddings), where the backend knows it.
    pub token_read_bytes: Option<u64>,
    /// Matrices repacked at load into the kernels' own layout (CPU engine on x86).
    pub repacked_matrices: usize,
    /// Which execution provider runs which part of the graph (NPU graphs on ONNX Runtime).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub placement: Option<ort::npu::Placement>,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    #[error("token id {id} is outside the vocabulary of {n_vocab} tokens")]
    BadToken { id: u32, n_vocab: usize },
    #[error("context full: positions {pos}..{end} do not fit in the window of {n_ctx} tokens")]
    ContextFull {
        pos: usize,
        end: usize,
        n_ctx: usize,
    },
    #[error("shift keeping {keep} and discarding {discard} of {len} cached positions does not fit the window of {n_ctx}")]
    BadShift {
        keep: usize,
        discard: usize,
        len: usize,
        n_ctx: usize,
    },
    #[error("saved state of {got} bytes does not match {len} positions ({want} bytes)")]
    BadState { len: usize, got: usize, want: usize },
    #[error("batch of {n} tokens is empty or larger than the backend's {max} per call")]
    BadBatch { n: usize, max: usize },
    #[error("logits of {n} tokens asked in one call; this model was loaded to return at most {max} (logit_rows)")]
    TooManyLogits { n: usize, max: usize },
    #[error("{0}")]
    Other(String),
}

/// The checks every backend's `forward` makes of its arguments: a batch of 1..=`max_batch`
/// tokens that fits the window at `pos`, every id inside the vocabulary.
pub fn check_forward(
    tokens: &[u32],
    pos: usize,
    max_batch: usize,
    n_ctx: usize,
    n_vocab: usize,
) -> Result<(), BackendError> {
    let n = tokens.len();
    if n == 0 || n > max_batch {
        return Err(BackendError::BadBatch { n, max: max_batch });
    }
    if pos + n > n_ctx {
        return Err(BackendError::ContextFull {
            pos,
            end: pos + n,
            n_ctx,
        });
    }
    if let Some(&id) = tokens.iter().find(|&&t| t as usize >= n_vocab) {
        return Err(BackendError::BadToken { id, n_vocab });
    }
    Ok(())
}

/// A model runner. One owner at a time (the engine worker), hence `&mut self` everywhere.
pub trait Backend: Send {
    fn info(&self) -> BackendInfo;

    /// Where the engine finds this model's tokenizer and chat template.
    fn vocabulary(&self) -> Vocabulary<'_>;

    fn n_vocab(&self) -> usize;

    /// Context window: the number of positions the KV cache holds.
    fn n_ctx(&self) -> usize;

    /// Most tokens one `forward` call takes; longer prompts are fed in chunks.
    fn max_batch(&self) -> usize;

    /// Finishes loading: work a backend leaves from opening until it is needed (the CPU
    /// engine's repacking of its weights) is done now, with `beside` given the vocabulary and
    /// run on another thread meanwhile, so that building the tokenizer and loading the weights
    /// overlap. The default runs `beside` alone; where no thread can be had, `beside` may not
    /// run at all.
    fn finish_load(&mut self, beside: &mut (dyn FnMut(Vocabulary<'_>) + Send)) {
        beside(self.vocabulary())
    }

    /// The engine has built its tokenizer from [`Backend::vocabulary`]: a backend may free
    /// what it kept only for that (a GGUF's vocabulary and merges, 24 MiB on Qwen2.5). After
    /// this, `vocabulary` may no longer give a whole tokenizer.
    fn release_vocabulary(&mut self) {}

    /// Most tokens one `forward` call with `all_logits` takes.
    fn max_logit_rows(&self) -> usize {
        self.max_batch()
    }

    /// Forgets the cached context; the next `forward` starts at position 0.
    fn reset(&mut self);

    /// Whether [`Backend::shift`] can slide this backend's window.
    fn can_shift(&self) -> bool {
        true
    }

    /// Slides the window: of the `len` cached positions, `keep..keep + discard` are forgotten
    /// and `keep + discard..len` move down to `keep..len - discard`, so that the next `forward`
    /// continues at `len - discard`. Positions `0..keep` (the attention sinks) stay.
    fn shift(&mut self, keep: usize, discard: usize, len: usize) -> Result<(), BackendError>;

    /// Bytes [`Backend::save`] writes for `len` cached positions.
    fn saved_bytes(&self, len: usize) -> usize;

    /// Appends the cached state of positions `0..len` to `out`: a session kept between turns
    /// while other requests use the cache.
    fn save(&self, len: usize, out: &mut Vec<u8>) -> Result<(), BackendError>;

    /// Puts back positions `0..len` from `data`, which [`Backend::save`] wrote for `len`; the
    /// next `forward` continues at `len`.
    fn load(&mut self, len: usize, data: &[u8]) -> Result<(), BackendError>;

    /// Runs `tokens` at positions `pos..pos + tokens.len()`, appending them to the KV cache,
    /// which must hold positions `0..pos` from earlier calls (anything cached at `pos..` is
    /// overwritten). Returns the logits of the last token (`n_vocab` floats), or of every token
    /// (`tokens.len() × n_vocab`, row-major) when `all_logits`.
    fn forward(
        &mut self,
        tokens: &[u32],
        pos: usize,
        all_logits: bool,
    ) -> Result<&[f32], BackendError>;
}
