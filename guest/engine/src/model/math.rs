//! Element-wise operations of the forward pass, written to match llama.cpp's
//! CPU results closely (f64 accumulation in RMSNorm, iterative RoPE angles).

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

/// Rotates the first `n_rot` dims of one head vector for position `pos`.
/// `freq_factors` (Llama 3 `rope_freqs`) divide the angle of each pair.
pub fn rope(
    head: &mut [f32],
    n_rot: usize,
    pos: usize,
    base: f32,
    freq_scale: f32,
    pairing: RopePairing,
    freq_factors: Option<&[f32]>,
) {
    let theta_scale = libm::powf(base, -2.0 / n_rot as f32);
    let mut theta = pos as f32;
    for i in 0..n_rot / 2 {
        let factor = freq_factors.map_or(1.0, |f| f[i]);
        let angle = freq_scale * theta / factor;
        let (sin, cos) = (libm::sinf(angle), libm::cosf(angle));
        let (a, b) = match pairing {
            RopePairing::Adjacent => (2 * i, 2 * i + 1),
            RopePairing::Neox => (i, i + n_rot / 2),
        };
        let (x0, x1) = (head[a], head[b]);
        head[a] = x0 * cos - x1 * sin;
        head[b] = x0 * sin + x1 * cos;
        theta *= theta_scale;
    }
}

pub fn silu(x: f32) -> f32 {
    x / (1.0 + libm::expf(-x))
}

pub fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + libm::tanhf(SQRT_2_OVER_PI * x * (1.0 + 0.044_715 * x * x)))
}

/// Softmax in place over `x`.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f64;
    for v in x.iter_mut() {
        *v = libm::expf(*v - max);
        sum += f64::from(*v);
    }
    let inv = (1.0 / sum) as f32;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent partial sums let the compiler vectorize without
    // reassociating (which it may not do for floats on its own).
    let mut acc = [0.0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        for l in 0..8 {
            acc[l] += a[c * 8 + l] * b[c * 8 + l];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for i in chunks * 8..a.len() {
        sum += a[i] * b[i];
    }
    sum
}

/// `y += a * x`.
pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (yv, &xv) in y.iter_mut().zip(x) {
        *yv += a * xv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let mut adj = [1.0, 0.0, 1.0, 0.0];
        rope(&mut adj, 4, 1, 10000.0, 1.0, RopePairing::Adjacent, None);
        assert!((adj[0] - libm::cosf(1.0)).abs() < 1e-6 && (adj[1] - libm::sinf(1.0)).abs() < 1e-6);
        let mut neox = [1.0, 1.0, 0.0, 0.0];
        rope(&mut neox, 4, 1, 10000.0, 1.0, RopePairing::Neox, None);
        assert!(
            (neox[0] - libm::cosf(1.0)).abs() < 1e-6 && (neox[2] - libm::sinf(1.0)).abs() < 1e-6
        );
        // Pair 1 rotates by base^(-2/4) = 0.01 radians.
        assert!((neox[3] - libm::sinf(0.01)).abs() < 1e-6);
        // Position 0 is the identity.
        let mut id = [0.3, -0.7, 0.2, 0.9];
        rope(&mut id, 4, 0, 10000.0, 1.0, RopePairing::Neox, None);
        assert_eq!(id, [0.3, -0.7, 0.2, 0.9]);
    }

    #[test]
    fn softmax_sums_to_one_and_activations_are_right() {
        let mut x = [1.0, 2.0, 3.0, 1000.0];
        softmax(&mut x);
        assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!((silu(1.0) - 0.731_058_6).abs() < 1e-6);
        assert!((gelu_tanh(1.0) - 0.841_192).abs() < 1e-5);
        assert_eq!(dot(&[1.0; 19], &[2.0; 19]), 38.0);
    }
}
