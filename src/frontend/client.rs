//! The daemon's client side, for `edgellm ask` and `edgellm status`: one request over the Unix
//! socket, its streamed text written out as it arrives. Requests and replies are the wire types
//! of [`crate::api::wire`], the same the daemon speaks.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use serde::Serialize;

use crate::api::status::Status;
use crate::api::wire::{GenerateBody, Operation, Response};
use crate::api::{Completion, ErrorCode};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error("talking to the daemon")]
    Io(#[from] std::io::Error),
    /// The daemon answered with an error reply.
    #[error("the daemon answered {}: {message}", code.as_str())]
    Daemon { code: ErrorCode, message: String },
    #[error("unexpected reply from the daemon: {0}")]
    Protocol(String),
}

/// Connects to the daemon's socket.
pub fn connect(path: &Path) -> std::io::Result<UnixStream> {
    UnixStream::connect(path)
}

fn send(
    stream: &mut UnixStream,
    request: &impl Serialize,
) -> Result<BufReader<UnixStream>, ClientError> {
    let mut line =
        serde_json::to_string(request).map_err(|e| ClientError::Protocol(e.to_string()))?;
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

/// The next reply; an `error` reply is [`ClientError::Daemon`].
fn read_reply(reader: &mut BufReader<UnixStream>) -> Result<Response, ClientError> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(ClientError::Protocol(
            "the daemon closed the connection".into(),
        ));
    }
    let r: Response = serde_json::from_str(&line)
        .map_err(|e| ClientError::Protocol(format!("{e}: {}", line.trim_end())))?;
    match r {
        Response::Error { code, message, .. } => Err(ClientError::Daemon { code, message }),
        r => Ok(r),
    }
}

/// The daemon's status reply.
pub fn status(stream: &mut UnixStream) -> Result<Status, ClientError> {
    let mut reader = send(
        stream,
        &Operation::Status {
            id: None,
            reply_to: None,
        },
    )?;
    match read_reply(&mut reader)? {
        Response::Status(s) => Ok(*s),
        other => Err(ClientError::Protocol(other.to_line())),
    }
}

/// Sends a generate request (`stream` is forced on) and writes its text to `out` as it comes.
pub fn generate<W: Write>(
    stream: &mut UnixStream,
    mut request: GenerateBody,
    mut out: W,
) -> Result<Completion, ClientError> {
    request.stream = true;
    let mut reader = send(stream, &request)?;
    loop {
        match read_reply(&mut reader)? {
            Response::Token { text, .. } => {
                out.write_all(text.as_bytes())?;
                out.flush()?;
            }
            done @ Response::Done { .. } => {
                return done
                    .into_completion()
                    .ok_or_else(|| ClientError::Protocol("done reply".into()));
            }
            other => return Err(ClientError::Protocol(other.to_line())),
        }
    }
}
