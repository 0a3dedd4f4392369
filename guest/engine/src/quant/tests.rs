//! Tests of the formats and kernels. The scalar path is checked against
//! hand-built blocks (packed the way ggml's quantizers pack them) and against
//! f64 math on dequantized values; every SIMD level is checked against scalar.

use std::format;
use std::vec;
use std::vec::Vec;

use super::*;

/// xorshift64*: deterministic test data without dependencies.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    /// Uniform in [lo, hi).
    fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32)
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
    /// Roughly normal floats (sum of uniforms), with a few outliers.
    fn activations(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let v: f32 = (0..4).map(|_| self.uniform(-1.0, 1.0)).sum();
                if self.below(50) == 0 {
                    v * 20.0
                } else {
                    v
                }
            })
            .collect()
    }
    /// A random scale: either sign, magnitudes from 2^-10 to 2.
    fn scale(&mut self) -> f32 {
        let magnitude = 2f32.powf(self.uniform(-10.0, 1.0));
        if self.below(2) == 0 {
            magnitude
        } else {
            -magnitude
        }
    }
}

fn put_f16(b: &mut [u8], at: usize, v: f32) {
    b[at..at + 2].copy_from_slice(&f32_to_f16(v).to_le_bytes());
}

fn all_levels() -> Vec<Kernels> {
    [
        SimdLevel::Scalar,
        SimdLevel::Avx2,
        SimdLevel::Avx512,
        SimdLevel::Avx512Vnni,
    ]
    .into_iter()
    .filter_map(Kernels::with_level)
    .collect()
}

fn scalar() -> Kernels {
    Kernels::with_level(SimdLevel::Scalar).expect("scalar kernels always exist")
}

/// The weight types the engine multiplies with.
const WEIGHT_TYPES: [GgmlType; 11] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

/// Offsets of the f16 scale fields of a block: (scales, mins/offsets).
fn scale_fields(ty: GgmlType) -> (&'static [usize], &'static [usize]) {
    match ty {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => (&[0], &[]),
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4_K | GgmlType::Q5_K => (&[0], &[2]),
        GgmlType::Q6_K => (&[208], &[]),
        _ => (&[], &[]),
    }
}

/// Random weight rows: random bytes with sane scale fields. With `unit_scales`,
/// every scale is 1 (and Q6_K's per-16 scales are small), so that dot
/// products are exact integers in f32 and SIMD must equal scalar exactly.
fn random_rows(ty: GgmlType, n: usize, rows: usize, rng: &mut Rng, unit_scales: bool) -> Vec<u8> {
    let mut data = rng.bytes(ty.row_bytes(n).unwrap() * rows);
    match ty {
        GgmlType::F32 => {
            for v in data.chunks_exact_mut(4) {
                let x = if unit_scales {
                    rng.below(64) as f32 - 32.0
                } else {
                    rng.uniform(-2.0, 2.0)
                };
                v.copy_from_slice(&x.to_le_bytes());
            }
        }
        GgmlType::F16 | GgmlType::BF16 => {
            for v in data.chunks_exact_mut(2) {
                let x = if unit_scales {
                    rng.below(64) as f32 - 32.0
                } else {
                    rng.uniform(-2.0, 2.0)
                };
                let bits = if ty == GgmlType::F16 {
                    f32_to_f16(x)
                } else {
                    f32_to_bf16(x)
                };
                v.copy_from_slice(&bits.to_le_bytes());
            }
        }
        _ => {
            let (scales, mins) = scale_fields(ty);
            for block in data.chunks_exact_mut(ty.block_bytes()) {
                for &at in scales.iter().chain(mins) {
                    put_f16(block, at, if unit_scales { 1.0 } else { rng.scale() });
                }
                if ty == GgmlType::Q6_K && unit_scales {
                    for s in &mut block[192..208] {
                        *s = (rng.below(17) as i8 - 8) as u8;
                    }
                }
            }
        }
    }
    data
}

/// Random activation rows of `act`; with `unit_scales`, built directly with
/// scale 1 and values in -127..=127 (consistent sums for Q8_1 and Q8_K).
fn random_acts(act: GgmlType, n: usize, cols: usize, rng: &mut Rng, unit_scales: bool) -> Vec<u8> {
    let bytes = act.row_bytes(n).unwrap();
    let mut out = vec![0u8; bytes * cols];
    for row in out.chunks_exact_mut(bytes) {
        if !unit_scales {
            scalar().quantize_row(act, &rng.activations(n), row);
            continue;
        }
        match act {
            GgmlType::Q8_0 | GgmlType::Q8_1 => {
                for block in row.chunks_exact_mut(act.block_bytes()) {
                    let at = if act == GgmlType::Q8_0 { 2 } else { 4 };
                    let qs: Vec<i32> = (0..32).map(|_| rng.below(255) as i32 - 127).collect();
                    put_f16(block, 0, 1.0);
                    if act == GgmlType::Q8_1 {
                        put_f16(block, 2, qs.iter().sum::<i32>() as f32);
                    }
                    for (b, q) in block[at..].iter_mut().zip(&qs) {
                        *b = *q as i8 as u8;
                    }
                }
            }
            GgmlType::Q8_K => {
                for block in row.chunks_exact_mut(act.block_bytes()) {
                    let qs: Vec<i32> = (0..256).map(|_| rng.below(255) as i32 - 127).collect();
                    block[..4].copy_from_slice(&1.0f32.to_le_bytes());
                    for (b, q) in block[4..260].iter_mut().zip(&qs) {
                        *b = *q as i8 as u8;
                    }
                    for k in 0..16 {
                        let sum: i32 = qs[16 * k..16 * k + 16].iter().sum();
                        block[260 + 2 * k..262 + 2 * k]
                            .copy_from_slice(&(sum as i16).to_le_bytes());
                    }
                }
            }
            _ => {
                let values: Vec<f32> = (0..n).map(|_| rng.below(64) as f32 - 32.0).collect();
                scalar().quantize_row(act, &values, row);
            }
        }
    }
    out
}

