//! [`Parallel`] over std threads, for running the engine on the host.
//!
//! Workers spin briefly between jobs (a forward pass hands out hundreds of jobs
//! per token, too many for a sleep/wake per job), then sleep on a condition
//! variable when idle.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::vec::Vec;

use crate::parallel::Parallel;

/// Spin iterations before an idle worker goes to sleep (~0.1-1 ms).
const SPINS_BEFORE_SLEEP: u32 = 1 << 16;

type Job = dyn Fn(usize) + Sync;

struct Shared {
    /// The current job; written only by the thread in `run` while no worker reads it.
    job: UnsafeCell<Option<*const Job>>,
    epoch: AtomicUsize,
    pending: AtomicUsize,
    sleepers: AtomicUsize,
    panicked: AtomicBool,
    shutdown: AtomicBool,
    lock: Mutex<()>,
    wake: Condvar,
}

// SAFETY: `job` is written by `run` only before publishing a new epoch (Release)
// and after all workers reported completion (Acquire); workers read it only in
// between. Everything else is atomics or std sync types.
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
            epoch: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
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

fn worker_loop(shared: &Shared, index: usize) {
    let mut seen = 0;
    loop {
        let mut spins = 0u32;
        loop {
            if shared.shutdown.load(Ordering::Acquire) {
                return;
            }
            let epoch = shared.epoch.load(Ordering::Acquire);
            if epoch != seen {
                seen = epoch;
                break;
            }
            if spins < SPINS_BEFORE_SLEEP {
                spins += 1;
                std::hint::spin_loop();
                continue;
            }
            let mut guard = shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            shared.sleepers.fetch_add(1, Ordering::SeqCst);
            while shared.epoch.load(Ordering::SeqCst) == seen
                && !shared.shutdown.load(Ordering::SeqCst)
            {
                guard = shared.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
            }
            shared.sleepers.fetch_sub(1, Ordering::SeqCst);
            spins = 0;
        }
        // SAFETY: the epoch was published after `job` was set, and `run` does not
        // return (so the job stays alive and unchanged) until `pending` reaches 0.
        let job = unsafe { (*shared.job.get()).map(|j| &*j) };
        if let Some(job) = job {
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(index))).is_err() {
                shared.panicked.store(true, Ordering::Release);
            }
        }
        shared.pending.fetch_sub(1, Ordering::AcqRel);
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
        // SAFETY: no worker reads `job` now (the previous run waited for all of
        // them); the lifetime is erased but the pointer is cleared again before
        // this function returns, after every worker is done with it.
        unsafe {
            let erased: *const Job =
                core::mem::transmute::<&(dyn Fn(usize) + Sync), &'static Job>(job);
            *shared.job.get() = Some(erased);
        }
        shared.pending.store(self.workers.len(), Ordering::Release);
        shared.epoch.fetch_add(1, Ordering::SeqCst);
        if shared.sleepers.load(Ordering::SeqCst) > 0 {
            let _g = shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            shared.wake.notify_all();
        }
        let mine = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(0)));
        let mut spins = 0u32;
        while shared.pending.load(Ordering::Acquire) != 0 {
            spins = spins.wrapping_add(1);
            if spins % 1024 == 0 {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        // SAFETY: every worker has finished with the job.
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

    #[test]
    fn every_worker_runs_each_job_once() {
        let pool = ThreadPool::new(3).unwrap();
        for _ in 0..1000 {
            let hits = [
                AtomicUsize::new(0),
                AtomicUsize::new(0),
                AtomicUsize::new(0),
            ];
            pool.run(&|i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
        }
        // After sleeping, workers wake for new jobs.
        std::thread::sleep(std::time::Duration::from_millis(50));
        let total = AtomicUsize::new(0);
        pool.run(&|i| {
            total.fetch_add(i + 1, Ordering::Relaxed);
        });
        assert_eq!(total.load(Ordering::Relaxed), 6);
    }
}
