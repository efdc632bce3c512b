//! A fixed pool of worker threads, started once with the model, that runs one job at a time.
//! Each parallel step of a forward pass is a `run` of `units` pieces of work, which the caller
//! (thread 0) and the workers claim in turn until none is left.
//!
//! A forward pass of a small model has a few hundred parallel steps of a few microseconds each,
//! so waking threads through the OS on every step would cost more than the work. Workers spin on
//! the job word for a while after each job, then park; the caller unparks parked workers.
//! An idle daemon therefore sleeps, and a busy one never waits on the scheduler between steps.
//!
//! A step never waits for a worker that has not started it. On a shared CPU (another process
//! busy beside the daemon, a VM whose vCPU is descheduled) a worker may not run for a whole
//! scheduler slice, milliseconds, against steps of microseconds: if each step waited for every
//! worker, two threads would decode three times slower than one. Here the caller claims units
//! until none is left, then closes the job: a worker that had not entered by then skips it, and
//! the caller waits only for the units already claimed.
//!
//! A worker descheduled in the middle of a unit still holds the step up. When the caller waits
//! for stragglers much longer than a unit takes, the pool runs its steps on one thread fewer
//! for a while (5 ms, four times longer while stalls keep coming, up to a second), then tries
//! again: on a board where another process holds a core, the threads that remain have a core
//! each.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::Arc;
use std::thread::{self, JoinHandle, Thread};
use std::time::{Duration, Instant};

/// Spin iterations (each a `spin_loop` hint, tens of cycles) before a worker parks: about a
/// millisecond, longer than the gap between two tokens' steps, far shorter than an idle pause.
const SPINS: u32 = 1 << 15;

/// The job word: the number of workers inside the job (low 32 bits), whether the job is open
/// to workers (bit 32), and the job's number (the bits above).
const INSIDE: u64 = (1 << 32) - 1;
const OPEN: u64 = 1 << 32;
const GEN: u64 = 1 << 33;

type Job = dyn Fn(usize, usize) + Sync;

struct Shared {
    n_threads: usize,
    state: AtomicU64,
    /// The next unit of the current job to claim.
    next: AtomicUsize,
    /// Workers with an index at or above this do not enter jobs.
    limit: AtomicUsize,
    units: AtomicUsize,
    job: UnsafeCell<Option<*const Job>>,
    shutdown: AtomicBool,
    panicked: AtomicBool,
    sleeping: Vec<AtomicBool>,
}

// SAFETY: `job` is written only by the caller of `run` while the job word is closed and no
// worker is inside, and read by a worker only after it entered the open job (an Acquire
// compare-exchange on the word that the caller's Release store opened). The pointee is Sync.
unsafe impl Sync for Shared {}
// SAFETY: as above; the raw pointer is only dereferenced under that protocol.
unsafe impl Send for Shared {}

impl Shared {
    /// Claims units of the current job and runs them until none is left; returns how many.
    fn work(&self, job: &(dyn Fn(usize, usize) + Sync), tid: usize) -> usize {
        let units = self.units.load(Acquire);
        let mut done = 0;
        loop {
            let u = self.next.fetch_add(1, Relaxed);
            if u >= units {
                return done;
            }
            job(u, tid);
            done += 1;
        }
    }
}

pub struct Pool {
    shared: Arc<Shared>,
    threads: Vec<(Thread, JoinHandle<()>)>,
    fit: Fit,
}

/// How many threads the steps run on now, and when to try one more.
#[derive(Debug)]
struct Fit {
    active: usize,
    /// The first back-off after a quiet spell.
    min: Duration,
    retry_at: Instant,
    backoff: Duration,
    last_stall: Option<Instant>,
    stalls: u64,
}

/// A wait for stragglers longer than this, and than four of the caller's units, is a stall.
const STALL: Duration = Duration::from_micros(500);
const BACKOFF_MIN: Duration = Duration::from_millis(5);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// A stall this soon after the pool tried again (a few scheduler periods) means the contention
/// goes on: the back-off grows fourfold. A later one starts it again from the minimum.
const AGAIN: Duration = Duration::from_millis(50);

