//! Checks and measurements the host asks for through the boot info: a parallel
//! SIMD checksum (vector state, heap, worker vCPUs end to end), the cost of an
//! MMIO round trip and the cost of touching fresh memory.

use aivmm_guest_abi::{report, selftest as st, MAX_VCPUS};
use alloc::vec::Vec;
use core::arch::x86_64::*;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::{platform, pool, println, time};

/// The best SIMD level this vCPU can use: the CPUID bit and the OS-enabled
/// register state in XCR0 (set by the VMM) must both be there.
fn simd_level() -> u64 {
    let leaf7 = __cpuid_count(7, 0);
    // SAFETY: XGETBV is allowed at CPL3 once CR4.OSXSAVE is set, which the VMM
    // does; this kernel is built for x86-64-v3, which implies XSAVE.
    let xcr0 = unsafe { _xgetbv(0) };
    let avx_state = 0b110; // SSE + AVX
    let avx512_state = 0b1110_0110; // + opmask, ZMM_Hi256, Hi16_ZMM
    if leaf7.ebx & (1 << 16) != 0 && xcr0 & avx512_state == avx512_state {
        st::SIMD_AVX512
    } else if leaf7.ebx & (1 << 5) != 0 && xcr0 & avx_state == avx_state {
        st::SIMD_AVX2
    } else {
        st::SIMD_SCALAR
    }
}

fn simd_name(level: u64) -> &'static str {
    match level {
        st::SIMD_AVX512 => "AVX-512",
        st::SIMD_AVX2 => "AVX2",
        _ => "scalar",
    }
}

fn checksum_scalar(data: &[u32]) -> (u32, u32) {
    data.iter().fold((0u32, 0u32), |(sum, xor), &value| {
        let m = st::mix(value);
        (sum.wrapping_add(m), xor ^ m)
    })
}

fn reduce_lanes(sums: &[u32], xors: &[u32]) -> (u32, u32) {
    (
        sums.iter().fold(0u32, |a, &b| a.wrapping_add(b)),
        xors.iter().fold(0, |a, &b| a ^ b),
    )
}

#[target_feature(enable = "avx2")]
fn checksum_avx2(data: &[u32]) -> (u32, u32) {
    let multiplier = _mm256_set1_epi32(0x2C1B_3C6D);
    let mut sum = _mm256_setzero_si256();
    let mut xor = _mm256_setzero_si256();
    let chunks = data.chunks_exact(8);
    let tail = chunks.remainder();
    for chunk in chunks {
        // SAFETY: `chunk` holds exactly 8 u32 = 32 bytes; loadu has no alignment need.
        let value = unsafe { _mm256_loadu_si256(chunk.as_ptr().cast()) };
        let mixed = _mm256_mullo_epi32(
            _mm256_xor_si256(value, _mm256_srli_epi32::<15>(value)),
            multiplier,
        );
        sum = _mm256_add_epi32(sum, mixed);
        xor = _mm256_xor_si256(xor, mixed);
    }
    let (mut sums, mut xors) = ([0u32; 8], [0u32; 8]);
    // SAFETY: both arrays are 32 bytes; storeu has no alignment need.
    unsafe {
        _mm256_storeu_si256(sums.as_mut_ptr().cast(), sum);
        _mm256_storeu_si256(xors.as_mut_ptr().cast(), xor);
    }
    let (lane_sum, lane_xor) = reduce_lanes(&sums, &xors);
    let (tail_sum, tail_xor) = checksum_scalar(tail);
    (lane_sum.wrapping_add(tail_sum), lane_xor ^ tail_xor)
}

/// AVX-512F, with the tail done by a masked load so the opmask state (which
/// the VMM must have enabled in XCR0) is exercised too. Masked-off lanes load
/// 0, and mix(0) = 0 changes neither the sum nor the xor.
#[target_feature(enable = "avx512f")]
fn checksum_avx512(data: &[u32]) -> (u32, u32) {
    let multiplier = _mm512_set1_epi32(0x2C1B_3C6D);
    let mut sum = _mm512_setzero_si512();
    let mut xor = _mm512_setzero_si512();
    let mut offset = 0;
    while offset < data.len() {
        let lanes = (data.len() - offset).min(16);
        let mask: __mmask16 = if lanes == 16 {
            0xffff
        } else {
            (1u16 << lanes) - 1
        };
        // SAFETY: lanes beyond `mask` are not read; the others are
        // data[offset..offset + lanes], in bounds.
        let value = unsafe { _mm512_maskz_loadu_epi32(mask, data.as_ptr().add(offset).cast()) };
        let mixed = _mm512_mullo_epi32(
            _mm512_xor_si512(value, _mm512_srli_epi32::<15>(value)),
            multiplier,
        );
        sum = _mm512_add_epi32(sum, mixed);
        xor = _mm512_xor_si512(xor, mixed);
        offset += lanes;
    }
    let (mut sums, mut xors) = ([0u32; 16], [0u32; 16]);
    // SAFETY: both arrays are 64 bytes; storeu has no alignment need.
    unsafe {
        _mm512_storeu_si512(sums.as_mut_ptr().cast(), sum);
        _mm512_storeu_si512(xors.as_mut_ptr().cast(), xor);
    }
    reduce_lanes(&sums, &xors)
}

