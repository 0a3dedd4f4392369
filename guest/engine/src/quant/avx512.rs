//! AVX-512 (F, BW, VL) kernels, with and without VNNI, for the formats that
//! dominate the supported models: Q8_0, Q5_0, Q4_0 and the K-quants Q4_K,
//! Q5_K, Q6_K. The other formats use the AVX2 kernels.
//!
//! The design goal is to keep port 5 (shuffles) free and the per-block work
//! minimal, since a matvec must stream weights at memory bandwidth:
//! - 32-value formats work on one block per ymm register (`vpdpbusd` on
//!   weights made unsigned, the offset cancelled through the activation sums).
//!   Their f16 scales are picked out eight blocks at a time (`vpermt2w`),
//!   multiplied by the activation scales into a small table, and read by the
//!   FMAs as broadcast memory operands, so no per-block shuffle is needed.
//! - K-quants process a 256-value super-block per row in zmm registers with
//!   `vpmaddubsw` (unsigned weights times signed activations) and `vpdpwssd`
//!   (times the sub-block scales); d and dmin go through the same kind of table.
//!
//! Everything below is `#[inline(always)]` and generic over `VNNI`; the two
//! entry points (`tile_vnni`, `tile_plain`) enable the target features, so the
//! same code is compiled once with `vpdpbusd`/`vpdpwssd` and once with their
//! `vpmaddubsw` + `vpmaddwd` equivalents. Contract of every `unsafe fn`: the
//! CPU supports the entry point's features, and each weight pointer `w[r]` and
//! activation pointer `a[c]` addresses `nb` whole blocks of its format.

// Kernels index several per-row and per-column arrays with the same counter.
#![allow(clippy::needless_range_loop)]

use core::arch::x86_64::*;

use super::{avx2, prefetch_step, GgmlType, KPath, TileKernels};

pub(super) struct Tiles<const VNNI: bool>;

