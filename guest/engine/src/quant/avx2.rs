//! AVX2 + FMA + F16C kernels.
//!
//! Integer dot products use `vpmaddubsw` (unsigned weight bytes times signed
//! activation bytes, summed in pairs to i16), then `vpmaddwd` to i32. Weights
//! that carry an offset (Q4_0's -8, Q5_0's -16, Q6_K's -32) are multiplied
//! unsigned and the offset times the activation sum is subtracted, which keeps
//! every i16 pair sum far from saturation (activations are within +-127).
//!
//! Contract of every `unsafe fn` here: the CPU supports AVX2, FMA and F16C, and
//! each weight pointer `w[r]` / activation pointer `a[c]` addresses `nb` whole
//! blocks of its format. All loads stay inside those blocks.

// Kernels index several per-row and per-column arrays with the same counter.
#![allow(clippy::needless_range_loop)]

use core::arch::x86_64::*;

use super::{prefetch_step, scalar, GgmlType, KPath, TileKernels};

pub(super) struct Tiles;

impl TileKernels for Tiles {
    fn tile<const R: usize, const C: usize>(
        ty: GgmlType,
        n: usize,
        w: [&[u8]; R],
        a: [&[u8]; C],
        kpath: KPath,
        ahead: usize,
    ) -> [[f32; C]; R] {
        // SAFETY: `Tiles` is only used by `Kernels` of a level that implies AVX2, FMA and F16C.
        unsafe { tile(ty, n, w, a, kpath, ahead) }
    }
}

/// The dot products of a tile, for the types this module accelerates.
///
/// # Safety
/// The CPU supports AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn tile<const R: usize, const C: usize>(
    ty: GgmlType,
    n: usize,
    w: [&[u8]; R],
    a: [&[u8]; C],
    kpath: KPath,
    ahead: usize,
) -> [[f32; C]; R] {
    let nb = n / ty.block_len();
    let row_bytes = nb * ty.block_bytes();
    let act_bytes = nb * ty.act_type().block_bytes();
    assert!(w.iter().all(|w| w.len() == row_bytes) && a.iter().all(|a| a.len() == act_bytes));
    // Prefetching ahead (only for a matvec tile) assumes the rows are consecutive.
    debug_assert!(
        ahead == 0 || (0..R).all(|r| w[r].as_ptr() == w[0].as_ptr().wrapping_add(r * row_bytes))
    );
    let wp = w.map(<[u8]>::as_ptr);
    let ap = a.map(<[u8]>::as_ptr);
    // SAFETY: the slices hold exactly `nb` blocks each (checked above); the CPU
    // features are this function's own contract.
    unsafe {
        match ty {
            GgmlType::Q8_0 => q8_0(nb, wp, ap, ahead),
            GgmlType::Q4_0 => q4_0(nb, wp, ap, ahead),
            GgmlType::Q5_0 => q5_0(nb, wp, ap, ahead),
            GgmlType::Q4_1 => q4_1(nb, wp, ap, ahead),
            GgmlType::Q5_1 => q5_1(nb, wp, ap, ahead),
            GgmlType::Q4_K => q4_k(nb, wp, ap, kpath == KPath::Gemm4, ahead),
            GgmlType::Q5_K => q5_k(nb, wp, ap, ahead),
            GgmlType::Q6_K => q6_k(nb, wp, ap, kpath == KPath::Tiled, ahead),
            GgmlType::F32 => floats::<R, C, F32>(nb, wp, ap),
            GgmlType::F16 => floats::<R, C, F16>(nb, wp, ap),
            GgmlType::BF16 => floats::<R, C, BF16>(nb, wp, ap),
            GgmlType::Q8_1 | GgmlType::Q8_K => scalar::Tiles::tile(ty, n, w, a, kpath, ahead),
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load256(p: *const u8) -> __m256i {
    // SAFETY: the caller guarantees 32 readable bytes at p.
    unsafe { _mm256_loadu_si256(p.cast()) }
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load128(p: *const u8) -> __m128i {
    // SAFETY: the caller guarantees 16 readable bytes at p.
    unsafe { _mm_loadu_si128(p.cast()) }
}

/// The f16 at p, widened with F16C.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn f16_at(p: *const u8) -> f32 {
    // SAFETY: the caller guarantees 2 readable bytes at p.
    let bits = unsafe { p.cast::<u16>().read_unaligned() };
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits))))
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn f32_at(p: *const u8) -> f32 {
    // SAFETY: the caller guarantees 4 readable bytes at p.
    unsafe { p.cast::<f32>().read_unaligned() }
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) fn hsum(v: __m256) -> f32 {
    let x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)))
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn hsum_all<const R: usize, const C: usize>(acc: [[__m256; C]; R]) -> [[f32; C]; R] {
    array_of!([0.0; C]; R, |r| array_of!(0.0; C, |c| hsum(acc[r][c])))
}

/// Sums adjacent i16 pairs of `x` into i32 lanes.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn pairs_to_i32(x: __m256i) -> __m256i {
    _mm256_madd_epi16(x, _mm256_set1_epi16(1))
}

/// 32 nibbles of 16 bytes at p as bytes: the low nibbles first, then the high ones.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn nibbles_32(p: *const u8) -> __m256i {
    // SAFETY: the caller guarantees 16 readable bytes at p.
    let x = unsafe { load128(p) };
    let both = _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(x), _mm_srli_epi16::<4>(x));
    _mm256_and_si256(both, _mm256_set1_epi8(0x0f))
}

/// The 32 bits at p spread to 32 bytes, 0x10 where the bit is set.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn bits_to_0x10(p: *const u8) -> __m256i {
    // SAFETY: the caller guarantees 4 readable bytes at p.
    let bits = unsafe { p.cast::<i32>().read_unaligned() };
    let spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(bits),
        _mm256_set_epi64x(
            0x0303030303030303,
            0x0202020202020202,
            0x0101010101010101,
            0,
        ),
    );
    // Byte k keeps every bit but bit k % 8 set; it is all ones iff that bit was set.
    let probe = _mm256_or_si256(spread, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
    _mm256_and_si256(
        _mm256_cmpeq_epi8(probe, _mm256_set1_epi8(-1)),
        _mm256_set1_epi8(0x10),
    )
}

