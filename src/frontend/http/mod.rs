//! The HTTP front-end: the OpenAI API ([`openai`]), Ollama's ([`ollama`]), `/health` and
//! `/metrics` ([`metrics`]), on hyper's HTTP/1.1 server on the daemon's tokio runtime.
//!
//! A generation goes through the same queue as the socket's and MQTT's: the same limits
//! (checked by [`GenerateRequest::validate`]), priorities and deadlines (headers
//! `X-Edgellm-Priority`, `X-Edgellm-Deadline-Ms`; every request is also bounded by
//! `http.request_timeout_ms`), and the same logs. Each request is its own owner: a client
//! that goes away (its connection closed, mid-stream or while waiting) cancels its request,
//! which the engine sees before its next token.
//!
//! Listeners are TCP addresses and Unix sockets (`http.listen`). With `http.api_key` set,
//! every route but `/health` needs `Authorization: Bearer <key>`. Bodies are bounded
//! (`http.max_body_bytes`, else `limits.max_line_bytes`) and must arrive within the request
//! timeout; headers within [`HEADER_TIMEOUT`]. Connections are bounded (`http.max_connections`).

pub mod metrics;
pub mod ollama;
pub mod openai;

use std::convert::Infallible;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use serde_json::Value;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use super::{until_true, Context};
use crate::api::wire::{check_priority, MAX_DEADLINE_MS};
use crate::api::{Completion, ErrorCode, Event, GenerateRequest};
use crate::config::{HttpConfig, HttpListen};
use crate::queue::{Caller, Job, Owner, Reply, Submit};

/// How long a client may take to send a request's headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HttpError {
    #[error("http.listen: {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Config(String),
    #[error("http.api_key_file = {path:?}: {source}")]
    KeyFile {
        path: String,
        source: std::io::Error,
    },
}

/// What `/v1/models`, `/api/tags` and `/api/show` say about the loaded model.
#[derive(Debug, Clone, Default)]
pub struct ModelCard {
    /// The name clients use: the file name without `.gguf`.
    pub name: String,
    /// Other names accepted for it (`http.model_aliases`).
    pub aliases: Vec<String>,
    pub size: u64,
    pub modified: Option<SystemTime>,
    /// 64 hex digits naming this file (of its name, size and modification time; the file is
    /// not read for it).
    pub digest: String,
    /// `general.architecture` ("llama", "qwen2").
    pub family: String,
    /// "135M", "494M", or empty.
    pub parameter_size: String,
    /// "Q4_1", "Q4_K_M".
    pub quantization: String,
    pub n_ctx: usize,
    pub template: String,
    /// The template renders tools.
    pub tools: bool,
}

impl ModelCard {
    /// The name a request gave, checked: `None` (or empty) is the loaded model; so is its name
    /// or an alias, with or without Ollama's `:latest` tag.
    pub fn accepts(&self, asked: Option<&str>) -> bool {
        let Some(a) = asked.filter(|a| !a.is_empty()) else {
            return true;
        };
        let a = a.strip_suffix(":latest").unwrap_or(a);
        a == self.name || self.aliases.iter().any(|x| x == a)
    }

    /// Every name it answers to, its own first.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.name.as_str()).chain(self.aliases.iter().map(String::as_str))
    }

    pub fn modified_unix(&self) -> u64 {
        self.modified
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs())
    }
}

/// The `[http]` settings in force, the model it serves, and the API key read at start.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: Vec<HttpListen>,
    api_key: Option<String>,
    /// 0: `limits.max_line_bytes` (read at each request, so SIGHUP applies).
    pub max_body_bytes: usize,
    pub request_timeout: Duration,
    pub max_connections: usize,
    pub model: ModelCard,
}

