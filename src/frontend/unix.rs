//! The Unix socket front-end: newline-delimited JSON (see [`crate::api::wire`]).
//!
//! One tokio task per connection reads requests, hands them to the queue, and writes what comes
//! back on the connection's reply channel, so a slow client only slows itself. Peers are checked
//! with SO_PEERCRED against the configured uids and gids. A request belongs to its connection
//! and its peer's uid: ids are unique per connection, cancel reaches the peer's own requests
//! (an admin's: any), status shows others' work as counts, sessions are kept per uid.
//!
//! Connections are bounded in number (`socket.max_connections`, and per uid), and one with
//! nothing in flight is closed after `socket.idle_timeout_ms` of silence: a connection beyond the
//! limits is answered `too_many_connections` at once (a `status` request on it still answered),
//! never left waiting. When a client goes away (its socket hung up, or a write fails) its
//! requests are cancelled; a client that only shut down its sending side (`nc -N`, `socat`)
//! still gets its replies. On shutdown the accept loop stops and each connection ends once its
//! last request has its terminal reply.

use std::collections::{HashMap, HashSet};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::AsyncReadExt;
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::codec::{Decoder, LinesCodec, LinesCodecError};

use super::{until_true, Access, Context};
use crate::api::wire::{self, Incoming, Refusal, Response};
use crate::api::ErrorCode;
use crate::queue::{Caller, Job, Owner, Reply};

/// How often a connection that has read EOF checks whether its peer hung up entirely.
const HANGUP_POLL: Duration = Duration::from_millis(100);
/// How long a connection beyond the limits may take to send a `status` request before it is
/// answered `too_many_connections`.
const OVER_LIMIT_WAIT: Duration = Duration::from_millis(250);
/// Before closing a connection it refuses, the daemon reads (and drops) what the peer sent, for
/// at most this long and this much, so that the peer reads the refusal instead of ECONNRESET.
const DRAIN_FOR: Duration = Duration::from_secs(1);
const DRAIN_BYTES: usize = 1 << 20;
/// Refused connections given that time at once; beyond, a refusal is written and the
/// connection closed at once, so a flood of refused connections cannot hold the descriptors.
const REFUSING_AT_ONCE: usize = 64;

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

/// The gid of `socket.group` (a name or a number).
pub fn resolve_group(g: &str) -> Result<u32, SocketError> {
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

/// Connections open now, in all and per uid.
#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_uid: HashMap<u32, usize>,
}

/// A connection's place in [`Counts`], given back when it ends.
struct Slot {
    counts: Arc<std::sync::Mutex<Counts>>,
    uid: u32,
}

impl Slot {
    /// A place for `uid`'s connection, or why there is none.
    fn take(
        counts: &Arc<std::sync::Mutex<Counts>>,
        uid: u32,
        access: &Access,
    ) -> Result<Slot, String> {
        let mut c = counts.lock().unwrap_or_else(|p| p.into_inner());
        let mine = c.per_uid.get(&uid).copied().unwrap_or(0);
        if c.total >= access.max_connections {
            return Err(format!(
                "{} connections are open; the limit is {} (socket.max_connections)",
                c.total, access.max_connections
            ));
        }
        if mine >= access.max_connections_per_uid {
            return Err(format!(
                "uid {uid} has {mine} connections open; the limit is {} (socket.max_connections_per_uid)",
                access.max_connections_per_uid
            ));
        }
        c.total += 1;
        *c.per_uid.entry(uid).or_default() += 1;
        Ok(Slot {
            counts: counts.clone(),
            uid,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_uid.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                c.per_uid.remove(&self.uid);
            }
        }
    }
}

/// Accepts connections until `shutdown` turns true, then waits for every connection to finish
/// (each ends once its requests have their terminal replies). Access and limits are read from
/// `ctx` at each connection, so a reload applies to the next one.
pub async fn serve(listener: UnixListener, ctx: Arc<Context>, mut shutdown: watch::Receiver<bool>) {
    let counts = Arc::new(std::sync::Mutex::new(Counts::default()));
    let refusing = Arc::new(tokio::sync::Semaphore::new(REFUSING_AT_ONCE));
    let mut conns = JoinSet::new();
    let mut next_conn = 0u64;
    let mut backoff = Duration::from_millis(10);
    loop {
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
        let counts = counts.clone();
        let refusing = refusing.clone();
        let shutdown = shutdown.clone();
        conns.spawn(async move {
            admit(stream, ctx, conn, &counts, &refusing, shutdown).await;
        });
    }
    drop(listener);
    while conns.join_next().await.is_some() {}
}