impl Fit {
    /// Called after a step that waited `wait` for stragglers, whose caller ran `own` units in
    /// `work`.
    fn step(&mut self, now: Instant, work: Duration, own: usize, wait: Duration) {
        let unit = work / own.max(1) as u32;
        if wait <= STALL.max(4 * unit) {
            return;
        }
        self.stalls += 1;
        self.backoff = match self.last_stall {
            Some(t) if now.saturating_duration_since(t) < self.backoff + AGAIN => {
                (4 * self.backoff).min(BACKOFF_MAX)
            }
            _ => self.min,
        };
        self.last_stall = Some(now);
        self.active = (self.active - 1).max(1);
        self.retry_at = now + self.backoff;
    }
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pool({} threads)", self.shared.n_threads)
    }
}

impl Pool {
    /// Starts `n_threads - 1` workers (the caller is the n-th). `n_threads` of 0 counts as 1.
    pub fn new(n_threads: usize) -> std::io::Result<Pool> {
        let n = n_threads.max(1);
        let shared = Arc::new(Shared {
            n_threads: n,
            state: AtomicU64::new(0),
            next: AtomicUsize::new(0),
            units: AtomicUsize::new(0),
            job: UnsafeCell::new(None),
            shutdown: AtomicBool::new(false),
            panicked: AtomicBool::new(false),
            sleeping: (0..n).map(|_| AtomicBool::new(false)).collect(),
            limit: AtomicUsize::new(n),
        });
        let mut threads = Vec::with_capacity(n - 1);
        for tid in 1..n {
            let s = Arc::clone(&shared);
            let h = thread::Builder::new()
                .name(format!("edgellm-worker-{tid}"))
                .spawn(move || worker(s, tid))?;
            threads.push((h.thread().clone(), h));
        }
        let fit = Fit {
            active: n,
            retry_at: Instant::now(),
            min: BACKOFF_MIN,
            backoff: BACKOFF_MIN,
            last_stall: None,
            stalls: 0,
        };
        Ok(Pool {
            shared,
            threads,
            fit,
        })
    }

    /// Steps that waited on a descheduled worker since the pool started (each one made the pool
    /// run on a thread fewer for a while).
    pub fn stalls(&self) -> u64 {
        self.fit.stalls
    }

    /// How many threads the next step may run on.
    pub fn active_threads(&self) -> usize {
        self.fit.active
    }

    pub fn n_threads(&self) -> usize {
        self.shared.n_threads
    }

    /// Runs `f(unit, thread_index)` once for every unit in `0..units`, on whichever threads
    /// claim them, and returns when all have finished. `thread_index` is below `n_threads()`
    /// and names scratch that only one thread at a time uses. `&mut self`: one job at a time.
    pub fn run(&mut self, units: usize, f: &(dyn Fn(usize, usize) + Sync)) {
        let s = &*self.shared;
        if s.n_threads == 1 || units <= 1 {
            (0..units).for_each(|u| f(u, 0));
            return;
        }
        let start = Instant::now();
        let fit = &mut self.fit;
        if fit.active < s.n_threads && start >= fit.retry_at {
            fit.active += 1;
            fit.retry_at = start + fit.backoff;
        }
        if fit.active == 1 {
            (0..units).for_each(|u| f(u, 0));
            return;
        }
        s.limit.store(fit.active, Relaxed);
        // SAFETY: the lifetime of `f` is erased for storage only; this function does not return
        // until every worker that entered the job has left it, and none can enter after it is
        // closed below. No worker is inside now (the previous run waited for them).
        unsafe {
            let ptr: *const Job = std::mem::transmute::<
                *const (dyn Fn(usize, usize) + Sync + '_),
                *const Job,
            >(f as *const _);
            *s.job.get() = Some(ptr);
        }
        s.units.store(units, Relaxed);
        s.next.store(0, Relaxed);
        let word = s.state.load(Relaxed);
        debug_assert_eq!(word & (INSIDE | OPEN), 0);
        s.state
            .store((word & !(INSIDE | OPEN)) + GEN + OPEN, SeqCst);
        for (i, (t, _)) in self.threads.iter().enumerate() {
            if s.sleeping[i + 1].load(SeqCst) {
                t.unpark();
            }
        }
        // Closes the job when the caller is done with it, returning or unwinding: no worker may
        // hold `f` after this function.
        let close = Close(s);
        let own = s.work(f, 0);
        let worked = Instant::now();
        drop(close);
        let end = Instant::now();
        self.fit.step(end, worked - start, own, end - worked);
        if s.panicked.load(SeqCst) {
            panic!("a worker thread panicked");
        }
    }
}

struct Close<'a>(&'a Shared);

