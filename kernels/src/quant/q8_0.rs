//! Q8_0: blocks of 32 signed bytes with one f16 scale. Used for weights and as the
//! activation format paired with Q4_0/Q5_0/Q8_0 weights.

use super::{f16_at, put_f16};

/// Values per block.
pub const QK: usize = 32;
/// Bytes per block: the f16 scale and 32 signed bytes.
pub const BYTES: usize = 34;

/// `q·d` for every value.
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

/// Quantize whole blocks of `src` into `dst` as [`quantize_block`] does (with AVX2 when the
/// CPU has it; bit-identical either way).
pub fn quantize(src: &[f32], dst: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::level() == crate::simd::Level::Avx2 {
        for (x, blk) in src.chunks_exact(QK).zip(dst.chunks_exact_mut(BYTES)) {
            // SAFETY: AVX2 detected; x has 32 values and blk has 34 bytes.
            let (d, _) = unsafe { avx2_quantize_block(x, &mut blk[2..]) };
            put_f16(blk, 0, d);
        }
        return;
    }
    quantize_scalar(src, dst)
}

/// The scalar reference of [`quantize`].
pub fn quantize_scalar(src: &[f32], dst: &mut [u8]) {
    for (x, blk) in src.chunks_exact(QK).zip(dst.chunks_exact_mut(BYTES)) {
        let (d, _) = quantize_block(x, &mut blk[2..]);
        put_f16(blk, 0, d);
    }
}

/// AVX2 version of [`quantize_block`], bit-identical to it (round-half-even both ways).
///
/// # Safety
/// The CPU must support AVX2 and FMA. The lengths are asserted (a panic, not UB): `x` must
/// hold 32 values and `qs` at least 32 bytes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn avx2_quantize_block(x: &[f32], qs: &mut [u8]) -> (f32, i32) {
    use std::arch::x86_64::*;
    assert!(x.len() >= QK && qs.len() >= QK);
    let p = x.as_ptr();
    // SAFETY: x holds at least 32 values (asserted), so the four 8-wide loads at 0..32 are
    // in bounds; loadu needs no alignment.
    let v = [0, 8, 16, 24].map(|o| unsafe { _mm256_loadu_ps(p.add(o)) });
    let sign = _mm256_set1_ps(-0.0);
    let m = v.iter().fold(_mm256_setzero_ps(), |m, &vi| {
        _mm256_max_ps(m, _mm256_andnot_ps(sign, vi))
    });
    let m4 = _mm_max_ps(_mm256_extractf128_ps(m, 1), _mm256_castps256_ps128(m));
    let m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    let m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    let amax = _mm_cvtss_f32(m4);
    let d = amax / 127.0;
    let id = _mm256_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
    let q = v.map(|vi| {
        _mm256_cvtps_epi32(_mm256_round_ps(
            _mm256_mul_ps(vi, id),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
        ))
    });
    let sum = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    let s4 = _mm_add_epi32(
        _mm256_extracti128_si256(sum, 1),
        _mm256_castsi256_si128(sum),
    );
    let s4 = _mm_hadd_epi32(s4, s4);
    let s4 = _mm_hadd_epi32(s4, s4);
    let packed = _mm256_packs_epi16(
        _mm256_packs_epi32(q[0], q[1]),
        _mm256_packs_epi32(q[2], q[3]),
    );
    let ordered = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    // SAFETY: qs holds at least 32 bytes (asserted); storeu needs no alignment.
    unsafe { _mm256_storeu_si256(qs.as_mut_ptr() as *mut __m256i, ordered) };
    (d, _mm_cvtsi128_si32(s4))
}

/// Scalar reference dot product of `n` values against Q8_0 activations.
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

/// AVX2 version of [`dot_scalar`].
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; `w` and `a` must hold `n/32` blocks each. The
/// lengths are only checked in debug builds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_avx2(n: usize, w: &[u8], a: &[u8]) -> f32 {
    use super::avx2_util::*;
    use std::arch::x86_64::*;
    let nb = n / QK;
    debug_assert!(w.len() >= nb * BYTES && a.len() >= nb * BYTES);
    let mut acc = _mm256_setzero_ps();
    for i in 0..nb {
        // SAFETY: every pointer read in this iteration is in bounds: i < nb and the caller
        // guarantees nb whole blocks in each row, so block i (34 bytes) starts at x in `w` and at y
        // in `a`; the helpers need the AVX2, FMA and F16C this function has.
        unsafe {
            let x = w.as_ptr().add(i * BYTES);
            let y = a.as_ptr().add(i * BYTES);
            let d = _mm256_set1_ps(
                f16_ptr(w.as_ptr().add(i * BYTES)) * f16_ptr(a.as_ptr().add(i * BYTES)),
            );
            let qx = _mm256_loadu_si256(x.add(2) as *const __m256i);
            let qy = _mm256_loadu_si256(y.add(2) as *const __m256i);
            acc = _mm256_fmadd_ps(d, mul_sum_i8_pairs_ps(qx, qy), acc);
        }
    }
    // SAFETY: this function's AVX2 and FMA are what hsum_ps needs.
    unsafe { hsum_ps(acc) }
}

