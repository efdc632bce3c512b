//! `edgellm quantize`: a GGUF's matrices requantized to another type, by rounding to nearest or
//! (with a calibration text) by GPTQ against the activations the int4 engine sees.

use std::collections::BTreeMap;
use std::path::Path;

use super::export_onnx::ExportError;
use super::gptq::{self, Hessian, Hessians, MatrixReport};
use super::writer::GgufWriter;
use crate::backend::cpu::Site;
use crate::gguf::{Gguf, TensorInfo, Value};
use crate::kernels::quant::{dequantize_row, GgmlType};

/// The types `quantize` writes (`--type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum QuantType {
    #[value(name = "q4_0")]
    Q4_0,
    #[value(name = "q4_1")]
    Q4_1,
    #[value(name = "q5_0")]
    Q5_0,
    #[value(name = "q5_1")]
    Q5_1,
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_k")]
    Q4K,
    #[value(name = "q5_k")]
    Q5K,
    #[value(name = "q6_k")]
    Q6K,
}

impl QuantType {
    pub fn ggml(self) -> GgmlType {
        match self {
            QuantType::Q4_0 => GgmlType::Q4_0,
            QuantType::Q4_1 => GgmlType::Q4_1,
            QuantType::Q5_0 => GgmlType::Q5_0,
            QuantType::Q5_1 => GgmlType::Q5_1,
            QuantType::Q8_0 => GgmlType::Q8_0,
            QuantType::Q4K => GgmlType::Q4K,
            QuantType::Q5K => GgmlType::Q5K,
            QuantType::Q6K => GgmlType::Q6K,
        }
    }
}

/// llama.cpp's `general.file_type` for a file of `ty` (the K types as their "_S" mixes).
fn file_type(ty: GgmlType) -> u32 {
    match ty {
        GgmlType::Q4_0 => 2,
        GgmlType::Q4_1 => 3,
        GgmlType::Q8_0 => 7,
        GgmlType::Q5_0 => 8,
        GgmlType::Q5_1 => 9,
        GgmlType::Q4K => 14,
        GgmlType::Q5K => 16,
        GgmlType::Q6K => 18,
        _ => 0,
    }
}

/// What the calibration run saw.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Calibration {
    /// The calibration file's name (not its path) and sha256.
    pub file: String,
    pub sha256: String,
    pub tokens: usize,
    pub window: usize,
}

/// GGUF keys recording a calibrated quantization (llama.cpp records its importance matrix in
/// `quantize.imatrix.*` the same way).
pub const KEY_METHOD: &str = "edgellm.quantize.method";
pub const KEY_FILE: &str = "edgellm.quantize.calibration.file";
pub const KEY_SHA256: &str = "edgellm.quantize.calibration.sha256";
pub const KEY_TOKENS: &str = "edgellm.quantize.calibration.tokens";
pub const KEY_WINDOW: &str = "edgellm.quantize.calibration.window";

/// How much more the first position of each window counts in `H` than any other. It is the
/// attention sink: every later position attends to it, so an error in its activations reaches
/// them all. Measured on SmolLM2-135M (Q4_1 → Q4_0, 8,192 tokens of calib-licences.txt,
/// llama-perplexity on gpl-3.txt at ctx 512): weight 1 → 19.75, 10 → 19.18, 50 → 18.96,
/// 200 → 19.11; leaving the first 4 positions out altogether → 659.
pub const FIRST_WEIGHT: f32 = 50.0;

/// Runs the int4 engine on `gguf` over `text` (at most `max_tokens` tokens, windows of
/// `window`) and sums `x xᵀ` at every matrix input (the LM head's only with `head`: it
/// costs the logits of every position). `progress(done, total)` per window.
pub fn collect(
    gguf: &Path,
    text: &str,
    window: usize,
    max_tokens: usize,
    head: bool,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(Hessians, usize), ExportError> {
    let ids = super::calibrate::tokens(gguf, text, max_tokens)?;
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Hessians::new()));
    let sink = seen.clone();
    let position = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let at = position.clone();
    let observer = Box::new(move |layer, site: Site, v: &[f32], cols: usize| {
        if !gptq::is_input(site) || (site == Site::HeadIn && !head) || cols == 0 {
            return;
        }
        let Ok(mut hs) = sink.lock() else {
            return;
        };
        let h = hs
            .entry((layer, site))
            .or_insert_with(|| Hessian::new(cols));
        if at.load(std::sync::atomic::Ordering::Relaxed) == 0 && v.len() >= cols {
            let first: Vec<f32> = v[..cols].iter().map(|x| x * FIRST_WEIGHT.sqrt()).collect();
            h.add(&first);
            h.add(&v[cols..]);
        } else {
            h.add(v);
        }
    });
    super::calibrate::run(
        gguf,
        &ids,
        window,
        head,
        observer,
        Some(&position),
        progress,
    )?;
    let mut hs = seen
        .lock()
        .map(|mut h| std::mem::take(&mut *h))
        .unwrap_or_default();
    for h in hs.values_mut() {
        h.finish();
    }
    Ok((hs, ids.len()))
}

/// What [`requantize`] did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct QuantizeReport {
    /// Matrices converted, and those of them quantized by GPTQ.
    pub matrices: usize,
    pub calibrated: usize,
    /// Σ `eᵀ H e` over the calibrated matrices: as written, and as plain rounding would have it.
    pub error: f64,
    pub plain_error: f64,
    /// Rows where plain rounding was the better of the two.
    pub plain_rows: usize,
}

