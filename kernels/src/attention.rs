//! Attention over an f16 KV cache with f32 accumulation.
//!
//! One call handles a tile of queries that share one kv head (a GQA group, at one or several
//! positions) against any number of KV segments (RAM cache rows, flash pages). The softmax is
//! exact over all visible keys (two passes: scores, then weighted values), and each result
//! comes back normalised together with its log-sum-exp, so results over disjoint key sets
//! (pages read by different workers) can be merged exactly with [`merge`]. Causal masking:
//! query `i` sees the keys whose absolute position is at most `query_pos[i]`.
//!
//! Rounding follows llama.cpp's CPU path so that logits match it bit for bit: the query is
//! rounded to f16 before `q·k`, the softmax weights are rounded to f16 before `p·v`, the
//! exponential is the polynomial in [`crate::simd_math`], and every dot product adds its terms
//! in the order of llama.cpp's matrix kernel ([`ReduceOrder::Gemm`], prompt batches) or its
//! vector kernel ([`ReduceOrder::Gemv`], single-token decode). The SIMD and scalar versions
//! perform the same IEEE operations in the same order, so they agree exactly.

use crate::simd::{level, Level};
use crate::simd_math::{exp_sub_sum, exp_sub_sum_scalar, hsum8_scalar};
use half::f16;

/// A run of consecutive keys and values of one kv head: rows of `head_dim` values each, the
/// first at absolute position `first_pos`.
#[derive(Clone, Copy, Debug)]
pub struct KvSegment<'a> {
    pub keys: &'a [f16],
    pub values: &'a [f16],
    pub first_pos: usize,
}

/// How dot products are summed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceOrder {
    /// One 8-lane accumulator; lane `j % 8` takes term `j` (llama.cpp's batched GEMM path).
    Gemm,
    /// Four 8-lane accumulators over 32-wide steps; lane `j % 32` takes term `j`
    /// (llama.cpp's single-token GEMV path).
    Gemv,
}

impl ReduceOrder {
    fn lanes(self) -> usize {
        match self {
            ReduceOrder::Gemm => 8,
            ReduceOrder::Gemv => 32,
        }
    }

    /// Combine per-lane partial sums in this order's association.
    fn reduce(self, lanes: &[f32]) -> f32 {
        match self {
            ReduceOrder::Gemm => hsum8_scalar(lanes.try_into().expect("8 lanes")),
            ReduceOrder::Gemv => {
                let mut x = [0.0f32; 8];
                for l in 0..8 {
                    let a = lanes[l] + lanes[16 + l];
                    let b = lanes[8 + l] + lanes[24 + l];
                    x[l] = a + b;
                }
                let t = [x[0] + x[4], x[1] + x[5], x[2] + x[6], x[3] + x[7]];
                (t[0] + t[1]) + (t[2] + t[3])
            }
        }
    }
}

/// Keys widened to f32 per block.
const KEY_BLOCK: usize = 32;

/// Scratch buffers reused across calls.
#[derive(Default)]
pub struct AttnScratch {
    qh: Vec<f32>,
    kf: Vec<f32>,
    scores: Vec<f32>,
    lanes: Vec<f32>,
}

/// Attend queries `q` (`n_q × head_dim`, row `i` at position `query_pos[i]`) over `segments`.
/// Writes the normalised output to `out` (`n_q × head_dim`) and the natural-log log-sum-exp
/// of the scaled scores to `lse` (`-inf` for a query that saw no key; its output is zero).
#[allow(clippy::too_many_arguments)]
pub fn attend(
    q: &[f32],
    query_pos: &[usize],
    segments: &[KvSegment],
    head_dim: usize,
    scale: f32,
    order: ReduceOrder,
    out: &mut [f32],
    lse: &mut [f32],
    scratch: &mut AttnScratch,
) {
    let simd = level() == Level::Avx2 && head_dim % 8 == 0;
    attend_impl(
        q, query_pos, segments, head_dim, scale, order, out, lse, scratch, simd,
    )
}

/// The scalar reference of [`attend`]: same operations in the same order, no SIMD.
#[allow(clippy::too_many_arguments)]
pub fn attend_scalar(
    q: &[f32],
    query_pos: &[usize],
    segments: &[KvSegment],
    head_dim: usize,
    scale: f32,
    order: ReduceOrder,
    out: &mut [f32],
    lse: &mut [f32],
    scratch: &mut AttnScratch,
) {
    attend_impl(
        q, query_pos, segments, head_dim, scale, order, out, lse, scratch, false,
    )
}