impl<const VNNI: bool> TileKernels for Tiles<VNNI> {
    fn tile<const R: usize, const C: usize>(
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
            ahead == 0
                || (0..R).all(|r| w[r].as_ptr() == w[0].as_ptr().wrapping_add(r * row_bytes))
        );
        let wp = w.map(<[u8]>::as_ptr);
        let ap = a.map(<[u8]>::as_ptr);
        // SAFETY: `Tiles<VNNI>` is only used by `Kernels` of level Avx512Vnni (VNNI)
        // or Avx512 (plain), which the CPU supports; the slices hold nb blocks (checked).
        unsafe {
            match ty {
                // Q4_K, and Q6_K in llama.cpp's tiled arithmetic, go to the
                // AVX2 kernels, which follow llama.cpp (the same on AVX-512 CPUs).
                GgmlType::Q6_K if kpath == KPath::Tiled => avx2::tile(ty, n, w, a, kpath, ahead),
                GgmlType::Q8_0
                | GgmlType::Q4_0
                | GgmlType::Q5_0
                | GgmlType::Q5_K
                | GgmlType::Q6_K => {
                    if VNNI {
                        tile_vnni(ty, nb, wp, ap, ahead)
                    } else {
                        tile_plain(ty, nb, wp, ap, ahead)
                    }
                }
                _ => avx2::tile(ty, n, w, a, kpath, ahead),
            }
        }
    }

    fn matvec_rows(ty: GgmlType) -> usize {
        if Self::wide_matmul_tiles(ty) {
            8
        } else {
            4
        }
    }

    fn wide_matmul_tiles(ty: GgmlType) -> bool {
        matches!(ty, GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q5_0)
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn tile_vnni<const R: usize, const C: usize>(
    ty: GgmlType,
    nb: usize,
    w: [*const u8; R],
    a: [*const u8; C],
    ahead: usize,
) -> [[f32; C]; R] {
    // SAFETY: forwarded contract.
    unsafe { tile_any::<R, C, true>(ty, nb, w, a, ahead) }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn tile_plain<const R: usize, const C: usize>(
    ty: GgmlType,
    nb: usize,
    w: [*const u8; R],
    a: [*const u8; C],
    ahead: usize,
) -> [[f32; C]; R] {
    // SAFETY: forwarded contract.
    unsafe { tile_any::<R, C, false>(ty, nb, w, a, ahead) }
}

#[inline(always)]
unsafe fn tile_any<const R: usize, const C: usize, const VNNI: bool>(
    ty: GgmlType,
    nb: usize,
    w: [*const u8; R],
    a: [*const u8; C],
    ahead: usize,
) -> [[f32; C]; R] {
    // SAFETY: forwarded contract.
    unsafe {
        match ty {
            GgmlType::Q8_0 => blocks32::<R, C, VNNI, Q8_0>(nb, w, a, ahead),
            GgmlType::Q4_0 => blocks32::<R, C, VNNI, Q4_0>(nb, w, a, ahead),
            GgmlType::Q5_0 => blocks32::<R, C, VNNI, Q5_0>(nb, w, a, ahead),
            GgmlType::Q5_K => k4_blocks::<R, C, VNNI, true>(nb, w, a, ahead),
            GgmlType::Q6_K => q6_k::<R, C, VNNI>(nb, w, a, ahead),
            _ => unreachable!("{} is routed to the AVX2 kernels", ty.name()),
        }
    }
}

#[inline(always)]
unsafe fn load512(p: *const u8) -> __m512i {
    // SAFETY: the caller guarantees 64 readable bytes at p.
    unsafe { _mm512_loadu_si512(p.cast()) }
}

#[inline(always)]
unsafe fn load256(p: *const u8) -> __m256i {
    // SAFETY: the caller guarantees 32 readable bytes at p.
    unsafe { _mm256_loadu_si256(p.cast()) }
}

#[inline(always)]
unsafe fn load128(p: *const u8) -> __m128i {
    // SAFETY: the caller guarantees 16 readable bytes at p.
    unsafe { _mm_loadu_si128(p.cast()) }
}

/// `lo` in the low 256 bits, `hi` in the high 256 bits.
#[inline(always)]
unsafe fn join(lo: __m256i, hi: __m256i) -> __m512i {
    // SAFETY: register-only AVX-512F operations, enabled by the entry points.
    unsafe { _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi) }
}

/// Which 32-value format `blocks32` handles.
const Q8_0: u8 = 0;
const Q4_0: u8 = 1;
const Q5_0: u8 = 2;

const fn block_bytes32(kind: u8) -> usize {
    match kind {
        Q8_0 => 34,
        Q4_0 => 18,
        _ => 22,
    }
}

/// The 32 weight values of the block at p as unsigned bytes in value order
/// (Q4_0: 0..16, Q5_0: 0..32, Q8_0 with VNNI: w + 128; Q8_0 without VNNI: w).
#[inline(always)]
unsafe fn weight_block32<const VNNI: bool, const KIND: u8>(p: *const u8) -> __m256i {
    // SAFETY: p points to one whole block of KIND.
    unsafe {
        match KIND {
            Q8_0 if VNNI => _mm256_xor_si256(load256(p.add(2)), _mm256_set1_epi8(-128)),
            Q8_0 => load256(p.add(2)),
            _ => {
                let qs = if KIND == Q4_0 { 2 } else { 6 };
                // qs in both halves; the upper half shifted to its high nibbles.
                let both = _mm256_broadcastsi128_si256(load128(p.add(qs)));
                let shifts = _mm256_setr_epi64x(0, 0, 0x0004_0004_0004_0004, 0x0004_0004_0004_0004);
                let shifted = _mm256_srlv_epi16(both, shifts);
                let low4 = _mm256_set1_epi8(0x0f);
                if KIND == Q4_0 {
                    _mm256_and_si256(shifted, low4)
                } else {
                    // Bit j of qh is bit 4 of value j: (shifted & 0x0f) | (bit ? 16 : 0).
                    let high = _mm256_maskz_mov_epi8(
                        p.add(2).cast::<u32>().read_unaligned(),
                        _mm256_set1_epi8(16),
                    );
                    _mm256_ternarylogic_epi32::<0xec>(shifted, high, low4)
                }
            }
        }
    }
}

/// The f16 scales of blocks `first..first + 8` of a row of `nb` 32-value
/// blocks of `block` bytes (18, 22 or 34), widened to f32; lanes past the row
/// end are garbage. The scales are the first word of each block: up to four
/// 64-byte loads cover eight blocks, and `vpermt2w` picks the eight words out
/// (cheaper here than a gather).
#[inline(always)]
unsafe fn scales8(row: *const u8, block: usize, nb: usize, first: usize) -> __m256 {
    // SAFETY: loads cover bytes first * block .. + 256, masked to the row's
    // nb * block bytes (masked-off bytes are not accessed).
    unsafe {
        let start = row.add(first * block);
        let available = (nb - first) * block;
        let load = |i: usize| {
            let valid = available.saturating_sub(64 * i).min(64);
            let mask = if valid == 64 {
                u64::MAX
            } else {
                (1u64 << valid) - 1
            };
            _mm512_maskz_loadu_epi8(mask, start.add(64 * i).cast())
        };
        let step = (block / 2) as i16;
        let word = |k: i16| (k * step) & 63;
        let pick = _mm512_set_epi16(
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            word(7),
            word(6),
            word(5),
            word(4),
            word(3),
            word(2),
            word(1),
            word(0),
        );
        let low = _mm512_permutex2var_epi16(load(0), pick, load(1));
        let words = if block <= 18 {
            low
        } else {
            // Words 64 and up come from the next 128 bytes (Q5_0 needs only 64 of them).
            let next = if block <= 22 {
                _mm512_setzero_si512()
            } else {
                load(3)
            };
            let high = _mm512_permutex2var_epi16(load(2), pick, next);
            let from_high = (0..8)
                .filter(|&k| k * step >= 64)
                .fold(0u32, |m, k| m | 1 << k);
            _mm512_mask_blend_epi16(from_high, low, high)
        };
        _mm256_cvtph_ps(_mm512_castsi512_si128(words))
    }
}

/// Q8_0 / Q4_0 / Q5_0 x Q8_0, one block per ymm register. Block scales are
/// multiplied eight blocks at a time into a small table that the FMAs read
/// with broadcast loads, which keeps the shuffle port free.
#[inline(always)]
unsafe fn blocks32<const R: usize, const C: usize, const VNNI: bool, const KIND: u8>(
    nb: usize,
    w: [*const u8; R],
    a: [*const u8; C],
    ahead: usize,
) -> [[f32; C]; R] {
    let bs = block_bytes32(KIND);
    // Signed Q8_0 weights without VNNI use vpsignb instead of an offset.
    let signed = KIND == Q8_0 && !VNNI;
    // SAFETY: every block index is below nb; see the module contract.
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        // The offset that made the weights unsigned, cancelled via the activation sums.
        let offset = _mm256_set1_epi8(match KIND {
            Q8_0 => -128,
            Q4_0 => 8,
            _ => 16,
        });
        let mut table = [[[0.0f32; 8]; C]; R];
        for first in (0..nb).step_by(8) {
            let count = (nb - first).min(8);
            let act_scales = array_of!(_mm256_setzero_ps(); C, |c| scales8(a[c], 34, nb, first));
            for r in 0..R {
                let weight_scales = scales8(w[r], bs, nb, first);
                for c in 0..C {
                    _mm256_storeu_ps(
                        table[r][c].as_mut_ptr(),
                        _mm256_mul_ps(weight_scales, act_scales[c]),
                    );
                }
            }
            // Read the table back through an opaque reference: otherwise the compiler keeps it in
            // registers and extracts each scale with shuffles, the very port this design avoids.
            let table = core::hint::black_box(&table);
            for k in 0..count {
                let b = first + k;
                prefetch_step(w[0], b, R * bs, ahead);
                let act = array_of!(offset; C, |c| load256(a[c].add(b * 34 + 2)));
                // Each i32 lane starts at -(offset * sum of its four activations).
                let start = array_of!(offset; C, |c| {
                    if signed {
                        _mm256_setzero_si256()
                    } else {
                        _mm256_sub_epi32(_mm256_setzero_si256(), dot_u8_i8::<VNNI>(_mm256_setzero_si256(), offset, act[c]))
                    }
                });
                for r in 0..R {
                    let wq = weight_block32::<VNNI, KIND>(w[r].add(b * bs));
                    for c in 0..C {
                        let dot = if signed {
                            let pairs = _mm256_maddubs_epi16(
                                _mm256_sign_epi8(wq, wq),
                                _mm256_sign_epi8(act[c], wq),
                            );
                            _mm256_madd_epi16(pairs, _mm256_set1_epi16(1))
                        } else {
                            dot_u8_i8::<VNNI>(start[c], wq, act[c])
                        };
                        let scale = _mm256_broadcast_ss(&table[r][c][k]);
                        acc[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, acc[r][c]);
                    }
                }
            }
        }
        array_of!([0.0; C]; R, |r| array_of!(0.0; C, |c| avx2::hsum(acc[r][c])))
    }
}

