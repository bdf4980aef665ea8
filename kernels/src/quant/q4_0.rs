//! Q4_0: 32 values as 4-bit unsigned nibbles offset by 8, one f16 scale.
//! Element j of a block is the low nibble of byte j (j < 16) or the high nibble of byte j-16.

use super::{f16_at, put_f16, q8_0};

/// Values per block.
pub const QK: usize = 32;
/// Bytes per block: the f16 scale and 16 bytes of nibbles.
pub const BYTES: usize = 18;

/// As ggml's `dequantize_row_q4_0`: `(q − 8)·d`.
pub fn dequantize(src: &[u8], dst: &mut [f32]) {
    for (blk, out) in src.chunks_exact(BYTES).zip(dst.chunks_exact_mut(QK)) {
        let d = f16_at(blk, 0);
        for j in 0..16 {
            out[j] = ((blk[2 + j] & 0x0f) as i32 - 8) as f32 * d;
            out[j + 16] = ((blk[2 + j] >> 4) as i32 - 8) as f32 * d;
        }
    }
}

/// Reference quantizer (as ggml's `quantize_row_q4_0_ref`), used to build test weights.
pub fn quantize(src: &[f32], dst: &mut [u8]) {
    for (x, blk) in src.chunks_exact(QK).zip(dst.chunks_exact_mut(BYTES)) {
        let max = x
            .iter()
            .fold(0.0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        put_f16(blk, 0, d);
        for j in 0..16 {
            let q0 = ((x[j] * id + 8.5) as i32).min(15) as u8;
            let q1 = ((x[j + 16] * id + 8.5) as i32).min(15) as u8;
            blk[2 + j] = q0 | (q1 << 4);
        }
    }
}

/// Scalar reference dot product of `n` values against Q8_0 activations: an integer sum per
/// block, scaled by both blocks' `d`.
pub fn dot_scalar(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut sum = 0.0f32;
    for (x, y) in w
        .chunks_exact(BYTES)
        .zip(a.chunks_exact(q8_0::BYTES))
        .take(n / QK)
    {
        let mut isum = 0i32;
        for j in 0..16 {
            isum += ((x[2 + j] & 0x0f) as i32 - 8) * (y[2 + j] as i8 as i32);
            isum += ((x[2 + j] >> 4) as i32 - 8) * (y[2 + j + 16] as i8 as i32);
        }
        sum += isum as f32 * (f16_at(x, 0) * f16_at(y, 0));
    }
    sum
}

/// AVX2 version of [`dot_scalar`].
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; `w` must hold `n/32` Q4_0 blocks and `a` as many
/// Q8_0. The lengths are only checked in debug builds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_avx2(n: usize, w: &[u8], a: &[u8]) -> f32 {
    use super::avx2_util::*;
    use std::arch::x86_64::*;
    let nb = n / QK;
    debug_assert!(w.len() >= nb * BYTES && a.len() >= nb * q8_0::BYTES);
    let mut acc = _mm256_setzero_ps();
    for i in 0..nb {
        // SAFETY: every pointer read in this iteration is in bounds: i < nb and the caller
        // guarantees nb whole blocks in each row, so Q4_0 block i (18 bytes) starts at x and Q8_0
        // block i (34 bytes) at y; the helpers need the AVX2, FMA and F16C this function has.
        unsafe {
            let x = w.as_ptr().add(i * BYTES);
            // Stream the weights ahead of use (a hint; past the end it is harmless).
            _mm_prefetch(
                x.wrapping_add(super::PREFETCH_AHEAD) as *const i8,
                _MM_HINT_T0,
            );
            let y = a.as_ptr().add(i * q8_0::BYTES);
            let d = _mm256_set1_ps(
                f16_ptr(w.as_ptr().add(i * BYTES)) * f16_ptr(a.as_ptr().add(i * q8_0::BYTES)),
            );
            let qx = _mm256_sub_epi8(unpack_nibbles(x.add(2)), _mm256_set1_epi8(8));
            let qy = _mm256_loadu_si256(y.add(2) as *const __m256i);
            acc = _mm256_fmadd_ps(d, mul_sum_i8_pairs_ps(qx, qy), acc);
        }
    }
    // SAFETY: this function's AVX2 and FMA are what hsum_ps needs.
    unsafe { hsum_ps(acc) }
}