/// Visits the keys of `segments` in blocks of at most [`KEY_BLOCK`], widened to f32:
/// `f(first key index, first absolute position, rows)`.
fn for_blocks(
    segments: &[KvSegment],
    d: usize,
    last_pos: usize,
    values: bool,
    buf: &mut Vec<f32>,
    mut f: impl FnMut(usize, usize, &[f32]),
) {
    let mut index = 0;
    for seg in segments {
        assert_eq!(
            seg.keys.len(),
            seg.values.len(),
            "segment keys and values differ in length"
        );
        let src = if values { seg.values } else { seg.keys };
        let len = src.len() / d;
        let mut j0 = 0;
        while j0 < len && seg.first_pos + j0 <= last_pos {
            let nb = KEY_BLOCK.min(len - j0);
            buf.resize(nb * d, 0.0);
            widen(&src[j0 * d..(j0 + nb) * d], buf);
            f(index + j0, seg.first_pos + j0, buf);
            j0 += nb;
        }
        index += len;
    }
}

#[allow(clippy::too_many_arguments)]
fn attend_impl(
    q: &[f32],
    query_pos: &[usize],
    segments: &[KvSegment],
    d: usize,
    scale: f32,
    order: ReduceOrder,
    out: &mut [f32],
    lse: &mut [f32],
    scratch: &mut AttnScratch,
    simd: bool,
) {
    let n_q = query_pos.len();
    assert!(
        q.len() == n_q * d && out.len() == n_q * d && lse.len() == n_q,
        "attention buffer sizes"
    );
    let last_pos = query_pos.iter().copied().max().unwrap_or(0);
    let n_keys: usize = segments.iter().map(|s| s.keys.len() / d).sum();
    let lanes = order.lanes();
    // Rows padded to whole lanes; masked and padding entries stay -inf (weight exactly 0).
    let row = n_keys.div_ceil(lanes).max(1) * lanes;
    let AttnScratch {
        qh,
        kf,
        scores,
        lanes: acc,
    } = scratch;
    qh.clear();
    qh.extend(q.iter().map(|&x| f16::from_f32(x).to_f32()));
    scores.clear();
    scores.resize(n_q * row, f32::NEG_INFINITY);

    // Pass 1: scaled scores of every visible key.
    for_blocks(segments, d, last_pos, false, kf, |j0, p0, kb| {
        for i in 0..n_q {
            let visible = query_pos[i]
                .saturating_add(1)
                .saturating_sub(p0)
                .min(kb.len() / d);
            let qi = &qh[i * d..(i + 1) * d];
            let s = &mut scores[i * row + j0..i * row + j0 + visible];
            for (r, sr) in s.iter_mut().enumerate() {
                *sr = dot(qi, &kb[r * d..(r + 1) * d], order, simd) * scale;
            }
        }
    });

    // Softmax per query: weights rounded to f16 as llama.cpp feeds them to p·v.
    for i in 0..n_q {
        let s = &mut scores[i * row..(i + 1) * row];
        let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if max == f32::NEG_INFINITY {
            s.fill(0.0);
            lse[i] = f32::NEG_INFINITY;
            continue;
        }
        let sum = if simd {
            exp_sub_sum(s, max)
        } else {
            exp_sub_sum_scalar(s, max)
        };
        let inv = (1.0 / sum) as f32;
        for p in s.iter_mut() {
            *p = f16::from_f32(*p * inv).to_f32();
        }
        lse[i] = max + (sum.ln() as f32);
    }

    // Pass 2: per-lane partial sums of p·v, reduced in the kernel's order.
    acc.clear();
    acc.resize(n_q * lanes * d, 0.0);
    for_blocks(segments, d, last_pos, true, kf, |j0, _p0, vb| {
        for i in 0..n_q {
            let p = &scores[i * row + j0..i * row + j0 + vb.len() / d];
            let state = &mut acc[i * lanes * d..(i + 1) * lanes * d];
            for (r, &pr) in p.iter().enumerate() {
                if pr != 0.0 {
                    let lane = (j0 + r) % lanes;
                    axpy(
                        &mut state[lane * d..(lane + 1) * d],
                        pr,
                        &vb[r * d..(r + 1) * d],
                        simd,
                    );
                }
            }
        }
    });
    let mut col = vec![0.0f32; lanes];
    for i in 0..n_q {
        let state = &acc[i * lanes * d..(i + 1) * lanes * d];
        for c in 0..d {
            for (l, v) in col.iter_mut().enumerate() {
                *v = state[l * d + c];
            }
            out[i * d + c] = order.reduce(&col);
        }
    }
}

