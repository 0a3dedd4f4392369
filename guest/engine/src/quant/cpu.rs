//! Which [`SimdLevel`] this CPU and OS support: CPUID says which instructions
//! exist, XGETBV whether the OS (or, in the guest, the VMM) enabled the
//! register state they need. Works without std, at any privilege level.

use core::arch::x86_64::{__cpuid, __cpuid_count, _xgetbv, CpuidResult};
use core::sync::atomic::{AtomicU8, Ordering};

use super::SimdLevel;

/// 0 until detected, then the level's index + 1.
static DETECTED: AtomicU8 = AtomicU8::new(0);

const LEVELS: [SimdLevel; 4] = [
    SimdLevel::Scalar,
    SimdLevel::Avx2,
    SimdLevel::Avx512,
    SimdLevel::Avx512Vnni,
];

/// The best level supported here, detected on first use.
pub(super) fn best_level() -> SimdLevel {
    match DETECTED.load(Ordering::Relaxed) {
        0 => {
            let level = detect();
            let index = LEVELS.iter().position(|&l| l == level).unwrap_or(0);
            DETECTED.store(index as u8 + 1, Ordering::Relaxed);
            level
        }
        cached => LEVELS[usize::from(cached - 1)],
    }
}

/// XCR0 bits: SSE and AVX (YMM upper halves) state.
const XCR0_AVX: u64 = 0b110;
/// XCR0 bits: AVX state plus opmask, ZMM0-15 upper halves and ZMM16-31.
const XCR0_AVX512: u64 = 0b1110_0110;

fn bit(reg: u32, n: u32) -> bool {
    reg >> n & 1 == 1
}

fn detect() -> SimdLevel {
    let max_leaf = cpuid(0).eax;
    if max_leaf < 7 {
        return SimdLevel::Scalar;
    }
    let leaf1 = cpuid(1);
    let leaf7 = cpuid_count(7, 0);
    let osxsave = bit(leaf1.ecx, 27);
    if !osxsave {
        return SimdLevel::Scalar;
    }
    // SAFETY: CPUID.1:ECX.OSXSAVE is set, so XGETBV is enabled (CR4.OSXSAVE).
    let xcr0 = unsafe { read_xcr0() };
    let avx2 = bit(leaf1.ecx, 12) // FMA
        && bit(leaf1.ecx, 28) // AVX
        && bit(leaf1.ecx, 29) // F16C
        && bit(leaf7.ebx, 5) // AVX2
        && xcr0 & XCR0_AVX == XCR0_AVX;
    let avx512 = avx2
        && bit(leaf7.ebx, 16) // AVX512F
        && bit(leaf7.ebx, 30) // AVX512BW
        && bit(leaf7.ebx, 31) // AVX512VL
        && xcr0 & XCR0_AVX512 == XCR0_AVX512;
    let vnni = avx512 && bit(leaf7.ecx, 11); // AVX512_VNNI
    match (avx2, avx512, vnni) {
        (_, _, true) => SimdLevel::Avx512Vnni,
        (_, true, _) => SimdLevel::Avx512,
        (true, _, _) => SimdLevel::Avx2,
        _ => SimdLevel::Scalar,
    }
}

fn cpuid(leaf: u32) -> CpuidResult {
    #[allow(unused_unsafe)]
    // SAFETY: CPUID exists on every x86_64 CPU (older toolchains mark it unsafe).
    unsafe {
        __cpuid(leaf)
    }
}

fn cpuid_count(leaf: u32, sub_leaf: u32) -> CpuidResult {
    #[allow(unused_unsafe)]
    // SAFETY: as for `cpuid`.
    unsafe {
        __cpuid_count(leaf, sub_leaf)
    }
}

/// # Safety
/// The OS must have enabled XGETBV (CPUID.1:ECX.OSXSAVE).
#[target_feature(enable = "xsave")]
unsafe fn read_xcr0() -> u64 {
    // SAFETY: the caller checked that XGETBV is enabled; XCR0 always exists.
    unsafe { _xgetbv(0) }
}