/// `acc` + the sums of four adjacent u8 x i8 products of `u` and `s` per i32 lane.
/// Without VNNI the intermediate i16 pair sums saturate above 32767; callers
/// pass u <= 31 there (activations are within +-127), which keeps them exact.
#[inline(always)]
unsafe fn dot_u8_i8<const VNNI: bool>(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
    // SAFETY: only reached from the entry points, which enable these features.
    unsafe {
        if VNNI {
            _mm256_dpbusd_epi32(acc, u, s)
        } else {
            _mm256_add_epi32(
                acc,
                _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)),
            )
        }
    }
}

#[inline(always)]
unsafe fn f32_at(p: *const u8) -> f32 {
    // SAFETY: the caller guarantees 4 readable bytes at p.
    unsafe { p.cast::<f32>().read_unaligned() }
}

/// Decodes the 12 packed scale bytes of a Q4_K/Q5_K block at p into 16 i16:
/// the eight 6-bit scales, then the eight 6-bit mins.
#[inline(always)]
unsafe fn k4_scales_mins(p: *const u8) -> __m256i {
    // SAFETY: p is followed by at least 16 bytes of the same block (12 scale bytes, then qh/qs).
    unsafe {
        // Dwords q0, q1, q2 hold bytes 0..4, 4..8, 8..12.
        let q = load128(p);
        // Scales 0..4 = q0 & 63, scales 4..8 = (q2 & 15) | (q0 >> 6) << 4,
        // mins 0..4 = q1 & 63, mins 4..8 = (q2 >> 4) | (q1 >> 6) << 4.
        let low = _mm_srlv_epi32(
            _mm_shuffle_epi32::<0b10_01_10_00>(q),
            _mm_setr_epi32(0, 0, 0, 4),
        );
        let low = _mm_and_si128(
            low,
            _mm_setr_epi32(0x3f3f3f3f, 0x0f0f0f0f, 0x3f3f3f3f, 0x0f0f0f0f),
        );
        let high = _mm_srli_epi32::<2>(_mm_shuffle_epi32::<0b01_00_00_00>(q));
        let high = _mm_and_si128(high, _mm_setr_epi32(0, 0x30303030, 0, 0x30303030));
        _mm256_cvtepu8_epi16(_mm_or_si128(low, high))
    }
}

