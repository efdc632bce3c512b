//! The daemon's client side, for `edgellm ask` and `edgellm status`: one request over the Unix
//! socket, its streamed text written out as it arrives.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use serde_json::Value;

use crate::queue::Completion;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error("talking to the daemon")]
    Io(#[from] std::io::Error),
    /// The daemon answered with an error reply.
    #[error("the daemon answered {code}: {message}")]
    Daemon { code: String, message: String },
    #[error("unexpected reply from the daemon: {0}")]
    Protocol(String),
}

/// Connects to the daemon's socket.
pub fn connect(path: &Path) -> std::io::Result<UnixStream> {
    UnixStream::connect(path)
}

fn send(stream: &mut UnixStream, request: &Value) -> Result<BufReader<UnixStream>, ClientError> {
    let mut line = request.to_string();
    line.push('\n');
    let written = stream.write_all(line.as_bytes());
    let mut reader = BufReader::new(stream.try_clone()?);
    if let Err(e) = written {
        // A daemon that refuses this peer says why and closes, possibly before the request is
        // written: its reply is the better error.
        return Err(match read_reply(&mut reader) {
            Err(daemon @ ClientError::Daemon { .. }) => daemon,
            _ => e.into(),
        });
    }
    Ok(reader)
}

fn read_reply(reader: &mut BufReader<UnixStream>) -> Result<Value, ClientError> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(ClientError::Protocol(
            "the daemon closed the connection".into(),
        ));
    }
    let v: Value = serde_json::from_str(&line)
        .map_err(|e| ClientError::Protocol(format!("{e}: {}", line.trim_end())))?;
    if v["type"] == "error" {
        return Err(ClientError::Daemon {
            code: v["code"].as_str().unwrap_or("?").to_string(),
            message: v["message"].as_str().unwrap_or("").to_string(),
        });
    }
    Ok(v)
}

/// The daemon's status reply.
pub fn status(stream: &mut UnixStream) -> Result<Value, ClientError> {
    let mut reader = send(stream, &serde_json::json!({"op": "status"}))?;
    read_reply(&mut reader)
}

/// Sends a generate request (`stream` is forced on) and writes its text to `out` as it comes.
pub fn generate<W: Write>(
    stream: &mut UnixStream,
    mut request: Value,
    mut out: W,
) -> Result<Completion, ClientError> {
    request["stream"] = Value::Bool(true);
    let mut reader = send(stream, &request)?;
    loop {
        let v = read_reply(&mut reader)?;
        match v["type"].as_str() {
            Some("token") => {
                out.write_all(v["text"].as_str().unwrap_or("").as_bytes())?;
                out.flush()?;
            }
            Some("done") => {
                return serde_json::from_value(v)
                    .map_err(|e| ClientError::Protocol(format!("done reply: {e}")));
            }
            _ => return Err(ClientError::Protocol(v.to_string())),
        }
    }
}