/// Q8_0 x Q8_0: |w| times a with w's sign (`vpsignb`), exact for any weight byte.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_0<const R: usize, const C: usize>(
    nb: usize,
    w: [*const u8; R],
    a: [*const u8; C],
    ahead: usize,
) -> [[f32; C]; R] {
    let mut acc = [[_mm256_setzero_ps(); C]; R];
    // SAFETY: block b of every row is within the nb blocks of the contract.
    unsafe {
        for b in 0..nb {
            let aq = array_of!(_mm256_setzero_si256(); C, |c| load256(a[c].add(b * 34 + 2)));
            let ad = array_of!(0.0; C, |c| f16_at(a[c].add(b * 34)));
            prefetch_step(w[0], b, R * 34, ahead);
            for r in 0..R {
                let x = w[r].add(b * 34);
                let wq = load256(x.add(2));
                let dw = f16_at(x);
                let abs = _mm256_sign_epi8(wq, wq);
                for c in 0..C {
                    let dot = pairs_to_i32(_mm256_maddubs_epi16(abs, _mm256_sign_epi8(aq[c], wq)));
                    acc[r][c] = _mm256_fmadd_ps(
                        _mm256_cvtepi32_ps(dot),
                        _mm256_set1_ps(dw * ad[c]),
                        acc[r][c],
                    );
                }
            }
        }
    }
    hsum_all(acc)
}

/// Q4_0 x Q8_0: nibbles (0..15) times a, minus 8 * sum(a).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_0<const R: usize, const C: usize>(
    nb: usize,
    w: [*const u8; R],
    a: [*const u8; C],
    ahead: usize,
) -> [[f32; C]; R] {
    let mut acc = [[_mm256_setzero_ps(); C]; R];
    // SAFETY: block b of every row is within the nb blocks of the contract.
    unsafe {
        for b in 0..nb {
            let aq = array_of!(_mm256_setzero_si256(); C, |c| load256(a[c].add(b * 34 + 2)));
            let ad = array_of!(0.0; C, |c| f16_at(a[c].add(b * 34)));
            let offset = array_of!(_mm256_setzero_si256(); C, |c| _mm256_maddubs_epi16(_mm256_set1_epi8(8), aq[c]));
            prefetch_step(w[0], b, R * 18, ahead);
            for r in 0..R {
                let x = w[r].add(b * 18);
                let wq = nibbles_32(x.add(2));
                let dw = f16_at(x);
                for c in 0..C {
                    let pairs = _mm256_sub_epi16(_mm256_maddubs_epi16(wq, aq[c]), offset[c]);
                    let dot = _mm256_cvtepi32_ps(pairs_to_i32(pairs));
                    acc[r][c] = _mm256_fmadd_ps(dot, _mm256_set1_ps(dw * ad[c]), acc[r][c]);
                }
            }
        }
    }
    hsum_all(acc)
}

/// Q5_0 x Q8_0: 5-bit values (0..31) times a, minus 16 * sum(a).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q5_0<const R: usize, const C: usize>(
    nb: usize,
    w: [*const u8; R],
    a: [*const u8; C],
    ahead: usize,
) -> [[f32; C]; R] {
    let mut acc = [[_mm256_setzero_ps(); C]; R];
    // SAFETY: block b of every row is within the nb blocks of the contract.
    unsafe {
        for b in 0..nb {
            let aq = array_of!(_mm256_setzero_si256(); C, |c| load256(a[c].add(b * 34 + 2)));
            let ad = array_of!(0.0; C, |c| f16_at(a[c].add(b * 34)));
            let offset = array_of!(_mm256_setzero_si256(); C, |c| _mm256_maddubs_epi16(_mm256_set1_epi8(16), aq[c]));
            prefetch_step(w[0], b, R * 22, ahead);
            for r in 0..R {
                let x = w[r].add(b * 22);
                let wq = _mm256_or_si256(nibbles_32(x.add(6)), bits_to_0x10(x.add(2)));
                let dw = f16_at(x);
                for c in 0..C {
                    let pairs = _mm256_sub_epi16(_mm256_maddubs_epi16(wq, aq[c]), offset[c]);
                    let dot = _mm256_cvtepi32_ps(pairs_to_i32(pairs));
                    acc[r][c] = _mm256_fmadd_ps(dot, _mm256_set1_ps(dw * ad[c]), acc[r][c]);
                }
            }
        }
    }
    hsum_all(acc)
}

