//! Vectorised elementwise math (exp, SiLU, softmax sums) with scalar references.
//!
//! Hand-written because prefill evaluates hundreds of millions of exponentials (softmax
//! scores and SiLU) and libm's scalar `expf` alone would cost seconds; no maintained crate
//! offers a runtime-dispatched AVX2 `exp` over slices.
//!
//! The exponential uses the same range reduction and degree-5 polynomial as llama.cpp's
//! AVX2 path (coefficients of the Arm optimized-routines `expf`, max error about 1.5 ulp),
//! so softmax and SiLU round the way llama.cpp's do and our logits track its closely.

use crate::simd::{level, Level};

/// 0x1.8p23: adding it leaves round(x) in the low mantissa bits.
const SHIFT: f32 = 12_582_912.0;
const INV_LN2: f32 = f32::from_bits(0x3fb8_aa3b);
const LN2_HI: f32 = f32::from_bits(0x3f31_7200);
const LN2_LO: f32 = f32::from_bits(0x35bf_be8e);
const C0: f32 = f32::from_bits(0x3f7f_fff6);
const C1: f32 = f32::from_bits(0x3eff_fedb);
const C2: f32 = f32::from_bits(0x3e2a_af33);
const C3: f32 = f32::from_bits(0x3d2b_9f17);
const C4: f32 = f32::from_bits(0x3c07_2010);

/// exp(x), scalar, with exactly the operations of the AVX2 version (reference for tests
/// and the portable path).
pub fn exp_approx(x: f32) -> f32 {
    let z = x.mul_add(INV_LN2, SHIFT);
    let n = z - SHIFT;
    let b = (-n).mul_add(LN2_LO, (-n).mul_add(LN2_HI, x));
    let e = z.to_bits() << 23;
    let k = f32::from_bits(e.wrapping_add(1.0f32.to_bits()));
    let u = b * b;
    let j = C4
        .mul_add(b, C3)
        .mul_add(u, C2.mul_add(b, C1))
        .mul_add(u, C0 * b);
    if n.abs() <= 126.0 {
        return j.mul_add(k, k);
    }
    // |n| > 126: 2^n is not a normal float; scale in two steps (or flush for |n| > 192).
    let g: u32 = if n <= 0.0 { 0x8200_0000 } else { 0 };
    let s1 = f32::from_bits(g.wrapping_add(0x7f00_0000));
    if n.abs() > 192.0 {
        return s1 * s1;
    }
    let s2 = f32::from_bits(e.wrapping_sub(g));
    s2.mul_add(j, s2) * s1
}

