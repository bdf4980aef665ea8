//! Q8_0: blocks of 32 signed bytes with one f16 scale. Used for weights and as the
//! activation format paired with Q4_0/Q5_0/Q8_0 weights.

use super::{f16_at, put_f16};

pub const QK: usize = 32;
pub const BYTES: usize = 34;

pub fn dequantize(src: &[u8], dst: &mut [f32]) {
    for (blk, out) in src.chunks_exact(BYTES).zip(dst.chunks_exact_mut(QK)) {
        let d = f16_at(blk, 0);
        for (o, &q) in out.iter_mut().zip(&blk[2..]) {
            *o = q as i8 as f32 * d;
        }
    }
}

/// Quantize one block's scale and values the way llama.cpp's x86 path does:
/// `d = amax/127`, `q = round_half_even(x * 127/amax)`.
#[inline]
pub(crate) fn quantize_block(x: &[f32], qs: &mut [u8]) -> (f32, i32) {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    let mut sum = 0i32;
    for (q, &v) in qs.iter_mut().zip(x) {
        let r = (v * id).round_ties_even() as i32;
        sum += r;
        *q = r as i8 as u8;
    }
    (d, sum)
}

pub fn quantize(src: &[f32], dst: &mut [u8]) {
    for (x, blk) in src.chunks_exact(QK).zip(dst.chunks_exact_mut(BYTES)) {
        let (d, _) = quantize_block(x, &mut blk[2..]);
        put_f16(blk, 0, d);
    }
}

pub fn dot_scalar(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut sum = 0.0f32;
    for (x, y) in w
        .chunks_exact(BYTES)
        .zip(a.chunks_exact(BYTES))
        .take(n / QK)
    {
        let isum: i32 = x[2..]
            .iter()
            .zip(&y[2..])
            .map(|(&p, &q)| p as i8 as i32 * q as i8 as i32)
            .sum();
        sum += isum as f32 * (f16_at(x, 0) * f16_at(y, 0));
    }
    sum
}

/// # Safety
/// The CPU must support AVX2 and FMA; `w` and `a` must hold `n/32` blocks each.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot_avx2(n: usize, w: &[u8], a: &[u8]) -> f32 {
    use super::avx2_util::*;
    use std::arch::x86_64::*;
    let nb = n / QK;
    debug_assert!(w.len() >= nb * BYTES && a.len() >= nb * BYTES);
    let mut acc = _mm256_setzero_ps();
    for i in 0..nb {
        let x = w.as_ptr().add(i * BYTES);
        let y = a.as_ptr().add(i * BYTES);
        let d = _mm256_set1_ps(f16_at(w, i * BYTES) * f16_at(a, i * BYTES));
        let qx = _mm256_loadu_si256(x.add(2) as *const __m256i);
        let qy = _mm256_loadu_si256(y.add(2) as *const __m256i);
        acc = _mm256_fmadd_ps(d, mul_sum_i8_pairs_ps(qx, qy), acc);
    }
    hsum_ps(acc)
}