/// Q4_1 / Q5_1 x Q8_1: d * da * dot(q, a) + m * s, where s = da * sum(a).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_1<const R: usize, const C: usize>(
    nb: usize,
    w: [*const u8; R],
    a: [*const u8; C],
    ahead: usize,
) -> [[f32; C]; R] {
    // SAFETY: forwarded contract; Q4_1 blocks are 20 bytes with qs at 4.
    unsafe { offset_blocks::<R, C, false>(nb, w, a, ahead) }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q5_1<const R: usize, const C: usize>(
    nb: usize,
    w: [*const u8; R],
    a: [*const u8; C],
    ahead: usize,
) -> [[f32; C]; R] {
    // SAFETY: forwarded contract; Q5_1 blocks are 24 bytes with qh at 4, qs at 8.
    unsafe { offset_blocks::<R, C, true>(nb, w, a, ahead) }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn offset_blocks<const R: usize, const C: usize, const FIVE_BITS: bool>(
    nb: usize,
    w: [*const u8; R],
    a: [*const u8; C],
    ahead: usize,
) -> [[f32; C]; R] {
    let block = if FIVE_BITS { 24 } else { 20 };
    let mut acc = [[_mm256_setzero_ps(); C]; R];
    let mut mins = [[0.0f32; C]; R];
    // SAFETY: block b of every row is within the nb blocks of the contract.
    unsafe {
        for b in 0..nb {
            let aq = array_of!(_mm256_setzero_si256(); C, |c| load256(a[c].add(b * 36 + 4)));
            let ad = array_of!(0.0; C, |c| f16_at(a[c].add(b * 36)));
            let asum = array_of!(0.0; C, |c| f16_at(a[c].add(b * 36 + 2)));
            prefetch_step(w[0], b, R * block, ahead);
            for r in 0..R {
                let x = w[r].add(b * block);
                let wq = if FIVE_BITS {
                    _mm256_or_si256(nibbles_32(x.add(8)), bits_to_0x10(x.add(4)))
                } else {
                    nibbles_32(x.add(4))
                };
                let (dw, m) = (f16_at(x), f16_at(x.add(2)));
                for c in 0..C {
                    let dot = _mm256_cvtepi32_ps(pairs_to_i32(_mm256_maddubs_epi16(wq, aq[c])));
                    acc[r][c] = _mm256_fmadd_ps(dot, _mm256_set1_ps(dw * ad[c]), acc[r][c]);
                    mins[r][c] += m * asum[c];
                }
            }
        }
    }
    let mut out = hsum_all(acc);
    for r in 0..R {
        for c in 0..C {
            out[r][c] += mins[r][c];
        }
    }
    out
}

/// Decodes the 12 packed scale bytes of a Q4_K/Q5_K block at p into 16 i16:
/// the eight scales, then the eight mins.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn k4_scales_mins(p: *const u8) -> __m256i {
    const LOW6: u32 = 0x3f3f3f3f;
    const LOW4: u32 = 0x0f0f0f0f;
    const LOW2: u32 = 0x03030303;
    // SAFETY: the caller guarantees 12 readable bytes at p.
    let q: [u32; 3] =
        unsafe { core::array::from_fn(|i| p.add(4 * i).cast::<u32>().read_unaligned()) };
    let scales_lo = q[0] & LOW6;
    let scales_hi = (q[2] & LOW4) | (((q[0] >> 6) & LOW2) << 4);
    let mins_lo = q[1] & LOW6;
    let mins_hi = ((q[2] >> 4) & LOW4) | (((q[1] >> 6) & LOW2) << 4);
    let packed = _mm_set_epi32(
        mins_hi as i32,
        mins_lo as i32,
        scales_hi as i32,
        scales_lo as i32,
    );
    _mm256_cvtepu8_epi16(packed)
}

/// Broadcasts i16 lane `k` of each 128-bit half of `v` (shuffle control for `vpshufb`).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn lane16(v: __m256i, k: usize) -> __m256i {
    let pick = (((2 * k + 1) << 8) | (2 * k)) as i16;
    _mm256_shuffle_epi8(v, _mm256_set1_epi16(pick))
}

/// The 16 bsums of a Q8_K block at p added in pairs: the activation sum of
/// each 32-value sub-block, as 8 i16.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn q8_k_sub_sums(p: *const u8) -> __m128i {
    // SAFETY: the caller guarantees the whole Q8_K block at p.
    let bsums = unsafe { load256(p.add(260)) };
    _mm_hadd_epi16(
        _mm256_castsi256_si128(bsums),
        _mm256_extracti128_si256::<1>(bsums),
    )
}

