//! The engine worker: one OS thread that owns the [`Engine`] (model and KV cache) and runs the
//! queue's jobs one at a time. Inference never runs on the async runtime.
//!
//! The thread beats a [`Progress`] heartbeat when it waits for work, between prefill chunks and
//! at every token; the daemon sends systemd's `WATCHDOG=1` only while that heartbeat is fresh,
//! so a wedged engine stops the pings and systemd restarts the service.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{Engine, EngineError, Sink};
use crate::api::status::SessionStats;
use crate::api::{Completion, ErrorCode, Event, FinishReason, GenerateRequest, Prompt};
use crate::queue::{Job, Queue};

/// How long the worker waits for a job before beating the heartbeat again.
const IDLE_BEAT: Duration = Duration::from_millis(200);

/// Liveness and speed of the engine, shared with the daemon without locks.
#[derive(Debug)]
pub struct Progress {
    start: Instant,
    /// Milliseconds since `start` of the latest beat.
    beat_ms: AtomicU64,
    /// Decode tokens/s of the latest finished request (f64 bits).
    last_tps: AtomicU64,
    /// Window positions in use by the running request, and positions it has evicted.
    kv_used: AtomicU64,
    kv_evicted: AtomicU64,
    /// The engine's sessions, after the latest request.
    sessions: Mutex<SessionStats>,
    /// The backend in use as status shows it; changes when the int4 engine takes over.
    backend: Mutex<BackendLabel>,
}

/// The backend in use: `backend` is "ort", "cpu-int4", or "cpu-int4 (fallback: <reason>)".
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct BackendLabel {
    pub backend: String,
    /// Kernels or execution provider.
    pub compute: String,
    pub threads: usize,
    /// Why ONNX Runtime is not in use, when it was configured.
    pub fallback: Option<String>,
}

impl BackendLabel {
    pub fn new(engine: &Engine, fallback: Option<String>) -> BackendLabel {
        let info = engine.backend.info();
        BackendLabel {
            backend: match &fallback {
                Some(why) => format!("{} (fallback: {why})", info.backend),
                None => info.backend,
            },
            compute: info.compute,
            threads: info.threads,
            fallback,
        }
    }
}

/// Builds the int4 CPU engine that takes over when ONNX Runtime fails while running.
pub type Fallback = Box<dyn FnOnce() -> Result<Engine, EngineError> + Send>;

impl Default for Progress {
    fn default() -> Self {
        Progress {
            start: Instant::now(),
            beat_ms: AtomicU64::new(0),
            last_tps: AtomicU64::new(0f64.to_bits()),
            kv_used: AtomicU64::new(0),
            kv_evicted: AtomicU64::new(0),
            sessions: Mutex::new(SessionStats::default()),
            backend: Mutex::new(BackendLabel::default()),
        }
    }
}

impl Progress {
    pub fn beat(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.beat_ms.store(ms, Ordering::Relaxed);
    }

