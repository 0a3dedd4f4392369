//! [`Parallel`] over std threads, for running the engine on the host.
//!
//! Workers spin briefly between jobs (a forward pass hands out hundreds of jobs
//! per token, too many for a sleep/wake per job), then sleep on a condition
//! variable when idle.
//!
//! A worker joins a job only while it is open: once the calling thread has
//! finished its own part (and so, with dynamically shared work, the whole
//! job), it closes the job and waits only for the workers that joined. On a
//! machine busier than its cores, a worker that is not running when a job
//! starts then costs nothing, instead of a scheduler time slice per job.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::vec::Vec;

use crate::parallel::Parallel;

/// Spin iterations before an idle worker goes to sleep (~0.1-1 ms).
const SPINS_BEFORE_SLEEP: u32 = 1 << 16;

type Job = dyn Fn(usize) + Sync;

/// [`Shared::state`]: the job's sequence number in the high 32 bits, then
/// whether it is closed, then how many workers joined it.
const SEQ_SHIFT: u32 = 32;
const CLOSED: u64 = 1 << 31;
const JOINED: u64 = CLOSED - 1;

struct Shared {
    /// The current job; written only by the thread in `run` while no worker
    /// can join or run a job.
    job: UnsafeCell<Option<*const Job>>,
    /// Which job is current, whether it is still open, who joined (see above).
    state: AtomicU64,
    /// Joined workers that finished the current job.
    done: AtomicUsize,
    sleepers: AtomicUsize,
    panicked: AtomicBool,
    shutdown: AtomicBool,
    lock: Mutex<()>,
    wake: Condvar,
}

// SAFETY: `job` is written by `run` only before it publishes a new open state
// (Release) and after it closed that job and every worker that joined it has
// finished (Acquire); workers read it only after joining an open job. The rest
// is atomics or std sync types.
unsafe impl Sync for Shared {}
// SAFETY: as above; the raw pointer is only dereferenced under that protocol.
unsafe impl Send for Shared {}

pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// Serializes `run` calls from different threads.
    run_lock: Mutex<()>,
}

impl ThreadPool {
    /// A pool of `n` workers in total: the calling thread plus n-1 spawned ones.
    pub fn new(n: usize) -> std::io::Result<Self> {
        Self::with_affinity(n, |_| {})
    }

    /// Like [`ThreadPool::new`]; `on_start(i)` runs first on each spawned worker
    /// thread `i` (1..n), e.g. to pin it to a core.
    pub fn with_affinity(
        n: usize,
        on_start: impl Fn(usize) + Send + Sync + 'static,
    ) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            job: UnsafeCell::new(None),
            // Job 0 is closed: there is none yet.
            state: AtomicU64::new(CLOSED),
            done: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let on_start = Arc::new(on_start);
        let mut workers = Vec::new();
        for i in 1..n.max(1) {
            let shared = shared.clone();
            let on_start = on_start.clone();
            workers.push(
                std::thread::Builder::new()
                    .name(std::format!("engine-worker-{i}"))
                    .spawn(move || {
                        on_start(i);
                        worker_loop(&shared, i)
                    })?,
            );
        }
        Ok(ThreadPool {
            shared,
            workers,
            run_lock: Mutex::new(()),
        })
    }
}

fn seq_of(state: u64) -> u64 {
    state >> SEQ_SHIFT
}

/// Joins the current job if it is open, starting from its observed `state`;
/// returns the sequence number of the job joined, or Err with the latest one.
fn try_join(shared: &Shared, mut state: u64) -> Result<u64, u64> {
    loop {
        if state & CLOSED != 0 {
            return Err(seq_of(state));
        }
        match shared.state.compare_exchange_weak(
            state,
            state + 1,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => return Ok(seq_of(state)),
            // Another worker joined, or `run` closed the job (or published the next).
            Err(now) => state = now,
        }
    }
}

