//! The bounded queue: jobs waiting for the engine, by priority (higher first) then arrival,
//! each with an optional deadline; the ids of every job queued or running, for cancel; and the
//! counters of the status reply. A `Mutex` and a `Condvar`: the front-ends only ever hold the
//! lock for a push or a lookup, and the engine thread waits on the condvar, never the runtime.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::api::status::{Counters, Running};
use crate::api::{CancelState, Completion, ErrorCode, Event, FinishReason, GenerateRequest};

#[derive(Debug, Clone)]
pub struct Reply {
    pub id: Arc<str>,
    pub event: Event,
}

/// A front-end's reply channel. Unbounded so that sending never blocks the engine; what it can
/// hold is bounded by the requests a front-end has in flight and their `max_tokens`.
pub type ReplyTx = tokio::sync::mpsc::UnboundedSender<Reply>;

/// A request accepted from a front-end, on its way to the engine.
#[derive(Debug)]
pub struct Job {
    pub id: Arc<str>,
    /// "unix", "mqtt": for logs and status.
    pub frontend: &'static str,
    pub req: GenerateRequest,
    pub stream: bool,
    /// Higher runs first; equal priorities run in arrival order.
    pub priority: i32,
    pub deadline: Option<Instant>,
    pub arrived: Instant,
    pub reply: ReplyTx,
    /// Set by `cancel` (and by shutdown after its grace period); the engine checks it per token.
    pub cancel: Arc<AtomicBool>,
}

impl Job {
    pub fn new(id: &str, frontend: &'static str, req: GenerateRequest, reply: ReplyTx) -> Job {
        Job {
            id: id.into(),
            frontend,
            req,
            stream: false,
            priority: 0,
            deadline: None,
            arrived: Instant::now(),
            reply,
            cancel: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Sends an event to the job's front-end. A front-end that went away drops it: its
    /// connection closed, which already cancelled the job.
    pub fn send(&self, event: Event) {
        let _ = self.reply.send(Reply {
            id: self.id.clone(),
            event,
        });
    }

    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }
}

/// How a submission went. Refused jobs have already been sent their error reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Submit {
    Queued,
    Refused(ErrorCode),
}

#[derive(Debug, Clone)]
pub struct QueueStatus {
    pub depth: usize,
    pub capacity: usize,
    pub accepting: bool,
    pub running: Option<Running>,
    pub counters: Counters,
}

struct Inner {
    /// Waiting jobs; the next to run is the one with the highest (priority, -seq).
    waiting: Vec<(u64, Job)>,
    seq: u64,
    /// Ids of waiting and running jobs, with their cancel flags.
    active: HashMap<Arc<str>, Arc<AtomicBool>>,
    running: Option<(Arc<str>, &'static str, Instant)>,
    accepting: bool,
    counters: Counters,
}

pub struct Queue {
    inner: Mutex<Inner>,
    changed: Condvar,
    capacity: usize,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("capacity", &self.capacity)
            .finish()
    }
}

impl Queue {
    pub fn new(capacity: usize) -> Queue {
        Queue {
            inner: Mutex::new(Inner {
                waiting: Vec::with_capacity(capacity),
                seq: 0,
                active: HashMap::with_capacity(capacity + 1),
                running: None,
                accepting: true,
                counters: Counters::default(),
            }),
            changed: Condvar::new(),
            capacity,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock leaves plain data behind; keep serving.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a job, or refuses it with its error reply sent: `shutting_down` after
    /// [`Queue::close`], `bad_request` for an id already queued or running, `queue_full` when
    /// `capacity` jobs are waiting.
    pub fn submit(&self, job: Job) -> Submit {
        let mut g = self.lock();
        g.counters.received += 1;
        let refused = if !g.accepting {
            Some((
                ErrorCode::ShuttingDown,
                "the daemon is shutting down".to_string(),
            ))
        } else if g.active.contains_key(&job.id) {
            Some((
                ErrorCode::BadRequest,
                format!("id {:?} is already queued or running", &*job.id),
            ))
        } else if g.waiting.len() >= self.capacity {
            Some((
                ErrorCode::QueueFull,
                format!("the queue is full ({} waiting)", self.capacity),
            ))
        } else {
            None
        };
        if let Some((code, message)) = refused {
            match code {
                ErrorCode::QueueFull => g.counters.queue_full += 1,
                ErrorCode::ShuttingDown => g.counters.shutting_down += 1,
                _ => g.counters.refused_other += 1,
            }
            drop(g);
            job.send(Event::Error(code, message));
            return Submit::Refused(code);
        }
        g.counters.accepted += 1;
        g.active.insert(job.id.clone(), job.cancel.clone());
        let seq = g.seq;
        g.seq += 1;
        g.waiting.push((seq, job));
        drop(g);
        self.changed.notify_all();
        Submit::Queued
    }

    /// The engine's side: the next job to run, waiting up to `timeout`. Jobs whose deadline has
    /// passed are answered and skipped. `None` on timeout, or at once when the queue is closed
    /// and empty (the engine's cue to stop).
    pub fn next(&self, timeout: Duration) -> Option<Job> {
        let until = Instant::now() + timeout;
        let mut g = self.lock();
        loop {
            let now = Instant::now();
            self.expire(&mut g, now);
            let best = g
                .waiting
                .iter()
                .enumerate()
                .max_by_key(|(_, (seq, j))| (j.priority, std::cmp::Reverse(*seq)))
                .map(|(i, _)| i);
            if let Some(i) = best {
                let (_, job) = g.waiting.swap_remove(i);
                g.running = Some((job.id.clone(), job.frontend, now));
                drop(g);
                self.changed.notify_all();
                return Some(job);
            }
            if !g.accepting {
                return None;
            }
            g = self.wait(g, until)?;
        }
    }

    /// Waits for a change until `until`; `None` once it has passed.
    fn wait<'a>(&self, g: MutexGuard<'a, Inner>, until: Instant) -> Option<MutexGuard<'a, Inner>> {
        let now = Instant::now();
        if now >= until {
            return None;
        }
        let (g, _) = self
            .changed
            .wait_timeout(g, until - now)
            .unwrap_or_else(|p| p.into_inner());
        Some(g)
    }

