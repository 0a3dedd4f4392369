//! Work distribution over the partition's vCPUs, the shape the engine's
//! `Parallel` trait needs: the boot vCPU (worker 0) publishes a job in shared
//! memory, every worker vCPU runs it with its own index, and `run` returns when
//! all are done. An idle worker spins for a short while (new work is usually
//! imminent between the steps of one forward pass) and then parks with one
//! MMIO write, so that an idle partition does not burn host cores.

use aivmm_guest_abi::MAX_VCPUS;
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use crate::{platform, time};

/// How long an idle worker spins before it parks. A park + wake round trip
/// costs two VM exits (tens of microseconds on nested KVM).
const SPIN_BEFORE_PARK_MICROS: u64 = 100;
/// How long a worker spins after it was woken from a park before parking
/// again: the host wakes every vCPU when it queues a request, so work is
/// imminent and a second park would only cost exits.
const SPIN_AFTER_WAKE_MICROS: u64 = 5000;

/// How long a worker keeps spinning after a request ended: the next one
/// often follows at once (a benchmark, an API client), and a park right at
/// the end would be counted against the request that just ended.
const SPIN_AFTER_ACTIVE_MICROS: u64 = 20_000;

/// Set by the boot vCPU while it serves a request: idle workers keep spinning
/// instead of parking, so that a generated token costs no park/wake exits.
static ACTIVE: AtomicBool = AtomicBool::new(false);

/// Says whether a request is being served (see [`ACTIVE`]). When it starts,
/// waits up to `micros` for parked workers to come out of their park: the
/// host wakes every vCPU with a request, and a worker that is already waking
/// up needs no WAKE exit from [`run`].
pub fn set_active(active: bool, micros: u64) {
    ACTIVE.store(active, Ordering::Relaxed);
    if !active {
        return;
    }
    let deadline = time::rdtsc() + time::ticks_from_micros(micros);
    let workers = n_workers();
    while (1..workers).any(|worker| POOL.parked[worker].load(Ordering::SeqCst))
        && time::rdtsc() < deadline
    {
        core::hint::spin_loop();
    }
}

/// The engine's view of the pool: the vCPUs of this partition.
pub struct VcpuPool;

impl aivmm_engine::parallel::Parallel for VcpuPool {
    fn n_workers(&self) -> usize {
        n_workers()
    }

    fn run(&self, job: &(dyn Fn(usize) + Sync)) {
        run(job)
    }
}

/// A job as the pool stores it while it runs.
type StoredJob = dyn Fn(usize) + Sync + 'static;

struct Pool {
    /// Bumped once per job; workers wait for it to change.
    generation: AtomicU64,
    /// The current job; written only by the boot vCPU while no worker reads it.
    job: UnsafeCell<Option<&'static StoredJob>>,
    /// Workers that have not finished the current job.
    remaining: AtomicUsize,
    /// Whether worker i is (about to be) parked, so `run` knows whom to wake.
    parked: [AtomicBool; MAX_VCPUS as usize],
    /// Set while `run` is active (it is not reentrant).
    busy: AtomicBool,
}

// SAFETY: `job` is written by the boot vCPU only between jobs (before the
// generation bump that publishes it and after every worker has finished), and
// read by workers only after they observed that bump; the rest is atomics.
unsafe impl Sync for Pool {}

static POOL: Pool = Pool {
    generation: AtomicU64::new(0),
    job: UnsafeCell::new(None),
    remaining: AtomicUsize::new(0),
    parked: [const { AtomicBool::new(false) }; MAX_VCPUS as usize],
    busy: AtomicBool::new(false),
};

/// Number of workers, the boot vCPU included.
pub fn n_workers() -> usize {
    crate::boot_info().vcpu_count as usize
}

/// Calls `job(i)` once on every vCPU `i` (the caller is worker 0) and returns
/// when all calls have returned. Only the boot vCPU may call this.
pub fn run(job: &(dyn Fn(usize) + Sync)) {
    let workers = n_workers();
    if workers <= 1 {
        job(0);
        return;
    }
    if POOL.busy.swap(true, Ordering::Acquire) {
        panic!("pool::run called while a job is running (nested or from a worker)");
    }
    // SAFETY: the job reference is only used until `remaining` reaches 0 below,
    // which happens before this function (and so the borrow) ends; after that
    // the slot is cleared. Widening the lifetime to 'static is what lets it sit
    // in a static meanwhile.
    let job_static: &'static StoredJob =
        unsafe { core::mem::transmute::<&(dyn Fn(usize) + Sync), &'static StoredJob>(job) };
    // SAFETY: no worker reads `job` now: every worker finished the previous
    // job (remaining == 0) and waits for the generation bump below.
    unsafe { *POOL.job.get() = Some(job_static) };
    POOL.remaining.store(workers - 1, Ordering::Relaxed);
    POOL.generation.fetch_add(1, Ordering::SeqCst);
    for worker in 1..workers {
        if POOL.parked[worker].load(Ordering::SeqCst) {
            platform::wake(worker as u32);
        }
    }
    job(0);
    while POOL.remaining.load(Ordering::Acquire) != 0 {
        core::hint::spin_loop();
    }
    // SAFETY: every worker is done with this job (remaining == 0).
    unsafe { *POOL.job.get() = None };
    POOL.busy.store(false, Ordering::Release);
}

/// The life of a worker vCPU: wait for a job, run it, repeat.
pub fn worker_main(vcpu: u32) -> ! {
    let index = vcpu as usize;
    let mut seen = 0;
    loop {
        seen = wait_for_job(index, seen);
        // SAFETY: the generation changed to `seen`, published (SeqCst) after
        // the job slot was written, and the slot is not cleared before this
        // worker decrements `remaining`.
        let job = unsafe { *POOL.job.get() };
        match job {
            Some(job) => job(index),
            None => panic!("worker vCPU {vcpu} woke for generation {seen} but found no job"),
        }
        POOL.remaining.fetch_sub(1, Ordering::Release);
    }
}

/// Spins, then parks, until the job generation differs from `seen`; returns it.
/// While the pool is [`ACTIVE`] the spinning does not end.
fn wait_for_job(index: usize, seen: u64) -> u64 {
    let mut spin_micros = SPIN_BEFORE_PARK_MICROS;
    loop {
        let mut deadline = time::rdtsc() + time::ticks_from_micros(spin_micros);
        loop {
            let generation = POOL.generation.load(Ordering::Acquire);
            if generation != seen {
                return generation;
            }
            let now = time::rdtsc();
            if ACTIVE.load(Ordering::Relaxed) {
                deadline = now + time::ticks_from_micros(SPIN_AFTER_ACTIVE_MICROS);
            } else if now >= deadline {
                break;
            }
            core::hint::spin_loop();
        }
        // Announce the park, then look once more: either `run` sees the flag
        // and wakes us, or we see its new generation (both are SeqCst). A wake
        // that arrives before the park is kept pending by the VMM.
        POOL.parked[index].store(true, Ordering::SeqCst);
        let generation = POOL.generation.load(Ordering::SeqCst);
        if generation == seen {
            platform::park();
        }
        POOL.parked[index].store(false, Ordering::SeqCst);
        spin_micros = SPIN_AFTER_WAKE_MICROS;
    }
}