/// One weight row against four activation rows (block scales widened to f32), each summed
/// exactly as [`dot_avx2`] sums it.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C. The lengths are asserted (a panic, not UB): `w`
/// and every `acts[k]` must hold `n/32` Q8_0 blocks and every `d[k]` `n/32` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn gemm_1x4(n: usize, w: &[u8], acts: [&[u8]; 4], d: [&[f32]; 4]) -> [f32; 4] {
    use super::avx2_util::*;
    use std::arch::x86_64::*;
    let nb = n / QK;
    assert!(w.len() >= nb * BYTES);
    for k in 0..4 {
        assert!(acts[k].len() >= nb * BYTES && d[k].len() >= nb);
    }
    let mut acc = [_mm256_setzero_ps(); 4];
    for i in 0..nb {
        let o = i * BYTES;
        // SAFETY: all reads below are in bounds, as i < nb and the lengths were asserted above; the
        // helpers need the AVX2, FMA and F16C this function has.
        unsafe {
            let d0 = f16_ptr(w.as_ptr().add(o));
            let qx = _mm256_loadu_si256(w.as_ptr().add(o + 2) as *const __m256i);
            let ax = _mm256_sign_epi8(qx, qx);
            for k in 0..4 {
                let dd = _mm256_set1_ps(d0 * *d[k].get_unchecked(i));
                let qy = _mm256_loadu_si256(acts[k].as_ptr().add(o + 2) as *const __m256i);
                acc[k] =
                    _mm256_fmadd_ps(dd, mul_sum_u8_i8_ps(ax, _mm256_sign_epi8(qy, qx)), acc[k]);
            }
        }
    }
    // SAFETY: this function's AVX2 and FMA are what hsum_ps needs.
    [0, 1, 2, 3].map(|k| unsafe { hsum_ps(acc[k]) })
}

/// Four weight rows against one activation row, each summed exactly as [`dot_avx2`] does.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C. The lengths are asserted (a panic, not UB):
/// every `w[k]` and `act` must hold `n/32` Q8_0 blocks and `d` `n/32` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn gemv_4x1(n: usize, w: [&[u8]; 4], act: &[u8], d: &[f32]) -> [f32; 4] {
    use super::avx2_util::*;
    use std::arch::x86_64::*;
    let nb = n / QK;
    assert!(act.len() >= nb * BYTES && d.len() >= nb);
    for wk in &w {
        assert!(wk.len() >= nb * BYTES);
    }
    let mut acc = [_mm256_setzero_ps(); 4];
    for i in 0..nb {
        let o = i * BYTES;
        // SAFETY: all reads below are in bounds, as i < nb and the lengths were asserted above; the
        // helpers need the AVX2, FMA and F16C this function has.
        unsafe {
            let d1 = *d.get_unchecked(i);
            let qy = _mm256_loadu_si256(act.as_ptr().add(o + 2) as *const __m256i);
            for k in 0..4 {
                let wp = w[k].as_ptr();
                // Prefetching past the end of the matrix is harmless (a hint, never a fault).
                _mm_prefetch(
                    wp.wrapping_add(o + super::PREFETCH_AHEAD) as *const i8,
                    _MM_HINT_T0,
                );
                let dd = _mm256_set1_ps(f16_ptr(wp.add(o)) * d1);
                let qx = _mm256_loadu_si256(wp.add(o + 2) as *const __m256i);
                acc[k] = _mm256_fmadd_ps(dd, mul_sum_i8_pairs_ps(qx, qy), acc[k]);
            }
        }
    }
    // SAFETY: this function's AVX2 and FMA are what hsum_ps needs.
    [0, 1, 2, 3].map(|k| unsafe { hsum_ps(acc[k]) })
}
