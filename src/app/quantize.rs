//! `edgellm quantize`: a GGUF's layer matrices requantized to another type, rounded to nearest
//! (as `llama-quantize --allow-requantize`) or, with `--calibrate FILE`, by GPTQ against the
//! activations the int4 engine sees on that text. Written next to the target and renamed into
//! place; a JSON report on stdout.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use edgellm::convert::quantize::{collect, converts_head, requantize, Calibration, QuantType};
use edgellm::gguf::Gguf;
use edgellm::models;

use super::UsageError;

#[derive(Args)]
pub struct QuantizeArgs {
    input: PathBuf,
    output: PathBuf,
    /// Target type of the layer matrices
    #[arg(long = "type", value_enum, ignore_case = true)]
    ty: QuantType,
    /// A text to calibrate on: the model runs over it and each matrix is quantized to keep its
    /// outputs on these activations (GPTQ); without it, round to nearest
    #[arg(long)]
    calibrate: Option<PathBuf>,
    /// Most calibration tokens used (the text's first ones)
    #[arg(long, default_value_t = 8192, value_parser = clap::value_parser!(u32).range(16..=1_000_000))]
    calib_tokens: u32,
    /// Window of the calibration run: the text is read in pieces of this many tokens, each
    /// from an empty cache (llama-imatrix's --ctx-size)
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u32).range(64..=32768))]
    ctx: u32,
}

pub fn run(a: QuantizeArgs) -> Result<()> {
    let ty = a.ty.ggml();
    let g = Gguf::open(&a.input).with_context(|| format!("reading {}", a.input.display()))?;
    let started = std::time::Instant::now();
    let calibration = match &a.calibrate {
        None => None,
        Some(path) => {
            let text = std::fs::read(path)
                .with_context(|| format!("reading the calibration text {}", path.display()))?;
            let text = String::from_utf8(text).map_err(|_| {
                UsageError(format!("--calibrate {}: not UTF-8 text", path.display()))
            })?;
            let bar = super::progress::counter("calibrating", 1, "windows");
            let r = collect(
                &a.input,
                &text,
                a.ctx as usize,
                a.calib_tokens as usize,
                converts_head(&g, ty),
                &mut |done, total| {
                    bar.set_length(total as u64);
                    bar.set_position(done as u64);
                },
            );
            bar.finish_and_clear();
            let (hessians, tokens) =
                r.with_context(|| format!("calibrating on {}", path.display()))?;
            let info = Calibration {
                file: path
                    .file_name()
                    .map(|f| f.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                sha256: models::sha256_bytes(text.as_bytes()),
                tokens,
                window: a.ctx as usize,
            };
            tracing::info!(
                tokens,
                inputs = hessians.len(),
                seconds = started.elapsed().as_secs_f32(),
                "calibrated"
            );
            Some((hessians, info))
        }
    };
    let calibration_seconds = started.elapsed().as_secs_f64();
    let bar = super::progress::counter("quantizing", 1, "matrices");
    let (bytes, report) = requantize(
        &g,
        ty,
        calibration.as_ref().map(|(h, c)| (h, c)),
        &mut |done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        },
    );
    bar.finish_and_clear();
    let tmp = a.output.with_extension("part");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &a.output).with_context(|| format!("writing {}", a.output.display()))?;
    eprintln!(
        "wrote {} ({}{}) in {:.1} s",
        a.output.display(),
        ty.name(),
        if calibration.is_some() { ", GPTQ" } else { "" },
        started.elapsed().as_secs_f32()
    );
    let json = serde_json::json!({
        "output": a.output.display().to_string(),
        "type": ty.name(),
        "method": if calibration.is_some() { "gptq" } else { "round-to-nearest" },
        "calibration": calibration.as_ref().map(|(_, c)| c),
        "report": report,
        "calibration_seconds": calibration_seconds,
        "seconds": started.elapsed().as_secs_f64(),
    });
    println!("{json}");
    Ok(())
}