/// Q4_K / Q5_K x Q8_K: per block d * sum(scale_j * dot_j) - dmin * sum(min_j * asum_j).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_k<const R: usize, const C: usize>(
    nb: usize,
    w: [*const u8; R],
    a: [*const u8; C],
    pairs: bool,
    ahead: usize,
) -> [[f32; C]; R] {
    if R == 4 && pairs {
        // SAFETY: forwarded contract.
        let dots = unsafe { q4_k_gemm_rows4::<C>(nb, array_of!(w[0]; 4, |r| w[r]), a) };
        return array_of!([0.0; C]; R, |r| dots[r]);
    }
    if R == 4 && C == 1 && !pairs {
        // SAFETY: forwarded contract.
        let dots = unsafe { q4_k_rows4(nb, array_of!(w[0]; 4, |r| w[r]), a[0], ahead) };
        return array_of!([0.0; C]; R, |r| [dots[r]; C]);
    }
    // SAFETY: forwarded contract.
    unsafe { k4_blocks::<R, C, false>(nb, w, a, pairs, ahead) }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q5_k<const R: usize, const C: usize>(
    nb: usize,
    w: [*const u8; R],
    a: [*const u8; C],
    ahead: usize,
) -> [[f32; C]; R] {
    // SAFETY: forwarded contract.
    unsafe { k4_blocks::<R, C, true>(nb, w, a, false, ahead) }
}

#[target_feature(enable = "avx2,fma,f16c")]
/// Q4_K follows llama.cpp's repacked kernels (see `KPath`): exact integer
/// sums per block, or per 64 values when `pairs`, scaled into two FMA chains.
unsafe fn k4_blocks<const R: usize, const C: usize, const FIVE_BITS: bool>(
    nb: usize,
    w: [*const u8; R],
    a: [*const u8; C],
    pairs: bool,
    ahead: usize,
) -> [[f32; C]; R] {
    let pairs = pairs && !FIVE_BITS;
    let (block, qs_at) = if FIVE_BITS { (176, 48) } else { (144, 16) };
    let low4 = _mm256_set1_epi8(0x0f);
    let bit4 = _mm256_set1_epi8(0x10);
    let mut acc = [[_mm256_setzero_ps(); C]; R];
    // Q4_K: the scaled and the min sums of the whole rows (see `scalar::dot`).
    let mut scaled = [[0.0f32; C]; R];
    let mut mins_acc = [[0.0f32; C]; R];
    // SAFETY: block b of every row is within the nb blocks of the contract.
    unsafe {
        for b in 0..nb {
            let y = array_of!(a[0]; C, |c| a[c].add(b * 292));
            let ad = array_of!(0.0; C, |c| f32_at(y[c]));
            let asums = array_of!(_mm_setzero_si128(); C, |c| q8_k_sub_sums(y[c]));
            let x = array_of!(w[0]; R, |r| w[r].add(b * block));
            prefetch_step(w[0], b, R * block, ahead);
            let scales_mins = array_of!(low4; R, |r| k4_scales_mins(x[r].add(4)));
            let scales = array_of!(low4; R, |r| _mm256_permute2x128_si256::<0x00>(scales_mins[r], scales_mins[r]));
            // Q5_K high bits: bit s of each qh byte is moved to bit 4, for s < 4 by
            // shifting (qh << 4) right s times, for s >= 4 by shifting qh right s - 4 times
            // (16-bit shifts: the bits crossing between bytes never land on bit 4).
            let mut high = array_of!(low4; R, |r| if FIVE_BITS { _mm256_slli_epi16::<4>(load256(x[r].add(16))) } else { low4 });
            let mut sums = [[_mm256_setzero_si256(); C]; R];
            let dw = array_of!(0.0; R, |r| f16_at(x[r]));
            for j in 0..4 {
                let mut lo = [low4; R];
                let mut hi = [low4; R];
                for r in 0..R {
                    if FIVE_BITS && j == 2 {
                        high[r] = load256(x[r].add(16));
                    }
                    let q = load256(x[r].add(qs_at + 32 * j));
                    lo[r] = _mm256_and_si256(q, low4);
                    hi[r] = _mm256_and_si256(_mm256_srli_epi16::<4>(q), low4);
                    if FIVE_BITS {
                        lo[r] = _mm256_or_si256(lo[r], _mm256_and_si256(high[r], bit4));
                        high[r] = _mm256_srli_epi16::<1>(high[r]);
                        hi[r] = _mm256_or_si256(hi[r], _mm256_and_si256(high[r], bit4));
                        high[r] = _mm256_srli_epi16::<1>(high[r]);
                    }
                }
                for c in 0..C {
                    let ql = load256(y[c].add(4 + 64 * j));
                    let qh = load256(y[c].add(36 + 64 * j));
                    for r in 0..R {
                        let pl = _mm256_madd_epi16(
                            _mm256_maddubs_epi16(lo[r], ql),
                            lane16(scales[r], 2 * j),
                        );
                        let ph = _mm256_madd_epi16(
                            _mm256_maddubs_epi16(hi[r], qh),
                            lane16(scales[r], 2 * j + 1),
                        );
                        sums[r][c] = _mm256_add_epi32(sums[r][c], _mm256_add_epi32(pl, ph));
                    }
                }
                if pairs {
                    for r in 0..R {
                        for c in 0..C {
                            let sumi = hsum_i32(sums[r][c]);
                            scaled[r][c] = fmadd(sumi as f32, dw[r] * ad[c], scaled[r][c]);
                            sums[r][c] = _mm256_setzero_si256();
                        }
                    }
                }
            }
            for r in 0..R {
                let (dw, dmin) = (dw[r], f16_at(x[r].add(2)));
                let mins = _mm256_extracti128_si256::<1>(scales_mins[r]);
                for c in 0..C {
                    if !FIVE_BITS {
                        // Lane j: the mins of sub-blocks 2j and 2j + 1 times their activation sums.
                        let min_dots = _mm_madd_epi16(mins, asums[c]);
                        if pairs {
                            let lanes: [i32; 4] = core::mem::transmute(min_dots);
                            for summ in lanes {
                                mins_acc[r][c] = fmadd(summ as f32, dmin * ad[c], mins_acc[r][c]);
                            }
                        } else {
                            let sumi = hsum_i32(sums[r][c]);
                            let summ = hsum_i32(_mm256_zextsi128_si256(min_dots));
                            scaled[r][c] = fmadd(sumi as f32, dw * ad[c], scaled[r][c]);
                            mins_acc[r][c] = fmadd(summ as f32, dmin * ad[c], mins_acc[r][c]);
                        }
                        continue;
                    }
                    let min_dot = _mm256_zextsi128_si256(_mm_madd_epi16(mins, asums[c]));
                    acc[r][c] = _mm256_fmadd_ps(
                        _mm256_set1_ps(dw * ad[c]),
                        _mm256_cvtepi32_ps(sums[r][c]),
                        acc[r][c],
                    );
                    acc[r][c] = _mm256_fmadd_ps(
                        _mm256_set1_ps(-dmin * ad[c]),
                        _mm256_cvtepi32_ps(min_dot),
                        acc[r][c],
                    );
                }
            }
        }
    }
    if !FIVE_BITS {
        return array_of!([0.0; C]; R, |r| array_of!(0.0; C, |c| scaled[r][c] - mins_acc[r][c]));
    }
    hsum_all(acc)
}

/// The 16 bytes at the start of a Q4_K block (d, dmin and the 12 packed scale
/// bytes) of two rows, one per 128-bit lane, decoded in place to
/// `[scale 0..8, min 0..8]` per lane (the bytes of [`k4_scales_mins`]).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn k4_scales_mins_x2(head: __m256i) -> __m256i {
    const Z: i8 = -128;
    // Per lane: the scale dwords q0 q2 q1 q2, and 0 q0 0 q1 for the top two bits.
    let q0_q2_q1_q2 = _mm256_shuffle_epi8(
        head,
        _mm256_broadcastsi128_si256(_mm_setr_epi8(
            4, 5, 6, 7, 12, 13, 14, 15, 8, 9, 10, 11, 12, 13, 14, 15,
        )),
    );
    let tops = _mm256_shuffle_epi8(
        head,
        _mm256_broadcastsi128_si256(_mm_setr_epi8(
            Z, Z, Z, Z, 4, 5, 6, 7, Z, Z, Z, Z, 8, 9, 10, 11,
        )),
    );
    let low = _mm256_and_si256(
        q0_q2_q1_q2,
        _mm256_broadcastsi128_si256(_mm_setr_epi32(0x3f3f3f3f, 0x0f0f0f0f, 0x3f3f3f3f, 0)),
    );
    // 16-bit shifts: the bits a byte takes from its neighbour are masked off.
    let high_nibbles = _mm256_and_si256(
        _mm256_srli_epi16::<4>(q0_q2_q1_q2),
        _mm256_broadcastsi128_si256(_mm_setr_epi32(0, 0, 0, 0x0f0f0f0f)),
    );
    let tops = _mm256_and_si256(
        _mm256_srli_epi16::<2>(tops),
        _mm256_broadcastsi128_si256(_mm_setr_epi32(0, 0x30303030, 0, 0x30303030)),
    );
    _mm256_or_si256(_mm256_or_si256(low, high_nibbles), tops)
}