/// A copy of `g` with its 2-D weight matrices re-encoded as `ty`, as `llama-quantize
/// --allow-requantize` does for the non-K types: the token embeddings (which are also the output
/// matrix when tied) keep their type when they are Q8_0 or better, 1-D tensors stay F32, and
/// `general.file_type` is updated. With `calibration`, each matrix whose input has a second
/// moment in `hessians` is quantized by GPTQ, and the file records how.
/// `progress(done, total)` counts the matrices.
pub fn requantize(
    g: &Gguf,
    ty: GgmlType,
    calibration: Option<(&Hessians, &Calibration)>,
    progress: &mut dyn FnMut(usize, usize),
) -> (Vec<u8>, QuantizeReport) {
    let mut w = GgufWriter::new();
    for k in &g.keys {
        // What an earlier quantization recorded no longer describes this file.
        if k.starts_with("quantize.imatrix.") || k.starts_with("edgellm.quantize.") {
            continue;
        }
        if k == "general.file_type" {
            w.kv(k, Value::U32(file_type(ty)));
        } else {
            w.kv(k, g.metadata[k].clone());
        }
    }
    if let Some((_, c)) = calibration {
        w.kv_str(KEY_METHOD, "gptq");
        w.kv_str(KEY_FILE, &c.file);
        w.kv_str(KEY_SHA256, &c.sha256);
        w.kv_u32(KEY_TOKENS, c.tokens as u32);
        w.kv_u32(KEY_WINDOW, c.window as u32);
    }
    let n_layer = match g.metadata.get("general.architecture") {
        Some(Value::String(a)) => g
            .metadata
            .get(&format!("{a}.block_count"))
            .and_then(Value::as_u64),
        _ => None,
    }
    .unwrap_or(0) as usize;
    let tied = g.tensor("output.weight").is_none();
    // The matrices to convert, grouped by the input they read (one factorization each).
    let mut by_site: BTreeMap<Option<(usize, Site)>, Vec<usize>> = BTreeMap::new();
    for (i, t) in g.tensors.iter().enumerate() {
        if converts(g, t, ty) {
            let site = calibration
                .and_then(|(hs, _)| {
                    gptq::input_site(&t.name, n_layer, tied).filter(|s| hs.contains_key(s))
                })
                .filter(|_| gptq::supports(ty));
            by_site.entry(site).or_default().push(i);
        }
    }
    let total: usize = by_site.values().map(Vec::len).sum();
    let mut out: Vec<Option<Vec<u8>>> = vec![None; g.tensors.len()];
    let mut report = QuantizeReport::default();
    let mut done = 0;
    let prepare = |site: &Option<(usize, Site)>| match (site, calibration) {
        (Some(s), Some((hs, _))) => Some((&hs[s], gptq::prepare(&hs[s], true))),
        _ => None,
    };
    let sites: Vec<_> = by_site.iter().collect();
    std::thread::scope(|scope| {
        // The next input's factorization runs beside this one's matrices.
        let mut prepared = sites.first().and_then(|(s, _)| prepare(s));
        for (k, (_, tensors)) in sites.iter().enumerate() {
            let next = sites
                .get(k + 1)
                .map(|(s, _)| scope.spawn(move || prepare(s)));
            for &i in tensors.iter() {
                let t = &g.tensors[i];
                let cols = t.dims[0] as usize;
                let weights = dequantize(g, t);
                let bytes = match &prepared {
                    Some((h, prep)) if h.n == cols => {
                        let (bytes, r) = gptq::gptq(ty, &weights, cols, h, prep);
                        add(&mut report, r);
                        bytes
                    }
                    _ => weights
                        .chunks_exact(cols)
                        .flat_map(|r| gptq::quantize_plain(ty, r))
                        .collect(),
                };
                out[i] = Some(bytes);
                report.matrices += 1;
                done += 1;
                progress(done, total);
            }
            prepared = next.and_then(|j| j.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
        }
    });
    for (t, o) in g.tensors.iter().zip(out) {
        match o {
            Some(bytes) => w.tensor(&t.name, &t.dims, ty, bytes),
            None => w.tensor(&t.name, &t.dims, t.ty, g.tensor_data(t).to_vec()),
        };
    }
    (w.to_bytes(), report)
}

/// Whether `requantize` re-encodes `t` as `ty`: 2-D matrices whose rows divide into `ty`'s
/// blocks, except token embeddings of Q8_0 or better that are also the output (tied).
fn converts(g: &Gguf, t: &TensorInfo, ty: GgmlType) -> bool {
    let keep_embd = matches!(
        g.tensor("token_embd.weight").map(|t| t.ty),
        Some(GgmlType::Q8_0 | GgmlType::F16 | GgmlType::F32)
    ) && g.tensor("output.weight").is_none();
    t.dims.len() == 2
        && t.ty != ty
        && t.ty.supported()
        && t.dims[0].is_multiple_of(ty.block_size() as u64)
        && !(keep_embd && t.name == "token_embd.weight")
}

/// Whether quantizing `g` to `ty` converts the LM head (so calibration must see its input at
/// every position).
pub fn converts_head(g: &Gguf, ty: GgmlType) -> bool {
    let head = g
        .tensor("output.weight")
        .or_else(|| g.tensor("token_embd.weight"));
    head.is_some_and(|t| converts(g, t, ty))
}

fn add(report: &mut QuantizeReport, r: MatrixReport) {
    report.calibrated += 1;
    report.error += r.error;
    report.plain_error += r.plain_error;
    report.plain_rows += r.plain_rows;
}

/// A matrix's values as f32, row-major.
fn dequantize(g: &Gguf, t: &TensorInfo) -> Vec<f32> {
    let cols = t.dims[0] as usize;
    let data = g.tensor_data(t);
    let rb = t.ty.row_bytes(cols);
    let mut out = vec![0f32; data.len() / rb * cols];
    for (r, o) in data.chunks_exact(rb).zip(out.chunks_exact_mut(cols)) {
        dequantize_row(t.ty, r, o);
    }
    out
}
