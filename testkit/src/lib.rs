//! Test helpers for edgellm, kept out of the shipped library (a dev-dependency of the workspace).
//!
//! Synthetic models: small llama/qwen2 GGUF files with seeded random weights and a byte-level
//! BPE vocabulary, written with `edgellm::convert::writer`. They exercise every code path
//! of the engine (load, tokenizer, template, forward, sampling) in milliseconds, on any target,
//! including aarch64 under qemu.

use edgellm::convert::writer::GgufWriter;
use edgellm::engine::sampler::Rng;
use edgellm::engine::tokenizer::byte_level_chars;
use edgellm::gguf::Value;
use edgellm::kernels::quant::{quantize, GgmlType};

/// Shape and types of a synthetic model.
#[derive(Debug, Clone)]
pub struct SynthSpec {
    pub arch: &'static str,
    pub n_layer: usize,
    pub dim: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub ffn: usize,
    pub ctx: usize,
    /// Type of the big matrices.
    pub wtype: GgmlType,
    /// Type of the embeddings (tied output unless `separate_output`).
    pub embd_type: GgmlType,
    pub separate_output: bool,
    pub seed: u64,
    /// Control tokens `<|pad0|>`, … appended until the vocabulary has at least this many
    /// (0: the 263 tokens of [`vocab`]): a multiple of 8 lets the kernels repack the tied
    /// embeddings.
    pub min_vocab: usize,
}

impl Default for SynthSpec {
    fn default() -> Self {
        SynthSpec {
            arch: "llama",
            n_layer: 2,
            dim: 64,
            n_head: 4,
            n_kv_head: 2,
            ffn: 128,
            ctx: 256,
            wtype: GgmlType::Q4_1,
            embd_type: GgmlType::Q8_0,
            separate_output: false,
            seed: 42,
            min_vocab: 0,
        }
    }
}

/// The vocabulary: three control tokens, the 256 bytes, then a few merged tokens.
pub fn vocab() -> (Vec<String>, Vec<i32>, Vec<String>) {
    let bc = byte_level_chars();
    let mut tokens: Vec<String> = vec![
        "<|endoftext|>".into(),
        "<|im_start|>".into(),
        "<|im_end|>".into(),
    ];
    let mut types = vec![3, 3, 3];
    for c in &bc {
        tokens.push(c.to_string());
        types.push(1);
    }
    let sp = bc[b' ' as usize];
    let merges = vec![
        "h e".to_string(),
        "l l".to_string(),
        "he ll".to_string(),
        format!("{sp} t"),
    ];
    for m in ["he", "ll", "hell"] {
        tokens.push(m.into());
        types.push(1);
    }
    tokens.push(format!("{sp}t"));
    types.push(1);
    (tokens, types, merges)
}

fn randn(rng: &mut Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| (rng.next_f32() * 2.0 - 1.0) * scale)
        .collect()
}