    /// Time since the latest beat.
    pub fn since_beat(&self) -> Duration {
        let now = self.start.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.beat_ms.load(Ordering::Relaxed)))
    }

    pub fn last_tps(&self) -> f64 {
        f64::from_bits(self.last_tps.load(Ordering::Relaxed))
    }

    /// Window positions in use by the running request, and positions it evicted so far.
    pub fn kv(&self) -> (u64, u64) {
        (
            self.kv_used.load(Ordering::Relaxed),
            self.kv_evicted.load(Ordering::Relaxed),
        )
    }

    pub fn sessions(&self) -> SessionStats {
        self.sessions
            .lock()
            .map(|s| s.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    pub fn backend(&self) -> BackendLabel {
        self.backend
            .lock()
            .map(|s| s.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    pub fn set_backend(&self, b: BackendLabel) {
        match self.backend.lock() {
            Ok(mut s) => *s = b,
            Err(p) => *p.into_inner() = b,
        }
    }

    fn set_sessions(&self, st: SessionStats) {
        match self.sessions.lock() {
            Ok(mut s) => *s = st,
            Err(p) => *p.into_inner() = st,
        }
    }
}

/// Starts the worker thread. It runs until the queue is closed and empty.
/// `fallback`, when given, replaces the engine if its backend fails while running a request;
/// that request is then finished on the new engine.
pub fn spawn(
    engine: Engine,
    queue: Arc<Queue>,
    progress: Arc<Progress>,
    fallback: Option<Fallback>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("edgellm-engine".into())
        .spawn(move || run(engine, &queue, &progress, fallback))
}

fn run(mut engine: Engine, queue: &Queue, progress: &Progress, mut fallback: Option<Fallback>) {
    progress.set_sessions(engine.session_stats());
    loop {
        progress.beat();
        match queue.next(IDLE_BEAT) {
            Some(job) => {
                progress.kv_used.store(0, Ordering::Relaxed);
                progress.kv_evicted.store(0, Ordering::Relaxed);
                let (mut outcome, sent) = answer(&mut engine, &job, &job.req, progress);
                if let Event::Error(ErrorCode::Internal, why) = &outcome {
                    if let Some(f) = fallback.take() {
                        outcome = take_over(&mut engine, f, why, &job, sent, progress);
                    }
                }
                progress.set_sessions(engine.session_stats());
                log(&job, &outcome);
                // Counted before it is sent: a client that asks for status after its reply
                // sees the request counted.
                queue.finished(&job, &outcome);
                job.send(outcome);
            }
            None if queue.accepting() => continue,
            None => {
                tracing::debug!("engine worker: queue closed and empty, stopping");
                return;
            }
        }
    }
}

/// The backend failed while running `job`: the int4 engine replaces it (with the same window
/// and session settings) and finishes the job, continuing after the text already streamed.
fn take_over(
    engine: &mut Engine,
    fallback: Fallback,
    why: &str,
    job: &Job,
    sent: String,
    progress: &Progress,
) -> Event {
    let failed = Event::Error(ErrorCode::Internal, why.to_string());
    let mut next = match fallback() {
        Ok(e) => e,
        Err(e) => {
            tracing::error!("the int4 CPU engine could not take over from ONNX Runtime: {e}");
            return failed;
        }
    };
    next.adopt_settings(engine);
    *engine = next;
    let reason = format!("error while running: {why}");
    tracing::warn!(
        id = &*job.id,
        "ort backend failed ({why}); the int4 CPU engine takes over"
    );
    progress.set_backend(BackendLabel::new(engine, Some(reason)));
    // What the client has seen so far is kept: the rest is generated after it.
    let mut req = job.req.clone();
    let mut tokens = 0;
    if !sent.is_empty() {
        let prompt = match engine.prompt_text(&req.prompt, &req.tools) {
            Ok(p) => p,
            Err(e) => return Event::Error(ErrorCode::Internal, e.to_string()),
        };
        tokens = engine.tokenizer.encode(&sent).map_or(0, |t| t.len());
        req.prompt = Prompt::Raw(prompt + &sent);
        req.max_tokens = req.max_tokens.saturating_sub(tokens).max(1);
    }
    req.session = None;
    match answer(engine, job, &req, progress).0 {
        Event::Done(mut c) => {
            c.text = sent + &c.text;
            c.usage.completion_tokens += tokens;
            Event::Done(c)
        }
        other => other,
    }
}

/// Runs one job to its terminal event. A panic inside the engine is caught and answered
/// `internal`: the next request starts from a reset cache, so the worker carries on.
/// Also returns the text generated before the end (what a take-over continues from).
fn answer(
    engine: &mut Engine,
    job: &Job,
    req: &GenerateRequest,
    progress: &Progress,
) -> (Event, String) {
    if job.cancelled() {
        let e = Event::Done(Box::new(Completion::empty(FinishReason::Cancelled)));
        return (e, Default::default());
    }
    let mut sink = JobSink {
        job,
        progress,
        text: String::new(),
    };
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| engine.generate(req, &mut sink)));
    let partial = std::mem::take(&mut sink.text);
    let event = match result {
        Ok(Ok(c)) => {
            if c.usage.completion_tokens > 1 {
                progress
                    .last_tps
                    .store(c.timing.decode_tps.to_bits(), Ordering::Relaxed);
            }
            Event::Done(Box::new(c))
        }
        Ok(Err(e)) => {
            let code = match &e {
                EngineError::PromptTooLong { .. } | EngineError::TurnTooLong { .. } => {
                    ErrorCode::TooLarge
                }
                EngineError::SessionUnknown(_) => ErrorCode::SessionUnknown,
                EngineError::EmptyPrompt | EngineError::BadRequest(_) | EngineError::Chat(_) => {
                    ErrorCode::BadRequest
                }
                _ => ErrorCode::Internal,
            };
            if code == ErrorCode::Internal {
                tracing::error!(id = &*job.id, "engine error: {e}");
            }
            Event::Error(code, e.to_string())
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            tracing::error!(id = &*job.id, "engine panicked: {what}");
            Event::Error(ErrorCode::Internal, format!("engine failure: {what}"))
        }
    };
    (event, partial)
}

/// Streams a job's text to its front-end and stops it on cancel or deadline.
struct JobSink<'a> {
    job: &'a Job,
    progress: &'a Progress,
    /// Text produced so far.
    text: String,
}

impl Sink for JobSink<'_> {
    fn text(&mut self, text: &str) {
        self.text.push_str(text);
        if self.job.stream && !text.is_empty() {
            self.job.send(Event::Token(text.to_string()));
        }
    }

    fn interrupt(&mut self) -> Option<FinishReason> {
        self.progress.beat();
        if self.job.cancelled() {
            return Some(FinishReason::Cancelled);
        }
        if self.job.deadline.is_some_and(|d| Instant::now() >= d) {
            return Some(FinishReason::Deadline);
        }
        None
    }

    fn kv(&mut self, used: usize, evicted: usize) {
        self.progress.kv_used.store(used as u64, Ordering::Relaxed);
        self.progress
            .kv_evicted
            .store(evicted as u64, Ordering::Relaxed);
    }
}

/// The one info line per request.
fn log(job: &Job, outcome: &Event) {
    let waited_ms = job.arrived.elapsed().as_millis() as u64;
    match outcome {
        Event::Done(c) => tracing::info!(
            id = &*job.id,
            frontend = job.frontend,
            priority = job.priority,
            prompt_tokens = c.usage.prompt_tokens,
            completion_tokens = c.usage.completion_tokens,
            cached_tokens = c.usage.cached_tokens,
            dropped_tokens = c.usage.prompt_tokens_dropped,
            evicted_tokens = c.usage.evicted_tokens,
            ttft_ms = c.timing.ttft_ms.round() as u64,
            tps = (c.timing.decode_tps * 10.0).round() / 10.0,
            total_ms = waited_ms,
            finish = c.finish_reason.as_str(),
            "request done"
        ),
        Event::Error(code, message) => tracing::info!(
            id = &*job.id,
            frontend = job.frontend,
            priority = job.priority,
            code = code.as_str(),
            total_ms = waited_ms,
            "request failed: {message}"
        ),
        Event::Token(_) => {}
    }
}
