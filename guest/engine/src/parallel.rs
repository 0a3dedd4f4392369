//! How the engine splits work across cores.
//!
//! The engine never creates threads: it hands a job to a [`Parallel`]
//! implementation, which runs it on its workers and returns when all are done.
//! The host implements it with std threads ([`crate::host_pool`]), the
//! inference kernel with its vCPUs over shared memory.

use core::marker::PhantomData;
use core::sync::atomic::{AtomicUsize, Ordering};

/// Runs one job on up to N workers and waits for the ones that ran it.
///
/// Jobs share their work dynamically (a [`ChunkCounter`]): worker 0 alone
/// completes a job, any other worker only helps.
pub trait Parallel: Sync {
    /// Number of workers (>= 1); the caller's own thread counts as worker 0.
    fn n_workers(&self) -> usize;
    /// Calls `job(0)` on the calling thread and `job(i)` at most once on each
    /// other worker `i` in `1..n_workers()`, and returns when every call has
    /// returned. A worker that only gets to the job after worker 0 finished it
    /// may skip it (a worker descheduled by a busy machine then delays nothing).
    fn run(&self, job: &(dyn Fn(usize) + Sync));
}

/// Everything on the calling thread.
pub struct Serial;

impl Parallel for Serial {
    fn n_workers(&self) -> usize {
        1
    }
    fn run(&self, job: &(dyn Fn(usize) + Sync)) {
        job(0)
    }
}

/// Hands out chunks of `0..total` to whichever worker asks next, so that a
/// worker slowed down by a noisy neighbour simply takes fewer chunks.
pub struct ChunkCounter {
    next: AtomicUsize,
    total: usize,
    chunk: usize,
}

impl ChunkCounter {
    pub fn new(total: usize, chunk: usize) -> Self {
        ChunkCounter {
            next: AtomicUsize::new(0),
            total,
            chunk: chunk.max(1),
        }
    }

    /// The next range to process, or None when all are taken.
    pub fn next(&self) -> Option<core::ops::Range<usize>> {
        let start = self.next.fetch_add(self.chunk, Ordering::Relaxed);
        (start < self.total).then(|| start..(start + self.chunk).min(self.total))
    }
}

/// A mutable slice that several workers write to at the same time, each to
/// ranges no other worker touches (rows of a matmul, heads of attention).
pub struct DisjointSlice<'a, T> {
    ptr: *mut T,
    len: usize,
    _borrow: PhantomData<&'a mut [T]>,
}

// SAFETY: the slice is only reachable through `range`, whose contract forbids
// overlapping concurrent ranges; T: Send makes handing elements to other threads sound.
unsafe impl<T: Send> Sync for DisjointSlice<'_, T> {}

impl<'a, T> DisjointSlice<'a, T> {
    pub fn new(slice: &'a mut [T]) -> Self {
        DisjointSlice {
            ptr: slice.as_mut_ptr(),
            len: slice.len(),
            _borrow: PhantomData,
        }
    }

    /// A mutable view of `range`.
    ///
    /// # Safety
    /// No two views that overlap may exist at the same time (across all threads).
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn range(&self, range: core::ops::Range<usize>) -> &mut [T] {
        assert!(
            range.start <= range.end && range.end <= self.len,
            "DisjointSlice range out of bounds"
        );
        // SAFETY: in bounds (checked above) of a slice borrowed mutably for 'a;
        // exclusivity is the caller's contract.
        unsafe {
            core::slice::from_raw_parts_mut(self.ptr.add(range.start), range.end - range.start)
        }
    }
}
