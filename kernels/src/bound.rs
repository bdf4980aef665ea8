//! Quest's upper bound of a query's dot product with any key of a run of keys, from the
//! run's element-wise key maximum and minimum (stored as f16: the extremes of f16 keys are
//! f16 values, so the narrow storage loses nothing).
//!
//! For a probe `p` split into its positive part `p⁺` and negative part `p⁻`, every key `k`
//! of the run has `p · k ≤ p⁺ · max + p⁻ · min`. A block's tokens may be split into several
//! runs, each with its own extremes; the block's bound is the best run's.
//!
//! Hand-written because a decode step evaluates this for every block of every layer and
//! query head (hundreds of thousands of 64-wide products per token at 16K tokens); one call
//! per (block, kv head) loads each run's extremes once for all the query heads of the group
//! and widens them with F16C, where a generic dot product would reload and reconvert them per
//! head.

use crate::simd::{level, Level};
use half::f16;

/// Scalar reference of [`quest_bound`].
pub fn quest_bound_scalar(pos: &[f32], neg: &[f32], hi: &[f16], lo: &[f16], out: &mut [f32]) {
    let d = dim(pos, hi, lo, out);
    out.fill(f32::NEG_INFINITY);
    for (h, l) in hi.chunks_exact(d).zip(lo.chunks_exact(d)) {
        for (g, o) in out.iter_mut().enumerate() {
            let (pp, pn) = (&pos[g * d..(g + 1) * d], &neg[g * d..(g + 1) * d]);
            let s: f32 = (0..d)
                .map(|i| pp[i] * h[i].to_f32() + pn[i] * l[i].to_f32())
                .sum();
            *o = o.max(s);
        }
    }
}

/// For each of `out.len()` probes (`pos` and `neg`: their positive and negative parts,
/// `probes × d` each), the largest over the runs of `hi`/`lo` (`runs × d` each) of
/// `pos·hi + neg·lo`. `d` is `hi.len() / runs`, taken from `pos.len() / out.len()`.
/// No runs gives `-inf`.
pub fn quest_bound(pos: &[f32], neg: &[f32], hi: &[f16], lo: &[f16], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if level() == Level::Avx2 {
        let d = dim(pos, hi, lo, out);
        if d.is_multiple_of(8) {
            // SAFETY: AVX2, FMA and F16C were detected at run time; `dim` checked that pos
            // and neg hold out.len() × d values and hi and lo the same whole runs of d.
            unsafe { avx2::quest_bound(pos, neg, hi, lo, out, d) };
            return;
        }
    }
    quest_bound_scalar(pos, neg, hi, lo, out)
}

/// The row length shared by the arguments; panics when they disagree (a caller's bug).
fn dim(pos: &[f32], hi: &[f16], lo: &[f16], out: &[f32]) -> usize {
    let g = out.len().max(1);
    let d = pos.len() / g;
    assert!(
        d > 0 && pos.len() == g * d && hi.len() == lo.len() && hi.len().is_multiple_of(d),
        "quest_bound: {} probe values for {} probes, {} / {} run values",
        pos.len(),
        out.len(),
        hi.len(),
        lo.len()
    );
    d
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use half::f16;
    use std::arch::x86_64::*;

    /// Probes scored together per pass: their accumulators stay in registers.
    const LANES: usize = 4;

    /// The AVX2 version of [`super::quest_bound`] for a row length `d`.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C; `d` must be a non-zero multiple of 8, `pos`
    /// and `neg` must hold `out.len() × d` values and `hi` and `lo` the same whole number of
    /// rows of `d` (what `super::dim` checks). The reads are unchecked.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn quest_bound(
        pos: &[f32],
        neg: &[f32],
        hi: &[f16],
        lo: &[f16],
        out: &mut [f32],
        d: usize,
    ) {
        out.fill(f32::NEG_INFINITY);
        let runs = hi.len() / d;
        let mut g0 = 0;
        while g0 < out.len() {
            let n = (out.len() - g0).min(LANES);
            let mut best = _mm_set1_ps(f32::NEG_INFINITY);
            for r in 0..runs {
                let mut acc = [_mm256_setzero_ps(); LANES];
                let mut i = 0;
                while i < d {
                    // SAFETY: r < runs and i + 8 <= d (d % 8 == 0) bound hi/lo; g0 + j <
                    // out.len() bounds the probe rows of pos/neg (checked by the caller).
                    unsafe {
                        let h = _mm256_cvtph_ps(_mm_loadu_si128(
                            hi.as_ptr().add(r * d + i) as *const __m128i
                        ));
                        let l = _mm256_cvtph_ps(_mm_loadu_si128(
                            lo.as_ptr().add(r * d + i) as *const __m128i
                        ));
                        for (j, a) in acc.iter_mut().enumerate().take(n) {
                            let at = (g0 + j) * d + i;
                            *a = _mm256_fmadd_ps(_mm256_loadu_ps(pos.as_ptr().add(at)), h, *a);
                            *a = _mm256_fmadd_ps(_mm256_loadu_ps(neg.as_ptr().add(at)), l, *a);
                        }
                    }
                    i += 8;
                }
                // The (up to) four probes' sums in one vector: three horizontal adds instead
                // of a full horizontal sum per probe.
                let ab = _mm256_hadd_ps(acc[0], acc[1]);
                let cd = _mm256_hadd_ps(acc[2], acc[3]);
                let abcd = _mm256_hadd_ps(ab, cd);
                let sums = _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
                best = _mm_max_ps(best, sums);
            }
            let mut lanes = [0.0f32; LANES];
            // SAFETY: `lanes` holds the 4 f32 that the store writes.
            unsafe { _mm_storeu_ps(lanes.as_mut_ptr(), best) };
            out[g0..g0 + n].copy_from_slice(&lanes[..n]);
            g0 += n;
        }
    }
}
