//! The Unix socket front-end: newline-delimited JSON (see [`crate::api::wire`]).
//!
//! One tokio task per connection reads requests, hands them to the queue, and writes what comes
//! back on the connection's reply channel, so a slow client only slows itself. Peers are checked
//! with SO_PEERCRED against the configured uids and gids. When a client goes away (its socket
//! hung up, or a write fails) its requests are cancelled; a client that only shut down its
//! sending side (`nc -N`, `socat`) still gets its replies. On shutdown the accept loop stops and
//! each connection ends once its last request has its terminal reply.

use std::collections::HashSet;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;
use tokio_util::codec::{Decoder, LinesCodec, LinesCodecError};

use super::{until_true, Context};
use crate::api::wire::{self, Incoming, Refusal, Response};
use crate::api::ErrorCode;
use crate::queue::{Job, Reply};

/// How often a connection that has read EOF checks whether its peer hung up entirely.
const HANGUP_POLL: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SocketError {
    #[error("socket {path}: another edgellm daemon is running and listening there")]
    InUse { path: PathBuf },
    #[error("socket {path}: the path exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error("socket {path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("socket.group = {group:?}: no such group")]
    NoGroup { group: String },
    #[error("LISTEN_FDS: {0}")]
    Activation(String),
}

/// Who may connect, and the socket file's permissions.
#[derive(Debug, Clone, Default)]
pub struct Access {
    pub allowed_uids: Vec<u32>,
    pub allowed_gids: Vec<u32>,
}

impl Access {
    /// A peer is let in by its uid, its primary gid or one of its supplementary groups.
    fn allows(&self, uid: u32, gids: &[u32]) -> bool {
        (self.allowed_uids.is_empty() && self.allowed_gids.is_empty())
            || self.allowed_uids.contains(&uid)
            || gids.iter().any(|g| self.allowed_gids.contains(g))
    }
}

/// The peer's supplementary groups (SO_PEERGROUPS, Linux 4.13+), as they were when it connected;
/// empty where the kernel does not say.
fn peer_groups(stream: &UnixStream) -> Vec<u32> {
    use std::os::fd::AsRawFd;
    // Not in every libc release's public constants; the value is the same on every Linux arch
    // this daemon targets (asm-generic).
    const SO_PEERGROUPS: libc::c_int = 59;
    let mut groups = vec![0 as libc::gid_t; 64];
    for _ in 0..2 {
        let mut len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: `groups` is a live buffer of `len` bytes that getsockopt writes at most `len`
        // bytes into, and the fd is owned by `stream` for the whole call.
        let rc = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let n = len as usize / std::mem::size_of::<libc::gid_t>();
        if rc == 0 {
            groups.truncate(n);
            return groups;
        }
        // ERANGE: the buffer was too small and `len` now says how big it must be.
        if std::io::Error::last_os_error().raw_os_error() != Some(libc::ERANGE) || n <= groups.len()
        {
            return Vec::new();
        }
        groups.resize(n, 0);
    }
    Vec::new()
}

/// Checks that `path` is free to bind: absent, or a stale socket left by a crash (nobody
/// answers a connect), which is removed. A socket that answers belongs to a running daemon and
/// is left alone; so is anything that is not a socket.
pub fn claim_path(path: &Path) -> Result<(), SocketError> {
    use std::os::unix::fs::FileTypeExt;
    let io = |what, source| SocketError::Io {
        path: path.to_path_buf(),
        what,
        source,
    };
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io("inspecting", e)),
        Ok(m) if !m.file_type().is_socket() => Err(SocketError::NotASocket {
            path: path.to_path_buf(),
        }),
        Ok(_) => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => Err(SocketError::InUse {
                path: path.to_path_buf(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                tracing::info!(path = %path.display(), "removing a stale socket left by an earlier run");
                std::fs::remove_file(path).map_err(|e| io("removing the stale socket", e))
            }
            Err(e) => Err(io("probing the existing socket", e)),
        },
    }
}