    /// The engine's side: the job's terminal reply was sent.
    pub fn finished(&self, id: &str, outcome: &Event) {
        let mut g = self.lock();
        g.active.remove(id);
        g.running = None;
        let c = &mut g.counters;
        match outcome {
            Event::Done(d) => {
                c.done += 1;
                c.prompt_tokens += d.usage.prompt_tokens as u64;
                c.completion_tokens += d.usage.completion_tokens as u64;
                match d.finish_reason {
                    FinishReason::Cancelled => c.cancelled += 1,
                    FinishReason::Deadline => c.deadline_running += 1,
                    _ => {}
                }
            }
            Event::Error(..) => c.failed += 1,
            Event::Token(_) => {}
        }
        drop(g);
        self.changed.notify_all();
    }

    /// Answers `deadline` to every waiting job whose deadline has passed. The engine does this
    /// before each pick; the daemon also calls it on a timer so that a job behind a long
    /// generation is answered when its deadline passes, not when the engine is free.
    pub fn expire_now(&self) {
        let mut g = self.lock();
        self.expire(&mut g, Instant::now());
    }

    fn expire(&self, g: &mut Inner, now: Instant) {
        let mut i = 0;
        while i < g.waiting.len() {
            let due = g.waiting[i].1.deadline.is_some_and(|d| d <= now);
            if !due {
                i += 1;
                continue;
            }
            let (_, job) = g.waiting.swap_remove(i);
            g.active.remove(&job.id);
            g.counters.deadline_queued += 1;
            let waited = now.saturating_duration_since(job.arrived).as_millis();
            job.send(Event::Error(
                ErrorCode::Deadline,
                format!(
                    "the deadline passed after {waited} ms in the queue; the request never started"
                ),
            ));
        }
    }

    /// Cancels a waiting job (answered at once) or flags the running one.
    pub fn cancel(&self, id: &str) -> CancelState {
        let mut g = self.lock();
        if let Some(i) = g.waiting.iter().position(|(_, j)| &*j.id == id) {
            let (_, job) = g.waiting.swap_remove(i);
            g.active.remove(id);
            g.counters.done += 1;
            g.counters.cancelled += 1;
            drop(g);
            job.send(Event::Done(Box::new(Completion::empty(
                FinishReason::Cancelled,
            ))));
            self.changed.notify_all();
            return CancelState::Queued;
        }
        match g.active.get(id) {
            Some(flag) => {
                flag.store(true, Ordering::Relaxed);
                CancelState::Running
            }
            None => CancelState::Unknown,
        }
    }

    /// Stops taking jobs: later submissions are refused `shutting_down`, and [`Queue::next`]
    /// returns `None` once the waiting jobs are gone.
    pub fn close(&self) {
        self.lock().accepting = false;
        self.changed.notify_all();
    }

