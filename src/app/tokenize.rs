//! `edgellm tokenize`: the token ids of a text as a JSON array (special tokens parsed), with
//! the model's own tokenizer.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use edgellm::engine::tokenizer::Tokenizer;
use edgellm::gguf::Gguf;

use super::{model_path, read_arg};

#[derive(Args)]
pub struct TokenizeArgs {
    /// GGUF model file
    #[arg(long, short = 'm')]
    model: Option<PathBuf>,
    /// Text to tokenize; "-" reads stdin
    text: String,
}

pub fn run(a: TokenizeArgs) -> Result<()> {
    let text = read_arg(a.text)?;
    let path = model_path(a.model.as_deref())?;
    let shown = path.display();
    let g = Gguf::open(&path).with_context(|| format!("loading {shown}"))?;
    let tok =
        Tokenizer::from_gguf(&g, path.parent()).with_context(|| format!("loading {shown}"))?;
    let ids = tok.encode(&text)?;
    println!("{}", serde_json::to_string(&ids)?);
    Ok(())
}