impl Settings {
    /// The settings of `[http]`, reading the API key from its file or variable; the model is
    /// described once it is loaded.
    pub fn from_config(c: &HttpConfig) -> Result<Settings, HttpError> {
        let listen = c
            .listen
            .iter()
            .map(|l| HttpListen::parse(l))
            .collect::<Result<Vec<_>, _>>()
            .map_err(HttpError::Config)?;
        let key = if !c.api_key_file.is_empty() {
            let k =
                std::fs::read_to_string(&c.api_key_file).map_err(|source| HttpError::KeyFile {
                    path: c.api_key_file.clone(),
                    source,
                })?;
            Some(k.trim().to_string())
        } else if !c.api_key_env.is_empty() {
            Some(std::env::var(&c.api_key_env).map_err(|_| {
                HttpError::Config(format!(
                    "http.api_key_env = {:?}: the variable is not set",
                    c.api_key_env
                ))
            })?)
        } else {
            (!c.api_key.is_empty()).then(|| c.api_key.clone())
        };
        if key.as_deref() == Some("") {
            return Err(HttpError::Config(
                "http.api_key_file / http.api_key_env: the key is empty".into(),
            ));
        }
        Ok(Settings {
            listen,
            api_key: key,
            max_body_bytes: c.max_body_bytes,
            request_timeout: Duration::from_millis(c.request_timeout_ms),
            max_connections: c.max_connections,
            model: ModelCard::default(),
        })
    }
}

/// A bound listener, before the runtime starts.
#[derive(Debug)]
pub enum Bound {
    Tcp(std::net::TcpListener),
    /// The socket, and the path to remove on exit.
    Unix(std::os::unix::net::UnixListener, PathBuf),
}

/// Binds every `http.listen` address (a stale Unix socket is replaced, a live one refused).
/// `mode` and `group` are given to Unix sockets, as to the daemon's own.
pub fn bind(
    listen: &[HttpListen],
    mode: u32,
    group: Option<&str>,
) -> Result<Vec<Bound>, anyhow::Error> {
    let mut out = Vec::new();
    for l in listen {
        match l {
            HttpListen::Tcp(a) => {
                let s = std::net::TcpListener::bind(a).map_err(|source| HttpError::Bind {
                    addr: a.to_string(),
                    source,
                })?;
                s.set_nonblocking(true).map_err(|source| HttpError::Bind {
                    addr: a.to_string(),
                    source,
                })?;
                out.push(Bound::Tcp(s));
            }
            HttpListen::Unix(p) => {
                super::unix::claim_path(p)?;
                out.push(Bound::Unix(super::unix::bind(p, mode, group)?, p.clone()));
            }
        }
    }
    Ok(out)
}

impl Bound {
    /// Where it listens, for logs.
    pub fn describe(&self) -> String {
        match self {
            Bound::Tcp(s) => s
                .local_addr()
                .map_or_else(|_| "tcp".into(), |a| format!("http://{a}")),
            Bound::Unix(_, p) => format!("unix:{}", p.display()),
        }
    }
}

/// What every request handler shares.
pub struct Shared {
    pub ctx: Arc<Context>,
    pub settings: Settings,
    next_request: AtomicU64,
}

impl Shared {
    fn next(&self) -> u64 {
        self.next_request.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn max_body(&self) -> usize {
        match self.settings.max_body_bytes {
            0 => self.ctx.limits().max_line_bytes,
            n => n,
        }
    }
}

/// Serves every listener until `shutdown` turns true; then stops accepting, lets each
/// connection finish its requests, and returns. (The daemon removes Unix socket paths, also
/// when this is cut short.)
pub async fn serve(
    bound: Vec<Bound>,
    settings: Settings,
    ctx: Arc<Context>,
    shutdown: watch::Receiver<bool>,
) {
    let shared = Arc::new(Shared {
        ctx,
        settings,
        next_request: AtomicU64::new(0),
    });
    let slots = Arc::new(tokio::sync::Semaphore::new(shared.settings.max_connections));
    let mut loops = JoinSet::new();
    for b in bound {
        let (shared, slots, shutdown) = (shared.clone(), slots.clone(), shutdown.clone());
        let served = match b {
            Bound::Tcp(s) => TcpListener::from_std(s)
                .map(|l| loops.spawn(accept_loop(l, shared, slots, shutdown))),
            Bound::Unix(s, _) => UnixListener::from_std(s)
                .map(|l| loops.spawn(accept_loop(l, shared, slots, shutdown))),
        };
        if let Err(e) = served {
            tracing::error!("http: listener not served: {e}");
        }
    }
    while loops.join_next().await.is_some() {}
}

/// A listener: its connections, and who is at the other end, for logs and ownership.
trait Accept: Send + 'static {
    type Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static;
    fn accept_peer(
        &self,
    ) -> impl std::future::Future<Output = std::io::Result<(Self::Stream, String)>> + Send;
}