fn widen(src: &[f16], dst: &mut [f32]) {
    use half::slice::HalfFloatSliceExt;
    // half picks F16C at run time for slice conversion.
    src.convert_to_f32_slice(dst);
}

/// `q·k` summed in `order`.
fn dot(q: &[f32], k: &[f32], order: ReduceOrder, simd: bool) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` is only true when AVX2+FMA were detected and d % 8 == 0; q and k
        // both hold d values.
        return unsafe {
            match order {
                ReduceOrder::Gemm => avx2::dot_gemm(q, k),
                ReduceOrder::Gemv => avx2::dot_gemv(q, k),
            }
        };
    }
    let _ = simd;
    let d = q.len();
    match order {
        ReduceOrder::Gemm => {
            let mut acc = [0.0f32; 8];
            for c in (0..d - d % 8).step_by(8) {
                for l in 0..8 {
                    acc[l] = k[c + l].mul_add(q[c + l], acc[l]);
                }
            }
            let mut s = hsum8_scalar(&acc);
            for c in d - d % 8..d {
                s = k[c].mul_add(q[c], s);
            }
            s
        }
        ReduceOrder::Gemv => {
            let whole = d - d % 32;
            let mut acc = [0.0f32; 32];
            for c in (0..whole).step_by(32) {
                for l in 0..32 {
                    acc[l] = k[c + l].mul_add(q[c + l], acc[l]);
                }
            }
            let mut s = ReduceOrder::Gemv.reduce(&acc) as f64;
            for c in whole..d {
                s += (k[c] * q[c]) as f64;
            }
            s as f32
        }
    }
}

/// `y += a · x`.
fn axpy(y: &mut [f32], a: f32, x: &[f32], simd: bool) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: AVX2+FMA detected; y and x hold the same multiple-of-8 length.
        unsafe { avx2::axpy(y, a, x) };
        return;
    }
    let _ = simd;
    for (yv, &xv) in y.iter_mut().zip(x) {
        *yv = xv.mul_add(a, *yv);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_gemm(q: &[f32], k: &[f32]) -> f32 {
        let d = q.len();
        debug_assert!(k.len() == d && d % 8 == 0);
        let mut acc = _mm256_setzero_ps();
        let mut c = 0;
        while c < d {
            acc = _mm256_fmadd_ps(
                _mm256_loadu_ps(k.as_ptr().add(c)),
                _mm256_loadu_ps(q.as_ptr().add(c)),
                acc,
            );
            c += 8;
        }
        crate::quant::avx2_util::hsum_ps(acc)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_gemv(q: &[f32], k: &[f32]) -> f32 {
        let d = q.len();
        debug_assert!(k.len() == d && d % 8 == 0);
        let whole = d - d % 32;
        let mut a = [_mm256_setzero_ps(); 4];
        let mut c = 0;
        while c < whole {
            for (r, ar) in a.iter_mut().enumerate() {
                let o = c + 8 * r;
                *ar = _mm256_fmadd_ps(
                    _mm256_loadu_ps(k.as_ptr().add(o)),
                    _mm256_loadu_ps(q.as_ptr().add(o)),
                    *ar,
                );
            }
            c += 32;
        }
        let x = _mm256_add_ps(_mm256_add_ps(a[0], a[2]), _mm256_add_ps(a[1], a[3]));
        let t0 = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
        let t1 = _mm_hadd_ps(t0, t0);
        let mut s = _mm_cvtss_f32(_mm_hadd_ps(t1, t1)) as f64;
        for i in whole..d {
            s += (*k.get_unchecked(i) * *q.get_unchecked(i)) as f64;
        }
        s as f32
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
        let n = y.len();
        debug_assert!(x.len() == n && n % 8 == 0);
        let av = _mm256_set1_ps(a);
        let mut c = 0;
        while c < n {
            let yp = y.as_mut_ptr().add(c);
            _mm256_storeu_ps(
                yp,
                _mm256_fmadd_ps(_mm256_loadu_ps(x.as_ptr().add(c)), av, _mm256_loadu_ps(yp)),
            );
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
