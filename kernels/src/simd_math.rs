//! Vectorised elementwise math (exp, SiLU) with scalar references.
//!
//! Hand-written because prefill evaluates hundreds of millions of exponentials (softmax
//! scores and SiLU) and libm's scalar `expf` alone would cost seconds; no maintained crate
//! offers a runtime-dispatched AVX2 `exp` over slices.

use crate::simd::{level, Level};

/// Cody-Waite split of ln 2 and a degree-6 minimax-style polynomial for exp on
/// [-ln2/2, ln2/2]; relative error below 2e-7 over the f32 range used here.
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;
const LOG2E: f32 = std::f32::consts::LOG2_E;
const P: [f32; 6] = [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0];

/// Scalar exp with the same algorithm as the AVX2 version (reference for tests).
#[inline]
pub fn exp_approx(x: f32) -> f32 {
    let x = x.clamp(-87.3, 88.0);
    let n = (x * LOG2E).round_ties_even();
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = P[0];
    for &c in &P[1..] {
        p = p * r + c;
    }
    let y = p * r + 1.0;
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    /// exp of 8 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_ps(x: __m256) -> __m256 {
        let x = _mm256_min_ps(
            _mm256_max_ps(x, _mm256_set1_ps(-87.3)),
            _mm256_set1_ps(88.0),
        );
        let n = _mm256_round_ps(
            _mm256_mul_ps(x, _mm256_set1_ps(LOG2E)),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
        let mut p = _mm256_set1_ps(P[0]);
        for &c in &P[1..] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let y = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0));
        let e = _mm256_slli_epi32(
            _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
            23,
        );
        _mm256_mul_ps(y, _mm256_castsi256_ps(e))
    }

    /// `x[i] = exp(x[i] - shift)`, returning the sum of the results.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_sub_sum(x: &mut [f32], shift: f32) -> f32 {
        let s = _mm256_set1_ps(shift);
        let mut acc = _mm256_setzero_ps();
        let mut chunks = x.chunks_exact_mut(8);
        for c in &mut chunks {
            // SAFETY: c has exactly 8 f32.
            let v = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), s));
            _mm256_storeu_ps(c.as_mut_ptr(), v);
            acc = _mm256_add_ps(acc, v);
        }
        let mut sum = crate::quant::avx2_util::hsum_ps(acc);
        for v in chunks.into_remainder() {
            *v = exp_approx(*v - shift);
            sum += *v;
        }
        sum
    }

    /// `g[i] = silu(g[i]) * u[i]`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn swiglu(g: &mut [f32], u: &[f32]) {
        let one = _mm256_set1_ps(1.0);
        let n = g.len().min(u.len());
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n bounds both slices.
            let x = _mm256_loadu_ps(g.as_ptr().add(i));
            let e = exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), x));
            let silu = _mm256_div_ps(x, _mm256_add_ps(one, e));
            _mm256_storeu_ps(
                g.as_mut_ptr().add(i),
                _mm256_mul_ps(silu, _mm256_loadu_ps(u.as_ptr().add(i))),
            );
            i += 8;
        }
        super::swiglu_scalar(&mut g[i..n], &u[i..n]);
    }
}

/// Scalar reference of [`exp_sub_sum`].
pub fn exp_sub_sum_scalar(x: &mut [f32], shift: f32) -> f32 {
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = exp_approx(*v - shift);
        sum += *v;
    }
    sum
}

/// `x[i] = exp(x[i] - shift)`, returning the sum.
pub fn exp_sub_sum(x: &mut [f32], shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if level() == Level::Avx2 {
        // SAFETY: AVX2 and FMA were detected at run time.
        return unsafe { avx2::exp_sub_sum(x, shift) };
    }
    exp_sub_sum_scalar(x, shift)
}

/// Scalar reference of [`swiglu`].
pub fn swiglu_scalar(g: &mut [f32], u: &[f32]) {
    for (x, &y) in g.iter_mut().zip(u) {
        *x = *x / (1.0 + exp_approx(-*x)) * y;
    }
}

/// SwiGLU: `g[i] = silu(g[i]) * u[i]`.
pub fn swiglu(g: &mut [f32], u: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if level() == Level::Avx2 {
        // SAFETY: AVX2 and FMA were detected at run time.
        return unsafe { avx2::swiglu(g, u) };
    }
    swiglu_scalar(g, u)
}