impl Accept for TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn accept_peer(&self) -> std::io::Result<(Self::Stream, String)> {
        let (s, peer) = self.accept().await?;
        let _ = s.set_nodelay(true);
        Ok((s, peer.to_string()))
    }
}

impl Accept for UnixListener {
    type Stream = tokio::net::UnixStream;
    async fn accept_peer(&self) -> std::io::Result<(Self::Stream, String)> {
        let (s, _) = self.accept().await?;
        let peer = s
            .peer_cred()
            .map_or_else(|_| "unix".into(), |c| format!("uid:{}", c.uid()));
        Ok((s, peer))
    }
}

/// Accepts connections until `shutdown` turns true, backing off when accepting fails (out of
/// descriptors), then waits for the connections to end.
async fn accept_loop<L: Accept>(
    l: L,
    shared: Arc<Shared>,
    slots: Arc<tokio::sync::Semaphore>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut conns = JoinSet::new();
    let mut backoff = Duration::from_millis(10);
    loop {
        let accepted = tokio::select! {
            a = l.accept_peer() => a,
            _ = until_true(&mut shutdown) => break,
        };
        while conns.try_join_next().is_some() {}
        match accepted {
            Ok((s, peer)) => {
                backoff = Duration::from_millis(10);
                conns.spawn(connection(
                    s,
                    peer,
                    shared.clone(),
                    slots.clone(),
                    shutdown.clone(),
                ));
            }
            Err(e) => {
                tracing::warn!("http: accept failed: {e}; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
    drop(l);
    while conns.join_next().await.is_some() {}
}

/// Serves one connection (HTTP/1.1, keep-alive) until the client closes it, or, on shutdown,
/// once its request in flight is answered.
async fn connection<S>(
    mut stream: S,
    peer: String,
    shared: Arc<Shared>,
    slots: Arc<tokio::sync::Semaphore>,
    mut shutdown: watch::Receiver<bool>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let Ok(_slot) = slots.try_acquire_owned() else {
        tracing::warn!(
            peer,
            "http: refused a connection: {} connections already (http.max_connections)",
            shared.settings.max_connections
        );
        let body =
            r#"{"error":"too many connections (http.max_connections); try again when one closes"}"#;
        let msg = format!(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            use tokio::io::AsyncWriteExt;
            let _ = stream.write_all(msg.as_bytes()).await;
            let _ = stream.shutdown().await;
        })
        .await;
        return;
    };
    let peer: Arc<str> = peer.into();
    let service = {
        let peer = peer.clone();
        hyper::service::service_fn(move |req| {
            let shared = shared.clone();
            let peer = peer.clone();
            async move { Ok::<_, Infallible>(handle(req, &shared, &peer).await) }
        })
    };
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), service);
    let mut conn = std::pin::pin!(conn);
    let r = tokio::select! {
        r = conn.as_mut() => r,
        _ = until_true(&mut shutdown) => {
            conn.as_mut().graceful_shutdown();
            conn.as_mut().await
        }
    };
    if let Err(e) = r {
        tracing::debug!(peer = &*peer, "http: connection ended: {e}");
    }
}

/// A response body: whole, or streamed from a request's replies.
pub enum Body {
    Full(Option<Bytes>),
    Stream(Box<Streamed>),
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Body::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Body::Stream(s) => s.poll_next(cx).map(|b| b.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, Body::Full(None))
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self {
            Body::Full(Some(b)) => hyper::body::SizeHint::with_exact(b.len() as u64),
            Body::Full(None) => hyper::body::SizeHint::with_exact(0),
            Body::Stream(_) => hyper::body::SizeHint::default(),
        }
    }
}

