//! Q5_0: 32 values of 5 bits offset by 16, one f16 scale: `x = d·(q − 16)`.
//!
//! Layout (22 bytes): `d: f16` at 0, `qh: u32` (little-endian) at 2, 16 bytes of nibbles at 6.
//! Value `j < 16` is the low nibble of byte `j`, value `j + 16` the high nibble; bit `j` of
//! `qh` is the fifth bit of value `j`.

use super::{f16_at, q8_0};

/// Values per block.
pub const QK: usize = 32;
/// Bytes per block: f16 `d`, the 32 fifth bits and 16 bytes of nibbles.
pub const BYTES: usize = 22;

/// The little-endian u32 at `off` (a block's fifth bits).
#[inline(always)]
pub(crate) fn qh_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

/// The 32 unsigned 5-bit values of a block (`qh` bits over nibbles at `qs`).
#[inline(always)]
pub(crate) fn five_bits(qh: u32, qs: &[u8]) -> [u8; 32] {
    let mut q = [0u8; 32];
    for j in 0..16 {
        q[j] = (qs[j] & 0x0f) | ((((qh >> j) & 1) as u8) << 4);
        q[j + 16] = (qs[j] >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
    }
    q
}

/// As ggml's `dequantize_row_q5_0`: `(q − 16)·d`.
pub fn dequantize(src: &[u8], dst: &mut [f32]) {
    for (blk, out) in src.chunks_exact(BYTES).zip(dst.chunks_exact_mut(QK)) {
        let d = f16_at(blk, 0);
        let q = five_bits(qh_at(blk, 2), &blk[6..]);
        for (o, &v) in out.iter_mut().zip(&q) {
            *o = (v as i32 - 16) as f32 * d;
        }
    }
}

/// Scalar reference dot product of `n` values against Q8_0 activations.
pub fn dot_scalar(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut sum = 0.0f32;
    for (x, y) in w
        .chunks_exact(BYTES)
        .zip(a.chunks_exact(q8_0::BYTES))
        .take(n / QK)
    {
        let q = five_bits(qh_at(x, 2), &x[6..]);
        let isum: i32 = q
            .iter()
            .zip(&y[2..])
            .map(|(&p, &v)| (p as i32 - 16) * v as i8 as i32)
            .sum();
        sum += isum as f32 * (f16_at(x, 0) * f16_at(y, 0));
    }
    sum
}

/// AVX2 version of [`dot_scalar`].
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C. The lengths are asserted (a panic, not UB): `w`
/// must hold `n/32` Q5_0 blocks and `a` as many Q8_0.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_avx2(n: usize, w: &[u8], a: &[u8]) -> f32 {
    use super::avx2_util::*;
    use std::arch::x86_64::*;
    let nb = n / QK;
    assert!(w.len() >= nb * BYTES && a.len() >= nb * q8_0::BYTES);
    let bit4 = _mm256_set1_epi8(0x10);
    let mut acc = _mm256_setzero_ps();
    for i in 0..nb {
        // SAFETY: every pointer read in this iteration is in bounds: the assert above puts all 22
        // bytes of Q5_0 block i at x and all 34 bytes of Q8_0 block i at y, inside `w` and `a`; the
        // helpers need the AVX2, FMA and F16C this function has.
        unsafe {
            let x = w.as_ptr().add(i * BYTES);
            // Stream the weights ahead of use (a hint; past the end it is harmless).
            _mm_prefetch(
                x.wrapping_add(super::PREFETCH_AHEAD) as *const i8,
                _MM_HINT_T0,
            );
            let y = a.as_ptr().add(i * q8_0::BYTES);
            let d = _mm256_set1_ps(f16_ptr(x) * f16_ptr(y));
            let qh = u32::from_le((x.add(2) as *const u32).read_unaligned());
            let hb = _mm256_and_si256(bits_to_bytes(qh), bit4);
            let nib = unpack_nibbles(x.add(6));
            let qy = _mm256_loadu_si256(y.add(2) as *const __m256i);
            let qx = _mm256_sub_epi8(_mm256_or_si256(nib, hb), bit4);
            acc = _mm256_fmadd_ps(d, mul_sum_i8_pairs_ps(qx, qy), acc);
        }
    }
    // SAFETY: this function's AVX2 and FMA are what hsum_ps needs.
    unsafe { hsum_ps(acc) }
}

