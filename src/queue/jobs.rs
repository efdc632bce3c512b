//! The bounded queue: jobs waiting for the engine, by priority (higher first) then arrival,
//! each with an optional deadline; the ids of every job queued or running, for cancel; and the
//! counters of the status reply. A `Mutex` and a `Condvar`: the front-ends only ever hold the
//! lock for a push or a lookup, and the engine thread waits on the condvar, never the runtime.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::latency::Latency;
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

/// Who a job belongs to. Ids are unique per `channel` (a socket connection, the MQTT
/// front-end); `peer` is the principal behind it ("uid:1000", "mqtt"), whose requests it may
/// cancel and whose sessions it shares.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Owner {
    pub channel: u64,
    pub peer: Arc<str>,
}

impl Owner {
    pub fn new(channel: u64, peer: &str) -> Owner {
        Owner {
            channel,
            peer: peer.into(),
        }
    }
}

/// Who asks to cancel or for status: an owner, and whether it may act on every peer's work.
#[derive(Debug, Clone, Copy)]
pub struct Caller<'a> {
    pub owner: &'a Owner,
    pub admin: bool,
}

/// A request accepted from a front-end, on its way to the engine.
#[derive(Debug)]
pub struct Job {
    pub id: Arc<str>,
    pub owner: Owner,
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
    /// A job of `owner`'s; a session the request names becomes the owner's session.
    pub fn new(
        id: &str,
        owner: Owner,
        frontend: &'static str,
        mut req: GenerateRequest,
        reply: ReplyTx,
    ) -> Job {
        if let Some(s) = &mut req.session {
            s.owner = owner.peer.to_string();
        }
        Job {
            id: id.into(),
            owner,
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
    pub latency: Latency,
}

type Key = (u64, Arc<str>);

struct Active {
    peer: Arc<str>,
    cancel: Arc<AtomicBool>,
}

fn key(job: &Job) -> Key {
    (job.owner.channel, job.id.clone())
}

struct Inner {
    /// Waiting jobs; the next to run is the one with the highest (priority, -seq).
    waiting: Vec<(u64, Job)>,
    seq: u64,
    /// Waiting and running jobs by owner channel and id, with their owners' peers and cancel
    /// flags.
    active: HashMap<Key, Active>,
    running: Option<(Arc<str>, Owner, &'static str, Instant)>,
    accepting: bool,
    counters: Counters,
    latency: Latency,
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
                latency: Latency::default(),
            }),
            changed: Condvar::new(),
            capacity,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock leaves plain data behind; keep serving.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a job submitted now would not be refused for a full queue (it would be queued,
    /// or refused for another reason).
    pub fn has_room(&self) -> bool {
        let g = self.lock();
        !g.accepting || g.waiting.len() < self.capacity
    }

    /// Queues a job, or refuses it with its error reply sent: `shutting_down` after
    /// [`Queue::close`], `bad_request` for an id its channel already has queued or running,
    /// `queue_full` when `capacity` jobs are waiting.
    pub fn submit(&self, job: Job) -> Submit {
        let mut g = self.lock();
        g.counters.received += 1;
        let refused = if !g.accepting {
            Some((
                ErrorCode::ShuttingDown,
                "the daemon is shutting down".to_string(),
            ))
        } else if g.active.contains_key(&key(&job)) {
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
        g.active.insert(
            key(&job),
            Active {
                peer: job.owner.peer.clone(),
                cancel: job.cancel.clone(),
            },
        );
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
                g.running = Some((job.id.clone(), job.owner.clone(), job.frontend, now));
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
    pub fn finished(&self, job: &Job, outcome: &Event) {
        let mut g = self.lock();
        g.active.remove(&key(job));
        g.running = None;
        match outcome {
            Event::Done(d) => {
                g.latency.record(
                    d.usage.completion_tokens,
                    d.timing.ttft_ms,
                    d.timing.decode_tps,
                );
                let c = &mut g.counters;
                c.done += 1;
                c.prompt_tokens += d.usage.prompt_tokens as u64;
                c.completion_tokens += d.usage.completion_tokens as u64;
                match d.finish_reason {
                    FinishReason::Cancelled => c.cancelled += 1,
                    FinishReason::Deadline => c.deadline_running += 1,
                    _ => {}
                }
            }
            Event::Error(..) => g.counters.failed += 1,
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
            g.active.remove(&key(&job));
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

    /// Cancels `id` for `caller`: a job of the caller's own channel with that id; failing
    /// that, the caller's peer's jobs with that id on its other channels (an admin's: anyone's).
    /// A waiting job is answered at once, the running one flagged. Another peer's job is
    /// `unknown` to a caller that is not an admin, exactly as an id that does not exist.
    pub fn cancel(&self, caller: Caller<'_>, id: &str) -> CancelState {
        let mut g = self.lock();
        let own = (caller.owner.channel, Arc::<str>::from(id));
        let targets: Vec<Key> = if g.active.contains_key(&own) {
            vec![own]
        } else {
            g.active
                .iter()
                .filter(|((_, i), a)| &**i == id && (caller.admin || a.peer == caller.owner.peer))
                .map(|(k, _)| k.clone())
                .collect()
        };
        let mut state = CancelState::Unknown;
        let mut answered = Vec::new();
        for k in targets {
            if let Some(i) = g.waiting.iter().position(|(_, j)| key(j) == k) {
                let (_, job) = g.waiting.swap_remove(i);
                g.active.remove(&k);
                g.counters.done += 1;
                g.counters.cancelled += 1;
                answered.push(job);
                state = CancelState::Queued;
            } else if let Some(a) = g.active.get(&k) {
                a.cancel.store(true, Ordering::Relaxed);
                if state == CancelState::Unknown {
                    state = CancelState::Running;
                }
            }
        }
        drop(g);
        if !answered.is_empty() {
            for job in answered {
                job.send(Event::Done(Box::new(Completion::empty(
                    FinishReason::Cancelled,
                ))));
            }
            self.changed.notify_all();
        }
        state
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
            g.active.remove(&key(&job));
            g.counters.failed += 1;
            job.send(Event::Error(
                ErrorCode::ShuttingDown,
                "the daemon is shutting down; the request did not start within the grace period"
                    .into(),
            ));
        }
        for a in g.active.values() {
            a.cancel.store(true, Ordering::Relaxed);
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
            running: g
                .running
                .as_ref()
                .map(|(id, owner, frontend, since)| Running {
                    id: Some(id.to_string()),
                    owner: owner.peer.to_string(),
                    frontend: frontend.to_string(),
                    elapsed_ms: since.elapsed().as_millis() as u64,
                }),
            counters: g.counters.clone(),
            latency: g.latency.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::sync::mpsc;

    use super::*;
    use crate::api::Prompt;

    fn owner() -> Owner {
        Owner::new(1, "uid:1000")
    }

    fn me() -> Caller<'static> {
        static OWNER: std::sync::OnceLock<Owner> = std::sync::OnceLock::new();
        Caller {
            owner: OWNER.get_or_init(owner),
            admin: false,
        }
    }

    fn job(id: &str, tx: &mpsc::UnboundedSender<Reply>) -> Job {
        job_of(id, owner(), tx)
    }

    fn job_of(id: &str, owner: Owner, tx: &mpsc::UnboundedSender<Reply>) -> Job {
        Job::new(
            id,
            owner,
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
            &next,
            &Event::Done(Box::new(Completion::empty(FinishReason::Stop))),
        );
        assert_eq!(q.cancel(me(), "a"), CancelState::Queued);
        let r = terminal(&mut rx);
        assert!(
            matches!(&r.event, Event::Done(c) if c.finish_reason == FinishReason::Cancelled),
            "{r:?}"
        );
        let running = q.next(Duration::ZERO).expect("low");
        assert_eq!(&*running.id, "low");
        assert_eq!(q.cancel(me(), "low"), CancelState::Running);
        assert!(running.cancelled());
        assert_eq!(q.cancel(me(), "nobody"), CancelState::Unknown);

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

    /// Ids are per channel; cancel reaches the caller's own jobs (an admin's: anyone's); a
    /// session names the owner's session; status names the running job's owner.
    #[test]
    fn jobs_belong_to_their_owners() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let q = Queue::new(8);
        let alice = Owner::new(1, "uid:1000");
        let alice2 = Owner::new(2, "uid:1000");
        let bob = Owner::new(3, "uid:1001");
        // The same id on three channels: three jobs.
        for o in [&alice, &alice2, &bob] {
            assert_eq!(q.submit(job_of("r1", o.clone(), &tx)), Submit::Queued);
        }
        // Bob's channel cancels its own r1 only.
        let bob_c = Caller {
            owner: &bob,
            admin: false,
        };
        assert_eq!(q.cancel(bob_c, "r1"), CancelState::Queued);
        let r = terminal(&mut rx);
        assert!(matches!(r.event, Event::Done(_)));
        assert!(rx.try_recv().is_err(), "only bob's job was answered");
        // Bob from another channel cannot reach alice's jobs: they are unknown to him.
        let bob_elsewhere = Owner::new(9, "uid:1001");
        let c = Caller {
            owner: &bob_elsewhere,
            admin: false,
        };
        assert_eq!(q.cancel(c, "r1"), CancelState::Unknown);
        assert_eq!(q.status().depth, 2);
        // Alice from a third channel reaches both of hers.
        let alice3 = Owner::new(4, "uid:1000");
        let c = Caller {
            owner: &alice3,
            admin: false,
        };
        assert_eq!(q.cancel(c, "r1"), CancelState::Queued);
        terminal(&mut rx);
        terminal(&mut rx);
        assert_eq!(q.status().depth, 0);
        // An admin reaches anyone's.
        assert_eq!(q.submit(job_of("r2", alice.clone(), &tx)), Submit::Queued);
        let running = q.next(Duration::ZERO).expect("r2");
        assert_eq!(q.status().running.expect("running").owner, "uid:1000");
        let admin = Caller {
            owner: &bob_elsewhere,
            admin: true,
        };
        assert_eq!(q.cancel(admin, "r2"), CancelState::Running);
        assert!(running.cancelled());
        // The session a request names becomes its owner's.
        let mut req = GenerateRequest::new(Prompt::Messages(vec![]));
        req.session = Some(crate::api::SessionRef {
            id: "kitchen".into(),
            owner: "forged".into(),
            history: None,
        });
        let j = Job::new("s", bob.clone(), "test", req, tx.clone());
        assert_eq!(j.req.session.expect("session").owner, "uid:1001");
    }
}
