//! The portable reference: dot products, activation quantization and
//! dequantization for every type, written straight from ggml's block layouts.
//!
//! Block layouts (all little-endian, `d`/`m`/`dmin`/`s` are f16 unless noted):
//! - Q4_0 (18 B): d, qs[16]; value j = (qs[j] & 15) - 8, value j+16 = (qs[j] >> 4) - 8, times d.
//! - Q4_1 (20 B): d, m, qs[16]; value = d * nibble + m.
//! - Q5_0 (22 B): d, qh: u32, qs[16]; bit j of qh is bit 4 of value j; value - 16, times d.
//! - Q5_1 (24 B): d, m, qh, qs[16]; value = d * q5 + m.
//! - Q8_0 (34 B): d, qs: [i8; 32].   Q8_1 (36 B): d, s = d * sum(qs), qs: [i8; 32].
//! - Q4_K (144 B): d, dmin, scales[12] (eight 6-bit scales and mins), qs[128]; each 64 values
//!   take 32 bytes, low nibbles first; value = d * scale * q - dmin * min.
//! - Q5_K (176 B): d, dmin, scales[12], qh[32], qs[128]; bit j of qh[l] is bit 4 of value 32j + l.
//! - Q6_K (210 B): ql[128], qh[64], scales: [i8; 16], d; value = d * scale[v / 16] * (q6 - 32).
//! - Q8_K (292 B): d: f32, qs: [i8; 256], bsums: [i16; 16] (sums of 16 qs each).

use super::half::{bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16};
use super::{GgmlType, KPath, TileKernels, QK_K};

pub(super) struct Tiles;

impl TileKernels for Tiles {
    fn tile<const R: usize, const C: usize>(
        ty: GgmlType,
        n: usize,
        w: [&[u8]; R],
        a: [&[u8]; C],
        kpath: KPath,
        _ahead: usize,
    ) -> [[f32; C]; R] {
        core::array::from_fn(|r| core::array::from_fn(|c| dot(ty, n, w[r], a[c], kpath)))
    }
}

/// The f16 at `b[at..at + 2]`, widened.
pub(super) fn f16_at(b: &[u8], at: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([b[at], b[at + 1]]))
}

