//! Time from the TSC, whose frequency the VMM passes in the boot info.

use core::sync::atomic::{AtomicU64, Ordering};

static TSC_KHZ: AtomicU64 = AtomicU64::new(0);

pub fn init(tsc_khz: u64) {
    TSC_KHZ.store(tsc_khz.max(1), Ordering::Relaxed);
}

pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC is allowed at CPL3 (CR4.TSD is clear) and has no side effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// TSC ticks in `micros` microseconds.
pub fn ticks_from_micros(micros: u64) -> u64 {
    TSC_KHZ.load(Ordering::Relaxed).saturating_mul(micros) / 1000
}