/// Binds the socket at `path` (after [`claim_path`]) with the given file mode and group.
pub fn bind(
    path: &Path,
    mode: u32,
    group: Option<&str>,
) -> Result<std::os::unix::net::UnixListener, SocketError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |what, source| SocketError::Io {
        path: path.to_path_buf(),
        what,
        source,
    };
    claim_path(path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.is_dir() {
            return Err(io(
                "its directory does not exist",
                std::io::Error::from(std::io::ErrorKind::NotFound),
            ));
        }
    }
    let gid = match group {
        None => None,
        Some(g) => Some(resolve_group(g)?),
    };
    let listener = std::os::unix::net::UnixListener::bind(path).map_err(|e| io("binding", e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| io("setting its mode", e))?;
    if let Some(gid) = gid {
        std::os::unix::fs::chown(path, None, Some(gid)).map_err(|e| io("setting its group", e))?;
    }
    listener
        .set_nonblocking(true)
        .map_err(|e| io("setting it non-blocking", e))?;
    Ok(listener)
}

fn resolve_group(g: &str) -> Result<u32, SocketError> {
    if let Ok(n) = g.parse::<u32>() {
        return Ok(n);
    }
    match nix::unistd::Group::from_name(g) {
        Ok(Some(gr)) => Ok(gr.gid.as_raw()),
        _ => Err(SocketError::NoGroup {
            group: g.to_string(),
        }),
    }
}

/// The listening socket handed over by systemd socket activation (`LISTEN_FDS`, fd 3), if
/// this process was started that way. The variables are removed so children do not inherit them.
/// Hand-written rather than `listenfd`: edgellm.socket passes exactly one fd, which is checked to
/// be a stream socket and refused with a message otherwise, in a dozen lines.
pub fn from_systemd() -> Result<Option<std::os::unix::net::UnixListener>, SocketError> {
    use std::os::fd::FromRawFd;
    let (Ok(pid), Ok(fds)) = (std::env::var("LISTEN_PID"), std::env::var("LISTEN_FDS")) else {
        return Ok(None);
    };
    if pid.parse::<u32>().ok() != Some(std::process::id()) {
        return Ok(None);
    }
    let n: u32 = fds
        .parse()
        .map_err(|_| SocketError::Activation(format!("{fds:?} is not a number")))?;
    if n != 1 {
        return Err(SocketError::Activation(format!(
            "{n} sockets passed; edgellm.socket passes exactly one"
        )));
    }
    const FD: i32 = 3; // SD_LISTEN_FDS_START
                       // SAFETY: systemd passes the listening socket as fd 3 when LISTEN_PID is this process and
                       // LISTEN_FDS is 1, and nothing else in this process owns fd 3: it is taken once, here.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(FD) };
    let kind = nix::sys::socket::getsockopt(&fd, nix::sys::socket::sockopt::SockType)
        .map_err(|e| SocketError::Activation(format!("fd 3 is not a socket: {e}")))?;
    if kind != nix::sys::socket::SockType::Stream {
        return Err(SocketError::Activation(
            "fd 3 is not a stream socket (edgellm.socket needs ListenStream=)".into(),
        ));
    }
    let _ = nix::fcntl::fcntl(
        &fd,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    );
    let listener = std::os::unix::net::UnixListener::from(fd);
    listener
        .set_nonblocking(true)
        .map_err(|e| SocketError::Io {
            path: PathBuf::from("LISTEN_FDS"),
            what: "setting it non-blocking",
            source: e,
        })?;
    // SAFETY: called before the runtime and the engine thread start, while this is the only
    // thread of the process, so no other thread reads the environment concurrently.
    unsafe {
        std::env::remove_var("LISTEN_PID");
        std::env::remove_var("LISTEN_FDS");
        std::env::remove_var("LISTEN_FDNAMES");
    }
    Ok(Some(listener))
}

