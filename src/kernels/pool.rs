//! A fixed pool of worker threads, started once with the model, that runs one job at a time on
//! every thread (the caller is worker 0). Each parallel step of a forward pass is a `run`.
//!
//! A forward pass of a small model has a few hundred parallel steps of a few microseconds each,
//! so waking threads through the OS on every step would cost more than the work. Workers spin on
//! an epoch counter for a while after each job, then park; the caller unparks parked workers.
//! An idle daemon therefore sleeps, and a busy one never waits on the scheduler between steps.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::Arc;
use std::thread::{self, JoinHandle, Thread};
use std::time::Duration;

/// Spin iterations (each a `spin_loop` hint, tens of cycles) before a worker parks: about a
/// millisecond, longer than the gap between two tokens' steps, far shorter than an idle pause.
const SPINS: u32 = 1 << 15;

type Job = dyn Fn(usize, usize) + Sync;

struct Shared {
    n_threads: usize,
    epoch: AtomicU64,
    /// Workers still running the current job.
    pending: AtomicUsize,
    job: UnsafeCell<Option<*const Job>>,
    shutdown: AtomicBool,
    panicked: AtomicBool,
    sleeping: Vec<AtomicBool>,
}

// SAFETY: `job` is written only by the caller of `run` while no worker reads it (all workers are
// between jobs: pending == 0), and published to workers by the Release increment of `epoch`,
// which they read with Acquire before dereferencing it. The pointee is Sync.
unsafe impl Sync for Shared {}
// SAFETY: as above; the raw pointer is only dereferenced under that protocol.
unsafe impl Send for Shared {}

pub struct Pool {
    shared: Arc<Shared>,
    threads: Vec<(Thread, JoinHandle<()>)>,
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
            epoch: AtomicU64::new(0),
            pending: AtomicUsize::new(0),
            job: UnsafeCell::new(None),
            shutdown: AtomicBool::new(false),
            panicked: AtomicBool::new(false),
            sleeping: (0..n).map(|_| AtomicBool::new(false)).collect(),
        });
        let mut threads = Vec::with_capacity(n - 1);
        for tid in 1..n {
            let s = Arc::clone(&shared);
            let h = thread::Builder::new()
                .name(format!("edgellm-worker-{tid}"))
                .spawn(move || worker(s, tid))?;
            threads.push((h.thread().clone(), h));
        }
        Ok(Pool { shared, threads })
    }

    pub fn n_threads(&self) -> usize {
        self.shared.n_threads
    }

    /// Runs `f(thread_index, n_threads)` on every thread and returns when all have finished.
    /// `&mut self`: one job at a time.
    pub fn run(&mut self, f: &(dyn Fn(usize, usize) + Sync)) {
        let s = &*self.shared;
        let n = s.n_threads;
        if n == 1 {
            f(0, 1);
            return;
        }
        // SAFETY: the lifetime of `f` is erased for storage only; this function does not return
        // until every worker has finished with it (pending reaches 0 below), and no worker reads
        // `job` outside a job. No worker is inside a job now (the previous run waited for them).
        unsafe {
            let ptr: *const Job = std::mem::transmute::<
                *const (dyn Fn(usize, usize) + Sync + '_),
                *const Job,
            >(f as *const _);
            *s.job.get() = Some(ptr);
        }
        s.pending.store(n - 1, SeqCst);
        s.epoch.fetch_add(1, SeqCst);
        for (i, (t, _)) in self.threads.iter().enumerate() {
            if s.sleeping[i + 1].load(SeqCst) {
                t.unpark();
            }
        }
        f(0, n);
        let mut spins = 0u32;
        while s.pending.load(Acquire) != 0 {
            spins = spins.saturating_add(1);
            if spins < SPINS {
                std::hint::spin_loop();
            } else {
                thread::yield_now();
            }
        }
        if s.panicked.load(SeqCst) {
            panic!("a worker thread panicked");
        }
    }
}

fn worker(s: Arc<Shared>, tid: usize) {
    let mut seen = 0u64;
    loop {
        let mut spins = 0u32;
        loop {
            let e = s.epoch.load(Acquire);
            if e != seen {
                seen = e;
                break;
            }
            if s.shutdown.load(Acquire) {
                return;
            }
            spins = spins.saturating_add(1);
            if spins < SPINS {
                std::hint::spin_loop();
            } else {
                s.sleeping[tid].store(true, SeqCst);
                if s.epoch.load(SeqCst) == seen && !s.shutdown.load(SeqCst) {
                    // The timeout is only a safety net: `run` unparks sleeping workers.
                    thread::park_timeout(Duration::from_millis(100));
                }
                s.sleeping[tid].store(false, SeqCst);
            }
        }
        // SAFETY: the epoch changed, so `run` stored a job before its Release increment, and it
        // keeps the closure alive until `pending` reaches 0.
        let job = unsafe { (*s.job.get()).map(|p| &*p) };
        if let Some(job) = job {
            let r =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(tid, s.n_threads)));
            if r.is_err() {
                s.panicked.store(true, SeqCst);
            }
        }
        s.pending.fetch_sub(1, Release);
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
    fn every_thread_runs_each_job_once() {
        let mut pool = Pool::new(3).expect("pool");
        let counts: Vec<AtomicUsize> = (0..3).map(|_| AtomicUsize::new(0)).collect();
        for _ in 0..1000 {
            pool.run(&|tid, nt| {
                assert_eq!(nt, 3);
                counts[tid].fetch_add(1, SeqCst);
            });
        }
        for c in &counts {
            assert_eq!(c.load(SeqCst), 1000);
        }
    }

    #[test]
    fn workers_wake_after_parking() {
        let mut pool = Pool::new(2).expect("pool");
        let hits = AtomicUsize::new(0);
        pool.run(&|_, _| {
            hits.fetch_add(1, SeqCst);
        });
        // Long enough for the worker to spin out and park.
        thread::sleep(Duration::from_millis(300));
        pool.run(&|_, _| {
            hits.fetch_add(1, SeqCst);
        });
        assert_eq!(hits.load(SeqCst), 4);
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
