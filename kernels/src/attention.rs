//! Attention over an f16 KV cache with f32 accumulation.
//!
//! One call handles a tile of query vectors that share one kv head (a GQA group, for one or
//! several positions) against any number of KV segments (RAM cache rows, flash pages). The
//! softmax is computed online, block by block, and each query's result comes back normalised
//! together with its log-sum-exp, so results over disjoint key sets can be merged exactly
//! with [`merge`]. Causal masking: query `i` sees the keys whose absolute position is at most
//! `query_pos[i]`.

use crate::simd::{level, Level};
use crate::simd_math::{exp_sub_sum, exp_sub_sum_scalar};
use half::f16;

/// A run of consecutive keys and values of one kv head: `len` rows of `head_dim` values each,
/// the first at absolute position `first_pos`.
#[derive(Clone, Copy, Debug)]
pub struct KvSegment<'a> {
    pub keys: &'a [f16],
    pub values: &'a [f16],
    pub first_pos: usize,
}

impl KvSegment<'_> {
    fn len(&self, head_dim: usize) -> usize {
        self.keys.len() / head_dim
    }
}

/// Keys converted to f32 per block; hand-tuned block size (fits L1 with the V block).
const KEY_BLOCK: usize = 32;

/// Per-query online-softmax state.
struct Running {
    max: f32,
    sum: f32,
}

/// Scratch buffers reused across calls.
#[derive(Default)]
pub struct AttnScratch {
    kf: Vec<f32>,
    vf: Vec<f32>,
    scores: Vec<f32>,
}

/// Attend queries `q` (`n_q × head_dim`, row `i` at position `query_pos[i]`) over `segments`.
/// Writes the normalised output to `out` (`n_q × head_dim`) and the natural-log
/// log-sum-exp of the scaled scores to `lse` (`-inf` for a query that saw no key, whose
/// output is then zero).
pub fn attend(
    q: &[f32],
    query_pos: &[usize],
    segments: &[KvSegment],
    head_dim: usize,
    scale: f32,
    out: &mut [f32],
    lse: &mut [f32],
    scratch: &mut AttnScratch,
) {
    match level() {
        Level::Avx2 => {
            attend_impl::<true>(q, query_pos, segments, head_dim, scale, out, lse, scratch)
        }
        Level::Scalar => {
            attend_impl::<false>(q, query_pos, segments, head_dim, scale, out, lse, scratch)
        }
    }
}

/// The scalar reference of [`attend`] (same algorithm, no SIMD), for tests.
pub fn attend_scalar(
    q: &[f32],
    query_pos: &[usize],
    segments: &[KvSegment],
    head_dim: usize,
    scale: f32,
    out: &mut [f32],
    lse: &mut [f32],
    scratch: &mut AttnScratch,
) {
    attend_impl::<false>(q, query_pos, segments, head_dim, scale, out, lse, scratch)
}

#[allow(clippy::too_many_arguments)]
fn attend_impl<const SIMD: bool>(
    q: &[f32],
    query_pos: &[usize],
    segments: &[KvSegment],
    d: usize,
    scale: f32,
    out: &mut [f32],
    lse: &mut [f32],
    scratch: &mut AttnScratch,
) {
    let n_q = query_pos.len();
    assert!(
        q.len() == n_q * d && out.len() == n_q * d && lse.len() == n_q,
        "attention buffer sizes"
    );
    let mut state: Vec<Running> = (0..n_q)
        .map(|_| Running {
            max: f32::NEG_INFINITY,
            sum: 0.0,
        })
        .collect();
    out.fill(0.0);
    scratch.kf.resize(KEY_BLOCK * d, 0.0);
    scratch.vf.resize(KEY_BLOCK * d, 0.0);
    scratch.scores.resize(KEY_BLOCK, 0.0);
    let last_needed = query_pos.iter().copied().max().unwrap_or(0);
    for seg in segments {
        let len = seg.len(d);
        assert!(
            seg.values.len() == seg.keys.len(),
            "segment keys and values differ in length"
        );
        let mut j0 = 0;
        while j0 < len && seg.first_pos + j0 <= last_needed {
            let nb = KEY_BLOCK.min(len - j0);
            let kb = &mut scratch.kf[..nb * d];
            let vb = &mut scratch.vf[..nb * d];
            widen(&seg.keys[j0 * d..(j0 + nb) * d], kb);
            widen(&seg.values[j0 * d..(j0 + nb) * d], vb);
            let block_pos = seg.first_pos + j0;
            for i in 0..n_q {
                // Keys of this block visible to query i.
                let visible = query_pos[i]
                    .saturating_add(1)
                    .saturating_sub(block_pos)
                    .min(nb);
                if visible == 0 {
                    continue;
                }
                let s = &mut scratch.scores[..visible];
                let qi = &q[i * d..(i + 1) * d];
                scores::<SIMD>(qi, &kb[..visible * d], d, scale, s);
                let bmax = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let st = &mut state[i];
                let new_max = st.max.max(bmax);
                let psum = if SIMD {
                    exp_sub_sum(s, new_max)
                } else {
                    exp_sub_sum_scalar(s, new_max)
                };
                let carry = if st.max == f32::NEG_INFINITY {
                    0.0
                } else {
                    (st.max - new_max).exp()
                };
                st.sum = st.sum * carry + psum;
                st.max = new_max;
                accumulate::<SIMD>(&mut out[i * d..(i + 1) * d], carry, s, &vb[..visible * d]);
            }
            j0 += nb;
        }
    }
    for (i, st) in state.iter().enumerate() {
        let o = &mut out[i * d..(i + 1) * d];
        if st.sum > 0.0 {
            let inv = 1.0 / st.sum;
            o.iter_mut().for_each(|v| *v *= inv);
            lse[i] = st.max + st.sum.ln();
        } else {
            lse[i] = f32::NEG_INFINITY;
        }
    }
}

