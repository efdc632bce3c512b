//! One calibration run: the int4 engine over a text, every window from an empty cache, with an
//! observer seeing the activations at each matrix product (see [`Site`]). The NPU export takes
//! activation ranges from it, calibrated quantization the inputs' second moments.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::backend::cpu::model::ModelError;
use crate::backend::cpu::{CpuBackend, CpuOptions, Observer};
use crate::backend::Backend;
use crate::gguf::Gguf;

use super::export_onnx::ExportError;

/// Positions per forward call.
const BATCH: usize = 64;

/// The calibration text's tokens, at most `max_tokens` of them (at least 16 are needed).
pub fn tokens(gguf: &Path, text: &str, max_tokens: usize) -> Result<Vec<u32>, ExportError> {
    let g = Gguf::open(gguf).map_err(ModelError::from)?;
    let tok = crate::engine::tokenizer::Tokenizer::from_gguf(&g, gguf.parent())
        .map_err(|e| ExportError::Unsupported(format!("tokenizer: {e}")))?;
    let mut ids = tok
        .encode(text)
        .map_err(|e| ExportError::Unsupported(format!("calibration text: {e}")))?;
    ids.truncate(max_tokens);
    if ids.len() < 16 {
        return Err(ExportError::Unsupported(format!(
            "the calibration text is {} tokens: at least 16 are needed",
            ids.len()
        )));
    }
    Ok(ids)
}

/// Runs the model in `gguf` over `ids` in windows of `window` positions with `observer`
/// installed (with `all_logits`, the head runs on every position, so the observer sees its
/// input for all of them); `progress(done, total)` after each window. `position`, if given, holds the
/// position in its window of the first row the observer is about to see.
pub fn run(
    gguf: &Path,
    ids: &[u32],
    window: usize,
    all_logits: bool,
    observer: Observer,
    position: Option<&AtomicUsize>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(), ExportError> {
    let g = Gguf::open(gguf).map_err(ModelError::from)?;
    let window = window.max(BATCH);
    let mut cpu = CpuBackend::load(
        g,
        &CpuOptions {
            n_ctx: window,
            max_batch: BATCH,
            logit_rows: BATCH,
            ..Default::default()
        },
    )?;
    cpu.set_observer(Some(observer));
    let windows: Vec<&[u32]> = ids.chunks(window).collect();
    for (i, w) in windows.iter().enumerate() {
        cpu.reset();
        for (j, part) in w.chunks(BATCH).enumerate() {
            if let Some(p) = position {
                p.store(j * BATCH, Ordering::Relaxed);
            }
            cpu.forward(part, j * BATCH, all_logits)
                .map_err(|e| ExportError::Unsupported(format!("calibration run: {e}")))?;
        }
        progress(i + 1, windows.len());
    }
    cpu.set_observer(None);
    Ok(())
}