/// The block headers of four Q4_K rows (`x[r]` at the same block of each):
/// their scales and mins decoded two rows per vector ([`k4_scales_mins_x2`]:
/// rows 0 and 1, then 2 and 3, one per 128-bit lane), and
/// `[d0 d1 d2 d3 dmin0 dmin1 dmin2 dmin3]` as floats.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn k4_heads_rows4(x: [*const u8; 4]) -> ([__m256i; 2], __m256) {
    // SAFETY: the caller guarantees a whole Q4_K block (144 bytes) at each x[r].
    let heads = unsafe {
        [
            _mm256_loadu2_m128i(x[1].cast(), x[0].cast()),
            _mm256_loadu2_m128i(x[3].cast(), x[2].cast()),
        ]
    };
    let decoded = [k4_scales_mins_x2(heads[0]), k4_scales_mins_x2(heads[1])];
    // Lane r: d (low half) and dmin (high half) of row r.
    let pairs = _mm256_unpacklo_epi32(heads[0], heads[1]);
    let d_dmin = _mm_unpacklo_epi32(
        _mm256_castsi256_si128(pairs),
        _mm256_extracti128_si256::<1>(pairs),
    );
    let d_dmin = _mm256_cvtph_ps(_mm_shuffle_epi8(
        d_dmin,
        _mm_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15),
    ));
    (decoded, d_dmin)
}

/// The scales of row `r` of [`k4_heads_rows4`]'s decoded pairs, in both lanes.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn row_scales(decoded: [__m256i; 2], r: usize) -> __m256i {
    let pair = decoded[r / 2];
    if r.is_multiple_of(2) {
        _mm256_permute2x128_si256::<0x00>(pair, pair)
    } else {
        _mm256_permute2x128_si256::<0x11>(pair, pair)
    }
}

/// Q4_K x Q8_K for four rows and `C` activation rows as llama.cpp's repacked
/// GEMM computes them (`KPath::Gemm4`): an exact integer sum per 64 values,
/// scaled into the row's FMA chains. The four rows' sums are gathered into the
/// lanes of one vector (a horizontal add tree), so each step of the chains is
/// one vector FMA for all four rows instead of a horizontal sum and a scalar
/// FMA per row.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_k_gemm_rows4<const C: usize>(
    nb: usize,
    w: [*const u8; 4],
    a: [*const u8; C],
) -> [[f32; C]; 4] {
    let low4 = _mm256_set1_epi8(0x0f);
    let picks = byte_as_i16_picks();
    // Lane r: row r.
    let mut scaled = [_mm_setzero_ps(); C];
    let mut mins = [_mm_setzero_ps(); C];
    // SAFETY: block b of every row is within the nb blocks of the contract.
    unsafe {
        for b in 0..nb {
            let x = array_of!(w[0]; 4, |r| w[r].add(b * 144));
            let y = array_of!(a[0]; C, |c| a[c].add(b * 292));
            let (decoded, d_dmin) = k4_heads_rows4(x);
            let ad = array_of!(_mm_setzero_ps(); C, |c| _mm_set1_ps(f32_at(y[c])));
            let dw = array_of!(_mm_setzero_ps(); C, |c| _mm_mul_ps(_mm256_castps256_ps128(d_dmin), ad[c]));
            let dmin = array_of!(_mm_setzero_ps(); C, |c| _mm_mul_ps(_mm256_extractf128_ps::<1>(d_dmin), ad[c]));
            for j in 0..4 {
                let mut sums = [[_mm256_setzero_si256(); C]; 4];
                for r in 0..4 {
                    let scales = row_scales(decoded, r);
                    let (sl, sh) = (
                        _mm256_shuffle_epi8(scales, picks[2 * j]),
                        _mm256_shuffle_epi8(scales, picks[2 * j + 1]),
                    );
                    let q = load256(x[r].add(16 + 32 * j));
                    let lo = _mm256_and_si256(q, low4);
                    let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q), low4);
                    for c in 0..C {
                        let pl = _mm256_madd_epi16(
                            _mm256_maddubs_epi16(lo, load256(y[c].add(4 + 64 * j))),
                            sl,
                        );
                        let ph = _mm256_madd_epi16(
                            _mm256_maddubs_epi16(hi, load256(y[c].add(36 + 64 * j))),
                            sh,
                        );
                        sums[r][c] = _mm256_add_epi32(pl, ph);
                    }
                }
                for c in 0..C {
                    let sumi = hsum4_i32(array_of!(low4; 4, |r| sums[r][c]));
                    scaled[c] = _mm_fmadd_ps(_mm_cvtepi32_ps(sumi), dw[c], scaled[c]);
                }
            }
            for c in 0..C {
                // Lane pair r, lane j: the mins of row r's sub-blocks 2j and 2j + 1
                // times their activation sums; then transposed to lane r of vector j.
                let asums = _mm256_broadcastsi128_si256(q8_k_sub_sums(y[c]));
                let zero = _mm256_setzero_si256();
                let m01 = _mm256_madd_epi16(_mm256_unpackhi_epi8(decoded[0], zero), asums);
                let m23 = _mm256_madd_epi16(_mm256_unpackhi_epi8(decoded[1], zero), asums);
                let halves = [
                    _mm256_unpacklo_epi32(m01, m23),
                    _mm256_unpackhi_epi32(m01, m23),
                ];
                for j in 0..4 {
                    let h = halves[j / 2];
                    let (lane0, lane1) =
                        (_mm256_castsi256_si128(h), _mm256_extracti128_si256::<1>(h));
                    let summ = if j % 2 == 0 {
                        _mm_unpacklo_epi32(lane0, lane1)
                    } else {
                        _mm_unpackhi_epi32(lane0, lane1)
                    };
                    mins[c] = _mm_fmadd_ps(_mm_cvtepi32_ps(summ), dmin[c], mins[c]);
                }
            }
        }
    }
    let out = array_of!(_mm_setzero_ps(); C, |c| _mm_sub_ps(scaled[c], mins[c]));
    // SAFETY: an __m128 is four f32 lanes; any bits are a valid f32.
    let lanes: [[f32; 4]; C] = unsafe { core::mem::transmute_copy(&out) };
    array_of!([0.0; C]; 4, |r| array_of!(0.0; C, |c| lanes[c][r]))
}

