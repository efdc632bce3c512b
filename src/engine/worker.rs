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

use super::session::SessionStats;
use super::{Engine, EngineError, Sink};
use crate::queue::{Completion, ErrorCode, Event, FinishReason, Job, Queue};

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
}

impl Default for Progress {
    fn default() -> Self {
        Progress {
            start: Instant::now(),
            beat_ms: AtomicU64::new(0),
            last_tps: AtomicU64::new(0f64.to_bits()),
            kv_used: AtomicU64::new(0),
            kv_evicted: AtomicU64::new(0),
            sessions: Mutex::new(SessionStats::default()),
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

    fn set_sessions(&self, st: SessionStats) {
        match self.sessions.lock() {
            Ok(mut s) => *s = st,
            Err(p) => *p.into_inner() = st,
        }
    }
}

/// Starts the worker thread. It runs until the queue is closed and empty.
pub fn spawn(
    engine: Engine,
    queue: Arc<Queue>,
    progress: Arc<Progress>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("edgellm-engine".into())
        .spawn(move || run(engine, &queue, &progress))
}

fn run(mut engine: Engine, queue: &Queue, progress: &Progress) {
    progress.set_sessions(engine.session_stats());
    loop {
        progress.beat();
        match queue.next(IDLE_BEAT) {
            Some(job) => {
                progress.kv_used.store(0, Ordering::Relaxed);
                progress.kv_evicted.store(0, Ordering::Relaxed);
                let outcome = answer(&mut engine, &job, progress);
                progress.set_sessions(engine.session_stats());
                log(&job, &outcome);
                // Counted before it is sent: a client that asks for status after its reply
                // sees the request counted.
                queue.finished(&job.id, &outcome);
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

/// Runs one job to its terminal event. A panic inside the engine is caught and answered
/// `internal`: the next request starts from a reset cache, so the worker carries on.
fn answer(engine: &mut Engine, job: &Job, progress: &Progress) -> Event {
    if job.cancelled() {
        return Event::Done(Box::new(Completion::empty(FinishReason::Cancelled)));
    }
    let mut sink = JobSink { job, progress };
    let result =
        std::panic::catch_unwind(AssertUnwindSafe(|| engine.generate(&job.req, &mut sink)));
    match result {
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
    }
}

/// Streams a job's text to its front-end and stops it on cancel or deadline.
struct JobSink<'a> {
    job: &'a Job,
    progress: &'a Progress,
}

impl Sink for JobSink<'_> {
    fn text(&mut self, text: &str) {
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
            code = code.as_str(),
            total_ms = waited_ms,
            "request failed: {message}"
        ),
        Event::Token(_) => {}
    }
}