/// Turns a request's events into the bytes of its streamed response.
pub trait Format: Send {
    /// Bytes for one event; `None` when it adds nothing.
    fn event(&mut self, event: &Event) -> Option<Bytes>;
    /// After the terminal event's bytes: a trailer (`data: [DONE]`).
    fn end(&mut self) -> Option<Bytes> {
        None
    }
}

/// A streamed response: the request's replies, formatted as they come.
pub struct Streamed {
    job: Inflight,
    format: Box<dyn Format>,
    /// Written before the first event (the OpenAI stream's role chunk).
    head: Option<Bytes>,
    trailer: Option<Bytes>,
    ended: bool,
}

impl Streamed {
    pub fn new(job: Inflight, format: Box<dyn Format>, head: Option<Bytes>) -> Streamed {
        Streamed {
            job,
            format,
            head,
            trailer: None,
            ended: false,
        }
    }

    fn poll_next(&mut self, cx: &mut TaskContext<'_>) -> Poll<Option<Bytes>> {
        if let Some(h) = self.head.take() {
            return Poll::Ready(Some(h));
        }
        loop {
            if self.ended {
                return Poll::Ready(self.trailer.take());
            }
            let Some(reply) = std::task::ready!(self.job.rx.poll_recv(cx)) else {
                // The queue never drops a job unanswered; should the channel close anyway,
                // the stream ends rather than hangs.
                self.ended = true;
                continue;
            };
            if reply.event.is_terminal() {
                self.job.finished = true;
                self.ended = true;
                self.trailer = self.format.end();
            } else {
                self.job.tokens += 1;
            }
            if let Some(b) = self.format.event(&reply.event) {
                return Poll::Ready(Some(b));
            }
        }
    }
}

/// A request on the queue: its replies, and its cancel should the client go away first.
pub struct Inflight {
    shared: Arc<Shared>,
    owner: Owner,
    pub id: Arc<str>,
    rx: mpsc::UnboundedReceiver<Reply>,
    finished: bool,
    /// Token events the engine has sent (streamed requests).
    tokens: usize,
    pub model: String,
    pub started: Instant,
}

impl Inflight {
    /// The completion of a request that is not streamed, or its refusal as a failure.
    pub async fn completion(&mut self) -> Result<Box<Completion>, Failure> {
        while let Some(r) = self.rx.recv().await {
            match r.event {
                Event::Token(_) => {}
                Event::Done(c) => {
                    self.finished = true;
                    return Ok(c);
                }
                Event::Error(code, m) => {
                    self.finished = true;
                    return Err(Failure::of(code, m));
                }
            }
        }
        self.finished = true;
        Err(Failure::of(
            ErrorCode::Internal,
            "the engine dropped the request".into(),
        ))
    }
}

impl Drop for Inflight {
    fn drop(&mut self) {
        // What the engine sent that the client never took: a terminal reply means the request
        // ended anyway; tokens say how far it had come when the hang-up was seen.
        while let Ok(r) = self.rx.try_recv() {
            if r.event.is_terminal() {
                self.finished = true;
            } else {
                self.tokens += 1;
            }
        }
        if !self.finished {
            tracing::info!(
                id = &*self.id,
                peer = &*self.owner.peer,
                tokens = self.tokens,
                "http: client went away; cancelling its request"
            );
            self.shared.ctx.queue.cancel(
                Caller {
                    owner: &self.owner,
                    admin: false,
                },
                &self.id,
            );
        }
    }
}

/// An error as each API shapes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    OpenAi,
    Ollama,
    Plain,
}

/// A refusal: the status, the protocol's code and a message naming the field and the limit.
#[derive(Debug, Clone)]
pub struct Failure {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub param: Option<String>,
}

impl Failure {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Failure {
        Failure {
            status,
            code,
            message: message.into(),
            param: None,
        }
    }

