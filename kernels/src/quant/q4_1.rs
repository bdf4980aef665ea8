//! Q4_1: 32 values as 4-bit nibbles with an f16 scale `d` and an f16 minimum `m`:
//! `x = q * d + m`. Dotted against Q8_1 activations: `Σ d·d'·(q·q') + m·s'`.

use super::{f16_at, put_f16, q8_1};

/// Values per block.
pub const QK: usize = 32;
/// Bytes per block: f16 `d`, f16 `m` and 16 bytes of nibbles.
pub const BYTES: usize = 20;

/// As ggml's `dequantize_row_q4_1`: `q·d + m`.
pub fn dequantize(src: &[u8], dst: &mut [f32]) {
    for (blk, out) in src.chunks_exact(BYTES).zip(dst.chunks_exact_mut(QK)) {
        let d = f16_at(blk, 0);
        let m = f16_at(blk, 2);
        for j in 0..16 {
            out[j] = (blk[4 + j] & 0x0f) as f32 * d + m;
            out[j + 16] = (blk[4 + j] >> 4) as f32 * d + m;
        }
    }
}

/// Reference quantizer (as ggml's `quantize_row_q4_1_ref`), used to build test weights.
pub fn quantize(src: &[f32], dst: &mut [u8]) {
    for (x, blk) in src.chunks_exact(QK).zip(dst.chunks_exact_mut(BYTES)) {
        let min = x.iter().copied().fold(f32::INFINITY, f32::min);
        let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let d = (max - min) / 15.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        put_f16(blk, 0, d);
        put_f16(blk, 2, min);
        for j in 0..16 {
            let q0 = (((x[j] - min) * id + 0.5) as i32).min(15) as u8;
            let q1 = (((x[j + 16] - min) * id + 0.5) as i32).min(15) as u8;
            blk[4 + j] = q0 | (q1 << 4);
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
        let mut isum = 0i32;
        for j in 0..16 {
            isum += (x[4 + j] & 0x0f) as i32 * (y[4 + j] as i8 as i32);
            isum += (x[4 + j] >> 4) as i32 * (y[4 + j + 16] as i8 as i32);
        }
        sum += isum as f32 * (f16_at(x, 0) * f16_at(y, 0)) + f16_at(x, 2) * f16_at(y, 2);
    }
    sum
}

/// AVX2 version of [`dot_scalar`].
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; `w` must hold `n/32` Q4_1 blocks and `a` as many
/// Q8_1. The lengths are only checked in debug builds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_avx2(n: usize, w: &[u8], a: &[u8]) -> f32 {
    use super::avx2_util::*;
    use std::arch::x86_64::*;
    let nb = n / QK;
    debug_assert!(w.len() >= nb * BYTES && a.len() >= nb * q8_1::BYTES);
    let mut acc = _mm256_setzero_ps();
    let mut summs = 0.0f32;
    for i in 0..nb {
        let xo = i * BYTES;
        let yo = i * q8_1::BYTES;
        // SAFETY: every pointer read in this iteration is in bounds: i < nb and the caller
        // guarantees nb whole blocks in each row, so Q4_1 block i (20 bytes) starts at w + xo and
        // Q8_1 block i (36 bytes) at a + yo; the helpers need the AVX2, FMA and F16C this function
        // has.
        unsafe {
            let d = _mm256_set1_ps(f16_ptr(w.as_ptr().add(xo)) * f16_ptr(a.as_ptr().add(yo)));
            summs += f16_ptr(w.as_ptr().add(xo + 2)) * f16_ptr(a.as_ptr().add(yo + 2));
            let qx = unpack_nibbles(w.as_ptr().add(xo + 4));
            let qy = _mm256_loadu_si256(a.as_ptr().add(yo + 4) as *const __m256i);
            acc = _mm256_fmadd_ps(d, mul_sum_u8_i8_ps(qx, qy), acc);
        }
    }
    // SAFETY: this function's AVX2 and FMA are what hsum_ps needs.
    unsafe { hsum_ps(acc) + summs }
}

/// One weight row against four activation rows (`acts[k]` with its block scales `d[k]` and
/// scaled sums `s[k]` already widened to f32). Each result is summed exactly as
/// [`dot_avx2`] sums it; the weight block is unpacked once for all four.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C. The lengths are asserted (a panic, not UB):
/// `w` must hold `n/32` Q4_1 blocks, each `acts[k]` `n/32` Q8_1 blocks and `d[k]`, `s[k]`
/// `n/32` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn gemm_1x4(
    n: usize,
    w: &[u8],
    acts: [&[u8]; 4],
    d: [&[f32]; 4],
    s: [&[f32]; 4],
) -> [f32; 4] {
    use super::avx2_util::*;
    use std::arch::x86_64::*;
    let nb = n / QK;
    assert!(w.len() >= nb * BYTES);
    for k in 0..4 {
        assert!(acts[k].len() >= nb * q8_1::BYTES && d[k].len() >= nb && s[k].len() >= nb);
    }
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut summs = [0.0f32; 4];
    for i in 0..nb {
        let xo = i * BYTES;
        // SAFETY: all reads below are in bounds, as i < nb and the lengths were asserted above; the
        // helpers need the AVX2, FMA and F16C this function has.
        unsafe {
            let d0 = f16_ptr(w.as_ptr().add(xo));
            let m0 = f16_ptr(w.as_ptr().add(xo + 2));
            let qx = unpack_nibbles(w.as_ptr().add(xo + 4));
            for k in 0..4 {
                let dd = _mm256_set1_ps(d0 * *d[k].get_unchecked(i));
                summs[k] += m0 * *s[k].get_unchecked(i);
                let qy =
                    _mm256_loadu_si256(acts[k].as_ptr().add(i * q8_1::BYTES + 4) as *const __m256i);
                acc[k] = _mm256_fmadd_ps(dd, mul_sum_u8_i8_ps(qx, qy), acc[k]);
            }
        }
    }
    // SAFETY: this function's AVX2 and FMA are what hsum_ps needs.
    [0, 1, 2, 3].map(|k| unsafe { hsum_ps(acc[k]) } + summs[k])
}