fn worker_loop(shared: &Shared, index: usize) {
    let mut seen = 0;
    loop {
        let mut spins = 0u32;
        let state = loop {
            if shared.shutdown.load(Ordering::Acquire) {
                return;
            }
            let state = shared.state.load(Ordering::Acquire);
            if seq_of(state) != seen {
                break state;
            }
            if spins < SPINS_BEFORE_SLEEP {
                spins += 1;
                std::hint::spin_loop();
                continue;
            }
            let mut guard = shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            shared.sleepers.fetch_add(1, Ordering::SeqCst);
            while seq_of(shared.state.load(Ordering::SeqCst)) == seen
                && !shared.shutdown.load(Ordering::SeqCst)
            {
                guard = shared.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
            }
            shared.sleepers.fetch_sub(1, Ordering::SeqCst);
            spins = 0;
        };
        match try_join(shared, state) {
            Ok(seq) => seen = seq,
            // Closed: wait for the next job.
            Err(seq) => {
                seen = seq;
                continue;
            }
        }
        // SAFETY: this worker joined an open job, published after `job` was set;
        // `run` does not return (so the job stays alive and unchanged) until
        // every worker that joined has incremented `done`.
        let job = unsafe { (*shared.job.get()).map(|j| &*j) };
        if let Some(job) = job {
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(index))).is_err() {
                shared.panicked.store(true, Ordering::Release);
            }
        }
        shared.done.fetch_add(1, Ordering::AcqRel);
    }
}

impl Parallel for ThreadPool {
    fn n_workers(&self) -> usize {
        self.workers.len() + 1
    }

    fn run(&self, job: &(dyn Fn(usize) + Sync)) {
        if self.workers.is_empty() {
            return job(0);
        }
        let _serial = self.run_lock.lock().unwrap_or_else(|e| e.into_inner());
        let shared = &*self.shared;
        // SAFETY: no worker reads `job` now: the previous job is closed and every
        // worker that joined it is done. The lifetime is erased but the pointer
        // is cleared again before this function returns, after every worker that
        // joined is done with it.
        unsafe {
            let erased: *const Job =
                core::mem::transmute::<&(dyn Fn(usize) + Sync), &'static Job>(job);
            *shared.job.get() = Some(erased);
        }
        shared.done.store(0, Ordering::Relaxed);
        let seq = seq_of(shared.state.load(Ordering::Relaxed)).wrapping_add(1) & 0xffff_ffff;
        shared.state.store(seq << SEQ_SHIFT, Ordering::SeqCst);
        if shared.sleepers.load(Ordering::SeqCst) > 0 {
            let _g = shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            shared.wake.notify_all();
        }
        let mine = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(0)));
        let joined = (shared.state.fetch_or(CLOSED, Ordering::AcqRel) & JOINED) as usize;
        let mut spins = 0u32;
        while shared.done.load(Ordering::Acquire) != joined {
            spins = spins.wrapping_add(1);
            if spins % 1024 == 0 {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        // SAFETY: the job is closed and every worker that joined it is done.
        unsafe { *shared.job.get() = None };
        if let Err(p) = mine {
            std::panic::resume_unwind(p);
        }
        if shared.panicked.swap(false, Ordering::AcqRel) {
            panic!("an engine worker thread panicked");
        }
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        {
            let _g = self.shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parallel::ChunkCounter;

    #[test]
    fn the_caller_runs_each_job_and_helpers_at_most_once() {
        let pool = ThreadPool::new(3).unwrap();
        for _ in 0..1000 {
            let hits = [
                AtomicUsize::new(0),
                AtomicUsize::new(0),
                AtomicUsize::new(0),
            ];
            let items: [AtomicUsize; 64] = core::array::from_fn(|_| AtomicUsize::new(0));
            let counter = ChunkCounter::new(items.len(), 3);
            pool.run(&|i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
                while let Some(chunk) = counter.next() {
                    for item in &items[chunk] {
                        item.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
            assert_eq!(hits[0].load(Ordering::Relaxed), 1);
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) <= 1));
            assert!(items.iter().all(|item| item.load(Ordering::Relaxed) == 1));
        }
    }

    /// Runs a job whose caller part waits until every worker joined it: the job
    /// stays open until then, so each worker must get to it (also after sleeping).
    fn all_workers_join(pool: &ThreadPool) {
        let hits = [
            AtomicUsize::new(0),
            AtomicUsize::new(0),
            AtomicUsize::new(0),
        ];
        pool.run(&|i| {
            hits[i].fetch_add(1, Ordering::SeqCst);
            if i == 0 {
                while hits.iter().any(|h| h.load(Ordering::SeqCst) == 0) {
                    std::thread::yield_now();
                }
            }
        });
        assert!(hits.iter().all(|h| h.load(Ordering::SeqCst) == 1));
    }

    #[test]
    fn workers_join_open_jobs_also_after_sleeping() {
        let pool = ThreadPool::new(3).unwrap();
        for _ in 0..100 {
            all_workers_join(&pool);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        all_workers_join(&pool);
    }
}