    pub fn bad(message: impl Into<String>) -> Failure {
        Failure::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// A refusal of the queue or the engine, by its error code.
    pub fn of(code: ErrorCode, message: String) -> Failure {
        let status = match code {
            ErrorCode::BadRequest | ErrorCode::TooLarge | ErrorCode::SessionUnknown => {
                StatusCode::BAD_REQUEST
            }
            ErrorCode::QueueFull => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::ShuttingDown | ErrorCode::TooManyConnections => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ErrorCode::Deadline => StatusCode::GATEWAY_TIMEOUT,
            ErrorCode::Forbidden => StatusCode::FORBIDDEN,
            ErrorCode::IdleTimeout => StatusCode::REQUEST_TIMEOUT,
            ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Failure::new(status, code.as_str(), message)
    }

    /// The JSON of this error in `api`'s shape.
    pub fn body(&self, api: Api) -> Value {
        match api {
            Api::OpenAi => serde_json::json!({"error": {
                "message": self.message,
                "type": match self.status.as_u16() {
                    400 | 413 | 404 | 405 => "invalid_request_error",
                    401 => "authentication_error",
                    429 => "rate_limit_error",
                    _ => "server_error",
                },
                "param": self.param,
                "code": self.code,
            }}),
            Api::Ollama | Api::Plain => serde_json::json!({"error": self.message}),
        }
    }

    pub fn response(&self, api: Api) -> Response<Body> {
        let mut r = json_response(self.status, &self.body(api));
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            r.headers_mut()
                .insert("retry-after", HeaderValue::from_static("1"));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert("www-authenticate", HeaderValue::from_static("Bearer"));
        }
        r
    }
}

pub fn json_response(status: StatusCode, v: &impl Serialize) -> Response<Body> {
    let body = serde_json::to_vec(v).unwrap_or_else(|_| b"{}".to_vec());
    let mut r = Response::new(Body::Full(Some(Bytes::from(body))));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

pub fn streamed_response(content_type: &'static str, s: Streamed) -> Response<Body> {
    let mut r = Response::new(Body::Stream(Box::new(s)));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut()
        .insert("cache-control", HeaderValue::from_static("no-cache"));
    r
}

/// The parts of a request a handler reads.
pub struct Req {
    pub method: Method,
    pub path: String,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
    pub peer: Arc<str>,
    /// When the request arrived: its deadline runs from here.
    pub arrived: Instant,
}

impl Req {
    /// The body as JSON (an empty body is `{}`); the error names what is wrong.
    pub fn json(&self) -> Result<Value, Failure> {
        if self.body.iter().all(u8::is_ascii_whitespace) {
            return Ok(Value::Object(Default::default()));
        }
        serde_json::from_slice(&self.body)
            .map_err(|e| Failure::bad(format!("malformed JSON body: {e}")))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Parses `v` as `T`; the error names the field's path (`messages[0].content`).
pub fn parse_body<T: serde::de::DeserializeOwned>(v: Value) -> Result<T, Failure> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        let mut f = Failure::bad(if path == "." {
            inner
        } else {
            format!("{path}: {inner}")
        });
        f.param = (path != ".").then_some(path);
        f
    })
}

async fn handle(req: Request<Incoming>, shared: &Arc<Shared>, peer: &Arc<str>) -> Response<Body> {
    let arrived = Instant::now();
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    let api = if path.starts_with("/v1/") {
        Api::OpenAi
    } else if path.starts_with("/api/") {
        Api::Ollama
    } else {
        Api::Plain
    };
    if path != "/health" {
        if let Some(key) = &shared.settings.api_key {
            let given = parts
                .headers
                .get(hyper::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .unwrap_or("");
            if !same(given.trim().as_bytes(), key.as_bytes()) {
                tracing::warn!(
                    peer = &**peer,
                    path,
                    "http: refused a request without the API key (http.api_key)"
                );
                return Failure::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "missing or wrong API key: send Authorization: Bearer <key> (http.api_key)",
                )
                .response(api);
            }
        }
    }
    let max = shared.max_body();
    let too_large = || {
        Failure::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("request body over {max} bytes (http.max_body_bytes, or limits.max_line_bytes when 0)"),
        )
    };
    let declared = parts
        .headers
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return too_large().response(api);
    }
    let timeout = shared.settings.request_timeout;
    let body = match tokio::time::timeout(
        timeout,
        http_body_util::Limited::new(body, max).collect(),
    )
    .await
    {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return too_large().response(api)
        }
        Ok(Err(e)) => {
            return Failure::bad(format!("reading the request body: {e}")).response(api);
        }
        Err(_) => {
            return Failure::new(
                StatusCode::REQUEST_TIMEOUT,
                "timeout",
                format!(
                    "the request body did not arrive within {} ms (http.request_timeout_ms)",
                    timeout.as_millis()
                ),
            )
            .response(api);
        }
    };
    let r = Req {
        method: parts.method,
        path,
        headers: parts.headers,
        body,
        peer: peer.clone(),
        arrived,
    };
    let out = route(&r, shared).await;
    let res = match out {
        Ok(res) => res,
        Err(f) => {
            if f.status.is_server_error() {
                tracing::warn!(
                    peer = &*r.peer,
                    path = r.path,
                    status = f.status.as_u16(),
                    "http: {}",
                    f.message
                );
            } else {
                tracing::debug!(
                    peer = &*r.peer,
                    path = r.path,
                    status = f.status.as_u16(),
                    "http: {}",
                    f.message
                );
            }
            f.response(api)
        }
    };
    tracing::debug!(
        peer = &*r.peer,
        method = %r.method,
        path = r.path,
        status = res.status().as_u16(),
        "http request"
    );
    res
}