    /// Shutdown after the grace period: waiting jobs are answered `shutting_down`, the running
    /// one is cancelled (it ends with `finish_reason: "cancelled"`).
    pub fn abort_all(&self) {
        let mut g = self.lock();
        g.accepting = false;
        let waiting = std::mem::take(&mut g.waiting);
        for (_, job) in waiting {
            g.active.remove(&job.id);
            g.counters.failed += 1;
            job.send(Event::Error(
                ErrorCode::ShuttingDown,
                "the daemon is shutting down; the request did not start within the grace period"
                    .into(),
            ));
        }
        for flag in g.active.values() {
            flag.store(true, Ordering::Relaxed);
        }
        drop(g);
        self.changed.notify_all();
    }

    pub fn accepting(&self) -> bool {
        self.lock().accepting
    }

    /// Waits (blocking) until the queue is idle or `timeout` passes; true when idle.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let until = Instant::now() + timeout;
        let mut g = self.lock();
        while !(g.waiting.is_empty() && g.running.is_none()) {
            match self.wait(g, until) {
                Some(next) => g = next,
                None => return false,
            }
        }
        true
    }

    pub fn status(&self) -> QueueStatus {
        let g = self.lock();
        QueueStatus {
            depth: g.waiting.len(),
            capacity: self.capacity,
            accepting: g.accepting,
            running: g.running.as_ref().map(|(id, frontend, since)| Running {
                id: id.to_string(),
                frontend: frontend.to_string(),
                elapsed_ms: since.elapsed().as_millis() as u64,
            }),
            counters: g.counters.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::sync::mpsc;

    use super::*;
    use crate::api::Prompt;

    fn job(id: &str, tx: &mpsc::UnboundedSender<Reply>) -> Job {
        Job::new(
            id,
            "test",
            GenerateRequest::new(Prompt::Raw("x".into())),
            tx.clone(),
        )
    }

    fn terminal(rx: &mut mpsc::UnboundedReceiver<Reply>) -> Reply {
        rx.try_recv().expect("a reply")
    }

    #[test]
    fn queue_is_bounded_ordered_by_priority_and_answers_every_job() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let q = Queue::new(3);
        let mut low = job("low", &tx);
        low.priority = -1;
        assert_eq!(q.submit(low), Submit::Queued);
        assert_eq!(q.submit(job("a", &tx)), Submit::Queued);
        let mut high = job("high", &tx);
        high.priority = 5;
        assert_eq!(q.submit(high), Submit::Queued);
        // Full: refused at once, with its error reply.
        assert_eq!(
            q.submit(job("extra", &tx)),
            Submit::Refused(ErrorCode::QueueFull)
        );
        let r = terminal(&mut rx);
        assert_eq!(&*r.id, "extra");
        assert!(matches!(r.event, Event::Error(ErrorCode::QueueFull, _)));
        // A duplicate of a queued id is refused.
        assert_eq!(
            q.submit(job("a", &tx)),
            Submit::Refused(ErrorCode::BadRequest)
        );
        terminal(&mut rx);

        let next = q.next(Duration::ZERO).expect("a job");
        assert_eq!(&*next.id, "high");
        q.finished(
            &next.id,
            &Event::Done(Box::new(Completion::empty(FinishReason::Stop))),
        );
        assert_eq!(q.cancel("a"), CancelState::Queued);
        let r = terminal(&mut rx);
        assert!(
            matches!(&r.event, Event::Done(c) if c.finish_reason == FinishReason::Cancelled),
            "{r:?}"
        );
        let running = q.next(Duration::ZERO).expect("low");
        assert_eq!(&*running.id, "low");
        assert_eq!(q.cancel("low"), CancelState::Running);
        assert!(running.cancelled());
        assert_eq!(q.cancel("nobody"), CancelState::Unknown);

        // A deadline that passes in the queue is answered `deadline` and the job never runs.
        let mut late = job("late", &tx);
        late.deadline = Some(Instant::now());
        assert_eq!(q.submit(late), Submit::Queued);
        q.expire_now();
        let r = terminal(&mut rx);
        assert!(matches!(r.event, Event::Error(ErrorCode::Deadline, _)));

        // Shutdown: waiting jobs are answered, new ones refused.
        assert_eq!(q.submit(job("w", &tx)), Submit::Queued);
        q.abort_all();
        let r = terminal(&mut rx);
        assert!(matches!(r.event, Event::Error(ErrorCode::ShuttingDown, _)));
        assert_eq!(
            q.submit(job("after", &tx)),
            Submit::Refused(ErrorCode::ShuttingDown)
        );
        terminal(&mut rx);
        let c = q.status().counters;
        assert_eq!(c.received, 8);
        assert_eq!(c.accepted, 5);
        assert_eq!((c.queue_full, c.refused_other, c.shutting_down), (1, 1, 1));
        assert_eq!(
            (c.done, c.cancelled, c.deadline_queued, c.failed),
            (2, 1, 1, 1)
        );
    }
}
