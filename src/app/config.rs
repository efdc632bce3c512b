//! `edgellm config`: the documented default config, or a config file checked and printed
//! resolved.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;

use edgellm::config::{Config, DEFAULT_TOML};

use super::UsageError;

#[derive(Args)]
pub struct ConfigArgs {
    /// Print the documented default config
    #[arg(long, conflicts_with = "check")]
    print_default: bool,
    /// Check this config file and print it resolved
    #[arg(long)]
    check: Option<PathBuf>,
}

pub fn run(a: ConfigArgs) -> Result<()> {
    if let Some(p) = a.check {
        let c = Config::load(&p)?;
        eprintln!("{}: valid", p.display());
        print!("{}", toml::to_string_pretty(&c)?);
    } else if a.print_default {
        print!("{DEFAULT_TOML}");
    } else {
        bail!(UsageError(
            "edgellm config: give --print-default or --check FILE".into()
        ));
    }
    Ok(())
}
