//! `edgellm config`: the documented default config, or a config file checked and printed
//! resolved.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;

use edgellm::config::{Config, DEFAULT_TOML};
use edgellm::frontend::{mqtt, unix};

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
        // What `serve` checks beyond the file itself: the socket's group exists, the MQTT
        // settings (credentials, TLS files) are complete and readable.
        if let Some(g) = &c.socket.group {
            unix::resolve_group(g).map_err(|e| UsageError(format!("{}: {e}", p.display())))?;
        }
        if c.mqtt.enabled {
            mqtt::Settings::from_config(&c.mqtt, c.limits.max_line_bytes, c.queue.capacity)
                .map_err(|e| UsageError(format!("{}: {e}", p.display())))?;
        }
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