/// One weight row against four Q8_0 activation rows (block scales `d[k]` widened to f32),
/// each summed exactly as [`dot_avx2`] does: the weight block is decoded once for all four.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C. The lengths are asserted (a panic, not UB): `w`
/// must hold `n/32` Q5_0 blocks, every `acts[k]` as many Q8_0 blocks and `d[k]` `n/32` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn gemm_1x4(n: usize, w: &[u8], acts: [&[u8]; 4], d: [&[f32]; 4]) -> [f32; 4] {
    use super::avx2_util::*;
    use std::arch::x86_64::*;
    let nb = n / QK;
    assert!(w.len() >= nb * BYTES);
    for k in 0..4 {
        assert!(acts[k].len() >= nb * q8_0::BYTES && d[k].len() >= nb);
    }
    let bit4 = _mm256_set1_epi8(0x10);
    let mut acc = [_mm256_setzero_ps(); 4];
    for i in 0..nb {
        // SAFETY: all reads below are in bounds, as i < nb and the lengths were asserted
        // above; the helpers need the AVX2, FMA and F16C this function has.
        unsafe {
            let x = w.as_ptr().add(i * BYTES);
            _mm_prefetch(
                x.wrapping_add(super::PREFETCH_AHEAD) as *const i8,
                _MM_HINT_T0,
            );
            let dx = f16_ptr(x);
            let qh = u32::from_le((x.add(2) as *const u32).read_unaligned());
            let hb = _mm256_and_si256(bits_to_bytes(qh), bit4);
            let qx = _mm256_sub_epi8(_mm256_or_si256(unpack_nibbles(x.add(6)), hb), bit4);
            let o = i * q8_0::BYTES;
            for k in 0..4 {
                let dd = _mm256_set1_ps(dx * *d[k].get_unchecked(i));
                let qy = _mm256_loadu_si256(acts[k].as_ptr().add(o + 2) as *const __m256i);
                acc[k] = _mm256_fmadd_ps(dd, mul_sum_i8_pairs_ps(qx, qy), acc[k]);
            }
        }
    }
    // SAFETY: this function's AVX2 and FMA are what hsum_ps needs.
    [0, 1, 2, 3].map(|k| unsafe { hsum_ps(acc[k]) })
}

/// Four weight rows against one Q8_0 activation row (block scales `d` widened to f32), each
/// summed exactly as [`dot_avx2`] does: the activation block is loaded once for all four.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C. The lengths are asserted (a panic, not UB):
/// every `w[k]` must hold `n/32` Q5_0 blocks, `act` as many Q8_0 blocks and `d` `n/32` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn gemv_4x1(n: usize, w: [&[u8]; 4], act: &[u8], d: &[f32]) -> [f32; 4] {
    use super::avx2_util::*;
    use std::arch::x86_64::*;
    let nb = n / QK;
    assert!(act.len() >= nb * q8_0::BYTES && d.len() >= nb);
    for wk in &w {
        assert!(wk.len() >= nb * BYTES);
    }
    let bit4 = _mm256_set1_epi8(0x10);
    let mut acc = [_mm256_setzero_ps(); 4];
    for i in 0..nb {
        // SAFETY: all reads below are in bounds, as i < nb and the lengths were asserted
        // above; the helpers need the AVX2, FMA and F16C this function has.
        unsafe {
            let d1 = *d.get_unchecked(i);
            let qy = _mm256_loadu_si256(act.as_ptr().add(i * q8_0::BYTES + 2) as *const __m256i);
            for k in 0..4 {
                let x = w[k].as_ptr().add(i * BYTES);
                // Prefetching past the end of the matrix is harmless (a hint, never a fault).
                _mm_prefetch(
                    x.wrapping_add(super::PREFETCH_AHEAD) as *const i8,
                    _MM_HINT_T0,
                );
                let dd = _mm256_set1_ps(f16_ptr(x) * d1);
                let qh = u32::from_le((x.add(2) as *const u32).read_unaligned());
                let hb = _mm256_and_si256(bits_to_bytes(qh), bit4);
                let qx = _mm256_sub_epi8(_mm256_or_si256(unpack_nibbles(x.add(6)), hb), bit4);
                acc[k] = _mm256_fmadd_ps(dd, mul_sum_i8_pairs_ps(qx, qy), acc[k]);
            }
        }
    }
    // SAFETY: this function's AVX2 and FMA are what hsum_ps needs.
    [0, 1, 2, 3].map(|k| unsafe { hsum_ps(acc[k]) })
}