/// Checks a new connection's peer against the access lists and the connection limits, then
/// serves it, or answers why not and closes it.
async fn admit(
    mut stream: UnixStream,
    ctx: Arc<Context>,
    conn: u64,
    counts: &Arc<std::sync::Mutex<Counts>>,
    refusing: &Arc<tokio::sync::Semaphore>,
    shutdown: watch::Receiver<bool>,
) {
    let peer = match stream.peer_cred() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(conn, "no peer credentials: {e}; closing");
            return;
        }
    };
    let (uid, gid, pid) = (peer.uid(), peer.gid(), peer.pid().unwrap_or(0));
    let mut gids = peer_groups(&stream);
    gids.push(gid);
    let access = ctx.live().access;
    if !access.allows(uid, &gids) {
        tracing::warn!(
            conn,
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
        match refusing.try_acquire() {
            Ok(_p) => refuse(&mut stream, &line).await,
            Err(_) => refuse_now(&stream, &line),
        }
        return;
    }
    let owner = Owner::new(conn, &format!("uid:{uid}"));
    let admin = access.is_admin(uid, &gids);
    let slot = match Slot::take(counts, uid, &access) {
        Ok(s) => s,
        Err(why) => {
            tracing::warn!(conn, uid, pid, "refused a connection: {why}");
            match refusing.try_acquire() {
                Ok(_p) => over_limit(stream, &ctx, &owner, admin, &why).await,
                Err(_) => refuse_now(
                    &stream,
                    &Response::error(None, ErrorCode::TooManyConnections, why).to_line(),
                ),
            }
            return;
        }
    };
    tracing::debug!(conn, uid, gid, pid, admin, "connection");
    let _slot = slot;
    Connection::new(stream, ctx, owner, admin)
        .run(access.idle_timeout, shutdown)
        .await;
}

/// A connection beyond the limits: a `status` request sent at once is answered (status always
/// answers); anything else, or nothing within [`OVER_LIMIT_WAIT`], is answered
/// `too_many_connections`. Then the connection is closed.
/// A refusal while [`REFUSING_AT_ONCE`] others are being given time: the line, if the socket
/// takes it now, and the connection closed.
fn refuse_now(stream: &UnixStream, line: &str) {
    let _ = stream.try_write(format!("{line}\n").as_bytes());
}

async fn over_limit(mut stream: UnixStream, ctx: &Context, owner: &Owner, admin: bool, why: &str) {
    let mut lines = LineReader::new(ctx.limits().max_line_bytes);
    let first = tokio::time::timeout(OVER_LIMIT_WAIT, lines.next(&mut stream)).await;
    let now = Instant::now();
    let status = match first {
        Ok(Ok(Read::Line(l))) => {
            matches!(
                wire::parse(&l, &ctx.limits(), 0, now),
                Ok(Incoming::Status { reply_to: None })
            )
        }
        _ => false,
    };
    let line = if status {
        Response::Status(Box::new(ctx.status_for(Caller { owner, admin }))).to_line()
    } else {
        Response::error(
            None,
            ErrorCode::TooManyConnections,
            format!("{why}; try again when a connection closes"),
        )
        .to_line()
    };
    refuse(&mut stream, &line).await;
}