/// Compares without stopping at the first difference.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

async fn route(r: &Req, shared: &Arc<Shared>) -> Result<Response<Body>, Failure> {
    let get = r.method == Method::GET || r.method == Method::HEAD;
    let post = r.method == Method::POST;
    let wrong = || {
        Failure::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("{} {}: method not allowed", r.method, r.path),
        )
    };
    match r.path.as_str() {
        "/" if get => Ok(plain(StatusCode::OK, "edgellm is running")),
        "/health" if get => Ok(metrics::health(shared)),
        "/metrics" if get => Ok(metrics::metrics(shared)),
        "/v1/models" if get => Ok(openai::models(shared)),
        p if p.starts_with("/v1/models/") && get => openai::model(shared, &p[11..]),
        "/v1/chat/completions" if post => openai::chat(r, shared).await,
        "/v1/completions" if post => openai::completions(r, shared).await,
        "/api/chat" if post => ollama::chat(r, shared).await,
        "/api/generate" if post => ollama::generate(r, shared).await,
        "/api/tags" if get => Ok(ollama::tags(shared)),
        "/api/show" if post => ollama::show(r, shared),
        "/api/version" if get => Ok(ollama::version()),
        "/api/ps" if get => Ok(ollama::ps(shared)),
        "/"
        | "/health"
        | "/metrics"
        | "/v1/models"
        | "/v1/chat/completions"
        | "/v1/completions"
        | "/api/chat"
        | "/api/generate"
        | "/api/tags"
        | "/api/show"
        | "/api/version"
        | "/api/ps" => Err(wrong()),
        p => Err(Failure::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{p}: no such route"),
        )),
    }
}

