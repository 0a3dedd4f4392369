//! How the engine splits work across cores.
//!
//! The engine never creates threads: it hands a job to a [`Parallel`]
//! implementation, which runs it on its workers and returns when all are done.
//! The host implements it with std threads ([`crate::host_pool`]), the
//! inference kernel with its vCPUs over shared memory.

use core::marker::PhantomData;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Runs one job on up to N workers and waits for the ones that ran it.
///
/// Jobs share their work dynamically (a [`ChunkCounter`] or a [`RangeSplit`]):
/// worker 0 alone completes a job, any other worker only helps.
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

/// Workers that get a range of their own in a [`RangeSplit`]; any more only
/// take chunks from the others.
pub const MAX_OWNED_RANGES: usize = 64;

/// One chunk of a [`RangeSplit`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    pub range: core::ops::Range<usize>,
    /// How many items directly after `range` the same worker will most likely
    /// take next (the rest of its own range): worth prefetching.
    pub then: usize,
}

/// Splits `0..total` into one contiguous range per worker, which its owner
/// takes chunk by chunk from the front; a worker whose range is done takes
/// chunks from the back of the range with the most left. Chunks shrink as a
/// range runs out, so the last ones are small.
///
/// Unlike a [`ChunkCounter`], whose consecutive chunks go to alternating
/// workers, each worker streams through consecutive rows of a matrix, so its
/// prefetching runs on from chunk to chunk instead of restarting (llama.cpp
/// splits a matrix-vector product statically, one range per thread, for the
/// same reason); the stealing keeps the balance when a noisy neighbour slows
/// one worker down.
pub struct RangeSplit {
    /// Per owner: the start of what is left in the high 32 bits, its end in the low.
    ranges: [AtomicU64; MAX_OWNED_RANGES],
    owners: usize,
    chunk: usize,
    /// Own ranges start at multiples of this; no chunk is smaller (but a last one).
    align: usize,
}

impl RangeSplit {
    /// `total` items (less than 2^32) for `workers` workers, in chunks of
    /// `chunk`; own ranges start at multiples of `align` where they can.
    pub fn new(total: usize, workers: usize, chunk: usize, align: usize) -> Self {
        assert!(u32::try_from(total).is_ok(), "RangeSplit: {total} items");
        let owners = workers.clamp(1, MAX_OWNED_RANGES);
        let align = align.max(1);
        let start = |i: usize| match i {
            0 => 0,
            i if i == owners => total,
            i => (total * i / owners / align * align).min(total),
        };
        RangeSplit {
            ranges: core::array::from_fn(|i| {
                AtomicU64::new(if i < owners {
                    pack(start(i), start(i + 1))
                } else {
                    0
                })
            }),
            owners,
            chunk: chunk.max(1),
            align,
        }
    }

    /// How much to take of a range with `left` items: `chunk`, but less near the
    /// end (a share of what is left), so that the workers finish together.
    fn size(&self, left: usize) -> usize {
        let share = left.div_ceil(2 * self.owners).max(self.align);
        self.chunk.min(share).min(left)
    }