/// Writes a last line, shuts the sending side, and reads what the peer sent (bounded) before
/// the socket closes, so the peer reads the line rather than a reset.
async fn refuse(stream: &mut UnixStream, line: &str) {
    let _ = stream.write_all(format!("{line}\n").as_bytes()).await;
    let _ = stream.shutdown().await;
    let mut drained = 0;
    let mut buf = [0u8; 8192];
    let _ = tokio::time::timeout(DRAIN_FOR, async {
        while drained < DRAIN_BYTES {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    })
    .await;
}

struct Connection {
    stream: UnixStream,
    ctx: Arc<Context>,
    /// This connection (its channel: ids are unique in it) and its peer.
    owner: Owner,
    admin: bool,
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
    fn new(stream: UnixStream, ctx: Arc<Context>, owner: Owner, admin: bool) -> Connection {
        let (tx, rx) = mpsc::unbounded_channel();
        Connection {
            stream,
            ctx,
            owner,
            admin,
            pending: HashSet::new(),
            tx,
            rx,
        }
    }

    fn caller(&self) -> Caller<'_> {
        Caller {
            owner: &self.owner,
            admin: self.admin,
        }
    }

    async fn run(mut self, idle_timeout: Duration, mut shutdown: watch::Receiver<bool>) {
        let conn = self.owner.channel;
        let max = self.ctx.limits().max_line_bytes;
        let mut lines = LineReader::new(max);
        let mut eof = false;
        let mut hangup = tokio::time::interval(HANGUP_POLL);
        hangup.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stopping = false;
        // Silence is measured from the latest line, or the latest terminal reply.
        let mut last_heard = tokio::time::Instant::now();
        loop {
            if (eof || stopping) && self.pending.is_empty() {
                break;
            }
            let idle = !eof && self.pending.is_empty();
            tokio::select! {
                r = lines.next(&mut self.stream), if !eof => {
                    last_heard = tokio::time::Instant::now();
                    match r {
                        Ok(Read::Line(line)) => {
                            if let Err(e) = self.handle(&line).await {
                                tracing::debug!(conn, "write failed: {e}");
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
                            tracing::debug!(conn, "read failed: {e}");
                            break;
                        }
                    }
                },
                Some(reply) = self.rx.recv() => {
                    let line = Response::event(&reply.id, &reply.event).to_line();
                    if reply.event.is_terminal() {
                        self.pending.remove(&reply.id);
                        last_heard = tokio::time::Instant::now();
                    }
                    if let Err(e) = self.write_line(&line).await {
                        tracing::debug!(conn, "write failed: {e}");
                        break;
                    }
                },
                _ = hangup.tick(), if eof => {
                    if hung_up(&self.stream) { break; }
                },
                _ = tokio::time::sleep_until(last_heard + idle_timeout), if idle => {
                    tracing::debug!(conn, "closing an idle connection (socket.idle_timeout_ms)");
                    let line = Response::error(None, ErrorCode::IdleTimeout, format!(
                        "no request for {} ms; closing (socket.idle_timeout_ms)",
                        idle_timeout.as_millis())).to_line();
                    refuse(&mut self.stream, &line).await;
                    break;
                },
                _ = until_true(&mut shutdown), if !stopping => stopping = true,
            }
        }
        // Whatever is still pending has nobody to answer to.
        let pending: Vec<Arc<str>> = self.pending.drain().collect();
        for id in pending {
            tracing::info!(conn, id = &*id, "client went away; cancelling its request");
            self.ctx.queue.cancel(self.caller(), &id);
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
        let ctx = self.ctx.clone();
        let live = ctx.live();
        let parsed = wire::parse(line, &live.limits, live.default_deadline_ms, Instant::now());
        let reply = match parsed {
            Err(r) => r.response(),
            Ok(
                Incoming::Status { reply_to: Some(_) }
                | Incoming::Cancel {
                    reply_to: Some(_), ..
                },
            ) => Response::error(
                None,
                ErrorCode::BadRequest,
                "reply_to: only MQTT 3.1.1 requests name a reply topic",
            ),
            Ok(Incoming::Status { .. }) => {
                Response::Status(Box::new(ctx.status_for(self.caller())))
            }
            Ok(Incoming::Cancel { id, .. }) => {
                let state = ctx.queue.cancel(self.caller(), &id);
                Response::Cancel { id, state }
            }
            Ok(Incoming::Generate(g)) => {
                if g.reply_to.is_some() {
                    Refusal::new(
                        Some(&g.id),
                        ErrorCode::BadRequest,
                        "reply_to: only MQTT 3.1.1 requests name a reply topic",
                    )
                    .response()
                } else if self.pending.contains(g.id.as_str()) {
                    // Refused here, so that the refusal (a terminal reply for this id) cannot
                    // be taken for the original's.
                    Refusal::new(
                        Some(&g.id),
                        ErrorCode::BadRequest,
                        format!(
                            "id {:?} is already in flight on this connection; ids are unique per connection until their terminal reply",
                            g.id
                        ),
                    )
                    .response()
                } else {
                    let mut job =
                        Job::new(&g.id, self.owner.clone(), "unix", g.req, self.tx.clone());
                    job.stream = g.stream;
                    job.priority = g.priority.unwrap_or(0);
                    job.deadline = g.deadline;
                    let id = job.id.clone();
                    // Refusals come back on the reply channel like every other terminal reply.
                    self.pending.insert(id);
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
