//! The kernel heap: Talc over the RAM range the boot info gives, behind a spin
//! lock so that every vCPU can allocate, with a count of the bytes in use (and
//! the peak) so that the host can size partitions from measurements.

use core::alloc::{GlobalAlloc, Layout};
use core::sync::atomic::{AtomicUsize, Ordering};

use talc::source::Manual;

struct CountingHeap {
    talc: talc::TalcLock<spinning_top::RawSpinlock, Manual>,
    size: AtomicUsize,
    in_use: AtomicUsize,
    peak: AtomicUsize,
}

impl CountingHeap {
    fn allocated(&self, bytes: usize) {
        let now = self.in_use.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.peak.fetch_max(now, Ordering::Relaxed);
    }

    fn freed(&self, bytes: usize) {
        self.in_use.fetch_sub(bytes, Ordering::Relaxed);
    }
}

// SAFETY: every call is forwarded unchanged to Talc (a correct allocator); the
// counters only observe sizes of successful calls.
unsafe impl GlobalAlloc for CountingHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds GlobalAlloc::alloc's contract.
        let ptr = unsafe { self.talc.alloc(layout) };
        if !ptr.is_null() {
            self.allocated(layout.size());
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let ptr = unsafe { self.talc.alloc_zeroed(layout) };
        if !ptr.is_null() {
            self.allocated(layout.size());
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller upholds GlobalAlloc::dealloc's contract.
        unsafe { self.talc.dealloc(ptr, layout) };
        self.freed(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller upholds GlobalAlloc::realloc's contract.
        let new = unsafe { self.talc.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            self.freed(layout.size());
            self.allocated(new_size);
        }
        new
    }
}

#[global_allocator]
static HEAP: CountingHeap = CountingHeap {
    talc: talc::TalcLock::new(Manual),
    size: AtomicUsize::new(0),
    in_use: AtomicUsize::new(0),
    peak: AtomicUsize::new(0),
};

/// Hands `[start, end)` to the allocator. Called once, by the boot vCPU,
/// before anything allocates.
pub fn init(start: u64, end: u64) {
    if end <= start {
        crate::platform::fatal(
            aivmm_guest_abi::fatal::BAD_BOOT_INFO,
            "the boot info gives an empty heap",
        );
    }
    // SAFETY: the VMM reserves [heap_start, heap_end) of guest RAM for the heap
    // (mapped read-write, not overlapping the kernel image, the stacks or any
    // device memory) and nothing else in the kernel uses it.
    let claimed = unsafe {
        HEAP.talc
            .lock()
            .claim(start as *mut u8, (end - start) as usize)
    };
    if claimed.is_none() {
        crate::platform::fatal(
            aivmm_guest_abi::fatal::OUT_OF_MEMORY,
            "the heap is too small for the allocator",
        );
    }
    HEAP.size.store((end - start) as usize, Ordering::Relaxed);
}

/// Heap size, bytes in use now, and the most ever in use.
#[derive(Clone, Copy, Debug)]
pub struct HeapStats {
    pub size: usize,
    pub in_use: usize,
    pub peak: usize,
}

pub fn stats() -> HeapStats {
    HeapStats {
        size: HEAP.size.load(Ordering::Relaxed),
        in_use: HEAP.in_use.load(Ordering::Relaxed),
        peak: HEAP.peak.load(Ordering::Relaxed),
    }
}
