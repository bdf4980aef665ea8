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
    /// The keys, `rows × head_dim` values.
    pub keys: &'a [f16],
    /// The values, as many as the keys.
    pub values: &'a [f16],
    /// Absolute position of the first row.
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
    acc: Vec<f32>,
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
    let simd = level() == Level::Avx2 && head_dim.is_multiple_of(8);
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

/// Of `len` rows whose first is at position `first_pos`, how many lie at or before
/// `last_pos` (the rows a query at `last_pos` sees).
fn visible_rows(first_pos: usize, len: usize, last_pos: usize) -> usize {
    last_pos
        .saturating_add(1)
        .saturating_sub(first_pos)
        .min(len)
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
        acc: pv_acc,
    } = scratch;
    qh.clear();
    qh.extend_from_slice(q);
    round_to_f16(qh);
    scores.clear();
    scores.resize(n_q * row, f32::NEG_INFINITY);

    #[cfg(target_arch = "x86_64")]
    if simd && d.is_multiple_of(order.lanes()) && n_q <= fused::MAX_QUERIES && d <= fused::MAX_DIM {
        fused::attend(
            qh, query_pos, segments, d, scale, order, row, scores, pv_acc, out, lse,
        );
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if simd && d.is_multiple_of(order.lanes()) {
        tiled::attend(
            qh, query_pos, segments, d, scale, order, row, scores, kf, acc, pv_acc, out, lse,
        );
        return;
    }

    // Pass 1: scaled scores of every visible key.
    for_blocks(segments, d, last_pos, false, kf, |j0, p0, kb| {
        for i in 0..n_q {
            let visible = query_pos[i]
                .saturating_add(1)
                .saturating_sub(p0)
                .min(kb.len() / d);
            let qi = &qh[i * d..(i + 1) * d];
            let s = &mut scores[i * row + j0..i * row + j0 + visible];
            block_scores(qi, kb, scale, order, simd, s);
        }
    });

    softmax_rows(scores, row, lse, simd);

    // Pass 2: per-lane partial sums of p·v, reduced in the kernel's order.
    acc.clear();
    acc.resize(n_q * lanes * d, 0.0);
    for_blocks(segments, d, last_pos, true, kf, |j0, _p0, vb| {
        for i in 0..n_q {
            let p = &scores[i * row + j0..i * row + j0 + vb.len() / d];
            let state = &mut acc[i * lanes * d..(i + 1) * lanes * d];
            block_accumulate(p, vb, j0, lanes, simd, state);
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

/// Round every value to the nearest f16 (ties to even), keeping it as f32.
fn round_to_f16(x: &mut [f32]) {
    use half::slice::HalfFloatSliceExt;
    // half converts slices with F16C when the CPU has it (round-to-nearest-even either way).
    let mut tmp = [half::f16::ZERO; 64];
    for chunk in x.chunks_mut(64) {
        let t = &mut tmp[..chunk.len()];
        t.convert_from_f32_slice(chunk);
        t.convert_to_f32_slice(chunk);
    }
}

/// Softmax of each query's row of scores in place (`lse.len()` rows of `row`): the weights
/// rounded to f16 as llama.cpp feeds them to p·v, the log-sum-exp to `lse` (`-inf`, and a
/// row of zeros, for a query that saw no key). `simd` picks the AVX2 exponential, which
/// computes the same polynomial as the scalar one.
fn softmax_rows(scores: &mut [f32], row: usize, lse: &mut [f32], simd: bool) {
    for (i, l) in lse.iter_mut().enumerate() {
        let s = &mut scores[i * row..(i + 1) * row];
        let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if max == f32::NEG_INFINITY {
            s.fill(0.0);
            *l = f32::NEG_INFINITY;
            continue;
        }
        let sum = if simd {
            exp_sub_sum(s, max)
        } else {
            exp_sub_sum_scalar(s, max)
        };
        let inv = (1.0 / sum) as f32;
        s.iter_mut().for_each(|p| *p *= inv);
        round_to_f16(s);
        *l = max + (sum.ln() as f32);
    }
}

/// `s[r] = scale · (q · k_r)` for the first `s.len()` rows of `kb`, summed in `order`.
fn block_scores(q: &[f32], kb: &[f32], scale: f32, order: ReduceOrder, simd: bool, s: &mut [f32]) {
    let d = q.len();
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` is only true when AVX2+FMA were detected and d % 8 == 0; kb holds
        // at least s.len() rows of d values (checked inside).
        unsafe { avx2::block_scores(q, kb, scale, order, s) };
        return;
    }
    let _ = simd;
    for (r, sr) in s.iter_mut().enumerate() {
        *sr = dot_scalar(q, &kb[r * d..(r + 1) * d], order) * scale;
    }
}

/// Adds `p[r] · v_r` to lane `(j0 + r) % lanes` of `state` (`lanes × d`).
fn block_accumulate(p: &[f32], vb: &[f32], j0: usize, lanes: usize, simd: bool, state: &mut [f32]) {
    let d = state.len() / lanes;
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: AVX2+FMA detected, d % 8 == 0; vb holds p.len() rows (checked inside).
        unsafe { avx2::block_accumulate(p, vb, j0, lanes, state) };
        return;
    }
    let _ = simd;
    for (r, &pr) in p.iter().enumerate() {
        if pr != 0.0 {
            let lane = (j0 + r) % lanes;
            for (y, &x) in state[lane * d..(lane + 1) * d]
                .iter_mut()
                .zip(&vb[r * d..(r + 1) * d])
            {
                *y = x.mul_add(pr, *y);
            }
        }
    }
}

/// `q·k` summed in `order`, scalar.
fn dot_scalar(q: &[f32], k: &[f32], order: ReduceOrder) -> f32 {
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

/// The SIMD path as register-tiled matrix products (the shape llama.cpp's batched kernel
/// uses): all visible keys widened to f32 once per call, values transposed so that `p·v`
/// streams contiguous rows, and each output accumulated in registers.
/// Decode: a few queries (one GQA group) over f16 keys and values read in place. Each key
/// and value row is converted with F16C into registers once for all the group's queries:
/// no widened copy of the context, no transpose. Scores sum in the order's lanes as
/// [`dot_scalar`] does, and `p·v` goes to the lane of its key as [`block_accumulate`]
/// does, so the results equal the scalar reference bit for bit.
#[cfg(target_arch = "x86_64")]
mod fused {
    use super::{visible_rows, KvSegment, ReduceOrder};
    use std::arch::x86_64::*;

    /// Most queries attended this way (larger tiles go through the tiled kernel, which
    /// reuses each widened key across its queries).
    pub const MAX_QUERIES: usize = 8;
    /// Widest head this way (a value row fits in 32 registers' worth of stack).
    pub const MAX_DIM: usize = 256;

    #[allow(clippy::too_many_arguments)]
    pub fn attend(
        qh: &[f32],
        query_pos: &[usize],
        segments: &[KvSegment],
        d: usize,
        scale: f32,
        order: ReduceOrder,
        row: usize,
        scores: &mut [f32],
        state: &mut Vec<f32>,
        out: &mut [f32],
        lse: &mut [f32],
    ) {
        let n_q = query_pos.len();
        assert!(
            n_q <= MAX_QUERIES
                && d <= MAX_DIM
                && d.is_multiple_of(order.lanes())
                && qh.len() >= n_q * d
                && scores.len() >= n_q * row
                && out.len() >= n_q * d
        );
        let last_pos = query_pos.iter().copied().max().unwrap_or(0);
        // Pass 1: scores of every visible key.
        let mut index = 0;
        for seg in segments {
            assert_eq!(
                seg.keys.len(),
                seg.values.len(),
                "segment keys and values differ in length"
            );
            let len = seg.keys.len() / d;
            let visible = visible_rows(seg.first_pos, len, last_pos);
            assert!(index + len <= row, "attention rows");
            let mut dots = [0.0f32; MAX_QUERIES];
            for r in 0..visible {
                let pos = seg.first_pos + r;
                let k = &seg.keys[r * d..(r + 1) * d];
                // SAFETY: F16C, AVX2 and FMA were detected by the caller; k holds d values and
                // qh n_q rows of d, d a multiple of the order's lanes; n_q <= MAX_QUERIES.
                unsafe { dots_f16(&qh[..n_q * d], k, order, &mut dots[..n_q]) };
                for i in 0..n_q {
                    if pos <= query_pos[i] {
                        scores[i * row + index + r] = dots[i] * scale;
                    }
                }
            }
            index += len;
        }
        super::softmax_rows(scores, row, lse, true);
        // Pass 2: p·v into per-lane sums, lane = key index mod lanes.
        let lanes = order.lanes();
        state.clear();
        state.resize(n_q * lanes * d, 0.0);
        let mut index = 0;
        for seg in segments {
            let len = seg.values.len() / d;
            let visible = visible_rows(seg.first_pos, len, last_pos);
            for r in 0..visible {
                let j = index + r;
                let p: [f32; MAX_QUERIES] =
                    std::array::from_fn(|i| if i < n_q { scores[i * row + j] } else { 0.0 });
                // SAFETY: F16C, AVX2 and FMA detected by the caller; the value row holds d
                // values (a multiple of 8, at most MAX_DIM); every state row (i, lane) holds
                // d values inside state (n_q × lanes × d).
                unsafe {
                    axpy_f16(
                        &seg.values[r * d..(r + 1) * d],
                        &p[..n_q],
                        state,
                        (lanes, j % lanes),
                        d,
                    )
                };
            }
            index += len;
        }
        let mut col = [0.0f32; 32];
        for i in 0..n_q {
            for c in 0..d {
                for (l, v) in col[..lanes].iter_mut().enumerate() {
                    *v = state[(i * lanes + l) * d + c];
                }
                out[i * d + c] = order.reduce(&col[..lanes]);
            }
        }
    }

    /// `out[i] = q_i · k` for the `out.len()` query rows of `q`, with `k` in f16 converted
    /// once for all of them, each summed in the order's lanes.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C; `k` must hold `d` values, a multiple of the
    /// order's lanes, and `q` `out.len() <= MAX_QUERIES` rows of `d` (checked in debug
    /// builds only).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dots_f16(q: &[f32], k: &[half::f16], order: ReduceOrder, out: &mut [f32]) {
        // SAFETY: as this function's contract; the group size picks the register tile.
        unsafe {
            match (out.len(), order) {
                (1, ReduceOrder::Gemv) => dots_n::<1, 4>(q, k, out),
                (2, ReduceOrder::Gemv) => dots_n::<2, 4>(q, k, out),
                (3, ReduceOrder::Gemv) => dots_n::<3, 4>(q, k, out),
                (4, ReduceOrder::Gemv) => dots_n::<4, 4>(q, k, out),
                (_, ReduceOrder::Gemv) => dots_n::<8, 4>(q, k, out),
                (1, ReduceOrder::Gemm) => dots_n::<1, 1>(q, k, out),
                (2, ReduceOrder::Gemm) => dots_n::<2, 1>(q, k, out),
                (3, ReduceOrder::Gemm) => dots_n::<3, 1>(q, k, out),
                (4, ReduceOrder::Gemm) => dots_n::<4, 1>(q, k, out),
                (_, ReduceOrder::Gemm) => dots_n::<8, 1>(q, k, out),
            }
        }
    }

    /// [`dots_f16`] for up to `N` queries with `G` groups of 8 lanes (1: GEMM order, 4: GEMV
    /// order); queries beyond `out.len()` are skipped.
    ///
    /// # Safety
    /// As [`dots_f16`], with `out.len() <= N` and `d` a multiple of `8·G`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dots_n<const N: usize, const G: usize>(q: &[f32], k: &[half::f16], out: &mut [f32]) {
        let d = k.len();
        let n = out.len();
        debug_assert!(n <= N && q.len() >= n * d && d.is_multiple_of(8 * G));
        let (qp, kp) = (q.as_ptr(), k.as_ptr() as *const __m128i);
        let mut acc = [[_mm256_setzero_ps(); G]; N];
        let mut c = 0;
        // SAFETY: every load reads 8 values at offsets below d of k and of a query row i < n.
        unsafe {
            while c < d {
                for g in 0..G {
                    let o = c + 8 * g;
                    let kv = _mm256_cvtph_ps(_mm_loadu_si128(kp.add(o / 8)));
                    for (i, a) in acc.iter_mut().enumerate().take(n) {
                        a[g] = _mm256_fmadd_ps(kv, _mm256_loadu_ps(qp.add(i * d + o)), a[g]);
                    }
                }
                c += 8 * G;
            }
            for (o, a) in out.iter_mut().zip(&acc) {
                *o = if G == 1 {
                    crate::quant::avx2_util::hsum_ps(a[0])
                } else {
                    super::tiled::reduce_gemv([a[0], a[1 % G], a[2 % G], a[3 % G]])
                };
            }
        }
    }

    /// For every query `i` with `p[i] != 0`: state row (i, lane) += p[i] · v, with `v` in
    /// f16 converted once for all queries.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C; `v` must hold `d` values, a multiple of 8 and
    /// at most [`MAX_DIM`]; `state` must hold `p.len() × lanes × d` values and `lane < lanes`
    /// (checked in debug builds only).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn axpy_f16(
        v: &[half::f16],
        p: &[f32],
        state: &mut [f32],
        (lanes, lane): (usize, usize),
        d: usize,
    ) {
        debug_assert!(
            v.len() == d
                && d.is_multiple_of(8)
                && d <= MAX_DIM
                && lane < lanes
                && state.len() >= p.len() * lanes * d
        );
        let vp = v.as_ptr() as *const __m128i;
        for c in 0..d / 8 {
            // SAFETY: c < d / 8 reads values 8c..8c + 8 of v; every store is at
            // (i·lanes + lane)·d + 8c + 8 <= state.len() for i < p.len().
            unsafe {
                let x = _mm256_cvtph_ps(_mm_loadu_si128(vp.add(c)));
                for (i, &pi) in p.iter().enumerate() {
                    if pi != 0.0 {
                        let y = state.as_mut_ptr().add((i * lanes + lane) * d + 8 * c);
                        _mm256_storeu_ps(
                            y,
                            _mm256_fmadd_ps(x, _mm256_set1_ps(pi), _mm256_loadu_ps(y)),
                        );
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop, clippy::too_many_arguments)] // fixed-size register tiles
mod tiled {
    use super::{visible_rows, widen, KvSegment, ReduceOrder};
    use std::arch::x86_64::*;

    /// Keys widened at a time: the chunk's f32 keys (or transposed values) stay in L2
    /// (128 KiB at head_dim 64) instead of the whole context's going through RAM twice. A
    /// multiple of every order's lanes, so the per-lane sums of p·v, carried from chunk to
    /// chunk, add the same terms in the same order as one pass over all keys.
    const CHUNK: usize = 512;

    /// Where the next chunk starts: a segment and a row in it.
    #[derive(Clone, Copy, Default)]
    struct Cursor {
        seg: usize,
        row: usize,
    }

    /// Fill rows `0..n` of a chunk from `segments` at `at`: per row, `put(chunk row, segment,
    /// segment row)` if the row is visible (position at most `last_pos`), else `key_pos` stays
    /// `usize::MAX` and the caller's zeroed buffer row is left as it is. Returns the cursor of
    /// the next chunk.
    fn fill_chunk(
        segments: &[KvSegment],
        d: usize,
        last_pos: usize,
        mut at: Cursor,
        n: usize,
        key_pos: &mut [usize],
        mut put: impl FnMut(usize, &KvSegment, usize, usize),
    ) -> Cursor {
        let mut filled = 0;
        while filled < n && at.seg < segments.len() {
            let seg = &segments[at.seg];
            let len = seg.keys.len() / d;
            let take = (len - at.row).min(n - filled);
            let visible = visible_rows(seg.first_pos + at.row, take, last_pos);
            if visible > 0 {
                put(filled, seg, at.row, visible);
                for r in 0..visible {
                    key_pos[filled + r] = seg.first_pos + at.row + r;
                }
            }
            filled += take;
            at.row += take;
            if at.row == len {
                at = Cursor {
                    seg: at.seg + 1,
                    row: 0,
                };
            }
        }
        at
    }

    #[allow(clippy::too_many_arguments)]
    pub fn attend(
        qh: &[f32],
        query_pos: &[usize],
        segments: &[KvSegment],
        d: usize,
        scale: f32,
        order: ReduceOrder,
        row: usize,
        scores: &mut [f32],
        kf: &mut Vec<f32>,
        vt: &mut Vec<f32>,
        acc: &mut Vec<f32>,
        out: &mut [f32],
        lse: &mut [f32],
    ) {
        let n_q = query_pos.len();
        let last_pos = query_pos.iter().copied().max().unwrap_or(0);
        for seg in segments {
            assert_eq!(
                seg.keys.len(),
                seg.values.len(),
                "segment keys and values differ in length"
            );
        }
        // Keys up to the last visible one, in whole lanes.
        let mut used = 0;
        let mut index = 0;
        for seg in segments {
            let len = seg.keys.len() / d;
            let visible = visible_rows(seg.first_pos, len, last_pos);
            if visible > 0 {
                used = index + visible;
            }
            index += len;
        }
        let lanes = order.lanes();
        let used = used.div_ceil(lanes) * lanes;
        assert!(used <= row, "attention rows");
        let mut key_pos = [usize::MAX; CHUNK];
        // Pass 1, chunk by chunk: widen the keys, score them.
        let mut at = Cursor::default();
        let mut c0 = 0;
        while c0 < used {
            let n = CHUNK.min(used - c0);
            kf.clear();
            kf.resize(n * d, 0.0);
            key_pos.fill(usize::MAX);
            at = fill_chunk(
                segments,
                d,
                last_pos,
                at,
                n,
                &mut key_pos,
                |r, seg, sr, v| widen(&seg.keys[sr * d..(sr + v) * d], &mut kf[r * d..(r + v) * d]),
            );
            // SAFETY: AVX2+FMA were detected by the caller, which also checked that d is a
            // multiple of the order's lanes; scores_pass asserts the buffer sizes (qh:
            // n_q×d, kf: n×d, scores: n_q×row) and that c0 + n <= row.
            unsafe {
                scores_pass(
                    qh,
                    kf,
                    d,
                    n_q,
                    (c0, n),
                    row,
                    scale,
                    order,
                    &key_pos,
                    query_pos,
                    scores,
                )
            };
            c0 += n;
        }
        super::softmax_rows(scores, row, lse, true);
        // Pass 2, chunk by chunk: widen the values transposed, add p·v to per-lane sums.
        let g = lanes / 8;
        acc.clear();
        acc.resize(n_q * d * lanes, 0.0);
        let mut at = Cursor::default();
        let mut c0 = 0;
        while c0 < used {
            let n = CHUNK.min(used - c0);
            vt.clear();
            vt.resize(d * n, 0.0);
            at = fill_chunk(
                segments,
                d,
                last_pos,
                at,
                n,
                &mut key_pos,
                |r, seg, sr, v| {
                    // SAFETY: F16C and AVX2 were detected by the caller; d % 8 == 0 (a multiple
                    // of the reduce order's lanes); the segment holds rows sr..sr + v, and vt
                    // holds d rows of n >= r + v values.
                    unsafe { widen_transpose(&seg.values[sr * d..(sr + v) * d], d, vt, n, r) }
                },
            );
            // SAFETY: AVX2+FMA detected by the caller; pv_chunk asserts the sizes of scores
            // (n_q×row with c0 + n <= row), vt (d×n) and acc (n_q×d×lanes); n is a multiple
            // of the order's lanes (CHUNK and `used` are).
            unsafe { pv_chunk(scores, row, c0, vt, n, d, n_q, g, acc) };
            c0 += n;
        }
        // SAFETY: AVX2+FMA detected by the caller; reduce_lanes asserts the sizes.
        unsafe { reduce_lanes(acc, n_q, d, g, out) };
    }

    /// Widen value rows (`d` f16 each) and store them transposed: value `(r, c)` goes to
    /// `vt[c * row + index + r]`. Whole 8×8 tiles go through registers (the scalar strip
    /// transpose this replaces was about a tenth of a sparse decode step); the last rows
    /// one value at a time. Bit-identical: it only moves widened values.
    ///
    /// # Safety
    /// The CPU must support AVX2 and F16C; `d` must be a multiple of 8 and `values` whole
    /// rows of `d`; `vt` must hold `d` rows of `row` values with `index + values.len() / d
    /// <= row` (the stores are unchecked).
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn widen_transpose(
        values: &[half::f16],
        d: usize,
        vt: &mut [f32],
        row: usize,
        index: usize,
    ) {
        let visible = values.len() / d;
        let full = visible / 8 * 8;
        let src = values.as_ptr();
        let dst = vt.as_mut_ptr();
        let mut r0 = 0;
        while r0 < full {
            let mut c0 = 0;
            while c0 < d {
                // SAFETY: r0 + 8 <= visible and c0 + 8 <= d (d % 8 == 0) bound the loads; as the
                // caller guarantees, the stores land in rows c0..c0 + 8 of vt at columns index +
                // r0..index + r0 + 8.
                unsafe {
                    let r: [__m256; 8] = std::array::from_fn(|k| {
                        _mm256_cvtph_ps(_mm_loadu_si128(
                            src.add((r0 + k) * d + c0) as *const __m128i
                        ))
                    });
                    let t0 = _mm256_unpacklo_ps(r[0], r[1]);
                    let t1 = _mm256_unpackhi_ps(r[0], r[1]);
                    let t2 = _mm256_unpacklo_ps(r[2], r[3]);
                    let t3 = _mm256_unpackhi_ps(r[2], r[3]);
                    let t4 = _mm256_unpacklo_ps(r[4], r[5]);
                    let t5 = _mm256_unpackhi_ps(r[4], r[5]);
                    let t6 = _mm256_unpacklo_ps(r[6], r[7]);
                    let t7 = _mm256_unpackhi_ps(r[6], r[7]);
                    let s0 = _mm256_shuffle_ps(t0, t2, 0x44);
                    let s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
                    let s2 = _mm256_shuffle_ps(t1, t3, 0x44);
                    let s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
                    let s4 = _mm256_shuffle_ps(t4, t6, 0x44);
                    let s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
                    let s6 = _mm256_shuffle_ps(t5, t7, 0x44);
                    let s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
                    let cols = [
                        _mm256_permute2f128_ps(s0, s4, 0x20),
                        _mm256_permute2f128_ps(s1, s5, 0x20),
                        _mm256_permute2f128_ps(s2, s6, 0x20),
                        _mm256_permute2f128_ps(s3, s7, 0x20),
                        _mm256_permute2f128_ps(s0, s4, 0x31),
                        _mm256_permute2f128_ps(s1, s5, 0x31),
                        _mm256_permute2f128_ps(s2, s6, 0x31),
                        _mm256_permute2f128_ps(s3, s7, 0x31),
                    ];
                    for (k, c) in cols.iter().enumerate() {
                        _mm256_storeu_ps(dst.add((c0 + k) * row + index + r0), *c);
                    }
                }
                c0 += 8;
            }
            r0 += 8;
        }
        for r in full..visible {
            for c in 0..d {
                vt[c * row + index + r] = values[r * d + c].to_f32();
            }
        }
    }

    /// Horizontal sum in the GEMV order: `(a0+a2)+(a1+a3)` lane-wise, then pairwise.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn reduce_gemv(a: [__m256; 4]) -> f32 {
        let x = _mm256_add_ps(_mm256_add_ps(a[0], a[2]), _mm256_add_ps(a[1], a[3]));
        let t0 = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
        let t1 = _mm_hadd_ps(t0, t0);
        _mm_cvtss_f32(_mm_hadd_ps(t1, t1))
    }

    /// `RM` rows of `a` against `RN` rows of `b` (`len` values each, contiguous), summed with
    /// `G` groups of 8 lanes (1: GEMM order, 4: GEMV order). Returns `[RM][RN]` results.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; `len` must be a multiple of `8 * G` and every
    /// pointer of `a` and `b` must point at `len` readable f32 (no alignment needed).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile<const RM: usize, const RN: usize, const G: usize>(
        a: [*const f32; RM],
        b: [*const f32; RN],
        len: usize,
    ) -> [[f32; RN]; RM] {
        let mut acc = [[[_mm256_setzero_ps(); G]; RN]; RM];
        let mut j = 0;
        while j < len {
            for g in 0..G {
                let o = j + 8 * g;
                // SAFETY: o + 8 <= len (len is a multiple of 8·G and j < len), and every row
                // holds len values (the caller's guarantee).
                unsafe {
                    let bv: [__m256; RN] = std::array::from_fn(|n| _mm256_loadu_ps(b[n].add(o)));
                    for m in 0..RM {
                        let av = _mm256_loadu_ps(a[m].add(o));
                        for n in 0..RN {
                            acc[m][n][g] = _mm256_fmadd_ps(bv[n], av, acc[m][n][g]);
                        }
                    }
                }
            }
            j += 8 * G;
        }
        let mut r = [[0.0f32; RN]; RM];
        for m in 0..RM {
            for n in 0..RN {
                // SAFETY: hsum_ps and reduce_gemv need the AVX2 and FMA this function has.
                r[m][n] = unsafe {
                    if G == 1 {
                        crate::quant::avx2_util::hsum_ps(acc[m][n][0])
                    } else {
                        reduce_gemv([
                            acc[m][n][0],
                            acc[m][n][1 % G],
                            acc[m][n][2 % G],
                            acc[m][n][3 % G],
                        ])
                    }
                };
            }
        }
        r
    }

    /// Apply `tile` over an `rows_a × rows_b` grid with `RM×RN` blocks and 1×1 edges.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; `len` must be a multiple of `8 * G`; for every
    /// `m < rows_a`, `a + m * a_stride` and for every `n < rows_b`, `b + n * b_stride` must
    /// point at `len` readable f32.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn grid<const RM: usize, const RN: usize, const G: usize>(
        a: *const f32,
        a_stride: usize,
        rows_a: usize,
        b: *const f32,
        b_stride: usize,
        rows_b: usize,
        len: usize,
        mut put: impl FnMut(usize, usize, f32),
    ) {
        let mut m0 = 0;
        while m0 < rows_a {
            let full_m = m0 + RM <= rows_a;
            let mut n0 = 0;
            while n0 < rows_b {
                // SAFETY: every row offset below is below rows_a (m0 + m < rows_a when full_m,
                // else m < rows_a) or rows_b (n0 + n < rows_b), so each pointer is one the
                // caller guarantees; len is passed through unchanged.
                unsafe {
                    if full_m && n0 + RN <= rows_b {
                        let r = tile::<RM, RN, G>(
                            std::array::from_fn(|m| a.add((m0 + m) * a_stride)),
                            std::array::from_fn(|n| b.add((n0 + n) * b_stride)),
                            len,
                        );
                        for m in 0..RM {
                            for n in 0..RN {
                                put(m0 + m, n0 + n, r[m][n]);
                            }
                        }
                        n0 += RN;
                    } else {
                        for m in m0..(m0 + RM).min(rows_a) {
                            let r =
                                tile::<1, 1, G>([a.add(m * a_stride)], [b.add(n0 * b_stride)], len);
                            put(m, n0, r[0][0]);
                        }
                        n0 += 1;
                    }
                }
            }
            m0 += RM;
        }
    }

    /// `scores[i·row + c0 + j] = scale · (q_i · k_j)` for the query rows of `qh` and the
    /// `n` key rows of a chunk `kf` starting at key `c0`, where key `j` is visible to query
    /// `i` (`key_pos[j] <= query_pos[i]`); other entries are left as they are.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA, and `d` must be a multiple of the order's lanes
    /// (8 for GEMM, 32 for GEMV). The buffer sizes are asserted (a panic, not UB).
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn scores_pass(
        qh: &[f32],
        kf: &[f32],
        d: usize,
        n_q: usize,
        (c0, n): (usize, usize),
        row: usize,
        scale: f32,
        order: ReduceOrder,
        key_pos: &[usize],
        query_pos: &[usize],
        scores: &mut [f32],
    ) {
        assert!(
            qh.len() >= n_q * d
                && kf.len() >= n * d
                && key_pos.len() >= n
                && scores.len() >= n_q * row
                && c0 + n <= row
        );
        let put = |i: usize, j: usize, v: f32| {
            // usize::MAX marks padding and keys beyond every query.
            if key_pos[j] != usize::MAX && key_pos[j] <= query_pos[i] {
                scores[i * row + c0 + j] = v * scale;
            }
        };
        // SAFETY: the assert bounds n_q rows of d in qh and n rows of d in kf; d is a
        // multiple of the order's 8·G (the caller's guarantee); AVX2+FMA as this function.
        unsafe {
            match order {
                ReduceOrder::Gemm => {
                    grid::<2, 4, 1>(qh.as_ptr(), d, n_q, kf.as_ptr(), d, n, d, put)
                }
                ReduceOrder::Gemv => {
                    grid::<1, 2, 4>(qh.as_ptr(), d, n_q, kf.as_ptr(), d, n, d, put)
                }
            }
        }
    }

    /// Add chunk `c0..c0 + n` of p·v to the per-lane sums: for every query `i` and value
    /// column `c`, lane `l` of group `k` of `acc[(i·d + c)·8G ..]` gets `p[i][c0 + j] ·
    /// vt[c][j]` for the `j` with `j % 8G == 8k + l`, in ascending `j`.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA, and `n` must be a multiple of `8·g`. The buffer
    /// sizes are asserted (a panic, not UB).
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn pv_chunk(
        p: &[f32],
        row: usize,
        c0: usize,
        vt: &[f32],
        n: usize,
        d: usize,
        n_q: usize,
        g: usize,
        acc: &mut [f32],
    ) {
        assert!(
            p.len() >= n_q * row
                && c0 + n <= row
                && vt.len() >= d * n
                && acc.len() >= n_q * d * 8 * g
                && n.is_multiple_of(8 * g)
                && (g == 1 || g == 4)
        );
        let pp = p.as_ptr();
        let vp = vt.as_ptr();
        let ap = acc.as_mut_ptr();
        // SAFETY: every query row i < n_q reads p[i·row + c0 ..][..n] and every column c < d
        // reads vt[c·n ..][..n], inside the asserted sizes; acc (i, c) is 8g values at
        // (i·d + c)·8g; n is a multiple of 8g; AVX2+FMA as this function.
        unsafe {
            let q = |i: usize| pp.add(i * row + c0);
            let v = |c: usize| vp.add(c * n);
            let a = |i: usize, c: usize| ap.add((i * d + c) * 8 * g);
            let step = if g == 1 { 4 } else { 1 };
            let mut i0 = 0;
            while i0 < n_q {
                let mut c = 0;
                while c < d {
                    if g == 1 && i0 + 4 <= n_q && c + 2 <= d {
                        fma_tile::<4, 2, 1>(
                            std::array::from_fn(|m| q(i0 + m)),
                            std::array::from_fn(|k| v(c + k)),
                            std::array::from_fn(|m| std::array::from_fn(|k| a(i0 + m, c + k))),
                            n,
                        );
                    } else if g == 4 && c + 2 <= d {
                        fma_tile::<1, 2, 4>(
                            [q(i0)],
                            [v(c), v(c + 1)],
                            [[a(i0, c), a(i0, c + 1)]],
                            n,
                        );
                    } else {
                        for m in i0..(i0 + step).min(n_q) {
                            for k in c..(c + 2).min(d) {
                                if g == 1 {
                                    fma_tile::<1, 1, 1>([q(m)], [v(k)], [[a(m, k)]], n);
                                } else {
                                    fma_tile::<1, 1, 4>([q(m)], [v(k)], [[a(m, k)]], n);
                                }
                            }
                        }
                    }
                    c += 2;
                }
                i0 += step;
            }
        }
    }

    /// For every `m < RM`, `k < RN`: lane `l` of group `j` of the sums at `acc[m][k]` gets
    /// `p_m[t] · v_k[t]` for the `t` with `t % 8G == 8j + l`, in ascending `t`.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; every `p` and `v` pointer must point at `n`
    /// readable f32 and every `acc` pointer at `8G` writable f32 (distinct); `n` must be a
    /// multiple of `8G`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn fma_tile<const RM: usize, const RN: usize, const G: usize>(
        p: [*const f32; RM],
        v: [*const f32; RN],
        acc: [[*mut f32; RN]; RM],
        n: usize,
    ) {
        // SAFETY: the loads and stores stay within the ranges the caller guarantees.
        unsafe {
            let mut s: [[[__m256; G]; RN]; RM] = std::array::from_fn(|m| {
                std::array::from_fn(|k| {
                    std::array::from_fn(|j| _mm256_loadu_ps(acc[m][k].add(8 * j)))
                })
            });
            let mut t = 0;
            while t < n {
                for j in 0..G {
                    let o = t + 8 * j;
                    let vv: [__m256; RN] = std::array::from_fn(|k| _mm256_loadu_ps(v[k].add(o)));
                    for m in 0..RM {
                        let pv = _mm256_loadu_ps(p[m].add(o));
                        for k in 0..RN {
                            s[m][k][j] = _mm256_fmadd_ps(vv[k], pv, s[m][k][j]);
                        }
                    }
                }
                t += 8 * G;
            }
            for m in 0..RM {
                for k in 0..RN {
                    for j in 0..G {
                        _mm256_storeu_ps(acc[m][k].add(8 * j), s[m][k][j]);
                    }
                }
            }
        }
    }

    /// `out[i·d + c]` = the per-lane sums of (i, c) reduced in the order's association.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA. The sizes are asserted.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn reduce_lanes(acc: &[f32], n_q: usize, d: usize, g: usize, out: &mut [f32]) {
        assert!(acc.len() >= n_q * d * 8 * g && out.len() >= n_q * d && (g == 1 || g == 4));
        for (k, o) in out[..n_q * d].iter_mut().enumerate() {
            let a = &acc[k * 8 * g..(k + 1) * 8 * g];
            // SAFETY: a holds 8g values; hsum_ps and reduce_gemv need this function's AVX2+FMA.
            *o = unsafe {
                if g == 1 {
                    crate::quant::avx2_util::hsum_ps(_mm256_loadu_ps(a.as_ptr()))
                } else {
                    reduce_gemv(std::array::from_fn(|j| {
                        _mm256_loadu_ps(a.as_ptr().add(8 * j))
                    }))
                }
            };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// `q·k` in the GEMM order: one 8-lane accumulator, then [`hsum_ps`].
    ///
    /// [`hsum_ps`]: crate::quant::avx2_util::hsum_ps
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; `q.len()` must be a multiple of 8 and `k` must hold
    /// at least `q.len()` values. The lengths are only checked in debug builds.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_gemm(q: &[f32], k: &[f32]) -> f32 {
        let d = q.len();
        debug_assert!(k.len() == d && d.is_multiple_of(8));
        let mut acc = _mm256_setzero_ps();
        let mut c = 0;
        while c < d {
            // SAFETY: c + 8 <= d (d % 8 == 0) and both slices hold d values.
            acc = unsafe {
                _mm256_fmadd_ps(
                    _mm256_loadu_ps(k.as_ptr().add(c)),
                    _mm256_loadu_ps(q.as_ptr().add(c)),
                    acc,
                )
            };
            c += 8;
        }
        // SAFETY: hsum_ps needs the AVX2 and FMA this function has.
        unsafe { crate::quant::avx2_util::hsum_ps(acc) }
    }

    /// `q·k` in the GEMV order: four 8-lane accumulators over 32-wide steps, reduced as
    /// `ReduceOrder::Gemv` does, and the tail added in f64.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA, and `k` must hold at least `q.len()` values. The
    /// length is only checked in debug builds (which also check `q.len() % 8 == 0`).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_gemv(q: &[f32], k: &[f32]) -> f32 {
        let d = q.len();
        debug_assert!(k.len() == d && d.is_multiple_of(8));
        let whole = d - d % 32;
        let mut a = [_mm256_setzero_ps(); 4];
        let mut c = 0;
        while c < whole {
            for (r, ar) in a.iter_mut().enumerate() {
                let o = c + 8 * r;
                // SAFETY: o + 8 <= c + 32 <= whole <= d, and both slices hold d values.
                *ar = unsafe {
                    _mm256_fmadd_ps(
                        _mm256_loadu_ps(k.as_ptr().add(o)),
                        _mm256_loadu_ps(q.as_ptr().add(o)),
                        *ar,
                    )
                };
            }
            c += 32;
        }
        let x = _mm256_add_ps(_mm256_add_ps(a[0], a[2]), _mm256_add_ps(a[1], a[3]));
        let t0 = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
        let t1 = _mm_hadd_ps(t0, t0);
        let mut s = _mm_cvtss_f32(_mm_hadd_ps(t1, t1)) as f64;
        for i in whole..d {
            // SAFETY: i < d and both slices hold d values.
            s += unsafe { *k.get_unchecked(i) * *q.get_unchecked(i) } as f64;
        }
        s as f32
    }

    /// `s[r] = scale · (q · k_r)` for the first `s.len()` rows of `kb`, summed in `order`.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA. The lengths are asserted (a panic, not UB): `kb`
    /// must hold `s.len()` rows of `q.len()` values and `q.len()` must be a multiple of 8.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn block_scores(
        q: &[f32],
        kb: &[f32],
        scale: f32,
        order: super::ReduceOrder,
        s: &mut [f32],
    ) {
        let d = q.len();
        assert!(kb.len() >= s.len() * d && d.is_multiple_of(8));
        for (r, sr) in s.iter_mut().enumerate() {
            // SAFETY: r < s.len() and the assert puts s.len() rows of d in kb; d % 8 == 0 and
            // k holds d values, as dot_gemm and dot_gemv need, with this function's features.
            let v = unsafe {
                let k = kb.get_unchecked(r * d..(r + 1) * d);
                match order {
                    super::ReduceOrder::Gemm => dot_gemm(q, k),
                    super::ReduceOrder::Gemv => dot_gemv(q, k),
                }
            };
            *sr = v * scale;
        }
    }

    /// Adds `p[r] · v_r` to lane `(j0 + r) % lanes` of `state` (`lanes × d`).
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA. The lengths are asserted (a panic, not UB): with
    /// `d = state.len() / lanes`, `state` must hold exactly `lanes × d` values, `d` must be a
    /// multiple of 8 and `vb` must hold `p.len()` rows of `d`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn block_accumulate(
        p: &[f32],
        vb: &[f32],
        j0: usize,
        lanes: usize,
        state: &mut [f32],
    ) {
        let d = state.len() / lanes;
        assert!(vb.len() >= p.len() * d && d.is_multiple_of(8) && state.len() == lanes * d);
        for (r, &pr) in p.iter().enumerate() {
            if pr != 0.0 {
                let lane = (j0 + r) % lanes;
                // SAFETY: lane < lanes and r < p.len() keep both ranges inside state and vb
                // (asserted above); both hold d values, a multiple of 8, as axpy needs with
                // this function's features.
                unsafe {
                    axpy(
                        state.get_unchecked_mut(lane * d..(lane + 1) * d),
                        pr,
                        vb.get_unchecked(r * d..(r + 1) * d),
                    )
                };
            }
        }
    }

    /// `y += a · x`, with one FMA per value.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; `y.len()` must be a multiple of 8 and `x` must hold
    /// at least `y.len()` values. The lengths are only checked in debug builds.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
        let n = y.len();
        debug_assert!(x.len() == n && n.is_multiple_of(8));
        let av = _mm256_set1_ps(a);
        let mut c = 0;
        while c < n {
            // SAFETY: c + 8 <= n (n % 8 == 0) and both slices hold n values.
            unsafe {
                let yp = y.as_mut_ptr().add(c);
                _mm256_storeu_ps(
                    yp,
                    _mm256_fmadd_ps(_mm256_loadu_ps(x.as_ptr().add(c)), av, _mm256_loadu_ps(yp)),
                );
            }
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