fn checksum_with(level: u64, data: &[u32]) -> (u32, u32) {
    match level {
        // SAFETY: simd_level() checked CPUID and XCR0 for AVX-512F.
        st::SIMD_AVX512 => unsafe { checksum_avx512(data) },
        // SAFETY: simd_level() checked CPUID and XCR0 for AVX2.
        st::SIMD_AVX2 => unsafe { checksum_avx2(data) },
        _ => checksum_scalar(data),
    }
}

/// Builds `elements` values in a growing Vec (many reallocations), checksums
/// them on every vCPU with the best SIMD level, and reports the result.
pub fn checksum(elements: u64) {
    let n = elements.min(u32::MAX as u64) as u32;
    let mut data: Vec<u32> = Vec::new();
    let mut next = 0u32;
    while next < n {
        let end = next.saturating_add(4096).min(n);
        data.extend((next..end).map(st::element));
        next = end;
    }

    let level = simd_level();
    let workers = pool::n_workers();
    let partials: [AtomicU64; MAX_VCPUS as usize] =
        [const { AtomicU64::new(0) }; MAX_VCPUS as usize];
    let per_worker = data.len().div_ceil(workers);
    pool::run(&|worker| {
        let start = (worker * per_worker).min(data.len());
        let end = (start + per_worker).min(data.len());
        let (sum, xor) = checksum_with(level, &data[start..end]);
        partials[worker].store(st::combine(sum, xor), Ordering::Relaxed);
    });
    let (sum, xor) = partials[..workers]
        .iter()
        .fold((0u32, 0u32), |(sum, xor), partial| {
            let value = partial.load(Ordering::Relaxed);
            (sum.wrapping_add((value >> 32) as u32), xor ^ value as u32)
        });
    let checksum = st::combine(sum, xor);
    platform::report(report::SELFTEST_SIMD, level);
    platform::report(report::SELFTEST_CHECKSUM, checksum);
    println!(
        "selftest: {n} elements on {workers} vCPU(s) with {}: checksum {checksum:#018x}",
        simd_name(level)
    );
}

/// Times `count` MMIO round trips through the VMM (PING) and `count` writes
/// that KVM completes with an ioeventfd (PING_IOEVENTFD).
pub fn bench_mmio_exits(count: u64) {
    let time_writes = |write: fn()| {
        let start = time::rdtsc();
        for _ in 0..count {
            write();
        }
        (time::rdtsc() - start) / count
    };
    let per_exit = time_writes(platform::ping);
    let per_ioeventfd = time_writes(platform::ping_ioeventfd);
    platform::report(report::MMIO_EXIT_TSC, per_exit);
    platform::report(report::IOEVENTFD_EXIT_TSC, per_ioeventfd);
    println!(
        "bench: {count} MMIO exits, {per_exit} TSC ticks each; {count} ioeventfd writes, {per_ioeventfd} ticks each"
    );
}

/// Times the first and the second touch of every 4 KiB page of `bytes` of
/// never-used heap.
pub fn bench_first_touch(bytes: u64) {
    const PAGE: usize = 4096;
    let pages = (bytes as usize / PAGE).max(1);
    let Ok(layout) = core::alloc::Layout::from_size_align(pages * PAGE, PAGE) else {
        println!("bench: {bytes} bytes is not a valid allocation size");
        return;
    };
    // SAFETY: the layout has a nonzero size.
    let memory = unsafe { alloc::alloc::alloc(layout) };
    if memory.is_null() {
        println!("bench: cannot allocate {bytes} bytes to touch");
        return;
    }
    let touch_all = || {
        let start = time::rdtsc();
        for page in 0..pages {
            // SAFETY: page * PAGE < pages * PAGE, inside the allocation.
            unsafe { core::ptr::write_volatile(memory.add(page * PAGE), 1) };
        }
        (time::rdtsc() - start) / pages as u64
    };
    let first = touch_all();
    let second = touch_all();
    // SAFETY: allocated above with this layout.
    unsafe { alloc::alloc::dealloc(memory, layout) };
    platform::report(report::FIRST_TOUCH_TSC_PER_PAGE, first);
    platform::report(report::SECOND_TOUCH_TSC_PER_PAGE, second);
    println!("bench: touched {pages} pages: first touch {first} TSC ticks/page, second {second}");
}