/// A weight row split into two parts whose sum is its dequantized value
/// (scale part, offset part), to bound the rounding of the kernels, which
/// accumulate the two parts separately.
fn weight_parts(ty: GgmlType, row: &[u8], n: usize) -> (Vec<f32>, Vec<f32>) {
    let (scales, mins) = scale_fields(ty);
    let with_zeroed = |fields: &[usize]| {
        let mut copy = row.to_vec();
        for block in copy.chunks_exact_mut(ty.block_bytes()) {
            for &at in fields {
                put_f16(block, at, 0.0);
            }
        }
        let mut values = vec![0.0; n];
        dequantize_row(ty, &copy, &mut values);
        values
    };
    if scales.is_empty() {
        return (with_zeroed(&[]), vec![0.0; n]);
    }
    (with_zeroed(mins), with_zeroed(scales))
}

/// f64 dot of the dequantized rows and the sum of |terms| (the scale the
/// rounding error of an f32 dot product is relative to).
fn reference_dot(ty: GgmlType, n: usize, w: &[u8], a: &[u8]) -> (f64, f64) {
    let act = ty.act_type();
    let mut av = vec![0.0; n];
    dequantize_row(act, a, &mut av);
    let (scale_part, min_part) = weight_parts(ty, w, n);
    let mut dot = 0.0f64;
    let mut magnitude = 0.0f64;
    for i in 0..n {
        let (s, m, x) = (
            f64::from(scale_part[i]),
            f64::from(min_part[i]),
            f64::from(av[i]),
        );
        dot += s * x + m * x;
        magnitude += (s * x).abs() + (m * x).abs();
    }
    if act == GgmlType::Q8_1 {
        // ggml uses the block's stored sum s = f16(d * sum(q)) for the offset term.
        dot = 0.0;
        for (b, (wb, ab)) in w
            .chunks_exact(ty.block_bytes())
            .zip(a.chunks_exact(36))
            .enumerate()
        {
            let m = f64::from(scalar::f16_at(wb, 2));
            let s = f64::from(scalar::f16_at(ab, 2));
            let scaled: f64 = (32 * b..32 * b + 32)
                .map(|i| f64::from(scale_part[i]) * f64::from(av[i]))
                .sum();
            dot += scaled + m * s;
            magnitude += (m * s).abs();
        }
    }
    (dot, magnitude)
}

#[test]
fn type_table_matches_ggml() {
    for ty in GgmlType::ALL {
        assert_eq!(GgmlType::from_id(ty.id()), Some(ty));
        assert_eq!(ggml_type_name(ty.id()), Some(ty.name()));
    }
    let sizes = [
        (GgmlType::F32, 1, 4),
        (GgmlType::F16, 1, 2),
        (GgmlType::BF16, 1, 2),
        (GgmlType::Q4_0, 32, 18),
        (GgmlType::Q4_1, 32, 20),
        (GgmlType::Q5_0, 32, 22),
        (GgmlType::Q5_1, 32, 24),
        (GgmlType::Q8_0, 32, 34),
        (GgmlType::Q8_1, 32, 36),
        (GgmlType::Q4_K, 256, 144),
        (GgmlType::Q5_K, 256, 176),
        (GgmlType::Q6_K, 256, 210),
        (GgmlType::Q8_K, 256, 292),
    ];
    for (ty, len, bytes) in sizes {
        assert_eq!(
            (ty.block_len(), ty.block_bytes()),
            (len, bytes),
            "{}",
            ty.name()
        );
    }
    assert_eq!(GgmlType::from_id(30), Some(GgmlType::BF16));
    assert_eq!(GgmlType::from_id(10), None);
    assert_eq!(GgmlType::from_id(4), None);
    assert_eq!(ggml_type_name(10), Some("Q2_K"));
    assert_eq!(ggml_type_name(16), Some("IQ2_XXS"));
    assert_eq!(ggml_type_name(35), Some("TQ2_0"));
    assert_eq!(ggml_type_name(39), Some("MXFP4"));
    assert_eq!(ggml_type_name(1000), None);
    assert_eq!(GgmlType::Q4_K.row_bytes(640), None);
    assert_eq!(GgmlType::Q8_0.row_bytes(640), Some(680));
    assert_eq!(GgmlType::Q4_K.row_bytes(2048), Some(1152));
    assert_eq!(GgmlType::Q8_0.row_bytes(usize::MAX / 32 * 32), None);
    assert_eq!(GgmlType::F32.row_bytes(usize::MAX), None);
    assert_eq!(GgmlType::Q5_0.act_type(), GgmlType::Q8_0);
    assert_eq!(GgmlType::Q5_1.act_type(), GgmlType::Q8_1);
    assert_eq!(GgmlType::Q6_K.act_type(), GgmlType::Q8_K);
    assert_eq!(GgmlType::BF16.act_type(), GgmlType::BF16);
}