impl Drop for Close<'_> {
    /// Every unit is claimed (or the caller unwinds): close the job to late workers and wait for
    /// those inside.
    fn drop(&mut self) {
        let s = self.0;
        s.next.store(usize::MAX / 2, SeqCst);
        s.state.fetch_and(!OPEN, SeqCst);
        let mut spins = 0u32;
        while s.state.load(Acquire) & INSIDE != 0 {
            spins = spins.saturating_add(1);
            if spins < SPINS {
                std::hint::spin_loop();
            } else {
                thread::yield_now();
            }
        }
    }
}

fn worker(s: Arc<Shared>, tid: usize) {
    let mut seen = 0u64;
    loop {
        let mut spins = 0u32;
        // Wait for a job this worker has not seen, and enter it while it is open.
        loop {
            let w = s.state.load(Acquire);
            if w / GEN != seen {
                if w & OPEN == 0 || tid >= s.limit.load(Relaxed) {
                    // Closed before this worker came: the caller has done it.
                    seen = w / GEN;
                    continue;
                }
                if s.state
                    .compare_exchange_weak(w, w + 1, Acquire, Relaxed)
                    .is_ok()
                {
                    seen = w / GEN;
                    break;
                }
                continue;
            }
            if s.shutdown.load(Acquire) {
                return;
            }
            spins = spins.saturating_add(1);
            if spins < SPINS {
                std::hint::spin_loop();
            } else {
                s.sleeping[tid].store(true, SeqCst);
                if s.state.load(SeqCst) / GEN == seen && !s.shutdown.load(SeqCst) {
                    // The timeout is only a safety net: `run` unparks sleeping workers.
                    thread::park_timeout(Duration::from_millis(100));
                }
                s.sleeping[tid].store(false, SeqCst);
            }
        }
        // SAFETY: this worker entered the open job, so `run` stored it before the Release store
        // that opened it, and keeps the closure alive until this worker leaves.
        let job = unsafe { (*s.job.get()).map(|p| &*p) };
        if let Some(job) = job {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| s.work(job, tid)));
            if r.is_err() {
                s.panicked.store(true, SeqCst);
            }
        }
        s.state.fetch_sub(1, Release);
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, SeqCst);
        for (t, h) in self.threads.drain(..) {
            t.unpark();
            let _ = h.join();
        }
    }
}

/// The part `[start, end)` of `0..n` that thread `tid` of `nt` takes, in multiples of `align`.
pub fn split(n: usize, tid: usize, nt: usize, align: usize) -> std::ops::Range<usize> {
    let units = n.div_ceil(align);
    let start = (units * tid / nt * align).min(n);
    let end = (units * (tid + 1) / nt * align).min(n);
    start..end
}

/// A mutable slice shared by the threads of one `run`, each writing a disjoint part.
#[derive(Clone, Copy)]
pub struct Shards<T> {
    ptr: *mut T,
    len: usize,
}

// SAFETY: access goes through `part`, whose contract forbids overlapping parts.
unsafe impl<T: Send> Send for Shards<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Sync for Shards<T> {}

impl<T> Shards<T> {
    pub fn new(s: &mut [T]) -> Shards<T> {
        Shards {
            ptr: s.as_mut_ptr(),
            len: s.len(),
        }
    }