fn widen(src: &[f16], dst: &mut [f32]) {
    use half::slice::HalfFloatSliceExt;
    // half picks F16C at run time for slice conversion.
    src.convert_to_f32_slice(dst);
}

/// `s[j] = scale · (q · k_j)` for the rows of `k`.
fn scores<const SIMD: bool>(q: &[f32], k: &[f32], d: usize, scale: f32, s: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if SIMD && d % 8 == 0 {
        // SAFETY: SIMD is only true when AVX2+FMA were detected; d % 8 == 0 and the slices
        // hold s.len() rows of d values (checked by the debug assertion inside).
        unsafe { avx2::scores(q, k, d, scale, s) };
        return;
    }
    for (j, sj) in s.iter_mut().enumerate() {
        let kj = &k[j * d..(j + 1) * d];
        *sj = scale * q.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>();
    }
}

/// `o = o · carry + Σ_j p_j · v_j`.
fn accumulate<const SIMD: bool>(o: &mut [f32], carry: f32, p: &[f32], v: &[f32]) {
    let d = o.len();
    #[cfg(target_arch = "x86_64")]
    if SIMD && d % 8 == 0 {
        // SAFETY: as in `scores`; v holds p.len() rows of d values.
        unsafe { avx2::accumulate(o, carry, p, v) };
        return;
    }
    for x in o.iter_mut() {
        *x *= carry;
    }
    for (j, &pj) in p.iter().enumerate() {
        for (x, &vj) in o.iter_mut().zip(&v[j * d..(j + 1) * d]) {
            *x += pj * vj;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// Sum each of 8 vectors horizontally; lane j of the result is the sum of `v[j]`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum8(v: &[__m256; 8]) -> __m256 {
        let a = _mm256_hadd_ps(v[0], v[1]);
        let b = _mm256_hadd_ps(v[2], v[3]);
        let c = _mm256_hadd_ps(v[4], v[5]);
        let e = _mm256_hadd_ps(v[6], v[7]);
        let ab = _mm256_hadd_ps(a, b);
        let ce = _mm256_hadd_ps(c, e);
        // ab = [s0 s1 s2 s3 | s0' s1' s2' s3'] halves of 0..3; ce likewise for 4..7.
        let lo = _mm256_permute2f128_ps(ab, ce, 0x20);
        let hi = _mm256_permute2f128_ps(ab, ce, 0x31);
        _mm256_add_ps(lo, hi)
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn scores(q: &[f32], k: &[f32], d: usize, scale: f32, s: &mut [f32]) {
        let n = s.len();
        debug_assert!(q.len() == d && k.len() >= n * d && d % 8 == 0);
        let qp = q.as_ptr();
        let kp = k.as_ptr();
        let sc = _mm256_set1_ps(scale);
        let mut j = 0;
        while j + 8 <= n {
            let mut acc = [_mm256_setzero_ps(); 8];
            let mut c = 0;
            while c < d {
                let qv = _mm256_loadu_ps(qp.add(c));
                for (r, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kp.add((j + r) * d + c)), *a);
                }
                c += 8;
            }
            _mm256_storeu_ps(s.as_mut_ptr().add(j), _mm256_mul_ps(hsum8(&acc), sc));
            j += 8;
        }
        while j < n {
            let mut a = _mm256_setzero_ps();
            let mut c = 0;
            while c < d {
                a = _mm256_fmadd_ps(
                    _mm256_loadu_ps(qp.add(c)),
                    _mm256_loadu_ps(kp.add(j * d + c)),
                    a,
                );
                c += 8;
            }
            s[j] = scale * crate::quant::avx2_util::hsum_ps(a);
            j += 1;
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn accumulate(o: &mut [f32], carry: f32, p: &[f32], v: &[f32]) {
        let d = o.len();
        debug_assert!(v.len() >= p.len() * d && d % 8 == 0);
        let cr = _mm256_set1_ps(carry);
        let mut c = 0;
        while c < d {
            let mut a = _mm256_mul_ps(_mm256_loadu_ps(o.as_ptr().add(c)), cr);
            for (j, &pj) in p.iter().enumerate() {
                a = _mm256_fmadd_ps(
                    _mm256_set1_ps(pj),
                    _mm256_loadu_ps(v.as_ptr().add(j * d + c)),
                    a,
                );
            }
            _mm256_storeu_ps(o.as_mut_ptr().add(c), a);
            c += 8;
        }
    }
}

/// Merge partial attention results over disjoint key sets: `outs[k]` (normalised,
/// `head_dim` each) with log-sum-exps `lses[k]`. Writes the combined output to `out` and
/// returns the combined log-sum-exp. Equivalent to one softmax over the union of keys.
pub fn merge(outs: &[&[f32]], lses: &[f32], out: &mut [f32]) -> f32 {
    let m = lses.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    out.fill(0.0);
    if m == f32::NEG_INFINITY {
        return m;
    }
    let total: f32 = lses.iter().map(|&l| (l - m).exp()).sum();
    for (o, &l) in outs.iter().zip(lses) {
        let w = (l - m).exp() / total;
        if w > 0.0 {
            for (x, &y) in out.iter_mut().zip(o.iter()) {
                *x += w * y;
            }
        }
    }
    m + total.ln()
}