#[test]
fn f16_round_trips_and_special_values() {
    for h in 0..=u16::MAX {
        let f = f16_to_f32(h);
        if f.is_nan() {
            assert!(f16_to_f32(f32_to_f16(f)).is_nan());
        } else {
            assert_eq!(f32_to_f16(f), h, "{h:#06x} -> {f}");
        }
    }
    assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
    assert_eq!(f16_to_f32(0x03ff), 1023.0 * 2f32.powi(-24));
    assert_eq!(f16_to_f32(0x0400), 2f32.powi(-14));
    assert_eq!(f16_to_f32(0x3c00), 1.0);
    assert_eq!(f16_to_f32(0xc000), -2.0);
    assert_eq!(f16_to_f32(0x7bff), 65504.0);
    assert_eq!(f16_to_f32(0x7c00), f32::INFINITY);
    assert_eq!(f16_to_f32(0xfc00), f32::NEG_INFINITY);
    assert!(f16_to_f32(0x7e00).is_nan());
    assert_eq!(f32_to_f16(65520.0), 0x7c00, "rounds up to infinity");
    assert_eq!(f32_to_f16(65519.0), 0x7bff);
    assert_eq!(
        f32_to_f16(1.0 + 2f32.powi(-11)),
        0x3c00,
        "tie to even (down)"
    );
    assert_eq!(
        f32_to_f16(1.0 + 3.0 * 2f32.powi(-11)),
        0x3c02,
        "tie to even (up)"
    );
    assert_eq!(
        f32_to_f16(2f32.powi(-25)),
        0x0000,
        "half the smallest subnormal ties to zero"
    );
    assert_eq!(f32_to_f16(1.5 * 2f32.powi(-25)), 0x0001);
    assert_eq!(f32_to_f16(-0.0), 0x8000);
    assert_eq!(f32_to_f16(1e-30), 0);
    assert_eq!(f32_to_f16(f32::MIN_POSITIVE / 2.0), 0, "f32 subnormal");
    assert_eq!(f32_to_f16(f32::NAN) & 0x7e00, 0x7e00);
}

#[test]
fn f16_conversion_matches_f16c() {
    if !std::is_x86_feature_detected!("f16c") {
        return;
    }
    let mut rng = Rng::new(7);
    let mut inputs: Vec<u32> = (0..200_000).map(|_| rng.next_u64() as u32).collect();
    // Dense coverage of the f16 range, including every subnormal boundary.
    inputs.extend((0x3300_0000u32..0x4780_0000).step_by(997));
    inputs.extend([
        0,
        0x8000_0000,
        0x7f80_0000,
        0xff80_0000,
        0x7fc0_0000,
        0x7f80_0001,
        0xffbf_ffff,
    ]);
    for bits in inputs {
        let f = f32::from_bits(bits);
        // SAFETY: F16C was detected above.
        let hw = unsafe { hw_f32_to_f16(f) };
        assert_eq!(f32_to_f16(f), hw, "f32 bits {bits:#010x}");
        let back = f16_to_f32(hw);
        // SAFETY: as above.
        let hw_back = unsafe { hw_f16_to_f32(hw) };
        assert_eq!(back.to_bits(), hw_back.to_bits(), "f16 bits {hw:#06x}");
    }
}

#[target_feature(enable = "f16c")]
unsafe fn hw_f32_to_f16(f: f32) -> u16 {
    use core::arch::x86_64::*;
    _mm_extract_epi16::<0>(_mm_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT }>(_mm_set_ss(f))) as u16
}

#[target_feature(enable = "f16c")]
unsafe fn hw_f16_to_f32(h: u16) -> f32 {
    use core::arch::x86_64::*;
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(h))))
}

#[test]
fn bf16_conversion() {
    assert_eq!(f32_to_bf16(1.0), 0x3f80);
    assert_eq!(bf16_to_f32(0x3f80), 1.0);
    assert_eq!(bf16_to_f32(0xc040), -3.0);
    // 1 + 2^-8 is halfway between bf16 1.0 and 1 + 2^-7: ties to even (1.0).
    assert_eq!(f32_to_bf16(1.0 + 2f32.powi(-8)), 0x3f80);
    assert_eq!(f32_to_bf16(1.0 + 3.0 * 2f32.powi(-8)), 0x3f82);
    assert_eq!(f32_to_bf16(1.0 + 2f32.powi(-8) + 2f32.powi(-20)), 0x3f81);
    assert_eq!(f32_to_bf16(f32::INFINITY), 0x7f80);
    assert_eq!(f32_to_bf16(f32::MAX), 0x7f80, "rounds to infinity");
    assert_eq!(
        f32_to_bf16(f32::from_bits(0x7f80_0001)),
        0x7fc0,
        "signalling NaN becomes quiet"
    );
    assert_eq!(
        f32_to_bf16(f32::from_bits(0x0000_8000)),
        0x0000,
        "subnormal tie to even"
    );
    assert_eq!(bf16_to_f32(0x0001), f32::from_bits(0x0001_0000));
    let mut rng = Rng::new(3);
    for _ in 0..100_000 {
        let f = f32::from_bits(rng.next_u64() as u32);
        if f.is_nan() {
            continue;
        }
        let b = bf16_to_f32(f32_to_bf16(f));
        // Relative error 2^-8, or half the smallest subnormal step (2^-133).
        let close = (b - f).abs() <= f.abs() * 2f32.powi(-8) || (b - f).abs() <= 2f32.powi(-134);
        assert!(b.is_infinite() || close, "{f} -> {b}");
    }
}

