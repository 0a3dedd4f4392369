//! Element-wise operations of the forward pass, written to match llama.cpp's
//! CPU results closely (f64 accumulation in RMSNorm, iterative RoPE angles).

use crate::quant::{f16_to_f32, f32_to_f16, Kernels};

/// Sum of squares as ggml computes it: each square in f32, summed in f64.
fn sum_of_squares(x: &[f32]) -> f64 {
    x.iter().map(|&v| f64::from(v * v)).sum()
}

/// `out = x / rms(x) * weight`.
pub fn rms_norm(out: &mut [f32], x: &[f32], weight: &[f32], eps: f32) {
    let sum = sum_of_squares(x);
    let mean = (sum / x.len() as f64) as f32;
    let scale = 1.0 / libm::sqrtf(mean + eps);
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = v * scale * w;
    }
}

/// In-place variant of [`rms_norm`].
pub fn rms_norm_inplace(x: &mut [f32], weight: &[f32], eps: f32) {
    let sum = sum_of_squares(x);
    let mean = (sum / x.len() as f64) as f32;
    let scale = 1.0 / libm::sqrtf(mean + eps);
    for (v, &w) in x.iter_mut().zip(weight) {
        *v = *v * scale * w;
    }
}

/// Which elements RoPE rotates together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopePairing {
    /// (x[2i], x[2i+1]): LLaMA as converted by llama.cpp.
    Adjacent,
    /// (x[i], x[i + n_rot/2]): GPT-NeoX, Qwen2, Gemma.
    Neox,
}

/// The cosine and sine of each rotated pair's angle at `pos`, interleaved
/// (`angles[2i]`, `angles[2i + 1]`), computed once per position like ggml's
/// RoPE cache. `freq_factors` (Llama 3 `rope_freqs`) divide each pair's angle.
pub fn rope_angles(
    angles: &mut [f32],
    pos: usize,
    base: f32,
    freq_scale: f32,
    freq_factors: Option<&[f32]>,
) {
    let n_rot = angles.len();
    // Rounded from f64: agrees with glibc's powf (which llama.cpp calls) where
    // libm's powf is off by an ulp for some of these exponents.
    let theta_scale = libm::pow(f64::from(base), f64::from(-2.0 / n_rot as f32)) as f32;
    let mut theta = pos as f32;
    for (i, cs) in angles.chunks_exact_mut(2).enumerate() {
        let factor = freq_factors.map_or(1.0, |f| f[i]);
        let angle = freq_scale * (theta / factor);
        cs[0] = libm::cosf(angle);
        cs[1] = libm::sinf(angle);
        theta *= theta_scale;
    }
}

/// Rotates the first `angles.len()` dims of one head vector by the angles of
/// [`rope_angles`]. The rotation is rounded like ggml's compiled code, which
/// fuses one product of each output into an FMA.
pub fn rope(head: &mut [f32], angles: &[f32], pairing: RopePairing, kernels: &Kernels) {
    let n_rot = angles.len();
    for (i, cs) in angles.chunks_exact(2).enumerate() {
        let (cos, sin) = (cs[0], cs[1]);
        let (a, b) = match pairing {
            RopePairing::Adjacent => (2 * i, 2 * i + 1),
            RopePairing::Neox => (i, i + n_rot / 2),
        };
        let (x0, x1) = (head[a], head[b]);
        head[a] = kernels.fmadd(x0, cos, -(x1 * sin));
        head[b] = kernels.fmadd(x0, sin, x1 * cos);
    }
}

