//! Backends run the model: token ids in, logits out, with the KV cache kept inside the backend.
//!
//! - [`cpu`]: the int4 CPU engine on a memory-mapped GGUF (this crate's own kernels).
//! - [`ort`]: ONNX Runtime through an execution provider chain, on an ONNX decoder folder.
//!
//! The engine (tokenizer, chat template, sampler, generation loop) only sees [`Backend`].

pub mod cpu;
pub mod ort;

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

    fn n_vocab(&self) -> usize;

    /// Context window: the number of positions the KV cache holds.
    fn n_ctx(&self) -> usize;

    /// Most tokens one `forward` call takes; longer prompts are fed in chunks.
    fn max_batch(&self) -> usize;

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
