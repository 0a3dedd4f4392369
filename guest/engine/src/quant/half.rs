//! Half-precision (IEEE binary16) and bfloat16 conversions.
//!
//! Both directions round to nearest, ties to even, and agree bit for bit with
//! x86 F16C (`vcvtps2ph` / `vcvtph2ps`) including subnormals, infinities and
//! NaN payloads, so that the scalar and SIMD paths quantize identically.

/// Widens an f16 (given as its bits) to f32. Exact for every input.
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h & 0x8000) << 16;
    let exp = u32::from((h >> 10) & 0x1f);
    let mant = u32::from(h & 0x3ff);
    let bits = match exp {
        0 if mant == 0 => sign,
        0 => {
            // Subnormal: mant * 2^-24. Shift the leading one up to bit 10 and
            // lower the exponent accordingly.
            let shift = mant.leading_zeros() - 21;
            sign | ((113 - shift) << 23) | (((mant << shift) & 0x3ff) << 13)
        }
        // Infinity or NaN; a signalling NaN becomes quiet, as F16C does.
        0x1f if mant != 0 => sign | 0x7fc0_0000 | (mant << 13),
        0x1f => sign | 0x7f80_0000,
        _ => sign | ((exp + 112) << 23) | (mant << 13),
    };
    f32::from_bits(bits)
}

/// Narrows an f32 to f16 bits, rounding to nearest even; overflow gives infinity.
pub fn f32_to_f16(f: f32) -> u16 {
    let x = f.to_bits();
    let sign = ((x >> 16) & 0x8000) as u16;
    let exp = ((x >> 23) & 0xff) as i32;
    let mant = x & 0x7f_ffff;
    if exp == 0xff {
        return if mant == 0 {
            sign | 0x7c00
        } else {
            sign | 0x7e00 | (mant >> 13) as u16
        };
    }
    // Biased f16 exponent of the value.
    let e = exp - 127 + 15;
    if e >= 0x1f {
        return sign | 0x7c00;
    }
    if e <= 0 {
        // Subnormal (or zero) in f16: keep the 24-bit significand shifted right.
        let shift = (14 - e) as u32;
        if shift > 24 {
            return sign;
        }
        let sig = mant | 0x80_0000;
        let half = sig >> shift;
        return sign | round_shifted(half, sig, shift) as u16;
    }
    let kept = ((e as u32) << 10) | (mant >> 13);
    // A carry out of the mantissa correctly bumps the exponent (up to infinity).
    sign | round_shifted(kept, mant, 13) as u16
}

/// Rounds `kept` (= `full >> shift`) to nearest even using the bits shifted out.
fn round_shifted(kept: u32, full: u32, shift: u32) -> u32 {
    let rest = full & ((1 << shift) - 1);
    let halfway = 1 << (shift - 1);
    if rest > halfway || (rest == halfway && kept & 1 == 1) {
        kept + 1
    } else {
        kept
    }
}

/// Widens a bfloat16 (given as its bits) to f32. Exact.
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

/// Narrows an f32 to bfloat16 bits like ggml: round to nearest even, NaN kept quiet.
pub fn f32_to_bf16(f: f32) -> u16 {
    let x = f.to_bits();
    if x & 0x7fff_ffff > 0x7f80_0000 {
        return ((x >> 16) | 0x40) as u16;
    }
    (x.wrapping_add(0x7fff + ((x >> 16) & 1)) >> 16) as u16
}