/// `vpdpwssd`, kept as one instruction: LLVM otherwise splits long chains of it
/// into `vpmaddwd` + `vpaddd`, one more uop each on the busiest port.
#[target_feature(enable = "avx512f,avx512vnni")]
#[inline]
unsafe fn dpwssd(mut acc: __m512i, x: __m512i, y: __m512i) -> __m512i {
    // SAFETY: a register-only instruction of the enabled features.
    unsafe {
        core::arch::asm!(
            "vpdpwssd {acc}, {x}, {y}",
            acc = inout(zmm_reg) acc,
            x = in(zmm_reg) x,
            y = in(zmm_reg) y,
            options(pure, nomem, nostack, preserves_flags),
        );
    }
    acc
}

/// The f16 pair at `offset` of the current block of each of up to eight rows,
/// widened: lanes 2r and 2r + 1 hold row r's two values.
#[inline(always)]
unsafe fn gather_f16_pairs<const R: usize>(x: [*const u8; R], offset: usize) -> __m512 {
    const { assert!(R <= 8) };
    // SAFETY: each x[r] + offset is followed by 4 bytes of the same block.
    unsafe {
        let base = x[0].add(offset);
        let at = array_of!(0i64; 8, |r| x[r.min(R - 1)] as i64 - x[0] as i64);
        let offsets = _mm512_setr_epi64(at[0], at[1], at[2], at[3], at[4], at[5], at[6], at[7]);
        _mm512_cvtph_ps(_mm512_i64gather_epi32::<1>(offsets, base.cast()))
    }
}