/// Accepts connections until `shutdown` turns true, then waits for every connection to finish
/// (each ends once its requests have their terminal replies).
pub async fn serve(
    listener: UnixListener,
    ctx: Arc<Context>,
    access: Access,
    max_connections: usize,
    mut shutdown: watch::Receiver<bool>,
) {
    let permits = Arc::new(Semaphore::new(max_connections));
    let mut conns = JoinSet::new();
    let mut next_conn = 0u64;
    let mut backoff = Duration::from_millis(10);
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = until_true(&mut shutdown) => break,
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = until_true(&mut shutdown) => break,
        };
        while conns.try_join_next().is_some() {}
        let stream = match accepted {
            Ok((s, _)) => {
                backoff = Duration::from_millis(10);
                s
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!("accept failed: {e}; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        next_conn += 1;
        let conn = next_conn;
        let ctx = ctx.clone();
        let access = access.clone();
        let shutdown = shutdown.clone();
        conns.spawn(async move {
            let _permit = permit;
            Connection::new(stream, ctx, conn)
                .run(&access, shutdown)
                .await;
        });
    }
    drop(listener);
    while conns.join_next().await.is_some() {}
}

struct Connection {
    stream: UnixStream,
    ctx: Arc<Context>,
    conn: u64,
    /// Ids of this connection's requests that have not had their terminal reply.
    pending: HashSet<Arc<str>>,
    tx: mpsc::UnboundedSender<Reply>,
    rx: mpsc::UnboundedReceiver<Reply>,
}

enum Read {
    Line(Vec<u8>),
    /// A line over the limit is being skipped up to its newline.
    TooLong,
    /// A line that is not UTF-8.
    NotText(String),
    Eof,
}

impl Connection {
    fn new(stream: UnixStream, ctx: Arc<Context>, conn: u64) -> Connection {
        let (tx, rx) = mpsc::unbounded_channel();
        Connection {
            stream,
            ctx,
            conn,
            pending: HashSet::new(),
            tx,
            rx,
        }
    }

    async fn run(mut self, access: &Access, mut shutdown: watch::Receiver<bool>) {
        let peer = match self.stream.peer_cred() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(conn = self.conn, "no peer credentials: {e}; closing");
                return;
            }
        };
        let (uid, gid, pid) = (peer.uid(), peer.gid(), peer.pid().unwrap_or(0));
        let mut gids = peer_groups(&self.stream);
        gids.push(gid);
        if !access.allows(uid, &gids) {
            tracing::warn!(
                conn = self.conn,
                uid,
                gid,
                pid,
                "refused a connection: peer not in socket.allowed_uids / socket.allowed_gids"
            );
            let line = Response::error(
                None,
                ErrorCode::Forbidden,
                format!("uid {uid} gid {gid} may not use this daemon (socket.allowed_uids, socket.allowed_gids)"),
            )
            .to_line();
            let _ = self.write_line(&line).await;
            return;
        }
        tracing::debug!(conn = self.conn, uid, gid, pid, "connection");
        let max = self.ctx.limits.max_line_bytes;
        let mut lines = LineReader::new(max);
        let mut eof = false;
        let mut hangup = tokio::time::interval(HANGUP_POLL);
        hangup.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stopping = false;
        loop {
            if (eof || stopping) && self.pending.is_empty() {
                break;
            }
            tokio::select! {
                r = lines.next(&mut self.stream), if !eof => match r {
                    Ok(Read::Line(line)) => {
                        if let Err(e) = self.handle(&line).await {
                            tracing::debug!(conn = self.conn, "write failed: {e}");
                            break;
                        }
                    }
                    Ok(Read::TooLong) => {
                        let line = Response::error(None, ErrorCode::TooLarge, format!(
                            "request line too long; the limit is {max} bytes (limits.max_line_bytes)")).to_line();
                        if self.write_line(&line).await.is_err() { break; }
                    }
                    Ok(Read::NotText(e)) => {
                        let line = Response::error(None, ErrorCode::BadRequest, format!(
                            "malformed JSON: the request line is not UTF-8 ({e})")).to_line();
                        if self.write_line(&line).await.is_err() { break; }
                    }
                    Ok(Read::Eof) => eof = true,
                    Err(e) => {
                        tracing::debug!(conn = self.conn, "read failed: {e}");
                        break;
                    }
                },
                Some(reply) = self.rx.recv() => {
                    let line = Response::event(&reply.id, &reply.event).to_line();
                    if reply.event.is_terminal() {
                        self.pending.remove(&reply.id);
                    }
                    if let Err(e) = self.write_line(&line).await {
                        tracing::debug!(conn = self.conn, "write failed: {e}");
                        break;
                    }
                },
                _ = hangup.tick(), if eof => {
                    if hung_up(&self.stream) { break; }
                },
                _ = until_true(&mut shutdown), if !stopping => stopping = true,
            }
        }
        // Whatever is still pending has nobody to answer to.
        for id in self.pending.drain() {
            tracing::info!(
                conn = self.conn,
                id = &*id,
                "client went away; cancelling its request"
            );
            self.ctx.queue.cancel(&id);
        }
    }

    async fn write_line(&mut self, line: &str) -> std::io::Result<()> {
        let mut buf = Vec::with_capacity(line.len() + 1);
        buf.extend_from_slice(line.as_bytes());
        buf.push(b'\n');
        self.stream.write_all(&buf).await
    }

    async fn handle(&mut self, line: &[u8]) -> std::io::Result<()> {
        if line.iter().all(u8::is_ascii_whitespace) {
            return Ok(());
        }
        let ctx = &self.ctx;
        let parsed = wire::parse(line, &ctx.limits, ctx.default_deadline_ms, Instant::now());
        let reply = match parsed {
            Err(r) => r.response(),
            Ok(Incoming::Status) => Response::Status(Box::new(ctx.status())),
            Ok(Incoming::Cancel { id }) => {
                let state = ctx.queue.cancel(&id);
                Response::Cancel { id, state }
            }
            Ok(Incoming::Generate(g)) => {
                if g.reply_to.is_some() {
                    Refusal {
                        id: Some(g.id),
                        code: ErrorCode::BadRequest,
                        message: "reply_to: only MQTT 3.1.1 requests name a reply topic".into(),
                    }
                    .response()
                } else {
                    let mut job = Job::new(&g.id, "unix", g.req, self.tx.clone());
                    job.stream = g.stream;
                    job.priority = g.priority.unwrap_or(0);
                    job.deadline = g.deadline;
                    let id = job.id.clone();
                    // Refusals come back on the reply channel like every other terminal reply.
                    self.pending.insert(id.clone());
                    ctx.queue.submit(job);
                    return Ok(());
                }
            }
        };
        self.write_line(&reply.to_line()).await
    }
}