#[test]
fn known_blocks_dequantize_to_known_values() {
    // Q8_0: d = 0.5.
    let mut q8_0 = vec![0x00, 0x38];
    q8_0.extend((0..32).map(|j| (j as i8 * 4 - 64) as u8));
    check_dequant(GgmlType::Q8_0, &q8_0, |j| (j as f32 * 4.0 - 64.0) * 0.5);

    // Q4_0: d = 1, qs[j] = j | (15 - j) << 4.
    let mut q4_0 = vec![0x00, 0x3c];
    q4_0.extend((0..16).map(|j| j | ((15 - j) << 4)));
    check_dequant(GgmlType::Q4_0, &q4_0, |j| {
        if j < 16 {
            j as f32 - 8.0
        } else {
            7.0 - (j - 16) as f32
        }
    });

    // Q4_1: d = 0.25, m = -1.
    let mut q4_1 = vec![0x00, 0x34, 0x00, 0xbc];
    q4_1.extend((0..16).map(|j| j | ((15 - j) << 4)));
    check_dequant(GgmlType::Q4_1, &q4_1, |j| {
        0.25 * if j < 16 { j as f32 } else { (31 - j) as f32 } - 1.0
    });

    // Q5_0: d = 2, qh = 0xa5a5f00f: value j gets 16 iff bit j is set.
    let qh: u32 = 0xa5a5_f00f;
    let mut q5_0 = vec![0x00, 0x40];
    q5_0.extend(qh.to_le_bytes());
    q5_0.extend((0..16).map(|j| ((j * 7) % 16) | (((j * 3 + 5) % 16) << 4)));
    let q5 = |j: usize| {
        let nibble = if j < 16 {
            (j * 7) % 16
        } else {
            ((j - 16) * 3 + 5) % 16
        };
        (nibble | (((qh >> j) & 1) as usize) << 4) as f32
    };
    check_dequant(GgmlType::Q5_0, &q5_0, |j| 2.0 * (q5(j) - 16.0));

    // Q5_1: d = 0.5, m = 3, same quants.
    let mut q5_1 = vec![0x00, 0x38, 0x00, 0x42];
    q5_1.extend_from_slice(&q5_0[2..]);
    check_dequant(GgmlType::Q5_1, &q5_1, |j| 0.5 * q5(j) + 3.0);

    // Q8_K: d = -0.25 as f32.
    let mut q8_k = (-0.25f32).to_le_bytes().to_vec();
    q8_k.extend((0..256).map(|j| (j as u8).wrapping_mul(3)));
    q8_k.extend([0u8; 32]);
    check_dequant(GgmlType::Q8_K, &q8_k, |j| {
        -0.25 * f32::from((j as u8).wrapping_mul(3) as i8)
    });

    check_dequant(GgmlType::F16, &[0x00, 0x3c, 0x00, 0xc2], |j| [1.0, -3.0][j]);
    check_dequant(GgmlType::BF16, &[0x80, 0x3f, 0x40, 0xc0], |j| {
        [1.0, -3.0][j]
    });
    check_dequant(GgmlType::F32, &[0, 0, 0x80, 0x3f, 0, 0, 0x40, 0xc0], |j| {
        [1.0, -3.0][j]
    });
}

fn check_dequant(ty: GgmlType, block: &[u8], expected: impl Fn(usize) -> f32) {
    let n = block.len() / ty.block_bytes() * ty.block_len();
    let mut out = vec![0.0; n];
    dequantize_row(ty, block, &mut out);
    for (j, &v) in out.iter().enumerate() {
        assert_eq!(v, expected(j), "{} value {j}", ty.name());
    }
}

/// Packs 6-bit scales and mins the way ggml's `quantize_row_q4_K_ref` does.
fn pack_k4_scales(scales: [u8; 8], mins: [u8; 8]) -> [u8; 12] {
    let mut out = [0u8; 12];
    for j in 0..8 {
        let (ls, lm) = (scales[j], mins[j]);
        if j < 4 {
            out[j] = ls;
            out[j + 4] = lm;
        } else {
            out[j + 4] = (ls & 0xf) | ((lm & 0xf) << 4);
            out[j - 4] |= (ls >> 4) << 6;
            out[j] |= (lm >> 4) << 6;
        }
    }
    out
}

