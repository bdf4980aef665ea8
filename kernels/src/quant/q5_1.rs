//! Q5_1: 32 unsigned 5-bit values with an f16 scale `d` and an f16 minimum `m`:
//! `x = d·q + m`. Dotted against Q8_1 activations: `Σ d·d'·(q·q') + m·s'`.
//!
//! Layout (24 bytes): `d: f16` at 0, `m: f16` at 2, `qh: u32` at 4, 16 bytes of nibbles at 8,
//! bits placed as in Q5_0.

use super::q5_0::{five_bits, qh_at};
use super::{f16_at, q8_1};

/// Values per block.
pub const QK: usize = 32;
/// Bytes per block: f16 `d`, f16 `m`, the 32 fifth bits and 16 bytes of nibbles.
pub const BYTES: usize = 24;

/// As ggml's `dequantize_row_q5_1`: `q·d + m`.
pub fn dequantize(src: &[u8], dst: &mut [f32]) {
    for (blk, out) in src.chunks_exact(BYTES).zip(dst.chunks_exact_mut(QK)) {
        let d = f16_at(blk, 0);
        let m = f16_at(blk, 2);
        let q = five_bits(qh_at(blk, 4), &blk[8..]);
        for (o, &v) in out.iter_mut().zip(&q) {
            *o = v as f32 * d + m;
        }
    }
}

/// Scalar reference dot product of `n` values against Q8_1 activations.
pub fn dot_scalar(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut sum = 0.0f32;
    for (x, y) in w
        .chunks_exact(BYTES)
        .zip(a.chunks_exact(q8_1::BYTES))
        .take(n / QK)
    {
        let q = five_bits(qh_at(x, 4), &x[8..]);
        let isum: i32 = q
            .iter()
            .zip(&y[4..])
            .map(|(&p, &v)| p as i32 * v as i8 as i32)
            .sum();
        sum += isum as f32 * (f16_at(x, 0) * f16_at(y, 0)) + f16_at(x, 2) * f16_at(y, 2);
    }
    sum
}

/// AVX2 version of [`dot_scalar`].
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C. The lengths are asserted (a panic, not UB): `w`
/// must hold `n/32` Q5_1 blocks and `a` as many Q8_1.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_avx2(n: usize, w: &[u8], a: &[u8]) -> f32 {
    use super::avx2_util::*;
    use std::arch::x86_64::*;
    let nb = n / QK;
    assert!(w.len() >= nb * BYTES && a.len() >= nb * q8_1::BYTES);
    let bit4 = _mm256_set1_epi8(0x10);
    let mut acc = _mm256_setzero_ps();
    let mut summs = 0.0f32;
    for i in 0..nb {
        // SAFETY: every pointer read in this iteration is in bounds: the assert above puts all 24
        // bytes of Q5_1 block i at x and all 36 bytes of Q8_1 block i at y, inside `w` and `a`; the
        // helpers need the AVX2, FMA and F16C this function has.
        unsafe {
            let x = w.as_ptr().add(i * BYTES);
            // Stream the weights ahead of use (a hint; past the end it is harmless).
            _mm_prefetch(
                x.wrapping_add(super::PREFETCH_AHEAD) as *const i8,
                _MM_HINT_T0,
            );
            let y = a.as_ptr().add(i * q8_1::BYTES);
            let d = _mm256_set1_ps(f16_ptr(x) * f16_ptr(y));
            summs += f16_ptr(x.add(2)) * f16_ptr(y.add(2));
            let qh = u32::from_le((x.add(4) as *const u32).read_unaligned());
            let hb = _mm256_and_si256(bits_to_bytes(qh), bit4);
            let nib = unpack_nibbles(x.add(8));
            let qy = _mm256_loadu_si256(y.add(4) as *const __m256i);
            let qx = _mm256_or_si256(nib, hb);
            acc = _mm256_fmadd_ps(d, mul_sum_u8_i8_ps(qx, qy), acc);
        }
    }
    // SAFETY: this function's AVX2 and FMA are what hsum_ps needs.
    unsafe { hsum_ps(acc) + summs }
}