/// Q4_K x Q8_K for four rows and one activation row (the matvec tile): the
/// arithmetic of `k4_blocks`'s single-row path with the four rows' float
/// work done in the lanes of one vector, and the block headers (d, dmin,
/// scales) decoded two rows per vector instead of in scalar registers.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_k_rows4(nb: usize, w: [*const u8; 4], a: *const u8, ahead: usize) -> [f32; 4] {
    let low4 = _mm256_set1_epi8(0x0f);
    let picks = byte_as_i16_picks();
    let (mut scaled, mut mins) = (_mm_setzero_ps(), _mm_setzero_ps());
    // SAFETY: block b of every row is within the nb blocks of the contract.
    unsafe {
        for b in 0..nb {
            let y = a.add(b * 292);
            let ad = _mm_set1_ps(f32_at(y));
            let asums = _mm256_broadcastsi128_si256(q8_k_sub_sums(y));
            let x = array_of!(w[0]; 4, |r| w[r].add(b * 144));
            prefetch_step(w[0], b, 4 * 144, ahead);
            let (decoded, d_dmin) = k4_heads_rows4(x);
            // Lane pair r: the mins of row r times the sub-block activation sums.
            let min_dots = [
                _mm256_madd_epi16(
                    _mm256_unpackhi_epi8(decoded[0], _mm256_setzero_si256()),
                    asums,
                ),
                _mm256_madd_epi16(
                    _mm256_unpackhi_epi8(decoded[1], _mm256_setzero_si256()),
                    asums,
                ),
            ];
            let mut sums = [_mm256_setzero_si256(); 4];
            for r in 0..4 {
                let scales = row_scales(decoded, r);
                for j in 0..4 {
                    let q = load256(x[r].add(16 + 32 * j));
                    let lo = _mm256_and_si256(q, low4);
                    let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q), low4);
                    let pl = _mm256_madd_epi16(
                        _mm256_maddubs_epi16(lo, load256(y.add(4 + 64 * j))),
                        _mm256_shuffle_epi8(scales, picks[2 * j]),
                    );
                    let ph = _mm256_madd_epi16(
                        _mm256_maddubs_epi16(hi, load256(y.add(36 + 64 * j))),
                        _mm256_shuffle_epi8(scales, picks[2 * j + 1]),
                    );
                    sums[r] = _mm256_add_epi32(sums[r], _mm256_add_epi32(pl, ph));
                }
            }
            let sumi = hsum4_i32(sums);
            // Per lane [row0 row2 row0 row2 | row1 row3 row1 row3] after two pairwise adds.
            let summ = _mm256_hadd_epi32(min_dots[0], min_dots[1]);
            let summ = _mm256_hadd_epi32(summ, summ);
            let summ = _mm_unpacklo_epi32(
                _mm256_castsi256_si128(summ),
                _mm256_extracti128_si256::<1>(summ),
            );
            let dw = _mm_mul_ps(_mm256_castps256_ps128(d_dmin), ad);
            let dmin = _mm_mul_ps(_mm256_extractf128_ps::<1>(d_dmin), ad);
            scaled = _mm_fmadd_ps(_mm_cvtepi32_ps(sumi), dw, scaled);
            mins = _mm_fmadd_ps(_mm_cvtepi32_ps(summ), dmin, mins);
        }
    }
    // SAFETY: an __m128 is four f32 lanes; any bits are a valid f32.
    unsafe { core::mem::transmute(_mm_sub_ps(scaled, mins)) }
}

/// `vpshufb` controls that copy byte `k` of each 128-bit half, zero-extended,
/// into every i16 lane of that half (the scale of sub-block `k` of a
/// [`k4_scales_mins_x2`] row).
///
/// Hidden from the optimizer: LLVM would otherwise turn these splat controls
/// into `vpbroadcastw` loads, one more shuffle each on AMD cores.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn byte_as_i16_picks() -> [__m256i; 8] {
    core::hint::black_box(
        array_of!(_mm256_setzero_si256(); 8, |k| _mm256_set1_epi16((0x8000 | k) as i16)),
    )
}

/// `a * b + c` with one rounding.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) fn fmadd(a: f32, b: f32, c: f32) -> f32 {
    _mm_cvtss_f32(_mm_fmadd_ss(_mm_set_ss(a), _mm_set_ss(b), _mm_set_ss(c)))
}