#[test]
fn known_k_quant_blocks() {
    let mut rng = Rng::new(11);
    let scales: [u8; 8] = [1, 63, 17, 32, 48, 5, 62, 33];
    let mins: [u8; 8] = [0, 16, 63, 31, 7, 40, 1, 50];
    let (d, dmin) = (0.125f32, 0.0625f32);

    // Q4_K: values in 0..16, packed like ggml's quantizer.
    let q4: Vec<u8> = (0..256).map(|_| rng.below(16) as u8).collect();
    let mut block = vec![0u8; 4];
    put_f16(&mut block, 0, d);
    put_f16(&mut block, 2, dmin);
    block.extend(pack_k4_scales(scales, mins));
    for j in (0..256).step_by(64) {
        block.extend((0..32).map(|l| q4[j + l] | (q4[j + l + 32] << 4)));
    }
    let expected = |q: &[u8], v: usize| {
        d * f32::from(scales[v / 32]) * f32::from(q[v]) - dmin * f32::from(mins[v / 32])
    };
    check_dequant(GgmlType::Q4_K, &block, |v| expected(&q4, v));

    // Q5_K: values in 0..32.
    let q5: Vec<u8> = (0..256).map(|_| rng.below(32) as u8).collect();
    let mut block = block[..16].to_vec();
    let mut qh = [0u8; 32];
    let mut ql = Vec::new();
    for (step, n) in (0..256).step_by(64).enumerate() {
        for j in 0..32 {
            let (l1, l2) = (q5[n + j], q5[n + j + 32]);
            qh[j] |= (l1 >> 4) << (2 * step);
            qh[j] |= (l2 >> 4) << (2 * step + 1);
            ql.push((l1 & 0xf) | ((l2 & 0xf) << 4));
        }
    }
    block.extend(qh);
    block.extend(ql);
    check_dequant(GgmlType::Q5_K, &block, |v| expected(&q5, v));

    // Q6_K: values in -32..32, signed 8-bit scales, packed like `quantize_row_q6_K_ref`.
    let q6: Vec<u8> = (0..256).map(|_| rng.below(64) as u8).collect();
    let sc: [i8; 16] = [
        -128, 127, -1, 1, 0, 64, -64, 33, -33, 100, -100, 7, -7, 90, 2, -2,
    ];
    let (mut ql, mut qh) = (vec![0u8; 128], vec![0u8; 64]);
    for (half, j) in (0..256).step_by(128).enumerate() {
        for l in 0..32 {
            let (a, b, c, e) = (q6[j + l], q6[j + l + 32], q6[j + l + 64], q6[j + l + 96]);
            ql[64 * half + l] = (a & 0xf) | ((c & 0xf) << 4);
            ql[64 * half + l + 32] = (b & 0xf) | ((e & 0xf) << 4);
            qh[32 * half + l] = (a >> 4) | ((b >> 4) << 2) | ((c >> 4) << 4) | ((e >> 4) << 6);
        }
    }
    let mut block = ql;
    block.extend(qh);
    block.extend(sc.map(|s| s as u8));
    put_f16_push(&mut block, 0.5);
    check_dequant(GgmlType::Q6_K, &block, |v| {
        0.5 * f32::from(sc[v / 16]) * (f32::from(q6[v]) - 32.0)
    });
}

fn put_f16_push(b: &mut Vec<u8>, v: f32) {
    b.extend(f32_to_f16(v).to_le_bytes());
}

#[test]
fn scalar_dot_matches_dequantized_math() {
    let mut rng = Rng::new(5);
    for ty in WEIGHT_TYPES {
        let n = 3 * ty.block_len().max(32);
        let act = ty.act_type();
        for _ in 0..20 {
            let w = random_rows(ty, n, 1, &mut rng, false);
            let a = random_acts(act, n, 1, &mut rng, false);
            let mut out = [0.0f32];
            scalar().matvec(ty, n, &w, &a, &mut out);
            let (dot, magnitude) = reference_dot(ty, n, &w, &a);
            let tolerance = 1e-5 * magnitude + 1e-30;
            assert!(
                (f64::from(out[0]) - dot).abs() <= tolerance,
                "{}: {} vs {dot} (magnitude {magnitude})",
                ty.name(),
                out[0]
            );
        }
    }
}

/// Row and column counts that are not multiples of any tile shape.
const ROW_COUNTS: [usize; 5] = [1, 3, 4, 7, 13];

#[test]
fn simd_matvec_equals_scalar() {
    let mut rng = Rng::new(1);
    for kernels in all_levels() {
        for ty in WEIGHT_TYPES {
            for blocks in [1, 5] {
                let n = blocks * ty.block_len().max(32) + if ty.block_len() == 1 { 7 } else { 0 };
                for rows in ROW_COUNTS {
                    for unit_scales in [true, false] {
                        let w = random_rows(ty, n, rows, &mut rng, unit_scales);
                        let a = random_acts(ty.act_type(), n, 1, &mut rng, unit_scales);
                        let mut expected = vec![0.0; rows];
                        scalar().matvec(ty, n, &w, &a, &mut expected);
                        let mut got = vec![0.0; rows];
                        kernels.matvec(ty, n, &w, &a, &mut got);
                        let row_bytes = ty.row_bytes(n).unwrap();
                        for r in 0..rows {
                            let wr = &w[r * row_bytes..(r + 1) * row_bytes];
                            compare(kernels, ty, n, wr, &a, got[r], expected[r], unit_scales);
                        }
                    }
                }
            }
        }
    }
}