/// The AVX2 versions of the kernels above.
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    /// exp of 8 lanes.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_ps(x: __m256) -> __m256 {
        let z = _mm256_fmadd_ps(x, _mm256_set1_ps(INV_LN2), _mm256_set1_ps(SHIFT));
        let n = _mm256_sub_ps(z, _mm256_set1_ps(SHIFT));
        let b = _mm256_fnmadd_ps(
            n,
            _mm256_set1_ps(LN2_LO),
            _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x),
        );
        let e = _mm256_slli_epi32(_mm256_castps_si256(z), 23);
        let k = _mm256_castsi256_ps(_mm256_add_epi32(
            e,
            _mm256_castps_si256(_mm256_set1_ps(1.0)),
        ));
        let abs_n = _mm256_andnot_ps(_mm256_set1_ps(-0.0), n);
        let big = _mm256_cmp_ps(abs_n, _mm256_set1_ps(126.0), _CMP_GT_OQ);
        let u = _mm256_mul_ps(b, b);
        let j = _mm256_fmadd_ps(
            _mm256_fmadd_ps(
                _mm256_fmadd_ps(_mm256_set1_ps(C4), b, _mm256_set1_ps(C3)),
                u,
                _mm256_fmadd_ps(_mm256_set1_ps(C2), b, _mm256_set1_ps(C1)),
            ),
            u,
            _mm256_mul_ps(_mm256_set1_ps(C0), b),
        );
        let normal = _mm256_fmadd_ps(j, k, k);
        if _mm256_movemask_ps(big) == 0 {
            return normal;
        }
        let nonpos = _mm256_castps_si256(_mm256_cmp_ps(n, _mm256_setzero_ps(), _CMP_LE_OQ));
        let g = _mm256_and_si256(nonpos, _mm256_set1_epi32(0x8200_0000u32 as i32));
        let s1 = _mm256_castsi256_ps(_mm256_add_epi32(g, _mm256_set1_epi32(0x7f00_0000)));
        let s2 = _mm256_castsi256_ps(_mm256_sub_epi32(e, g));
        let huge = _mm256_cmp_ps(abs_n, _mm256_set1_ps(192.0), _CMP_GT_OQ);
        let scaled = _mm256_mul_ps(_mm256_fmadd_ps(s2, j, s2), s1);
        let r = _mm256_blendv_ps(normal, scaled, big);
        _mm256_blendv_ps(r, _mm256_mul_ps(s1, s1), huge)
    }

    /// The 8-lane horizontal sum in the order llama.cpp's softmax uses.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn hsum(v: __m256) -> f32 {
        // SAFETY: hsum_ps needs the AVX2 and FMA our caller guarantees.
        unsafe { crate::quant::avx2_util::hsum_ps(v) }
    }

    /// `x[i] = exp(x[i] - shift)` over whole groups of 8, returning Σ in f64 (one f32
    /// partial sum per group of 8).
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_sub_sum(x: &mut [f32], shift: f32) -> f64 {
        let s = _mm256_set1_ps(shift);
        let mut sum = 0.0f64;
        let mut chunks = x.chunks_exact_mut(8);
        for c in &mut chunks {
            // SAFETY: c has exactly 8 f32 for the load and the store; exp_ps and hsum need
            // the AVX2 and FMA this function has.
            unsafe {
                let v = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), s));
                _mm256_storeu_ps(c.as_mut_ptr(), v);
                sum += hsum(v) as f64;
            }
        }
        for v in chunks.into_remainder() {
            *v = exp_approx(*v - shift);
            sum += *v as f64;
        }
        sum
    }

    /// `g[i] = silu(g[i]) * u[i]` over the first `min(g.len(), u.len())` values.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn swiglu(g: &mut [f32], u: &[f32]) {
        let one = _mm256_set1_ps(1.0);
        let n = g.len().min(u.len());
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n bounds both slices; exp_ps needs the AVX2 and FMA this
            // function has.
            unsafe {
                let x = _mm256_loadu_ps(g.as_ptr().add(i));
                let e = exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), x));
                let silu = _mm256_div_ps(x, _mm256_add_ps(one, e));
                _mm256_storeu_ps(
                    g.as_mut_ptr().add(i),
                    _mm256_mul_ps(silu, _mm256_loadu_ps(u.as_ptr().add(i))),
                );
            }
            i += 8;
        }
        super::swiglu_scalar(&mut g[i..n], &u[i..n]);
    }
}

/// Sum of 8 values in the order of the AVX2 horizontal sum: `((0+4)+(2+6)) + ((1+5)+(3+7))`.
pub fn hsum8_scalar(v: &[f32; 8]) -> f32 {
    let t = [v[0] + v[4], v[1] + v[5], v[2] + v[6], v[3] + v[7]];
    (t[0] + t[2]) + (t[1] + t[3])
}

/// Scalar reference of [`exp_sub_sum`].
pub fn exp_sub_sum_scalar(x: &mut [f32], shift: f32) -> f64 {
    let mut sum = 0.0f64;
    let mut chunks = x.chunks_exact_mut(8);
    for c in &mut chunks {
        let mut e = [0.0f32; 8];
        for (o, v) in e.iter_mut().zip(c.iter_mut()) {
            *v = exp_approx(*v - shift);
            *o = *v;
        }
        sum += hsum8_scalar(&e) as f64;
    }
    for v in chunks.into_remainder() {
        *v = exp_approx(*v - shift);
        sum += *v as f64;
    }
    sum
}

/// `x[i] = exp(x[i] - shift)`, returning the sum (in f64, accumulated per group of 8).
pub fn exp_sub_sum(x: &mut [f32], shift: f32) -> f64 {
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