    /// The elements `[start, start + len)`.
    ///
    /// # Safety
    /// No two parts handed out for the same `Shards` may overlap while both are alive, and the
    /// slice it was made from must outlive them (it does: both live inside one `Pool::run`).
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn part(&self, start: usize, len: usize) -> &mut [T] {
        assert!(start + len <= self.len, "shard out of range");
        // SAFETY: in bounds (checked above); exclusivity is the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(start), len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_unit_runs_once() {
        let mut pool = Pool::new(3).expect("pool");
        let counts: Vec<AtomicUsize> = (0..100).map(|_| AtomicUsize::new(0)).collect();
        let sizes = [0usize, 1, 2, 3, 7, 100];
        for i in 0..20_000 {
            let units = sizes[i % sizes.len()];
            pool.run(units, &|u, tid| {
                assert!(tid < 3);
                counts[u].fetch_add(1, SeqCst);
            });
        }
        // Job sizes cycle through `sizes`: unit u ran once in each job that had it.
        for (u, c) in counts.iter().enumerate() {
            let jobs = (0..20_000).filter(|i| sizes[i % sizes.len()] > u).count();
            assert_eq!(c.load(SeqCst), jobs, "unit {u}");
        }
    }

    /// Runs jobs of 8 units of 1 ms until one unit runs on a worker; how many jobs that took.
    fn jobs_until_a_worker_helps(pool: &mut Pool) -> Option<usize> {
        let helped = AtomicBool::new(false);
        for i in 1..=200 {
            pool.run(8, &|_, tid| {
                thread::sleep(Duration::from_millis(1));
                if tid != 0 {
                    helped.store(true, SeqCst);
                }
            });
            if helped.load(SeqCst) {
                return Some(i);
            }
        }
        None
    }

    #[test]
    fn workers_wake_after_parking() {
        let mut pool = Pool::new(2).expect("pool");
        assert!(jobs_until_a_worker_helps(&mut pool).is_some());
        // Long enough for the worker to spin out and park.
        thread::sleep(Duration::from_millis(300));
        assert!(jobs_until_a_worker_helps(&mut pool).is_some());
    }

    /// A worker that holds a step up (here: sleeps 50 ms inside a unit, as a descheduled one
    /// would) makes the pool run on one thread fewer for a while, then try again.
    #[test]
    fn a_stalled_worker_is_left_out_for_a_while() {
        let mut pool = Pool::new(2).expect("pool");
        // Long enough that the check below runs inside it on a busy test machine.
        pool.fit.min = Duration::from_secs(5);
        let stall_once = AtomicBool::new(true);
        // Fast units, many of them; the first one a worker takes stalls.
        for _ in 0..100_000 {
            pool.run(64, &|_, tid| {
                if tid != 0 && stall_once.swap(false, SeqCst) {
                    thread::sleep(Duration::from_millis(50));
                }
            });
            if pool.stalls() > 0 {
                break;
            }
        }
        assert!(pool.stalls() >= 1);
        assert_eq!(pool.active_threads(), 1);
        // Within the back-off every unit runs on the caller.
        let on_worker = AtomicUsize::new(0);
        pool.run(64, &|_, tid| {
            if tid != 0 {
                on_worker.fetch_add(1, SeqCst);
            }
        });
        assert_eq!(on_worker.load(SeqCst), 0);
        // After it, the worker is asked again.
        pool.fit.retry_at = Instant::now();
        assert!(jobs_until_a_worker_helps(&mut pool).is_some());
    }

    /// A caller that panics inside a job closes it: no worker runs the closure afterwards, and
    /// the pool serves the next job.
    #[test]
    fn a_panicking_caller_leaves_the_pool_usable() {
        let mut pool = Pool::new(2).expect("pool");
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            // Workers are slow, so the caller always claims units of its own (a fast worker
            // could otherwise take every unit and the caller would never panic).
            pool.run(1000, &|_, tid| {
                if tid == 0 {
                    panic!("caller fails");
                }
                thread::sleep(Duration::from_millis(1));
            })
        }));
        assert!(r.is_err());
        let count = AtomicUsize::new(0);
        pool.run(100, &|_, _| {
            count.fetch_add(1, SeqCst);
        });
        assert_eq!(count.load(SeqCst), 100);
    }

    #[test]
    fn split_covers_range_without_overlap() {
        for n in [0, 1, 7, 64, 100, 576, 49152] {
            for nt in 1..5 {
                let mut next = 0;
                for t in 0..nt {
                    let r = split(n, t, nt, 4);
                    assert_eq!(r.start, next);
                    next = r.end;
                }
                assert_eq!(next, n);
            }
        }
    }
}