/// A matvec in pieces, each told how many rows follow it (which it prefetches
/// into), gives what one matvec over all rows gives.
#[test]
fn matvec_in_pieces_equals_one_matvec() {
    let mut rng = Rng::new(9);
    for kernels in all_levels() {
        for ty in WEIGHT_TYPES {
            let (n, rows) = (2 * ty.block_len().max(32), 45);
            let w = random_rows(ty, n, rows, &mut rng, false);
            let a = random_acts(ty.act_type(), n, 1, &mut rng, false);
            let mut whole = vec![0.0; rows];
            kernels.matvec(ty, n, &w, &a, &mut whole);
            let row_bytes = ty.row_bytes(n).unwrap();
            let mut pieces = vec![0.0; rows];
            for (start, end) in [(0, 16), (16, 40), (40, 45)] {
                let rows_then = rows - end;
                kernels.matvec_then(
                    ty,
                    n,
                    &w[start * row_bytes..end * row_bytes],
                    rows_then,
                    &a,
                    &mut pieces[start..end],
                );
            }
            assert_eq!(
                whole.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                pieces.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                "{} at {:?}",
                ty.name(),
                kernels.level()
            );
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn compare(
    kernels: Kernels,
    ty: GgmlType,
    n: usize,
    w: &[u8],
    a: &[u8],
    got: f32,
    expected: f32,
    exact: bool,
) {
    let what = format!("{:?} {} n={n}", kernels.level(), ty.name());
    if exact {
        assert!(
            expected.abs() < (1 << 23) as f32,
            "{what}: test data too large to be exact"
        );
        assert_eq!(got, expected, "{what}: integer dot products differ");
    } else {
        let (_, magnitude) = reference_dot(ty, n, w, a);
        let tolerance = 2e-6 * magnitude as f32 + 1e-30;
        assert!(
            (got - expected).abs() <= tolerance,
            "{what}: {got} vs {expected} (magnitude {magnitude})"
        );
    }
}

#[test]
fn simd_matmul_equals_scalar_and_matvec() {
    let mut rng = Rng::new(2);
    for kernels in all_levels() {
        for ty in WEIGHT_TYPES {
            let n = 2 * ty.block_len().max(32) + if ty.block_len() == 1 { 3 } else { 0 };
            let act_bytes = ty.act_type().row_bytes(n).unwrap();
            for (rows, cols) in [(1, 1), (2, 5), (7, 3), (5, 9), (13, 4)] {
                for unit_scales in [true, false] {
                    let w = random_rows(ty, n, rows, &mut rng, unit_scales);
                    let acts = random_acts(ty.act_type(), n, cols, &mut rng, unit_scales);
                    let stride = rows + 2;
                    let mut got = vec![f32::NAN; stride * cols];
                    kernels.matmul(ty, n, &w, &acts, cols, &mut got, stride);
                    let mut expected = vec![0.0; rows];
                    let mut per_column = vec![0.0; rows];
                    let row_bytes = ty.row_bytes(n).unwrap();
                    for c in 0..cols {
                        let a = &acts[c * act_bytes..(c + 1) * act_bytes];
                        scalar().matvec(ty, n, &w, a, &mut expected);
                        kernels.matvec(ty, n, &w, a, &mut per_column);
                        for r in 0..rows {
                            let value = got[c * stride + r];
                            let wr = &w[r * row_bytes..(r + 1) * row_bytes];
                            compare(kernels, ty, n, wr, a, value, expected[r], unit_scales);
                            compare(kernels, ty, n, wr, a, value, per_column[r], unit_scales);
                        }
                        assert!(
                            got[c * stride + rows..(c + 1) * stride]
                                .iter()
                                .all(|v| v.is_nan()),
                            "wrote past the rows"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn large_matmul_uses_column_groups_correctly() {
    // Enough columns to need several activation groups of ACT_TILE_BYTES.
    let mut rng = Rng::new(9);
    let (ty, n, rows) = (GgmlType::Q8_0, 4096, 3);
    let cols = ACT_TILE_BYTES / GgmlType::Q8_0.row_bytes(n).unwrap() * 2 + 3;
    let w = random_rows(ty, n, rows, &mut rng, true);
    let acts = random_acts(ty.act_type(), n, cols, &mut rng, true);
    for kernels in all_levels() {
        let mut got = vec![0.0; rows * cols];
        kernels.matmul(ty, n, &w, &acts, cols, &mut got, rows);
        let act_bytes = ty.act_type().row_bytes(n).unwrap();
        for c in 0..cols {
            let mut expected = vec![0.0; rows];
            scalar().matvec(
                ty,
                n,
                &w,
                &acts[c * act_bytes..(c + 1) * act_bytes],
                &mut expected,
            );
            assert_eq!(
                &got[c * rows..(c + 1) * rows],
                &expected[..],
                "{:?} column {c}",
                kernels.level()
            );
        }
    }
}

#[test]
fn quantize_row_simd_equals_scalar() {
    let mut rng = Rng::new(4);
    for kernels in all_levels() {
        for act in [
            GgmlType::Q8_0,
            GgmlType::Q8_1,
            GgmlType::Q8_K,
            GgmlType::F16,
            GgmlType::BF16,
            GgmlType::F32,
        ] {
            for n in [256, 512, 1024] {
                let mut inputs = vec![rng.activations(n), vec![0.0; n]];
                // Exact ties after scaling, and blocks whose extremes are equal and opposite.
                inputs.push((0..n).map(|i| (i % 255) as f32 - 127.0).collect());
                inputs.push(
                    (0..n)
                        .map(|i| if i % 2 == 0 { -3.0 } else { 3.0 })
                        .collect(),
                );
                inputs.push(
                    (0..n)
                        .map(|i| if i % 3 == 0 { 3.0 } else { -3.0 })
                        .collect(),
                );
                for x in inputs {
                    let bytes = act.row_bytes(n).unwrap();
                    let (mut expected, mut got) = (vec![0u8; bytes], vec![0u8; bytes]);
                    scalar().quantize_row(act, &x, &mut expected);
                    kernels.quantize_row(act, &x, &mut got);
                    assert_eq!(got, expected, "{:?} {}", kernels.level(), act.name());
                }
            }
        }
        // F16 rows of any length (tail handling).
        let x = rng.activations(37);
        let (mut expected, mut got) = (vec![0u8; 74], vec![0u8; 74]);
        scalar().quantize_row(GgmlType::F16, &x, &mut expected);
        kernels.quantize_row(GgmlType::F16, &x, &mut got);
        assert_eq!(got, expected);
    }
}

#[test]
fn quantize_then_dequantize_error_bounds() {
    let mut rng = Rng::new(6);
    let n = 4096;
    let x = rng.activations(n);
    for act in [
        GgmlType::Q8_0,
        GgmlType::Q8_1,
        GgmlType::Q8_K,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::F32,
    ] {
        let mut q = vec![0u8; act.row_bytes(n).unwrap()];
        scalar().quantize_row(act, &x, &mut q);
        let mut back = vec![0.0; n];
        dequantize_row(act, &q, &mut back);
        let block = act.block_len().max(1);
        for (b, (xs, ys)) in x.chunks(block).zip(back.chunks(block)).enumerate() {
            let amax = xs.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            for (&v, &y) in xs.iter().zip(ys) {
                let bound = match act {
                    // Half a step of amax/127, plus the f16 rounding of the scale (127 steps * 2^-11).
                    GgmlType::Q8_0 | GgmlType::Q8_1 => {
                        amax / 127.0 * (0.5 + 127.0 / 2048.0) * 1.0001
                    }
                    GgmlType::Q8_K => amax / 127.0 * 0.5001,
                    GgmlType::F16 => v.abs() * 2f32.powi(-11),
                    GgmlType::BF16 => v.abs() * 2f32.powi(-8),
                    _ => 0.0,
                };
                assert!(
                    (v - y).abs() <= bound,
                    "{} block {b}: {v} -> {y} (bound {bound})",
                    act.name()
                );
            }
        }
    }
    // Q8_1 keeps d * sum(q) as its second f16.
    let mut q = vec![0u8; 36];
    scalar().quantize_row(GgmlType::Q8_1, &x[..32], &mut q);
    let sum: i32 = q[4..].iter().map(|&b| i32::from(b as i8)).sum();
    let d = x[..32].iter().fold(0.0f32, |m, v| m.max(v.abs())) / 127.0;
    assert_eq!(
        scalar::f16_at(&q, 2),
        f16_to_f32(f32_to_f16(d * sum as f32))
    );
    // Q8_K's largest-magnitude value maps to -127 and bsums are the group sums.
    let mut q = vec![0u8; 292];
    scalar().quantize_row(GgmlType::Q8_K, &x[..256], &mut q);
    let qs: Vec<i32> = q[4..260].iter().map(|&b| i32::from(b as i8)).collect();
    assert!(qs.contains(&-127));
    for k in 0..16 {
        let bsum = i32::from(i16::from_le_bytes([q[260 + 2 * k], q[261 + 2 * k]]));
        assert_eq!(bsum, qs[16 * k..16 * k + 16].iter().sum::<i32>());
    }
}

#[test]
fn detection_is_consistent() {
    let best = Kernels::detect();
    assert_eq!(Kernels::detect(), best, "cached");
    assert_eq!(Kernels::with_level(best.level()), Some(best));
    assert!(Kernels::with_level(SimdLevel::Scalar).is_some());
    let expect_avx2 = std::is_x86_feature_detected!("avx2")
        && std::is_x86_feature_detected!("fma")
        && std::is_x86_feature_detected!("f16c");
    assert_eq!(best.level() >= SimdLevel::Avx2, expect_avx2);
    let expect_vnni = expect_avx2
        && std::is_x86_feature_detected!("avx512f")
        && std::is_x86_feature_detected!("avx512bw")
        && std::is_x86_feature_detected!("avx512vl")
        && std::is_x86_feature_detected!("avx512vnni");
    assert_eq!(best.level() == SimdLevel::Avx512Vnni, expect_vnni);
}

#[test]
#[should_panic(expected = "matvec: weight bytes")]
fn matvec_rejects_short_weights() {
    let w = vec![0u8; 33];
    let a = vec![0u8; 34];
    Kernels::detect().matvec(GgmlType::Q8_0, 32, &w, &a, &mut [0.0]);
}

#[test]
#[should_panic(expected = "output slice too short")]
fn matmul_rejects_short_output() {
    let w = vec![0u8; 34 * 2];
    let a = vec![0u8; 34 * 3];
    Kernels::detect().matmul(GgmlType::Q8_0, 32, &w, &a, 3, &mut [0.0; 5], 2);
}

#[test]
#[should_panic(expected = "not a multiple")]
fn matvec_rejects_partial_blocks() {
    Kernels::detect().matvec(GgmlType::Q4_K, 640, &[], &[], &mut []);
}

/// One record of `testdata/ggml_reference.bin` (see make_ggml_reference.py there).
struct GgmlRecord<'a> {
    ty: GgmlType,
    n: usize,
    rows: usize,
    activation: Vec<f32>,
    ggml_act: &'a [u8],
    weights: &'a [u8],
    ggml_dots: Vec<f32>,
    ggml_dequantized: Vec<f32>,
}

fn ggml_records(data: &[u8]) -> Vec<GgmlRecord<'_>> {
    let mut at = 8;
    let mut take = |len: usize| {
        let slice = &data[at..at + len];
        at += len;
        slice
    };
    assert_eq!(take(0).len(), 0);
    let u32_at = |b: &[u8]| u32::from_le_bytes(b.try_into().unwrap()) as usize;
    let floats = |b: &[u8]| {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect::<Vec<_>>()
    };
    let count = u32_at(take(4));
    (0..count)
        .map(|_| {
            let ty = GgmlType::from_id(u32_at(take(4)) as u32).unwrap();
            let (n, rows) = (u32_at(take(4)), u32_at(take(4)));
            let activation = floats(take(4 * n));
            let ggml_act = take(ty.act_type().row_bytes(n).unwrap());
            let weights = take(rows * ty.row_bytes(n).unwrap());
            let ggml_dots = floats(take(4 * rows));
            let ggml_dequantized = floats(take(4 * n));
            GgmlRecord {
                ty,
                n,
                rows,
                activation,
                ggml_act,
                weights,
                ggml_dots,
                ggml_dequantized,
            }
        })
        .collect()
}

#[test]
fn matches_ggml_reference() {
    let data = include_bytes!("testdata/ggml_reference.bin");
    assert_eq!(&data[..8], b"GGMLREF1");
    let records = ggml_records(data);
    assert_eq!(records.len(), WEIGHT_TYPES.len());
    for rec in &records {
        let name = rec.ty.name();
        let act = rec.ty.act_type();
        let row_bytes = rec.ty.row_bytes(rec.n).unwrap();
        let mut dequantized = vec![0.0; rec.n];
        dequantize_row(rec.ty, &rec.weights[..row_bytes], &mut dequantized);
        assert_eq!(
            dequantized, rec.ggml_dequantized,
            "{name}: dequantization differs from ggml"
        );
        for kernels in all_levels() {
            let mut quantized = vec![0u8; rec.ggml_act.len()];
            kernels.quantize_row(act, &rec.activation, &mut quantized);
            assert_eq!(
                quantized,
                rec.ggml_act,
                "{:?} {}: activation quantization differs from ggml",
                kernels.level(),
                act.name()
            );
            let mut dots = vec![0.0; rec.rows];
            kernels.matvec(rec.ty, rec.n, rec.weights, rec.ggml_act, &mut dots);
            for (r, (&got, &want)) in dots.iter().zip(&rec.ggml_dots).enumerate() {
                let (_, magnitude) = reference_dot(
                    rec.ty,
                    rec.n,
                    &rec.weights[r * row_bytes..(r + 1) * row_bytes],
                    rec.ggml_act,
                );
                let tolerance = 2e-6 * magnitude as f32;
                assert!(
                    (got - want).abs() <= tolerance,
                    "{:?} {name} row {r}: {got} vs ggml {want}",
                    kernels.level()
                );
            }
        }
    }
}

/// The f16 row operations of the attention give the same bits on every level.
#[test]
fn f16_row_ops_equal_scalar_bit_for_bit() {
    let mut rng = Rng::new(16);
    let scalar = scalar();
    for n in [1, 7, 8, 31, 32, 33, 64, 256, 259] {
        let x: Vec<f32> = rng.activations(n);
        let y: Vec<f32> = rng.activations(n);
        let mut xh = vec![0u16; n];
        let mut yh = vec![0u16; n];
        scalar.f32_to_f16_row(&mut xh, &x);
        scalar.f32_to_f16_row(&mut yh, &y);
        let v = rng.uniform(-2.0, 2.0);
        for k in all_levels() {
            let mut kx = vec![0u16; n];
            k.f32_to_f16_row(&mut kx, &x);
            assert_eq!(kx, xh, "{:?} f32_to_f16_row n={n}", k.level());
            assert_eq!(
                k.dot_f16(&xh, &yh).to_bits(),
                scalar.dot_f16(&xh, &yh).to_bits(),
                "{:?} dot_f16 n={n}",
                k.level()
            );
            let (mut a, mut b) = (yh.clone(), yh.clone());
            k.mad_f16(&mut a, &xh, v);
            scalar.mad_f16(&mut b, &xh, v);
            assert_eq!(a, b, "{:?} mad_f16 n={n}", k.level());
            k.scale_f16(&mut a, v);
            scalar.scale_f16(&mut b, v);
            assert_eq!(a, b, "{:?} scale_f16 n={n}", k.level());
            let (p, q, r) = (x[0], y[0], v);
            assert_eq!(k.fmadd(p, q, r).to_bits(), scalar.fmadd(p, q, r).to_bits());
        }
    }
}

/// Q4_K follows llama.cpp's float roundings exactly (see `KPath`), so every
/// level must give the scalar reference's bits, with any scales, as a matvec
/// (tiles of rows) and as a matmul (groups of four columns and the rest).
#[test]
fn q4_k_equals_scalar_bit_for_bit() {
    let mut rng = Rng::new(7);
    let ty = GgmlType::Q4_K;
    for kernels in all_levels() {
        for blocks in [1, 3, 8] {
            let n = blocks * QK_K;
            for rows in [1, 4, 7, 12, 16] {
                let w = random_rows(ty, n, rows, &mut rng, false);
                for cols in [1, 4, 5] {
                    let a = random_acts(ty.act_type(), n, cols, &mut rng, false);
                    let mut expected = vec![0.0; rows * cols];
                    scalar().matmul(ty, n, &w, &a, cols, &mut expected, rows);
                    let mut got = vec![0.0; rows * cols];
                    kernels.matmul(ty, n, &w, &a, cols, &mut got, rows);
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(
                        bits(&got),
                        bits(&expected),
                        "{:?} Q4_K n={n} rows={rows} cols={cols}",
                        kernels.level()
                    );
                }
            }
        }
    }
}
