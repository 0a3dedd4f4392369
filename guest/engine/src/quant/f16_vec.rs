//! Vector operations on f16 rows (the KV cache and flash attention), with
//! ggml-cpu's rounding and summation order on AVX2: `ggml_vec_dot_f16` sums
//! in four 8-lane f32 accumulators and reduces them in a fixed tree,
//! `ggml_vec_mad_f16` / `ggml_vec_scale_f16` widen to f32, compute (with FMA)
//! and round back to f16 after every step.
//!
//! The portable functions are the reference; the AVX2 ones compute exactly the
//! same bits (every step is a correctly rounded IEEE operation in both).

use core::arch::x86_64::*;

use super::half::{f16_to_f32, f32_to_f16};

/// Lanes per accumulator and accumulators of `ggml_vec_dot_f16` (AVX2 build).
const LANES: usize = 8;
const ACCS: usize = 4;
const STEP: usize = LANES * ACCS;

/// ggml's AVX reduction of four 8-lane accumulators to one f32.
// Lane l of several accumulators at once: indexing reads clearer than zips.
#[allow(clippy::needless_range_loop)]
fn reduce(mut acc: [[f32; LANES]; ACCS]) -> f32 {
    for l in 0..LANES {
        acc[0][l] += acc[2][l];
        acc[1][l] += acc[3][l];
    }
    for l in 0..LANES {
        acc[0][l] += acc[1][l];
    }
    let t0: [f32; 4] = core::array::from_fn(|l| acc[0][l] + acc[0][l + 4]);
    (t0[0] + t0[1]) + (t0[2] + t0[3])
}

/// Dot product of two f16 rows. Products of two f16 values are exact in f32,
/// so a multiply-add here rounds exactly like the FMA of the SIMD path.
pub fn dot(x: &[u16], y: &[u16]) -> f32 {
    let n = x.len().min(y.len());
    let np = n - n % STEP;
    let mut acc = [[0.0f32; LANES]; ACCS];
    for i in (0..np).step_by(STEP) {
        for (j, a) in acc.iter_mut().enumerate() {
            for (l, v) in a.iter_mut().enumerate() {
                let k = i + j * LANES + l;
                *v += f16_to_f32(x[k]) * f16_to_f32(y[k]);
            }
        }
    }
    let mut sum = f64::from(reduce(acc));
    for k in np..n {
        sum += f64::from(f16_to_f32(x[k]) * f16_to_f32(y[k]));
    }
    sum as f32
}

/// `y = f16(y + x * v)`, with one rounding for the multiply-add.
pub fn mad(y: &mut [u16], x: &[u16], v: f32) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y = f32_to_f16(libm::fmaf(f16_to_f32(x), v, f16_to_f32(*y)));
    }
}

/// `y = f16(y * v)`.
pub fn scale(y: &mut [u16], v: f32) {
    for y in y.iter_mut() {
        *y = f32_to_f16(f16_to_f32(*y) * v);
    }
}

/// `out[i] = f16(x[i])`.
pub fn from_f32(out: &mut [u16], x: &[f32]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = f32_to_f16(v);
    }
}

/// AVX2 + FMA + F16C versions of the functions above, bit-identical to them.
///
/// # Safety (all functions)
/// The CPU supports AVX2, FMA and F16C.
pub(super) mod avx2 {
    use super::*;

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn load(p: &[u16], i: usize) -> __m256 {
        debug_assert!(i + LANES <= p.len());
        // SAFETY: callers pass i + 8 <= p.len().
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.as_ptr().add(i).cast())) }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn store(p: &mut [u16], i: usize, v: __m256) {
        debug_assert!(i + LANES <= p.len());
        // SAFETY: callers pass i + 8 <= p.len().
        unsafe {
            _mm_storeu_si128(
                p.as_mut_ptr().add(i).cast(),
                _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v),
            )
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot(x: &[u16], y: &[u16]) -> f32 {
        let n = x.len().min(y.len());
        let np = n - n % STEP;
        let mut acc = [_mm256_setzero_ps(); ACCS];
        // SAFETY: every load is of 8 values below np <= both lengths.
        unsafe {
            for i in (0..np).step_by(STEP) {
                for (j, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(load(x, i + j * LANES), load(y, i + j * LANES), *a);
                }
            }
        }
        let a0 = _mm256_add_ps(acc[0], acc[2]);
        let a1 = _mm256_add_ps(acc[1], acc[3]);
        let a0 = _mm256_add_ps(a0, a1);
        let t0 = _mm_add_ps(_mm256_castps256_ps128(a0), _mm256_extractf128_ps::<1>(a0));
        let t1 = _mm_hadd_ps(t0, t0);
        let mut sum = f64::from(_mm_cvtss_f32(_mm_hadd_ps(t1, t1)));
        for k in np..n {
            sum += f64::from(f16_to_f32(x[k]) * f16_to_f32(y[k]));
        }
        sum as f32
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn mad(y: &mut [u16], x: &[u16], v: f32) {
        let n = x.len().min(y.len());
        let np = n - n % LANES;
        let vv = _mm256_set1_ps(v);
        // SAFETY: every access is of 8 values below np <= both lengths.
        unsafe {
            for i in (0..np).step_by(LANES) {
                store(y, i, _mm256_fmadd_ps(load(x, i), vv, load(y, i)));
            }
        }
        super::mad(&mut y[np..n], &x[np..n], v);
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn scale(y: &mut [u16], v: f32) {
        let n = y.len();
        let np = n - n % LANES;
        let vv = _mm256_set1_ps(v);
        // SAFETY: every access is of 8 values below np = y.len() rounded down.
        unsafe {
            for i in (0..np).step_by(LANES) {
                store(y, i, _mm256_mul_ps(load(y, i), vv));
            }
        }
        super::scale(&mut y[np..], v);
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn from_f32(out: &mut [u16], x: &[f32]) {
        let n = out.len().min(x.len());
        let np = n - n % LANES;
        // SAFETY: every access is of 8 values below np <= both lengths.
        unsafe {
            for i in (0..np).step_by(LANES) {
                store(out, i, _mm256_loadu_ps(x.as_ptr().add(i)));
            }
        }
        super::from_f32(&mut out[np..n], &x[np..n]);
    }
}