/// Q6_K x Q8_K: 6-bit values (0..63) times a per 16-value scale, minus
/// 32 * sum(scale_k * bsum_k).
#[target_feature(enable = "avx2,fma,f16c")]
/// With `tiled`, as llama.cpp's tiled matmul (see `KPath::Tiled`).
unsafe fn q6_k<const R: usize, const C: usize>(
    nb: usize,
    w: [*const u8; R],
    a: [*const u8; C],
    tiled: bool,
    ahead: usize,
) -> [[f32; C]; R] {
    let mut out = [[0.0f32; C]; R];
    let low4 = _mm256_set1_epi8(0x0f);
    let bits45 = _mm256_set1_epi8(0x30);
    let mut acc = [[_mm256_setzero_ps(); C]; R];
    // SAFETY: block b of every row is within the nb blocks of the contract.
    unsafe {
        for b in 0..nb {
            let y = array_of!(a[0]; C, |c| a[c].add(b * 292));
            let ad = array_of!(0.0; C, |c| f32_at(y[c]));
            let bsums = array_of!(low4; C, |c| load256(y[c].add(260)));
            let x = array_of!(w[0]; R, |r| w[r].add(b * 210));
            prefetch_step(w[0], b, R * 210, ahead);
            let scales = array_of!(low4; R, |r| _mm256_cvtepi8_epi16(load128(x[r].add(192))));
            let mut sums = [[_mm256_setzero_si256(); C]; R];
            for r in 0..R {
                for c in 0..C {
                    let offset = _mm256_slli_epi32::<5>(_mm256_madd_epi16(scales[r], bsums[c]));
                    sums[r][c] = _mm256_sub_epi32(sums[r][c], offset);
                }
            }
            for half in 0..2 {
                // Scales 8 * half .. 8 * half + 8 in both 128-bit lanes.
                let sc = array_of!(low4; R, |r| {
                    if half == 0 {
                        _mm256_permute2x128_si256::<0x00>(scales[r], scales[r])
                    } else {
                        _mm256_permute2x128_si256::<0x11>(scales[r], scales[r])
                    }
                });
                let mut q6 = [[low4; 4]; R];
                for r in 0..R {
                    let ql0 = load256(x[r].add(64 * half));
                    let ql1 = load256(x[r].add(64 * half + 32));
                    let qh = load256(x[r].add(128 + 32 * half));
                    let high = [
                        _mm256_slli_epi16::<4>(qh),
                        _mm256_slli_epi16::<2>(qh),
                        qh,
                        _mm256_srli_epi16::<2>(qh),
                    ];
                    let low = [
                        ql0,
                        ql1,
                        _mm256_srli_epi16::<4>(ql0),
                        _mm256_srli_epi16::<4>(ql1),
                    ];
                    for g in 0..4 {
                        q6[r][g] = _mm256_or_si256(
                            _mm256_and_si256(low[g], low4),
                            _mm256_and_si256(high[g], bits45),
                        );
                    }
                }
                for g in 0..4 {
                    // i16 lanes 0..8 use scale 2g, lanes 8..16 scale 2g + 1 (of this half).
                    let lo_pick = (((4 * g + 1) << 8) | (4 * g)) as i16;
                    let hi_pick = (((4 * g + 3) << 8) | (4 * g + 2)) as i16;
                    let pick = _mm256_setr_m128i(_mm_set1_epi16(lo_pick), _mm_set1_epi16(hi_pick));
                    for c in 0..C {
                        let q8 = load256(y[c].add(4 + 128 * half + 32 * g));
                        for r in 0..R {
                            let pairs = _mm256_maddubs_epi16(q6[r][g], q8);
                            let scale = _mm256_shuffle_epi8(sc[r], pick);
                            sums[r][c] =
                                _mm256_add_epi32(sums[r][c], _mm256_madd_epi16(pairs, scale));
                        }
                    }
                }
            }
            for r in 0..R {
                let dw = f16_at(x[r].add(208));
                for c in 0..C {
                    if tiled {
                        let sumi = hsum_i32(sums[r][c]);
                        out[r][c] = fmadd(dw * sumi as f32, ad[c], out[r][c]);
                        continue;
                    }
                    acc[r][c] = _mm256_fmadd_ps(
                        _mm256_set1_ps(dw * ad[c]),
                        _mm256_cvtepi32_ps(sums[r][c]),
                        acc[r][c],
                    );
                }
            }
        }
    }
    if tiled {
        return out;
    }
    hsum_all(acc)
}

/// Which float format a row of `floats` holds.
const F32: u8 = 0;
const F16: u8 = 1;
const BF16: u8 = 2;

/// Eight values of float format `KIND` at p, widened to f32.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load_floats8<const KIND: u8>(p: *const u8) -> __m256 {
    // SAFETY: the caller guarantees 8 values (32 or 16 bytes) at p.
    unsafe {
        match KIND {
            F32 => _mm256_loadu_ps(p.cast()),
            F16 => _mm256_cvtph_ps(load128(p)),
            _ => _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(load128(p)))),
        }
    }
}

/// One value of float format `KIND` at p.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load_float<const KIND: u8>(p: *const u8) -> f32 {
    // SAFETY: the caller guarantees one value at p.
    unsafe {
        match KIND {
            F32 => p.cast::<f32>().read_unaligned(),
            F16 => f16_at(p),
            _ => f32::from_bits(u32::from(p.cast::<u16>().read_unaligned()) << 16),
        }
    }
}

/// F32 / F16 / BF16 rows of `n` values: 8 per step, the remainder one by one.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn floats<const R: usize, const C: usize, const KIND: u8>(
    n: usize,
    w: [*const u8; R],
    a: [*const u8; C],
) -> [[f32; C]; R] {
    let size = if KIND == F32 { 4 } else { 2 };
    let mut acc = [[_mm256_setzero_ps(); C]; R];
    let full = n / 8 * 8;
    // SAFETY: every offset is below n values.
    unsafe {
        for i in (0..full).step_by(8) {
            let av =
                array_of!(_mm256_setzero_ps(); C, |c| load_floats8::<KIND>(a[c].add(i * size)));
            for r in 0..R {
                let wv = load_floats8::<KIND>(w[r].add(i * size));
                for c in 0..C {
                    acc[r][c] = _mm256_fmadd_ps(wv, av[c], acc[r][c]);
                }
            }
        }
        let mut out = hsum_all(acc);
        for i in full..n {
            for r in 0..R {
                for c in 0..C {
                    out[r][c] += load_float::<KIND>(w[r].add(i * size))
                        * load_float::<KIND>(a[c].add(i * size));
                }
            }
        }
        out
    }
}

/// SIMD conversion of one activation row; false if `act` has no SIMD path here.
///
/// # Safety
/// The CPU supports AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn quantize_row(act: GgmlType, src: &[f32], dst: &mut [u8]) -> bool {
    match act {
        GgmlType::Q8_0 | GgmlType::Q8_1 => {
            for (x, y) in src
                .chunks_exact(32)
                .zip(dst.chunks_exact_mut(act.block_bytes()))
            {
                quantize_q8_0_block(act == GgmlType::Q8_1, x, y);
            }
        }
        GgmlType::Q8_K => {
            for (x, y) in src
                .chunks_exact(256)
                .zip(dst.chunks_exact_mut(act.block_bytes()))
            {
                quantize_q8_k_block(x, y);
            }
        }
        GgmlType::F16 => {
            let mut chunks = src.chunks_exact(8);
            let mut out = dst.chunks_exact_mut(16);
            for (x, y) in (&mut chunks).zip(&mut out) {
                // SAFETY: x holds 8 floats, y 16 bytes.
                unsafe {
                    let h = _mm256_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT }>(_mm256_loadu_ps(
                        x.as_ptr(),
                    ));
                    _mm_storeu_si128(y.as_mut_ptr().cast(), h);
                }
            }
            let tail = chunks.remainder();
            scalar::quantize_row(act, tail, &mut out.into_remainder()[..2 * tail.len()]);
        }
        _ => return false,
    }
    true
}