/// True when the peer closed its socket entirely (not just its sending side).
fn hung_up(stream: &UnixStream) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(stream.as_fd(), PollFlags::empty())];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(_) => fds[0]
            .revents()
            .is_some_and(|r| r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR)),
        Err(_) => false,
    }
}

/// Reads newline-terminated lines of at most `max` bytes, framed by tokio-util's
/// [`LinesCodec`] (which skips the rest of an overlong line and strips `\r`). Cancel-safe: the
/// only await is for readiness, and bytes move into `buf` synchronously after it, so a
/// `select!` that drops the future loses nothing.
struct LineReader {
    buf: BytesMut,
    codec: LinesCodec,
}

impl LineReader {
    fn new(max: usize) -> LineReader {
        LineReader {
            buf: BytesMut::new(),
            codec: LinesCodec::new_with_max_length(max),
        }
    }

    async fn next(&mut self, stream: &mut UnixStream) -> std::io::Result<Read> {
        let mut chunk = [0u8; 8192];
        loop {
            if let Some(r) = self.framed(false) {
                return Ok(r);
            }
            stream.readable().await?;
            let n = match stream.try_read(&mut chunk) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            };
            if n == 0 {
                // A last line without its newline still counts.
                return Ok(self.framed(true).unwrap_or(Read::Eof));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// The next complete line in `buf` (at `eof`, the unterminated rest too), if there is one.
    fn framed(&mut self, eof: bool) -> Option<Read> {
        let r = if eof {
            self.codec.decode_eof(&mut self.buf)
        } else {
            self.codec.decode(&mut self.buf)
        };
        match r {
            Ok(Some(line)) => Some(Read::Line(line.into_bytes())),
            Ok(None) => None,
            Err(LinesCodecError::MaxLineLengthExceeded) => Some(Read::TooLong),
            // Not UTF-8: the line is consumed, and JSON could not have parsed it either.
            Err(LinesCodecError::Io(e)) => Some(Read::NotText(e.to_string())),
        }
    }
}
