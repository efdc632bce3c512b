//! `edgellm quantize`: a GGUF's layer matrices requantized to another type (as
//! `llama-quantize --allow-requantize`), written next to the target and renamed into place.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use edgellm::convert::quantize::{requantize, QuantType};
use edgellm::gguf::Gguf;

#[derive(Args)]
pub struct QuantizeArgs {
    input: PathBuf,
    output: PathBuf,
    /// Target type of the layer matrices
    #[arg(long = "type", value_enum, ignore_case = true)]
    ty: QuantType,
}

pub fn run(a: QuantizeArgs) -> Result<()> {
    let ty = a.ty.ggml();
    let g = Gguf::open(&a.input).with_context(|| format!("reading {}", a.input.display()))?;
    let bytes = requantize(&g, ty);
    let tmp = a.output.with_extension("part");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &a.output).with_context(|| format!("writing {}", a.output.display()))?;
    eprintln!("wrote {} ({})", a.output.display(), ty.name());
    Ok(())
}
