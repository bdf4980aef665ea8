//! Small products over gathered rows of a strided table: a few query rows against the rows
//! `idx[j]` of a table (scores), and a weighted sum of those rows (outputs).
//!
//! The sparse policy estimates the pages a step skips from one summary row per page (mean
//! key, mean value), hundreds of pages per layer and query head group. Hand-written so the
//! products use AVX2+FMA (picked at run time) instead of the SSE2 the portable build allows,
//! and each gathered row is loaded once for all the query rows of the group.

use crate::simd::{level, Level};

/// The rows a gather touches must lie in the table; panics otherwise (a caller's bug).
fn check(table: &[f32], d: usize, stride: usize, offset: usize, idx: &[u32]) {
    let last = idx.iter().copied().max().map_or(0, |m| m as usize);
    assert!(
        d > 0 && (idx.is_empty() || last * stride + offset + d <= table.len()),
        "gather: row {last} (stride {stride}, offset {offset}, width {d}) outside a table of {}",
        table.len()
    );
}

/// `(g, d)` of a call over `n` gathered rows with `per_row` values of g × n (scores or
/// weights) and `per_dim` values of g × d (queries or outputs); panics when they disagree (a
/// caller's bug).
fn shape(what: &str, per_row: usize, per_dim: usize, n: usize) -> (usize, usize) {
    let g = per_row / n;
    let d = per_dim / g.max(1);
    assert!(
        g > 0 && d > 0 && per_row == g * n && per_dim == g * d,
        "{what}: {per_row} values for {n} rows and {per_dim} for their width"
    );
    (g, d)
}

/// Whether the AVX2 kernels take a call of `g` query rows of width `d`.
#[cfg(target_arch = "x86_64")]
fn simd(g: usize, d: usize) -> bool {
    level() == Level::Avx2 && d.is_multiple_of(8) && g <= avx2::MAX_ROWS
}

/// Scalar reference of [`gathered_scores`].
#[allow(clippy::too_many_arguments)]
pub fn gathered_scores_scalar(
    q: &[f32],
    table: &[f32],
    stride: usize,
    offset: usize,
    idx: &[u32],
    scale: f32,
    bias: f32,
    out: &mut [f32],
) {
    let n = idx.len();
    let d = q.len() / (out.len() / n.max(1)).max(1);
    check(table, d, stride, offset, idx);
    for (qi, o) in q.chunks_exact(d).zip(out.chunks_exact_mut(n.max(1))) {
        for (oj, &r) in o.iter_mut().zip(idx) {
            let at = r as usize * stride + offset;
            let s: f32 = qi.iter().zip(&table[at..at + d]).map(|(a, b)| a * b).sum();
            *oj = scale * s + bias;
        }
    }
}

/// `out[i·n + j] = scale · (q_i · row(idx[j])) + bias` for the `g = q.len() / d` query rows
/// `q_i` and the `n = idx.len()` table rows `row(r) = table[r·stride + offset ..][..d]`;
/// `out` holds `g × n` values (so `d = q.len() · n / out.len()`).
#[allow(clippy::too_many_arguments)]
pub fn gathered_scores(
    q: &[f32],
    table: &[f32],
    stride: usize,
    offset: usize,
    idx: &[u32],
    scale: f32,
    bias: f32,
    out: &mut [f32],
) {
    if idx.is_empty() {
        return;
    }
    let (g, d) = shape("gathered_scores", out.len(), q.len(), idx.len());
    check(table, d, stride, offset, idx);
    #[cfg(target_arch = "x86_64")]
    if simd(g, d) {
        // SAFETY: AVX2 and FMA were detected at run time; `check` bounded every gathered
        // row, and `shape` sized q (g × d) and out (g × n).
        unsafe { avx2::gathered_scores(q, d, table, stride, offset, idx, scale, bias, out) };
        return;
    }
    gathered_scores_scalar(q, table, stride, offset, idx, scale, bias, out)
}

/// Scalar reference of [`gathered_sum`].
pub fn gathered_sum_scalar(
    w: &[f32],
    table: &[f32],
    stride: usize,
    offset: usize,
    idx: &[u32],
    out: &mut [f32],
) {
    let n = idx.len().max(1);
    let d = out.len() / (w.len() / n).max(1);
    check(table, d, stride, offset, idx);
    for (wi, o) in w.chunks_exact(n).zip(out.chunks_exact_mut(d)) {
        for (&wj, &r) in wi.iter().zip(idx) {
            let at = r as usize * stride + offset;
            for (a, &v) in o.iter_mut().zip(&table[at..at + d]) {
                *a += wj * v;
            }
        }
    }
}

