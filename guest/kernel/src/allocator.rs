//! The kernel heap: Talc over the RAM range the boot info gives, behind a spin
//! lock so that every vCPU can allocate.

use talc::source::Manual;

#[global_allocator]
static HEAP: talc::TalcLock<spinning_top::RawSpinlock, Manual> = talc::TalcLock::new(Manual);

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
    let claimed = unsafe { HEAP.lock().claim(start as *mut u8, (end - start) as usize) };
    if claimed.is_none() {
        crate::platform::fatal(
            aivmm_guest_abi::fatal::OUT_OF_MEMORY,
            "the heap is too small for the allocator",
        );
    }
}