/// e^x rounded from f64: agrees with glibc's expf (which llama.cpp's attention
/// calls) on all but ~0.02% of inputs, where libm's expf differs on ~9%.
///
/// The attention softmax calls this once per query, head and key, so it is
/// its own f64 evaluation, several times faster than `libm::exp`: with
/// x = (k/32) ln 2 + r and |r| <= ln 2 / 64, e^x = 2^(k/32) e^r, and e^r comes
/// from a degree-6 Taylor polynomial (relative error below 1e-18, far under
/// the f64 rounding that `libm::exp` itself has). It returns the same f32 as
/// `libm::exp(x) as f32` (tested on millions of inputs).
pub fn exp(x: f32) -> f32 {
    // 2^(i/32).
    const EXP2_FRACTIONS: [f64; 32] = [
        1.0,
        1.0218971486541166,
        1.0442737824274138,
        1.0671404006768237,
        1.0905077326652577,
        1.1143867425958924,
        1.1387886347566916,
        1.1637248587775775,
        1.189207115002721,
        1.215247359980469,
        1.241857812073484,
        1.2690509571917332,
        1.2968395546510096,
        1.3252366431597413,
        1.3542555469368927,
        1.383909881963832,
        core::f64::consts::SQRT_2,
        1.4451808069770467,
        1.4768261459394993,
        1.5091644275934228,
        1.5422108254079407,
        1.5759808451078865,
        1.6104903319492543,
        1.645755478153965,
        1.681792830507429,
        1.718619298122478,
        1.7562521603732995,
        1.7947090750031072,
        1.8340080864093424,
        1.8741676341103,
        1.9152065613971474,
        1.9571441241754002,
    ];
    const N_OVER_LN2: f64 = 32.0 / core::f64::consts::LN_2;
    // ln 2 / 32 in two parts (fdlibm's split of ln 2): the high part ends in 32
    // zero bits, so k * LN2_N_HI is exact for every k here.
    #[allow(clippy::excessive_precision)]
    const LN2_N_HI: f64 = 6.931_471_803_691_238_164_90e-1 / 32.0;
    #[allow(clippy::excessive_precision)]
    const LN2_N_LO: f64 = 1.908_214_929_270_587_700_02e-10 / 32.0;
    // Outside this range the f32 result is 0 or infinity (or x is NaN), where
    // `libm::exp` is quick and exact.
    if !(-104.0..=89.0).contains(&x) {
        return libm::exp(f64::from(x)) as f32;
    }
    let x = f64::from(x);
    let k = libm::round(x * N_OVER_LN2);
    let r = (x - k * LN2_N_HI) - k * LN2_N_LO;
    let k = k as i64;
    let p = 1.0
        + r * (1.0
            + r * (1.0 / 2.0
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // 2^(k >> 5) is a normal f64 for every k of the range above.
    let scale = f64::from_bits(((1023 + (k >> 5)) as u64) << 52);
    (scale * EXP2_FRACTIONS[(k & 31) as usize] * p) as f32
}

pub fn silu(x: f32) -> f32 {
    x / (1.0 + libm::expf(-x))
}

pub fn gelu_tanh(x: f32) -> f32 {
    #[allow(clippy::excessive_precision)]
    const SQRT_2_OVER_PI: f32 = 0.797_884_560_802_865_355_879_892_119_868_76;
    0.5 * x * (1.0 + libm::tanhf(SQRT_2_OVER_PI * x * (1.0 + 0.044_715 * x * x)))
}

/// ggml-cpu's GELU table (GGML_GELU_FP16): the GELU of every f16 value,
/// rounded to f16, computed as ggml's compiled code does (one FMA in the
/// cubic term). `table` holds 65536 entries, indexed by f16 bits.
pub fn gelu_f16_table(table: &mut [u16]) {
    #[allow(clippy::excessive_precision)]
    const SQRT_2_OVER_PI: f32 = 0.797_884_560_802_865_355_879_892_119_868_76;
    const COEF_A: f32 = 0.044_715;
    for (bits, out) in table.iter_mut().enumerate() {
        let x = f16_to_f32(bits as u16);
        let inner = libm::fmaf(COEF_A * x, x, 1.0);
        let y = 0.5 * x * (1.0 + libm::tanhf(SQRT_2_OVER_PI * x * inner));
        *out = f32_to_f16(y);
    }
}

/// GELU as ggml-cpu computes it: the input rounded to f16 and looked up in
/// [`gelu_f16_table`], identity above 10 and zero below -10. The f16
/// roundings are far larger than any summation-order effect, so matching
/// llama.cpp needs them.
pub fn gelu_ggml(table: &[u16], x: f32) -> f32 {
    if x <= -10.0 {
        0.0
    } else if x >= 10.0 {
        x
    } else {
        f16_to_f32(table[usize::from(f32_to_f16(x))])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_equals_libm_exp_rounded_to_f32() {
        let check = |x: f32| {
            let expected = libm::exp(f64::from(x)) as f32;
            assert_eq!(exp(x).to_bits(), expected.to_bits(), "exp({x:e})");
        };
        // Every 61st f32 bit pattern from -110 to 90 (both signs, all scales),
        // and the edges of the range.
        for bits in (0..0xc2dc_0000u32).step_by(61) {
            let x = f32::from_bits(bits);
            if x <= 90.0 {
                check(x);
            }
            let neg = f32::from_bits(bits | 0x8000_0000);
            if neg >= -110.0 {
                check(neg);
            }
        }
        for x in [
            -104.0, -103.97, -103.28, -87.34, 0.0, -0.0, 88.72, 88.73, 89.0,
        ] {
            check(x);
        }
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
    }

    #[test]
    fn rms_norm_unit_weight_has_unit_rms() {
        let x = [1.0, -2.0, 3.0, -4.0];
        let mut out = [0.0; 4];
        rms_norm(&mut out, &x, &[1.0; 4], 0.0);
        let rms = libm::sqrtf(out.iter().map(|v| v * v).sum::<f32>() / 4.0);
        assert!((rms - 1.0).abs() < 1e-6);
    }

    #[test]
    fn rope_pairings_rotate_the_right_elements() {
        // At position 1, pair 0 rotates by exactly 1 radian in both pairings.
        let k = Kernels::detect();
        let mut angles = [0.0; 4];
        rope_angles(&mut angles, 1, 10000.0, 1.0, None);
        let mut adj = [1.0, 0.0, 1.0, 0.0];
        rope(&mut adj, &angles, RopePairing::Adjacent, &k);
        assert!((adj[0] - libm::cosf(1.0)).abs() < 1e-6 && (adj[1] - libm::sinf(1.0)).abs() < 1e-6);
        let mut neox = [1.0, 1.0, 0.0, 0.0];
        rope(&mut neox, &angles, RopePairing::Neox, &k);
        assert!(
            (neox[0] - libm::cosf(1.0)).abs() < 1e-6 && (neox[2] - libm::sinf(1.0)).abs() < 1e-6
        );
        // Pair 1 rotates by base^(-2/4) = 0.01 radians.
        assert!((neox[3] - libm::sinf(0.01)).abs() < 1e-6);
        // Position 0 is the identity.
        let mut id = [0.3, -0.7, 0.2, 0.9];
        rope_angles(&mut angles, 0, 10000.0, 1.0, None);
        rope(&mut id, &angles, RopePairing::Neox, &k);
        assert_eq!(id, [0.3, -0.7, 0.2, 0.9]);
    }

    #[test]
    fn activations_are_right() {
        assert!((silu(1.0) - 0.731_058_6).abs() < 1e-6);
        assert!((gelu_tanh(1.0) - 0.841_192).abs() < 1e-5);
        let mut table = alloc::vec![0u16; 1 << 16];
        gelu_f16_table(&mut table);
        assert!((gelu_ggml(&table, 1.0) - 0.841_192).abs() < 1e-3);
        assert!((gelu_ggml(&table, -0.5) - gelu_tanh(-0.5)).abs() < 1e-3);
        assert_eq!(gelu_ggml(&table, 12.0), 12.0);
        assert_eq!(gelu_ggml(&table, -12.0), 0.0);
    }
}