/// Q4_K / Q5_K x Q8_K. A zmm of 64 weight bytes holds sub-blocks (j, j + 2) in
/// its low nibbles and (j + 1, j + 3) in its high nibbles; the activations are
/// loaded in the same order.
#[inline(always)]
unsafe fn k4_blocks<const R: usize, const C: usize, const VNNI: bool, const FIVE_BITS: bool>(
    nb: usize,
    w: [*const u8; R],
    a: [*const u8; C],
    ahead: usize,
) -> [[f32; C]; R] {
    let (block, qs_at) = if FIVE_BITS { (176, 48) } else { (144, 16) };
    // SAFETY: every block index is below nb; see the module contract.
    unsafe {
        let low4 = _mm512_set1_epi8(0x0f);
        let mut acc = [[_mm512_setzero_ps(); C]; R];
        let mut acc_mins = [[_mm_setzero_ps(); C]; R];
        // Per column: d * da and dmin * da of each row, read back with broadcast loads.
        let mut factors = [[0.0f32; 16]; C];
        for b in 0..nb {
            let y = array_of!(a[0]; C, |c| a[c].add(b * 292));
            let x = array_of!(w[0]; R, |r| w[r].add(b * block));
            prefetch_step(w[0], b, R * block, ahead);
            let d_dmin = gather_f16_pairs(x, 0);
            for c in 0..C {
                _mm512_storeu_ps(
                    factors[c].as_mut_ptr(),
                    _mm512_mul_ps(d_dmin, _mm512_set1_ps(f32_at(y[c]))),
                );
            }
            let factors = core::hint::black_box(&factors);
            let scales_mins = array_of!(_mm256_setzero_si256(); R, |r| k4_scales_mins(x[r].add(4)));
            let scales =
                array_of!(_mm512_setzero_si512(); R, |r| _mm512_castsi256_si512(scales_mins[r]));
            // Q5_K: qh (bit j of byte l is bit 4 of value 32j + l) next to qh >> 2, so that
            // sub-blocks j and j + 2 find their bit at the same position.
            let high = array_of!(low4; R, |r| {
                if FIVE_BITS {
                    let qh = load256(x[r].add(16));
                    join(qh, _mm256_srli_epi16::<2>(qh))
                } else {
                    low4
                }
            });
            let mut sums = [[_mm512_setzero_si512(); C]; R];
            for t in 0..4 {
                let (half, upper) = (t / 2, t % 2);
                // Sub-blocks (4 half + upper, 4 half + upper + 2) in i16 lanes 0..16, 16..32.
                let first = (4 * half + upper) as i16;
                let pick = _mm512_set_epi16(
                    first + 2,
                    first + 2,
                    first + 2,
                    first + 2,
                    first + 2,
                    first + 2,
                    first + 2,
                    first + 2,
                    first + 2,
                    first + 2,
                    first + 2,
                    first + 2,
                    first + 2,
                    first + 2,
                    first + 2,
                    first + 2,
                    first,
                    first,
                    first,
                    first,
                    first,
                    first,
                    first,
                    first,
                    first,
                    first,
                    first,
                    first,
                    first,
                    first,
                    first,
                    first,
                );
                let mut wq = [low4; R];
                let mut sc = [low4; R];
                for r in 0..R {
                    let q = load512(x[r].add(qs_at + 64 * half));
                    let v = if upper == 1 {
                        _mm512_and_si512(_mm512_srli_epi16::<4>(q), low4)
                    } else {
                        _mm512_and_si512(q, low4)
                    };
                    wq[r] = if FIVE_BITS {
                        let bit = _mm512_test_epi8_mask(
                            high[r],
                            _mm512_set1_epi8(1 << (4 * half + upper)),
                        );
                        _mm512_mask_add_epi8(v, bit, v, _mm512_set1_epi8(16))
                    } else {
                        v
                    };
                    sc[r] = _mm512_permutexvar_epi16(pick, scales[r]);
                }
                for c in 0..C {
                    let at = 4 + 128 * half + 32 * upper;
                    let act = join(load256(y[c].add(at)), load256(y[c].add(at + 64)));
                    for r in 0..R {
                        sums[r][c] =
                            dot_i16::<VNNI>(sums[r][c], _mm512_maddubs_epi16(wq[r], act), sc[r]);
                    }
                }
            }
            for c in 0..C {
                let bsums = load256(y[c].add(260));
                // Activation sum of each 32-value sub-block.
                let sub_sums = _mm_hadd_epi16(
                    _mm256_castsi256_si128(bsums),
                    _mm256_extracti128_si256::<1>(bsums),
                );
                for r in 0..R {
                    let mins =
                        _mm_madd_epi16(_mm256_extracti128_si256::<1>(scales_mins[r]), sub_sums);
                    let d = _mm512_set1_ps(factors[c][2 * r]);
                    acc[r][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums[r][c]), d, acc[r][c]);
                    let dmin = _mm_set1_ps(factors[c][2 * r + 1]);
                    acc_mins[r][c] = _mm_fmadd_ps(_mm_cvtepi32_ps(mins), dmin, acc_mins[r][c]);
                }
            }
        }
        array_of!([0.0; C]; R, |r| array_of!(0.0; C, |c| {
            _mm512_reduce_add_ps(acc[r][c]) - avx2::hsum(_mm256_castps128_ps256(acc_mins[r][c]))
        }))
    }
}

