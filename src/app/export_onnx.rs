//! `edgellm export-onnx`: a GGUF as an ONNX model folder in onnxruntime-genai's layout, its
//! int4 blocks kept, for the ORT backend.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use edgellm::convert::export_onnx::export_with_progress;

#[derive(Args)]
pub struct ExportOnnxArgs {
    /// GGUF model file
    model: PathBuf,
    /// Output folder (created)
    out: PathBuf,
    /// MatMulNBits' accuracy level: 4 quantizes activations to 8 bits (fast, as the int4
    /// engine's kernels do), 1 computes in f32 (as its reference kernels do)
    #[arg(long, default_value_t = 4)]
    accuracy_level: i64,
}

pub fn run(a: ExportOnnxArgs) -> Result<()> {
    let bar = super::progress::counter("exporting", 1, "layers");
    let r = export_with_progress(&a.model, &a.out, a.accuracy_level, &mut |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    });
    bar.finish_and_clear();
    let r = r.with_context(|| format!("exporting {}", a.model.display()))?;
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}