/// `out_i += Σ_j w[i·n + j] · row(idx[j])` for the `g = w.len() / n` output rows `out_i`
/// (`out` holds `g × d` values) and rows as in [`gathered_scores`].
pub fn gathered_sum(
    w: &[f32],
    table: &[f32],
    stride: usize,
    offset: usize,
    idx: &[u32],
    out: &mut [f32],
) {
    if idx.is_empty() {
        return;
    }
    let (g, d) = shape("gathered_sum", w.len(), out.len(), idx.len());
    check(table, d, stride, offset, idx);
    #[cfg(target_arch = "x86_64")]
    if simd(g, d) {
        // SAFETY: as in gathered_scores; `shape` sized w (g × n) and out (g × d).
        unsafe { avx2::gathered_sum(w, d, table, stride, offset, idx, out) };
        return;
    }
    gathered_sum_scalar(w, table, stride, offset, idx, out)
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// Query rows handled at once (their accumulators stay in registers).
    pub const MAX_ROWS: usize = 4;

    /// The AVX2 version of [`super::gathered_scores`] for query rows of width `d`.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; `d` must be a non-zero multiple of 8; `q` must hold
    /// `g × d` values with `g = q.len() / d <= MAX_ROWS`, `out` `g × idx.len()` values, and
    /// every row `table[r·stride + offset ..][..d]` for `r` in `idx` must lie in `table`.
    /// The reads are unchecked.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn gathered_scores(
        q: &[f32],
        d: usize,
        table: &[f32],
        stride: usize,
        offset: usize,
        idx: &[u32],
        scale: f32,
        bias: f32,
        out: &mut [f32],
    ) {
        let (n, g) = (idx.len(), q.len() / d);
        for (j, &r) in idx.iter().enumerate() {
            // SAFETY: the caller guarantees row r lies in `table`.
            let row = unsafe { table.as_ptr().add(r as usize * stride + offset) };
            let mut acc = [_mm256_setzero_ps(); MAX_ROWS];
            let mut k = 0;
            while k < d {
                // SAFETY: k + 8 <= d (d % 8 == 0); the caller bounded the row and q.
                unsafe {
                    let v = _mm256_loadu_ps(row.add(k));
                    for (i, a) in acc.iter_mut().enumerate().take(g) {
                        *a = _mm256_fmadd_ps(_mm256_loadu_ps(q.as_ptr().add(i * d + k)), v, *a);
                    }
                }
                k += 8;
            }
            for (i, a) in acc.iter().enumerate().take(g) {
                // SAFETY: hsum_ps needs the AVX2 and FMA this function has.
                out[i * n + j] = scale * unsafe { crate::quant::avx2_util::hsum_ps(*a) } + bias;
            }
        }
    }

    /// The AVX2 version of [`super::gathered_sum`] for output rows of width `d`.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; `d` must be a non-zero multiple of 8; `out` must
    /// hold `g × d` values with `g = out.len() / d <= MAX_ROWS`, `w` `g × idx.len()` values,
    /// and every row `table[r·stride + offset ..][..d]` for `r` in `idx` must lie in `table`.
    /// The reads and writes are unchecked.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn gathered_sum(
        w: &[f32],
        d: usize,
        table: &[f32],
        stride: usize,
        offset: usize,
        idx: &[u32],
        out: &mut [f32],
    ) {
        let (n, g) = (idx.len(), out.len() / d);
        // Eight lanes of every output row at a time, in registers, over all gathered rows.
        let mut k = 0;
        while k < d {
            let mut acc = [_mm256_setzero_ps(); MAX_ROWS];
            for (i, a) in acc.iter_mut().enumerate().take(g) {
                // SAFETY: i < g and k + 8 <= d bound out (g × d).
                *a = unsafe { _mm256_loadu_ps(out.as_ptr().add(i * d + k)) };
            }
            for (j, &r) in idx.iter().enumerate() {
                // SAFETY: the caller bounded every row; k + 8 <= d. i < g and j < n bound w
                // (g × n).
                unsafe {
                    let v = _mm256_loadu_ps(table.as_ptr().add(r as usize * stride + offset + k));
                    for (i, a) in acc.iter_mut().enumerate().take(g) {
                        *a = _mm256_fmadd_ps(_mm256_set1_ps(*w.get_unchecked(i * n + j)), v, *a);
                    }
                }
            }
            for (i, a) in acc.iter().enumerate().take(g) {
                // SAFETY: i < g and k + 8 <= d bound out (g × d).
                unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(i * d + k), *a) };
            }
            k += 8;
        }
    }
}