/// Four weight rows against one activation row (scales widened to f32), each summed
/// exactly as [`dot_avx2`] sums it.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C. The lengths are asserted (a panic, not UB):
/// every `w[k]` must hold `n/32` Q4_1 blocks, `act` `n/32` Q8_1 blocks and `d`, `s` `n/32`
/// values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn gemv_4x1(n: usize, w: [&[u8]; 4], act: &[u8], d: &[f32], s: &[f32]) -> [f32; 4] {
    use super::avx2_util::*;
    use std::arch::x86_64::*;
    let nb = n / QK;
    assert!(act.len() >= nb * q8_1::BYTES && d.len() >= nb && s.len() >= nb);
    for wk in &w {
        assert!(wk.len() >= nb * BYTES);
    }
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut summs = [0.0f32; 4];
    for i in 0..nb {
        let xo = i * BYTES;
        // SAFETY: all reads below are in bounds, as i < nb and the lengths were asserted above; the
        // helpers need the AVX2, FMA and F16C this function has.
        unsafe {
            let d1 = *d.get_unchecked(i);
            let s1 = *s.get_unchecked(i);
            let qy = _mm256_loadu_si256(act.as_ptr().add(i * q8_1::BYTES + 4) as *const __m256i);
            for k in 0..4 {
                let wp = w[k].as_ptr();
                _mm_prefetch(
                    wp.wrapping_add(xo + super::PREFETCH_AHEAD) as *const i8,
                    _MM_HINT_T0,
                );
                let dd = _mm256_set1_ps(f16_ptr(wp.add(xo)) * d1);
                summs[k] += f16_ptr(wp.add(xo + 2)) * s1;
                let qx = unpack_nibbles(wp.add(xo + 4));
                acc[k] = _mm256_fmadd_ps(dd, mul_sum_u8_i8_ps(qx, qy), acc[k]);
            }
        }
    }
    // SAFETY: this function's AVX2 and FMA are what hsum_ps needs.
    [0, 1, 2, 3].map(|k| unsafe { hsum_ps(acc[k]) } + summs[k])
}

/// Two weight rows against four activation rows; each of the eight results is summed exactly
/// as [`dot_avx2`] sums it. Activation blocks are loaded once for both rows.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C. The lengths are asserted (a panic, not UB):
/// both `w[r]` must hold `n/32` Q4_1 blocks, each `acts[k]` `n/32` Q8_1 blocks and `d[k]`,
/// `s[k]` `n/32` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn gemm_2x4(
    n: usize,
    w: [&[u8]; 2],
    acts: [&[u8]; 4],
    d: [&[f32]; 4],
    s: [&[f32]; 4],
) -> [[f32; 4]; 2] {
    use super::avx2_util::*;
    use std::arch::x86_64::*;
    let nb = n / QK;
    assert!(w[0].len() >= nb * BYTES && w[1].len() >= nb * BYTES);
    for k in 0..4 {
        assert!(acts[k].len() >= nb * q8_1::BYTES && d[k].len() >= nb && s[k].len() >= nb);
    }
    let mut acc = [[_mm256_setzero_ps(); 4]; 2];
    let mut summs = [[0.0f32; 4]; 2];
    for i in 0..nb {
        let xo = i * BYTES;
        // SAFETY: all reads below are in bounds, as i < nb and the lengths were asserted above; the
        // helpers need the AVX2, FMA and F16C this function has.
        unsafe {
            let d0 = [
                f16_ptr(w[0].as_ptr().add(xo)),
                f16_ptr(w[1].as_ptr().add(xo)),
            ];
            let m0 = [
                f16_ptr(w[0].as_ptr().add(xo + 2)),
                f16_ptr(w[1].as_ptr().add(xo + 2)),
            ];
            let qx = [
                unpack_nibbles(w[0].as_ptr().add(xo + 4)),
                unpack_nibbles(w[1].as_ptr().add(xo + 4)),
            ];
            for k in 0..4 {
                let d1 = *d[k].get_unchecked(i);
                let s1 = *s[k].get_unchecked(i);
                let qy =
                    _mm256_loadu_si256(acts[k].as_ptr().add(i * q8_1::BYTES + 4) as *const __m256i);
                for r in 0..2 {
                    summs[r][k] += m0[r] * s1;
                    let dd = _mm256_set1_ps(d0[r] * d1);
                    acc[r][k] = _mm256_fmadd_ps(dd, mul_sum_u8_i8_ps(qx[r], qy), acc[r][k]);
                }
            }
        }
    }
    // SAFETY: this function's AVX2 and FMA are what hsum_ps needs.
    [0, 1].map(|r| [0, 1, 2, 3].map(|k| unsafe { hsum_ps(acc[r][k]) } + summs[r][k]))
}