fn f32_at(b: &[u8], at: usize) -> f32 {
    f32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn i16_at(b: &[u8], at: usize) -> i32 {
    i32::from(i16::from_le_bytes([b[at], b[at + 1]]))
}

fn i8_at(b: &[u8], at: usize) -> i32 {
    i32::from(b[at] as i8)
}

/// The 6-bit (scale, min) of sub-block `j` (0..8) from the 12 packed bytes of a Q4_K/Q5_K block.
pub(super) fn k4_scale_min(scales: &[u8], j: usize) -> (i32, i32) {
    let (sc, m) = if j < 4 {
        (scales[j] & 63, scales[j + 4] & 63)
    } else {
        (
            (scales[j + 4] & 0xf) | ((scales[j - 4] >> 6) << 4),
            (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4),
        )
    };
    (i32::from(sc), i32::from(m))
}

/// The 4-bit value `v` (0..256) of a Q4_K/Q5_K `qs` array.
fn k4_nibble(qs: &[u8], v: usize) -> i32 {
    let (j, l) = (v / 32, v % 32);
    i32::from((qs[32 * (j / 2) + l] >> (4 * (j % 2))) & 0xf)
}

/// The 5-bit value `v` of a Q5_K block.
fn q5_k_value(block: &[u8], v: usize) -> i32 {
    let high = (block[16 + v % 32] >> (v / 32)) & 1;
    k4_nibble(&block[48..176], v) | (i32::from(high) << 4)
}

/// The 6-bit value `v` of a Q6_K block, with the -32 offset applied.
fn q6_k_value(block: &[u8], v: usize) -> i32 {
    let (half, g, l) = (v / 128, (v % 128) / 32, v % 32);
    let low = (block[64 * half + 32 * (g % 2) + l] >> (4 * (g / 2))) & 0xf;
    let high = (block[128 + 32 * half + l] >> (2 * g)) & 3;
    i32::from(low | (high << 4)) - 32
}

/// The 5-bit value `j` (0..32) of a Q5_0/Q5_1 block whose `qh` starts at `qh_at`.
fn q5_value(block: &[u8], qh_at: usize, j: usize) -> i32 {
    let qh = u32::from_le_bytes([
        block[qh_at],
        block[qh_at + 1],
        block[qh_at + 2],
        block[qh_at + 3],
    ]);
    let nibble = (block[qh_at + 4 + j % 16] >> (4 * (j / 16))) & 0xf;
    i32::from(nibble) | (((qh >> j) & 1) as i32) << 4
}

fn q4_value(qs: &[u8], j: usize) -> i32 {
    i32::from((qs[j % 16] >> (4 * (j / 16))) & 0xf)
}

/// Dot product of one weight row of `ty` with one activation row of `ty.act_type()`.
pub(super) fn dot(ty: GgmlType, n: usize, w: &[u8], a: &[u8], kpath: KPath) -> f32 {
    let blocks = w
        .chunks_exact(ty.block_bytes())
        .zip(a.chunks_exact(ty.act_type().block_bytes()));
    let blocks = blocks.take(n / ty.block_len());
    let q8 = |y: &[u8], at: usize, j: usize| i8_at(y, at + j);
    match ty {
        GgmlType::F32 => blocks.map(|(x, y)| f32_at(x, 0) * f32_at(y, 0)).sum(),
        GgmlType::F16 => blocks.map(|(x, y)| f16_at(x, 0) * f16_at(y, 0)).sum(),
        GgmlType::BF16 => blocks.map(|(x, y)| bf16_at(x) * bf16_at(y)).sum(),
        GgmlType::Q4_0 => blocks
            .map(|(x, y)| {
                let sumi: i32 = (0..32)
                    .map(|j| (q4_value(&x[2..], j) - 8) * q8(y, 2, j))
                    .sum();
                sumi as f32 * (f16_at(x, 0) * f16_at(y, 0))
            })
            .sum(),
        GgmlType::Q4_1 => blocks
            .map(|(x, y)| {
                let sumi: i32 = (0..32).map(|j| q4_value(&x[4..], j) * q8(y, 4, j)).sum();
                (f16_at(x, 0) * f16_at(y, 0)) * sumi as f32 + f16_at(x, 2) * f16_at(y, 2)
            })
            .sum(),
        GgmlType::Q5_0 => blocks
            .map(|(x, y)| {
                let sumi: i32 = (0..32)
                    .map(|j| (q5_value(x, 2, j) - 16) * q8(y, 2, j))
                    .sum();
                sumi as f32 * (f16_at(x, 0) * f16_at(y, 0))
            })
            .sum(),
        GgmlType::Q5_1 => blocks
            .map(|(x, y)| {
                let sumi: i32 = (0..32).map(|j| q5_value(x, 4, j) * q8(y, 4, j)).sum();
                (f16_at(x, 0) * f16_at(y, 0)) * sumi as f32 + f16_at(x, 2) * f16_at(y, 2)
            })
            .sum(),
        GgmlType::Q8_0 => blocks
            .map(|(x, y)| {
                let sumi: i32 = (0..32).map(|j| i8_at(x, 2 + j) * q8(y, 2, j)).sum();
                sumi as f32 * (f16_at(x, 0) * f16_at(y, 0))
            })
            .sum(),
        GgmlType::Q8_1 => blocks
            .map(|(x, y)| {
                let sumi: i32 = (0..32).map(|j| i8_at(x, 4 + j) * q8(y, 4, j)).sum();
                sumi as f32 * (f16_at(x, 0) * f16_at(y, 0))
            })
            .sum(),
        GgmlType::Q4_K => {
            // As llama.cpp's repacked Q4_K kernels (used for every Q4_K matrix
            // on AVX2 CPUs): exact integer sums per block, the scaled and the
            // min parts accumulated separately with FMA, subtracted at the end.
            let (mut scaled, mut mins) = (0.0f32, 0.0f32);
            for (x, y) in blocks {
                let d = f32_at(y, 0);
                let (dw, dmin) = (f16_at(x, 0) * d, f16_at(x, 2) * d);
                let sums = k4_sub_block_sums(ty, x, y);
                match kpath {
                    KPath::Single | KPath::Tiled => {
                        let (sumi, summ) = sums.iter().fold((0, 0), |s, p| (s.0 + p.0, s.1 + p.1));
                        scaled = libm::fmaf(sumi as f32, dw, scaled);
                        mins = libm::fmaf(summ as f32, dmin, mins);
                    }
                    KPath::Gemm4 => {
                        for pair in sums.chunks_exact(2) {
                            let (sumi, summ) = (pair[0].0 + pair[1].0, pair[0].1 + pair[1].1);
                            scaled = libm::fmaf(sumi as f32, dw, scaled);
                            mins = libm::fmaf(summ as f32, dmin, mins);
                        }
                    }
                }
            }
            scaled - mins
        }
        GgmlType::Q5_K => blocks
            .map(|(x, y)| {
                let sums = k4_sub_block_sums(ty, x, y);
                let (sumi, summ) = sums.iter().fold((0, 0), |s, p| (s.0 + p.0, s.1 + p.1));
                let d = f32_at(y, 0);
                d * f16_at(x, 0) * sumi as f32 - d * f16_at(x, 2) * summ as f32
            })
            .sum(),
        GgmlType::Q6_K if kpath == KPath::Tiled => blocks.fold(0.0, |out, (x, y)| {
            let sumi = q6_k_block_sum(x, y);
            libm::fmaf(f16_at(x, 208) * sumi as f32, f32_at(y, 0), out)
        }),
        GgmlType::Q6_K => blocks
            .map(|(x, y)| f32_at(y, 0) * f16_at(x, 208) * q6_k_block_sum(x, y) as f32)
            .sum(),
        GgmlType::Q8_K => blocks
            .map(|(x, y)| {
                let sumi: i32 = (0..QK_K).map(|v| i8_at(x, 4 + v) * q8(y, 4, v)).sum();
                f32_at(x, 0) * f32_at(y, 0) * sumi as f32
            })
            .sum(),
    }
}

/// For one Q6_K block x and Q8_K block y: the sum of scale_k * dot_k.
fn q6_k_block_sum(x: &[u8], y: &[u8]) -> i32 {
    (0..16)
        .map(|k| {
            let dot: i32 = (16 * k..16 * k + 16)
                .map(|v| q6_k_value(x, v) * i8_at(y, 4 + v))
                .sum();
            i8_at(x, 192 + k) * dot
        })
        .sum()
}

/// For one Q4_K/Q5_K block x and Q8_K block y, per 32-value sub-block j:
/// (scale_j * dot_j, min_j * (sum of y's sub-block j)).
fn k4_sub_block_sums(ty: GgmlType, x: &[u8], y: &[u8]) -> [(i32, i32); 8] {
    let mut sums = [(0, 0); 8];
    for (j, s) in sums.iter_mut().enumerate() {
        let (sc, m) = k4_scale_min(&x[4..16], j);
        let dot: i32 = (32 * j..32 * j + 32)
            .map(|v| {
                let q = if ty == GgmlType::Q4_K {
                    k4_nibble(&x[16..], v)
                } else {
                    q5_k_value(x, v)
                };
                q * i8_at(y, 4 + v)
            })
            .sum();
        *s = (
            sc * dot,
            m * (i16_at(y, 260 + 4 * j) + i16_at(y, 262 + 4 * j)),
        );
    }
    sums
}

fn bf16_at(b: &[u8]) -> f32 {
    bf16_to_f32(u16::from_le_bytes([b[0], b[1]]))
}

/// Rounds to the nearest integer, ties to even (like `vcvtps2dq` and ggml's
/// `nearest_int`); valid for |x| < 2^22, which quantized values always are.
pub(super) fn round_even(x: f32) -> i32 {
    ((x + 12_582_912.0).to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

/// The f16 scale and its inverse for a Q8_0/Q8_1 block, as ggml's x86 code computes them.
pub(super) fn q8_0_scale(x: &[f32]) -> (f32, f32) {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let inverse = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    (amax / 127.0, inverse)
}

/// Converts `src` into the activation format `act`; `dst` holds exactly one row.
pub(super) fn quantize_row(act: GgmlType, src: &[f32], dst: &mut [u8]) {
    match act {
        GgmlType::F32 => {
            for (y, x) in dst.chunks_exact_mut(4).zip(src) {
                y.copy_from_slice(&x.to_le_bytes());
            }
        }
        GgmlType::F16 | GgmlType::BF16 => {
            let convert = if act == GgmlType::F16 {
                f32_to_f16
            } else {
                f32_to_bf16
            };
            for (y, &x) in dst.chunks_exact_mut(2).zip(src) {
                y.copy_from_slice(&convert(x).to_le_bytes());
            }
        }
        GgmlType::Q8_0 | GgmlType::Q8_1 => {
            let at = if act == GgmlType::Q8_0 { 2 } else { 4 };
            for (x, y) in src
                .chunks_exact(32)
                .zip(dst.chunks_exact_mut(act.block_bytes()))
            {
                let (d, inverse) = q8_0_scale(x);
                y[..2].copy_from_slice(&f32_to_f16(d).to_le_bytes());
                let mut sum = 0;
                for (q, &v) in y[at..].iter_mut().zip(x) {
                    let v = round_even(v * inverse);
                    sum += v;
                    *q = v as i8 as u8;
                }
                if act == GgmlType::Q8_1 {
                    y[2..4].copy_from_slice(&f32_to_f16(d * sum as f32).to_le_bytes());
                }
            }
        }
        GgmlType::Q8_K => {
            for (x, y) in src
                .chunks_exact(QK_K)
                .zip(dst.chunks_exact_mut(act.block_bytes()))
            {
                quantize_q8_k_block(x, y);
            }
        }
        _ => panic!("{} is not an activation format", act.name()),
    }
}

/// One Q8_K block: the value of largest magnitude (the first one on ties)
/// maps to -127, like ggml's `quantize_row_q8_K_ref`.
pub(super) fn quantize_q8_k_block(x: &[f32], y: &mut [u8]) {
    let mut max = 0.0f32;
    let mut amax = 0.0f32;
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    y.fill(0);
    if amax == 0.0 {
        return;
    }
    let iscale = -127.0 / max;
    for (q, &v) in y[4..4 + QK_K].iter_mut().zip(x) {
        *q = round_even(iscale * v).min(127) as i8 as u8;
    }
    for k in 0..QK_K / 16 {
        let sum: i32 = (0..16).map(|i| i8_at(y, 4 + 16 * k + i)).sum();
        y[260 + 2 * k..262 + 2 * k].copy_from_slice(&(sum as i16).to_le_bytes());
    }
    y[..4].copy_from_slice(&(1.0 / iscale).to_le_bytes());
}

/// Expands one row of `ty` (`src` holds exactly `dst.len()` values) to f32.
pub fn dequantize_row(ty: GgmlType, src: &[u8], dst: &mut [f32]) {
    assert_eq!(
        Some(src.len()),
        ty.row_bytes(dst.len()),
        "dequantize_row: {} bytes for {} values of {}",
        src.len(),
        dst.len(),
        ty.name()
    );
    let len = ty.block_len();
    for (x, y) in src
        .chunks_exact(ty.block_bytes())
        .zip(dst.chunks_exact_mut(len))
    {
        match ty {
            GgmlType::F32 => y[0] = f32_at(x, 0),
            GgmlType::F16 => y[0] = f16_at(x, 0),
            GgmlType::BF16 => y[0] = bf16_at(x),
            GgmlType::Q4_0 => fill(y, |j| f16_at(x, 0) * (q4_value(&x[2..], j) - 8) as f32),
            GgmlType::Q4_1 => fill(y, |j| {
                f16_at(x, 0) * q4_value(&x[4..], j) as f32 + f16_at(x, 2)
            }),
            GgmlType::Q5_0 => fill(y, |j| f16_at(x, 0) * (q5_value(x, 2, j) - 16) as f32),
            GgmlType::Q5_1 => fill(y, |j| {
                f16_at(x, 0) * q5_value(x, 4, j) as f32 + f16_at(x, 2)
            }),
            GgmlType::Q8_0 => fill(y, |j| f16_at(x, 0) * i8_at(x, 2 + j) as f32),
            GgmlType::Q8_1 => fill(y, |j| f16_at(x, 0) * i8_at(x, 4 + j) as f32),
            GgmlType::Q4_K | GgmlType::Q5_K => {
                let (d, dmin) = (f16_at(x, 0), f16_at(x, 2));
                for j in 0..8 {
                    let (sc, m) = k4_scale_min(&x[4..16], j);
                    let (scale, min) = (d * sc as f32, dmin * m as f32);
                    for (v, y) in y.iter_mut().enumerate().skip(32 * j).take(32) {
                        let q = if ty == GgmlType::Q4_K {
                            k4_nibble(&x[16..], v)
                        } else {
                            q5_k_value(x, v)
                        };
                        *y = scale * q as f32 - min;
                    }
                }
            }
            GgmlType::Q6_K => fill(y, |v| {
                f16_at(x, 208) * i8_at(x, 192 + v / 16) as f32 * q6_k_value(x, v) as f32
            }),
            GgmlType::Q8_K => fill(y, |v| f32_at(x, 0) * i8_at(x, 4 + v) as f32),
        }
    }
}

fn fill(y: &mut [f32], value: impl Fn(usize) -> f32) {
    for (j, y) in y.iter_mut().enumerate() {
        *y = value(j);
    }
}