/// The bytes of a synthetic GGUF model.
pub fn synth_model(spec: &SynthSpec) -> Vec<u8> {
    let (mut tokens, mut types, merges) = vocab();
    while tokens.len() < spec.min_vocab {
        tokens.push(format!("<|pad{}|>", tokens.len()));
        types.push(3);
    }
    let vocab = tokens.len();
    let hd = spec.dim / spec.n_head;
    let (qd, kvd) = (spec.n_head * hd, spec.n_kv_head * hd);
    let a = spec.arch;
    let mut w = GgufWriter::new();
    w.kv_str("general.architecture", a)
        .kv_str("general.name", "synthetic")
        .kv_u32(&format!("{a}.block_count"), spec.n_layer as u32)
        .kv_u32(&format!("{a}.context_length"), spec.ctx as u32)
        .kv_u32(&format!("{a}.embedding_length"), spec.dim as u32)
        .kv_u32(&format!("{a}.feed_forward_length"), spec.ffn as u32)
        .kv_u32(&format!("{a}.attention.head_count"), spec.n_head as u32)
        .kv_u32(
            &format!("{a}.attention.head_count_kv"),
            spec.n_kv_head as u32,
        )
        .kv_f32(&format!("{a}.rope.freq_base"), 10000.0)
        .kv_f32(&format!("{a}.attention.layer_norm_rms_epsilon"), 1e-5)
        .kv_str("tokenizer.ggml.model", "gpt2")
        .kv_str("tokenizer.ggml.pre", "default")
        .kv_strs("tokenizer.ggml.tokens", &tokens)
        .kv_i32s("tokenizer.ggml.token_type", &types)
        .kv_strs("tokenizer.ggml.merges", &merges)
        .kv_u32("tokenizer.ggml.bos_token_id", 1)
        .kv_u32("tokenizer.ggml.eos_token_id", 2)
        .kv("tokenizer.ggml.add_bos_token", Value::Bool(false));
    let mut rng = Rng::new(spec.seed);
    let ones = |n: usize, rng: &mut Rng| -> Vec<u8> {
        // Norm weights near 1 so activations keep their scale through the layers.
        let v: Vec<f32> = (0..n).map(|_| 0.8 + 0.4 * rng.next_f32()).collect();
        quantize(GgmlType::F32, &v)
    };
    let mat = |rows: usize, cols: usize, ty: GgmlType, rng: &mut Rng| -> Vec<u8> {
        let scale = 1.0 / (cols as f32).sqrt() * 1.7;
        quantize(ty, &randn(rng, rows * cols, scale))
    };
    let (d, f) = (spec.dim as u64, spec.ffn as u64);
    w.tensor(
        "token_embd.weight",
        &[d, vocab as u64],
        spec.embd_type,
        mat(vocab, spec.dim, spec.embd_type, &mut rng),
    );
    for l in 0..spec.n_layer {
        let p = |s: &str| format!("blk.{l}.{s}");
        let t = spec.wtype;
        w.tensor(
            &p("attn_norm.weight"),
            &[d],
            GgmlType::F32,
            ones(spec.dim, &mut rng),
        );
        w.tensor(
            &p("attn_q.weight"),
            &[d, qd as u64],
            t,
            mat(qd, spec.dim, t, &mut rng),
        );
        w.tensor(
            &p("attn_k.weight"),
            &[d, kvd as u64],
            t,
            mat(kvd, spec.dim, t, &mut rng),
        );
        w.tensor(
            &p("attn_v.weight"),
            &[d, kvd as u64],
            t,
            mat(kvd, spec.dim, t, &mut rng),
        );
        if a == "qwen2" {
            for (n, len) in [
                ("attn_q.bias", qd),
                ("attn_k.bias", kvd),
                ("attn_v.bias", kvd),
            ] {
                let b = randn(&mut rng, len, 0.5);
                w.tensor(
                    &p(n),
                    &[len as u64],
                    GgmlType::F32,
                    quantize(GgmlType::F32, &b),
                );
            }
        }
        w.tensor(
            &p("attn_output.weight"),
            &[qd as u64, d],
            t,
            mat(spec.dim, qd, t, &mut rng),
        );
        w.tensor(
            &p("ffn_norm.weight"),
            &[d],
            GgmlType::F32,
            ones(spec.dim, &mut rng),
        );
        w.tensor(
            &p("ffn_gate.weight"),
            &[d, f],
            t,
            mat(spec.ffn, spec.dim, t, &mut rng),
        );
        w.tensor(
            &p("ffn_up.weight"),
            &[d, f],
            t,
            mat(spec.ffn, spec.dim, t, &mut rng),
        );
        w.tensor(
            &p("ffn_down.weight"),
            &[f, d],
            t,
            mat(spec.dim, spec.ffn, t, &mut rng),
        );
    }
    w.tensor(
        "output_norm.weight",
        &[d],
        GgmlType::F32,
        ones(spec.dim, &mut rng),
    );
    if spec.separate_output {
        w.tensor(
            "output.weight",
            &[d, vocab as u64],
            spec.wtype,
            mat(vocab, spec.dim, spec.wtype, &mut rng),
        );
    }
    w.to_bytes()
}

/// Seeded uniform values in [-scale, scale).
pub fn random_f32(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    randn(&mut Rng::new(seed), n, scale)
}

/// The int4 engine on a GGUF file, as `edgellm serve` builds it.
pub fn cpu_engine(
    path: &std::path::Path,
    opts: &edgellm::backend::cpu::CpuOptions,
) -> Result<edgellm::engine::Engine, edgellm::engine::EngineError> {
    let backend = edgellm::backend::cpu::CpuBackend::open(path, opts)
        .map_err(edgellm::backend::OpenError::from)?;
    edgellm::engine::Engine::from_backend(Box::new(backend))
}

/// ONNX Runtime on an ONNX model folder, as `edgellm serve` builds it.
pub fn ort_engine(
    dir: &std::path::Path,
    opts: &edgellm::backend::ort::OrtOptions,
) -> Result<edgellm::engine::Engine, edgellm::engine::EngineError> {
    let backend = edgellm::backend::ort::OrtBackend::open(dir, opts)
        .map_err(edgellm::backend::OpenError::from)?;
    edgellm::engine::Engine::from_backend(Box::new(backend))
}