/// Eight floats from `x[at..at + 8]`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn load8(x: &[f32], at: usize) -> __m256 {
    let x = &x[at..at + 8];
    // SAFETY: x has exactly 8 floats.
    unsafe { _mm256_loadu_ps(x.as_ptr()) }
}

/// Rounds 32 floats (times `scale`) to i8, ties to even, into `out`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn round_32_to_i8(v: [__m256; 4], scale: __m256, out: &mut [u8]) -> __m256i {
    let q = array_of!(_mm256_setzero_si256(); 4, |i| {
        let scaled = _mm256_mul_ps(v[i], scale);
        _mm256_cvtps_epi32(_mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(scaled))
    });
    let sum = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    let words = [
        _mm256_packs_epi32(q[0], q[1]),
        _mm256_packs_epi32(q[2], q[3]),
    ];
    // packs works per 128-bit lane; the permute restores the element order.
    let bytes = _mm256_permutevar8x32_epi32(
        _mm256_packs_epi16(words[0], words[1]),
        _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7),
    );
    let out = &mut out[..32];
    // SAFETY: out has exactly 32 bytes.
    unsafe { _mm256_storeu_si256(out.as_mut_ptr().cast(), bytes) };
    sum
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn hmax(v: __m256) -> f32 {
    let x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let x = _mm_max_ps(x, _mm_movehl_ps(x, x));
    _mm_cvtss_f32(_mm_max_ss(x, _mm_movehdup_ps(x)))
}

#[target_feature(enable = "avx2,fma,f16c")]
fn quantize_q8_0_block(with_sum: bool, x: &[f32], y: &mut [u8]) {
    let v: [__m256; 4] = core::array::from_fn(|i| load8(x, 8 * i));
    let sign = _mm256_set1_ps(-0.0);
    let abs = array_of!(sign; 4, |i| _mm256_andnot_ps(sign, v[i]));
    let amax = hmax(_mm256_max_ps(
        _mm256_max_ps(abs[0], abs[1]),
        _mm256_max_ps(abs[2], abs[3]),
    ));
    let d = amax / 127.0;
    let inverse = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    y[..2].copy_from_slice(&super::f32_to_f16(d).to_le_bytes());
    let at = if with_sum { 4 } else { 2 };
    let sum = round_32_to_i8(v, _mm256_set1_ps(inverse), &mut y[at..]);
    if with_sum {
        let sum = hsum_i32(sum);
        y[2..4].copy_from_slice(&super::f32_to_f16(d * sum as f32).to_le_bytes());
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn hsum_i32(v: __m256i) -> i32 {
    let x = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let x = _mm_add_epi32(x, _mm_unpackhi_epi64(x, x));
    _mm_cvtsi128_si32(_mm_add_epi32(x, _mm_shuffle_epi32::<0b10_11_00_01>(x)))
}

/// The sums of the i32 lanes of each of four vectors, in lanes 0..4.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn hsum4_i32(v: [__m256i; 4]) -> __m128i {
    let x = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
    _mm_add_epi32(_mm256_castsi256_si128(x), _mm256_extracti128_si256::<1>(x))
}

/// Same result as `scalar::quantize_q8_k_block`, bit for bit.
#[target_feature(enable = "avx2,fma,f16c")]
fn quantize_q8_k_block(x: &[f32], y: &mut [u8]) {
    let sign = _mm256_set1_ps(-0.0);
    let mut vmax = _mm256_setzero_ps();
    for i in 0..32 {
        vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, load8(x, 8 * i)));
    }
    let amax = hmax(vmax);
    if amax == 0.0 {
        y.fill(0);
        return;
    }
    // The first value of largest magnitude decides the sign of the scale.
    let target = _mm256_set1_ps(amax);
    let first = (0..32)
        .find_map(|i| {
            let hit = _mm256_cmp_ps::<_CMP_EQ_OQ>(_mm256_andnot_ps(sign, load8(x, 8 * i)), target);
            let mask = _mm256_movemask_ps(hit);
            (mask != 0).then(|| 8 * i + mask.trailing_zeros() as usize)
        })
        .unwrap_or(0);
    let iscale = -127.0 / x[first];
    let scale = _mm256_set1_ps(iscale);
    let limit = _mm256_set1_epi32(127);
    for i in 0..8 {
        let q: [__m256i; 4] = core::array::from_fn(|k| {
            let scaled = _mm256_mul_ps(load8(x, 32 * i + 8 * k), scale);
            let rounded =
                _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(scaled);
            _mm256_min_epi32(_mm256_cvtps_epi32(rounded), limit)
        });
        let words = [
            _mm256_packs_epi32(q[0], q[1]),
            _mm256_packs_epi32(q[2], q[3]),
        ];
        let bytes = _mm256_permutevar8x32_epi32(
            _mm256_packs_epi16(words[0], words[1]),
            _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7),
        );
        let out = &mut y[4 + 32 * i..4 + 32 * i + 32];
        // SAFETY: out has exactly 32 bytes.
        unsafe { _mm256_storeu_si256(out.as_mut_ptr().cast(), bytes) };
        let sums: [i32; 2] = core::array::from_fn(|half| {
            out[16 * half..16 * half + 16]
                .iter()
                .map(|&q| i32::from(q as i8))
                .sum()
        });
        for (half, sum) in sums.into_iter().enumerate() {
            let k = 2 * i + half;
            y[260 + 2 * k..262 + 2 * k].copy_from_slice(&(sum as i16).to_le_bytes());
        }
    }
    y[..4].copy_from_slice(&(1.0 / iscale).to_le_bytes());
}