fn plain(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut r = Response::new(Body::Full(Some(Bytes::from_static(text.as_bytes()))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// The model a request names, checked: 404 in the API's shape when it is not this one.
pub fn check_model(shared: &Shared, asked: Option<&str>) -> Result<String, Failure> {
    let card = &shared.settings.model;
    if card.accepts(asked) {
        return Ok(asked
            .filter(|a| !a.is_empty())
            .unwrap_or(&card.name)
            .to_string());
    }
    let asked = asked.unwrap_or_default();
    Err(Failure::new(
        StatusCode::NOT_FOUND,
        "model_not_found",
        format!(
            "model {asked:?} not found; this daemon serves {} (http.model_aliases adds names)",
            card.names()
                .map(|n| format!("{n:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    ))
}

/// Checks `req` against the limits, and puts it on the queue with the request's priority and
/// deadline (headers, the queue's default, and the request timeout, whichever is first).
pub fn submit(
    r: &Req,
    shared: &Arc<Shared>,
    req: GenerateRequest,
    stream: bool,
    model: String,
) -> Result<Inflight, Failure> {
    let live = shared.ctx.live();
    req.validate(&live.limits)
        .map_err(|(code, m)| Failure::of(code, m))?;
    let priority = match r.header("x-edgellm-priority") {
        None => 0,
        Some(p) => {
            let p: i32 = p.trim().parse().map_err(|_| {
                Failure::bad(format!(
                    "X-Edgellm-Priority = {p:?}: allowed an integer -100..=100"
                ))
            })?;
            check_priority(p).map_err(|m| Failure::bad(format!("X-Edgellm-Priority: {m}")))?;
            p
        }
    };
    let mut deadline = r.arrived + shared.settings.request_timeout;
    let asked = match r.header("x-edgellm-deadline-ms") {
        Some(d) => match d.trim().parse::<u64>() {
            Ok(ms) if (1..=MAX_DEADLINE_MS).contains(&ms) => Some(ms),
            _ => {
                return Err(Failure::bad(format!(
                    "X-Edgellm-Deadline-Ms = {d:?}: allowed 1..={MAX_DEADLINE_MS}"
                )))
            }
        },
        None => (live.default_deadline_ms > 0).then_some(live.default_deadline_ms),
    };
    if let Some(ms) = asked {
        deadline = deadline.min(r.arrived + Duration::from_millis(ms));
    }
    let n = shared.next();
    let owner = Owner::new(n, &format!("http:{}", r.peer));
    let (tx, rx) = mpsc::unbounded_channel();
    let id = format!("http-{n}");
    let mut job = Job::new(&id, owner.clone(), "http", req, tx);
    job.stream = stream;
    job.priority = priority;
    job.deadline = Some(deadline);
    let id = job.id.clone();
    let mut inflight = Inflight {
        shared: shared.clone(),
        owner,
        id,
        rx,
        finished: false,
        tokens: 0,
        model,
        started: r.arrived,
    };
    if let Submit::Refused(code) = shared.ctx.queue.submit(job) {
        inflight.finished = true;
        let message = match inflight.rx.try_recv() {
            Ok(Reply {
                event: Event::Error(_, m),
                ..
            }) => m,
            _ => code.as_str().to_string(),
        };
        tracing::info!(peer = &*r.peer, path = r.path, "http: refused: {message}");
        return Err(Failure::of(code, message));
    }
    tracing::debug!(
        id = &*inflight.id,
        peer = &*r.peer,
        path = r.path,
        stream,
        "http: queued"
    );
    Ok(inflight)
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// RFC 3339 UTC with nanoseconds, as Ollama writes times.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_nanos()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339() {
        let t = SystemTime::UNIX_EPOCH + Duration::new(1_691_176_965, 499_127_000);
        assert_eq!(rfc3339(t), "2023-08-04T19:22:45.499127000Z");
        assert_eq!(
            rfc3339(SystemTime::UNIX_EPOCH),
            "1970-01-01T00:00:00.000000000Z"
        );
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000000000Z");
    }

    #[test]
    fn model_names_and_aliases() {
        let card = ModelCard {
            name: "SmolLM2".into(),
            aliases: vec!["llama3.2".into()],
            ..Default::default()
        };
        for ok in [
            None,
            Some(""),
            Some("SmolLM2"),
            Some("SmolLM2:latest"),
            Some("llama3.2"),
        ] {
            assert!(card.accepts(ok), "{ok:?}");
        }
        for no in [Some("smollm2"), Some("SmolLM2:7b"), Some("gpt-4o")] {
            assert!(!card.accepts(no), "{no:?}");
        }
    }

    #[test]
    fn keys_compare_whole() {
        assert!(same(b"secret", b"secret"));
        assert!(!same(b"secret", b"secreT"));
        assert!(!same(b"secret", b"secret2"));
        assert!(!same(b"", b"x"));
    }
}