    /// The next chunk for `worker`, or None when every item is taken.
    pub fn next(&self, worker: usize) -> Option<Chunk> {
        if let Some(own) = self.ranges.get(worker).filter(|_| worker < self.owners) {
            let mut now = own.load(Ordering::Relaxed);
            loop {
                let (start, end) = unpack(now);
                if start >= end {
                    break;
                }
                let taken = start + self.size(end - start);
                match own.compare_exchange_weak(
                    now,
                    pack(taken, end),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => {
                        return Some(Chunk {
                            range: start..taken,
                            then: end - taken,
                        })
                    }
                    Err(seen) => now = seen,
                }
            }
        }
        loop {
            let (victim, left) = self.ranges[..self.owners]
                .iter()
                .map(|r| {
                    let (start, end) = unpack(r.load(Ordering::Relaxed));
                    (r, end.saturating_sub(start))
                })
                .max_by_key(|&(_, left)| left)?;
            if left == 0 {
                return None;
            }
            let now = victim.load(Ordering::Relaxed);
            let (start, end) = unpack(now);
            if start >= end {
                continue;
            }
            let from = end - self.size(end - start);
            if victim
                .compare_exchange(now, pack(start, from), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
            {
                return Some(Chunk {
                    range: from..end,
                    then: 0,
                });
            }
        }
    }
}

fn pack(start: usize, end: usize) -> u64 {
    ((start as u64) << 32) | end as u64
}

fn unpack(v: u64) -> (usize, usize) {
    ((v >> 32) as usize, (v & 0xffff_ffff) as usize)
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec;
    use std::vec::Vec;

    fn drain(split: &RangeSplit, worker: usize) -> Vec<Chunk> {
        core::iter::from_fn(|| split.next(worker)).collect()
    }

    #[test]
    fn owners_stream_through_their_own_range() {
        let split = RangeSplit::new(256, 2, 16, 8);
        assert_eq!(
            split.next(1).unwrap(),
            Chunk {
                range: 128..144,
                then: 112
            }
        );
        let own = drain_own(&split, 0);
        assert_eq!(
            own[0],
            Chunk {
                range: 0..16,
                then: 112
            }
        );
        // Consecutive chunks, shrinking near the end (to no less than 8 but the last).
        for pair in own.windows(2) {
            assert_eq!(pair[0].range.end, pair[1].range.start);
            assert_eq!(pair[0].then, pair[1].range.len() + pair[1].then);
            assert!(pair[1].range.len() <= pair[0].range.len() && pair[0].range.len() >= 8);
        }
        assert!(own.last().unwrap().range.len() < 16);
        assert_eq!(own.last().unwrap().range.end, 128);
        // Worker 0's range is done: it takes from the back of worker 1's.
        assert_eq!(
            split.next(0).unwrap(),
            Chunk {
                range: 240..256,
                then: 0
            }
        );
        assert_eq!(
            split.next(1).unwrap(),
            Chunk {
                range: 144..160,
                then: 80
            }
        );
    }

    /// The chunks `worker` takes from its own range (stops before stealing).
    fn drain_own(split: &RangeSplit, worker: usize) -> Vec<Chunk> {
        let mut chunks: Vec<Chunk> = Vec::new();
        while chunks.last().is_none_or(|c| c.then > 0) {
            chunks.push(split.next(worker).unwrap());
        }
        chunks
    }

    #[test]
    fn every_item_is_taken_exactly_once() {
        for (total, workers, chunk) in [
            (0, 3, 4),
            (1, 4, 16),
            (1000, 3, 7),
            (64, 70, 1),
            (5632, 2, 352),
        ] {
            let split = RangeSplit::new(total, workers, chunk, 8);
            let mut seen = vec![0u32; total];
            // Workers take turns, some more often than others.
            let mut idle = vec![false; workers];
            let mut turn = 0;
            while idle.iter().any(|i| !i) {
                let worker = (turn * 7 + turn / 3) % workers;
                turn += 1;
                match split.next(worker) {
                    Some(c) => {
                        assert!(c.range.len() <= chunk.max(8) && !c.range.is_empty());
                        seen[c.range].iter_mut().for_each(|s| *s += 1);
                    }
                    None => idle[worker] = true,
                }
            }
            assert!(
                seen.iter().all(|&s| s == 1),
                "{total} items, {workers} workers"
            );
        }
    }

    #[test]
    fn chunks_are_disjoint_across_threads() {
        let split = RangeSplit::new(10_000, 4, 13, 8);
        let seen: Vec<AtomicUsize> = (0..10_000).map(|_| AtomicUsize::new(0)).collect();
        std::thread::scope(|s| {
            for worker in 0..4 {
                let (split, seen) = (&split, &seen);
                s.spawn(move || {
                    for c in drain(split, worker) {
                        for i in c.range {
                            seen[i].fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert!(seen.iter().all(|s| s.load(Ordering::Relaxed) == 1));
    }
}
