//! `edgellm export-onnx`: a GGUF as an ONNX model folder in onnxruntime-genai's layout, its
//! int4 blocks kept, for the ORT backend; or, with `--target qnn`, static-shape QDQ graphs for
//! an NPU (`convert::export_npu`).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};

use edgellm::convert::export_npu::{export_npu, NpuExport};
use edgellm::convert::export_onnx::export_with_progress;

use super::UsageError;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Target {
    /// onnxruntime-genai's layout, int4 MatMulNBits: ONNX Runtime's CPU (and GPU) providers
    Genai,
    /// Static shapes, int8 weights and 16-bit activations in QDQ form: Qualcomm's NPU (HTP)
    /// through the QNN execution provider
    Qnn,
}

#[derive(Args)]
pub struct ExportOnnxArgs {
    /// GGUF model file
    model: PathBuf,
    /// Output folder (created)
    out: PathBuf,
    /// What the graph is for
    #[arg(long, value_enum, default_value_t = Target::Genai)]
    target: Target,
    /// MatMulNBits' accuracy level: 4 quantizes activations to 8 bits (fast, as the int4
    /// engine's kernels do), 1 computes in f32 (as its reference kernels do)
    #[arg(long, default_value_t = 4)]
    accuracy_level: i64,
    /// --target qnn: text whose activations set the quantization ranges (run through the int4
    /// engine); required
    #[arg(long)]
    calibrate: Option<PathBuf>,
    /// --target qnn: the context window the graphs take (fixed at export)
    #[arg(long, default_value_t = 512)]
    n_ctx: usize,
    /// --target qnn: tokens of the prefill graph
    #[arg(long, default_value_t = 32)]
    chunk: usize,
    /// --target qnn: most calibration tokens used
    #[arg(long, default_value_t = 4096)]
    calib_tokens: usize,
}

pub fn run(a: ExportOnnxArgs) -> Result<()> {
    if a.target == Target::Qnn {
        let Some(calibrate) = a.calibrate.clone() else {
            bail!(UsageError(
                "--target qnn needs --calibrate FILE: a text whose activations set the 16-bit ranges (a few thousand tokens of prose)".into()
            ));
        };
        let bar = super::progress::counter("calibrating", 1, "windows");
        let opts = NpuExport {
            n_ctx: a.n_ctx,
            chunk: a.chunk,
            calibrate,
            calib_tokens: a.calib_tokens,
            ..Default::default()
        };
        let r = export_npu(&a.model, &a.out, &opts, &mut |stage, done, total| {
            bar.set_message(stage.to_string());
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        });
        bar.finish_and_clear();
        let r = r.with_context(|| format!("exporting {}", a.model.display()))?;
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    if a.calibrate.is_some() {
        bail!(UsageError(
            "--calibrate is for --target qnn (the genai graph keeps the GGUF's int4 blocks)".into()
        ));
    }
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