/// `acc` + the sums of adjacent i16 x i16 products per i32 lane.
#[inline(always)]
unsafe fn dot_i16<const VNNI: bool>(acc: __m512i, x: __m512i, y: __m512i) -> __m512i {
    // SAFETY: only reached from the entry points, which enable these features.
    unsafe {
        if VNNI {
            dpwssd(acc, x, y)
        } else {
            _mm512_add_epi32(acc, _mm512_madd_epi16(x, y))
        }
    }
}

/// Q6_K x Q8_K. The low nibbles of 64 `ql` bytes with 2 bits of `qh` each are
/// 64 consecutive values, the high nibbles the next 64; values are used
/// unsigned (0..64) and 32 * sum(scale * bsum) is subtracted.
#[inline(always)]
unsafe fn q6_k<const R: usize, const C: usize, const VNNI: bool>(
    nb: usize,
    w: [*const u8; R],
    a: [*const u8; C],
    ahead: usize,
) -> [[f32; C]; R] {
    // SAFETY: every block index is below nb; see the module contract.
    unsafe {
        let low4 = _mm512_set1_epi8(0x0f);
        let mut acc = [[_mm512_setzero_ps(); C]; R];
        let mut factors = [[0.0f32; 16]; C];
        for b in 0..nb {
            let y = array_of!(a[0]; C, |c| a[c].add(b * 292));
            let x = array_of!(w[0]; R, |r| w[r].add(b * 210));
            prefetch_step(w[0], b, R * 210, ahead);
            // d is the last f16 of the block: read the dword ending there (lane 2r + 1).
            let d = gather_f16_pairs(x, 206);
            for c in 0..C {
                _mm512_storeu_ps(
                    factors[c].as_mut_ptr(),
                    _mm512_mul_ps(d, _mm512_set1_ps(f32_at(y[c]))),
                );
            }
            let factors = core::hint::black_box(&factors);
            let scales = array_of!(_mm256_setzero_si256(); R, |r| _mm256_cvtepi8_epi16(load128(x[r].add(192))));
            let mut sums = [[_mm512_setzero_si512(); C]; R];
            for c in 0..C {
                let bsums = load256(y[c].add(260));
                for r in 0..R {
                    let offset = _mm256_slli_epi32::<5>(_mm256_madd_epi16(scales[r], bsums));
                    sums[r][c] =
                        _mm512_zextsi256_si512(_mm256_sub_epi32(_mm256_setzero_si256(), offset));
                }
            }
            for half in 0..2 {
                let mut q6 = [[low4; 2]; R];
                for r in 0..R {
                    let ql = load512(x[r].add(64 * half));
                    let qh = load256(x[r].add(128 + 32 * half));
                    // qh for values 0..32 and (qh >> 2) for 32..64 of each 64.
                    let qh = join(qh, _mm256_srli_epi16::<2>(qh));
                    let bits01 =
                        _mm512_slli_epi16::<4>(_mm512_and_si512(qh, _mm512_set1_epi8(0x03)));
                    let bits45 = _mm512_and_si512(qh, _mm512_set1_epi8(0x30));
                    // (A & C) | B with C = 0x0f: the nibble plus its two high bits.
                    q6[r][0] = _mm512_ternarylogic_epi32::<0xec>(ql, bits01, low4);
                    q6[r][1] =
                        _mm512_ternarylogic_epi32::<0xec>(_mm512_srli_epi16::<4>(ql), bits45, low4);
                }
                for part in 0..2 {
                    let t = 2 * half + part;
                    // Scales 4t..4t+4, each for 8 i16 lanes (16 values).
                    let s = (4 * t) as i16;
                    let pick = _mm512_set_epi16(
                        s + 3,
                        s + 3,
                        s + 3,
                        s + 3,
                        s + 3,
                        s + 3,
                        s + 3,
                        s + 3,
                        s + 2,
                        s + 2,
                        s + 2,
                        s + 2,
                        s + 2,
                        s + 2,
                        s + 2,
                        s + 2,
                        s + 1,
                        s + 1,
                        s + 1,
                        s + 1,
                        s + 1,
                        s + 1,
                        s + 1,
                        s + 1,
                        s,
                        s,
                        s,
                        s,
                        s,
                        s,
                        s,
                        s,
                    );
                    let sc = array_of!(low4; R, |r| _mm512_permutexvar_epi16(pick, _mm512_castsi256_si512(scales[r])));
                    for c in 0..C {
                        let act = load512(y[c].add(4 + 64 * t));
                        for r in 0..R {
                            sums[r][c] = dot_i16::<VNNI>(
                                sums[r][c],
                                _mm512_maddubs_epi16(q6[r][part], act),
                                sc[r],
                            );
                        }
                    }
                }
            }
            for c in 0..C {
                for r in 0..R {
                    let d = _mm512_set1_ps(factors[c][2 * r + 1]);
                    acc[r][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums[r][c]), d, acc[r][c]);
                }
            }
        }
        array_of!([0.0; C]; R, |r| array_of!(0.0; C, |c| _mm512_reduce_add_ps(acc[r][c])))
    }
}
