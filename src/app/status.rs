//! `edgellm status`: the running daemon's status reply, as JSON.

use anyhow::{Context, Result};
use clap::Args;

use edgellm::api::wire::Response;
use edgellm::frontend::client;

use super::{socket_path, DaemonArgs};

#[derive(Args)]
pub struct StatusArgs {
    #[command(flatten)]
    d: DaemonArgs,
}

pub fn run(a: StatusArgs) -> Result<()> {
    let sock = socket_path(&a.d)?;
    let mut stream = client::connect(&sock)
        .with_context(|| format!("no daemon answers at {}", sock.display()))?;
    let status = client::status(&mut stream)?;
    // The reply as the daemon sent it, `type` included.
    let reply = Response::Status(Box::new(status));
    println!("{}", serde_json::to_string_pretty(&reply)?);
    Ok(())
}
