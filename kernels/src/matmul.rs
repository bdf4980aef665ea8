//! Multi-threaded products of a quantized weight matrix with f32 activations.
//!
//! Activations are first quantized to the weight type's `vec_dot_type` (once, and reusable
//! across matrices that share it, e.g. Q/K/V), then each output row is a dot product of one
//! weight row with each activation row. Work is split over rows with rayon; the caller picks
//! the thread count by running inside a rayon pool. Matrices interleaved eight rows at a time
//! ([`crate::quant::x8`]) take that layout's kernel, which sums exactly as the plain ones do.

use crate::quant::x8::{self, GemvX8};
use crate::quant::{dot_kernels, quantize_row, ActRow, DotKernels, GgmlType, QuantError};
use rayon::prelude::*;

/// A weight matrix of `rows` rows of `cols` values of type `ty`: row-major as GGUF stores
/// it, or in the eight-row interleaved layout of [`crate::quant::x8`].
#[derive(Clone, Copy, Debug)]
pub struct QMatrix<'a> {
    ty: GgmlType,
    rows: usize,
    cols: usize,
    row_bytes: usize,
    data: &'a [u8],
    interleaved: bool,
}

impl<'a> QMatrix<'a> {
    /// Check that `data` holds exactly `rows` rows of `cols` values of `ty`.
    pub fn new(ty: GgmlType, rows: usize, cols: usize, data: &'a [u8]) -> Result<Self, QuantError> {
        let need = ty.row_bytes(cols)? * rows;
        if data.len() != need {
            return Err(QuantError::BadRowLength {
                ty,
                len: data.len(),
                block: need,
            });
        }
        if !ty.can_matmul() {
            return Err(QuantError::Unsupported(ty));
        }
        Ok(Self {
            ty,
            rows,
            cols,
            row_bytes: need / rows.max(1),
            data,
            interleaved: false,
        })
    }

    /// A matrix already in the interleaved layout (made by [`x8::interleave`]); refused
    /// where this CPU has no kernel for that layout and type.
    pub fn interleaved(
        ty: GgmlType,
        rows: usize,
        cols: usize,
        data: &'a [u8],
    ) -> Result<Self, QuantError> {
        if !x8::interleaves(ty, rows) {
            return Err(QuantError::Unsupported(ty));
        }
        Ok(Self {
            interleaved: true,
            ..Self::new(ty, rows, cols, data)?
        })
    }

    /// Whether the rows are interleaved eight at a time.
    pub fn is_interleaved(&self) -> bool {
        self.interleaved
    }

    /// The weight type.
    pub fn ty(&self) -> GgmlType {
        self.ty
    }

    /// Number of rows (outputs).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns (inputs).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Address of the first weight byte (identifies the matrix).
    pub fn data_ptr(&self) -> *const u8 {
        self.data.as_ptr()
    }

    /// Bytes of one row.
    pub fn row_bytes(&self) -> usize {
        self.row_bytes
    }

    /// The bytes of row `r` (row-major matrices only).
    pub fn row(&self, r: usize) -> &'a [u8] {
        debug_assert!(!self.interleaved, "row() of an interleaved matrix");
        &self.data[r * self.row_bytes..(r + 1) * self.row_bytes]
    }

    /// The bytes of the interleaved group holding rows `8g..8g + 8`.
    fn group(&self, g: usize) -> &'a [u8] {
        let gb = self.row_bytes * x8::ROWS;
        &self.data[g * gb..(g + 1) * gb]
    }
}

/// Activation rows quantized for one `vec_dot_type`.
#[derive(Debug, Default)]
pub struct QuantizedActs {
    ty: Option<GgmlType>,
    cols: usize,
    n: usize,
    row_bytes: usize,
    data: Vec<u8>,
    /// Q8_0/Q8_1 block scales widened to f32 (exactly: every f16 is an f32).
    d: Vec<f32>,
    /// Q8_1 scaled block sums widened to f32.
    s: Vec<f32>,
}

impl QuantizedActs {
    /// Quantize `n` rows of `cols` values from `x` to `ty`, reusing this buffer.
    pub fn quantize(
        &mut self,
        ty: GgmlType,
        x: &[f32],
        n: usize,
        cols: usize,
    ) -> Result<(), QuantError> {
        assert_eq!(x.len(), n * cols, "activation buffer is not n x cols");
        let rb = ty.row_bytes(cols)?;
        self.data.resize(rb * n, 0);
        let parallel = n >= 4;
        if parallel {
            self.data
                .par_chunks_mut(rb)
                .zip(x.par_chunks(cols))
                .try_for_each(|(dst, src)| quantize_row(ty, src, dst))?;
        } else {
            for (dst, src) in self.data.chunks_mut(rb).zip(x.chunks(cols)) {
                quantize_row(ty, src, dst)?;
            }
        }
        self.ty = Some(ty);
        self.cols = cols;
        self.n = n;
        self.row_bytes = rb;
        self.widen_scales(ty);
        Ok(())
    }

    fn widen_scales(&mut self, ty: GgmlType) {
        self.d.clear();
        self.s.clear();
        let (Some(bytes), true) = (
            ty.block_bytes(),
            matches!(ty, GgmlType::Q8_0 | GgmlType::Q8_1),
        ) else {
            return;
        };
        let f16 = |b: &[u8], o: usize| {
            half::f16::from_bits(u16::from_le_bytes([b[o], b[o + 1]])).to_f32()
        };
        for blk in self.data.chunks_exact(bytes) {
            self.d.push(f16(blk, 0));
            if ty == GgmlType::Q8_1 {
                self.s.push(f16(blk, 2));
            }
        }
    }

    fn act_row(&self, t: usize) -> ActRow<'_> {
        let nb = self.d.len() / self.n.max(1);
        let s = if self.s.is_empty() {
            &self.s[..]
        } else {
            &self.s[t * nb..(t + 1) * nb]
        };
        ActRow {
            blocks: self.row(t),
            d: &self.d[t * nb..(t + 1) * nb],
            s,
        }
    }

    /// Number of activation rows.
    pub fn len(&self) -> usize {
        self.n
    }

    /// Whether no rows are held.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    fn row(&self, t: usize) -> &[u8] {
        &self.data[t * self.row_bytes..(t + 1) * self.row_bytes]
    }
}

/// Scratch space reused across calls so the hot path does not allocate.
#[derive(Debug, Default)]
pub struct MatmulScratch {
    acts: QuantizedActs,
    transposed: Vec<f32>,
}

/// `out[t][r] = Σ_c w[r][c] · x[t][c]` for `n` activation rows `x` (`n × cols`).
pub fn matmul(
    w: &QMatrix,
    x: &[f32],
    n: usize,
    out: &mut [f32],
    scratch: &mut MatmulScratch,
) -> Result<(), QuantError> {
    let MatmulScratch { acts, transposed } = scratch;
    acts.quantize(w.ty.vec_dot_type(), x, n, w.cols)?;
    matmul_quantized(w, acts, out, transposed)
}

/// Like [`matmul`], with activations already quantized to `w.ty.vec_dot_type()`.
pub fn matmul_quantized(
    w: &QMatrix,
    acts: &QuantizedActs,
    out: &mut [f32],
    transposed: &mut Vec<f32>,
) -> Result<(), QuantError> {
    matmul_quantized_many(&mut [(*w, out)], acts, transposed)
}

/// Several products of the same activations (e.g. Q, K and V of one layer), `jobs[k] =
/// (w_k, out_k)`. A single token runs all of them in one parallel region, so threads meet
/// once instead of once per matrix.
pub fn matmul_quantized_many(
    jobs: &mut [(QMatrix, &mut [f32])],
    acts: &QuantizedActs,
    transposed: &mut Vec<f32>,
) -> Result<(), QuantError> {
    let n = acts.n;
    for (w, out) in jobs.iter() {
        if acts.ty != Some(w.ty.vec_dot_type()) || acts.cols != w.cols {
            return Err(QuantError::BadRowLength {
                ty: w.ty,
                len: acts.cols,
                block: w.cols,
            });
        }
        assert_eq!(out.len(), n * w.rows, "output buffer is not n x rows");
    }
    let threads = rayon::current_num_threads().max(1);
    if n == 1 {
        let total_rows: usize = jobs.iter().map(|(w, _)| w.rows).sum();
        // Enough chunks per thread to balance, few enough to keep scheduling cheap; a
        // multiple of 8 so the four-row kernel and the interleaved groups cover whole chunks.
        let rows_per_chunk = (total_rows / (threads * 3)).clamp(8, 4096).div_ceil(8) * 8;
        let mut tasks = Vec::new();
        for (w, out) in jobs.iter_mut() {
            let kernels = dot_kernels(w.ty)?;
            for (ci, o) in out.chunks_mut(rows_per_chunk).enumerate() {
                tasks.push((*w, kernels, ci * rows_per_chunk, o));
            }
        }
        tasks
            .into_par_iter()
            .for_each(|(w, kernels, r0, o)| gemv_rows(&w, &kernels, acts, r0, o));
        return Ok(());
    }
    for (w, out) in jobs.iter_mut() {
        match interleaved_kernel(w)? {
            Some(k) => batched_x8(w, k, acts, out, transposed, threads),
            None => batched(w, acts, out, transposed, threads)?,
        }
    }
    Ok(())
}

/// The interleaved-layout kernel of `w`, if it is interleaved.
fn interleaved_kernel(w: &QMatrix) -> Result<Option<GemvX8>, QuantError> {
    if !w.interleaved {
        return Ok(None);
    }
    x8::x8_kernel(w.ty)
        .map(Some)
        .ok_or(QuantError::Unsupported(w.ty))
}

/// Rows `r0..r0 + out.len()` of `w` times the single activation row of `acts`.
fn gemv_rows(w: &QMatrix, kernels: &DotKernels, acts: &QuantizedActs, r0: usize, out: &mut [f32]) {
    if w.interleaved {
        let k = x8::x8_kernel(w.ty).expect("interleaved matrices have kernels");
        assert!(
            r0.is_multiple_of(x8::ROWS) && out.len().is_multiple_of(x8::ROWS),
            "row range not aligned to the interleaved groups"
        );
        let a = acts.act_row(0);
        for (j, o) in out.chunks_exact_mut(x8::ROWS).enumerate() {
            o.copy_from_slice(&k(w.cols, w.group(r0 / x8::ROWS + j), a));
        }
        return;
    }
    let cols = w.cols;
    let (a, ar) = (acts.row(0), acts.act_row(0));
    let mut i = 0;
    if let Some(gemv) = kernels.gemv {
        while i + 4 <= out.len() {
            let r = r0 + i;
            out[i..i + 4].copy_from_slice(&gemv(
                cols,
                [w.row(r), w.row(r + 1), w.row(r + 2), w.row(r + 3)],
                ar,
            ));
            i += 4;
        }
    }
    for (j, y) in out.iter_mut().enumerate().skip(i) {
        *y = (kernels.one)(cols, w.row(r0 + j), a);
    }
}

/// Rows `rows` of `w` times the single activation row of `acts` (already quantized to
/// `w.ty.vec_dot_type()`), on the calling thread. `out` holds `rows.len()` values.
pub fn gemv_range(
    w: &QMatrix,
    acts: &QuantizedActs,
    rows: std::ops::Range<usize>,
    out: &mut [f32],
) -> Result<(), QuantError> {
    if acts.ty != Some(w.ty.vec_dot_type()) || acts.cols != w.cols || acts.n != 1 {
        return Err(QuantError::BadRowLength {
            ty: w.ty,
            len: acts.cols,
            block: w.cols,
        });
    }
    assert!(
        rows.end <= w.rows && out.len() == rows.len(),
        "row range outside the matrix"
    );
    if w.interleaved
        && (!rows.start.is_multiple_of(x8::ROWS) || !rows.len().is_multiple_of(x8::ROWS))
    {
        return Err(QuantError::BadRowLength {
            ty: w.ty,
            len: rows.len(),
            block: x8::ROWS,
        });
    }
    gemv_rows(w, &dot_kernels(w.ty)?, acts, rows.start, out);
    Ok(())
}

/// [`batched`] for an interleaved matrix: each task owns a band of groups, and every group's
/// weights stay in cache while all activation rows pass over them. The band is written group
/// by group as `[t][8]` tiles, which the end copies to `[t][r]`.
fn batched_x8(
    w: &QMatrix,
    k: GemvX8,
    acts: &QuantizedActs,
    out: &mut [f32],
    tiles: &mut Vec<f32>,
    threads: usize,
) {
    const G: usize = x8::ROWS;
    let n = acts.n;
    let groups = w.rows / G;
    let groups_per_chunk = (groups / (threads * 4)).clamp(1, 32);
    tiles.resize(n * w.rows, 0.0);
    tiles
        .par_chunks_mut(groups_per_chunk * G * n)
        .enumerate()
        .for_each(|(ci, band)| {
            for (j, tile) in band.chunks_exact_mut(G * n).enumerate() {
                let wg = w.group(ci * groups_per_chunk + j);
                for (t, dst) in tile.chunks_exact_mut(G).enumerate() {
                    dst.copy_from_slice(&k(w.cols, wg, acts.act_row(t)));
                }
            }
        });
    for (g, tile) in tiles.chunks_exact(G * n).enumerate() {
        for (t, vals) in tile.chunks_exact(G).enumerate() {
            out[t * w.rows + g * G..t * w.rows + (g + 1) * G].copy_from_slice(vals);
        }
    }
}

/// Several activation rows: each task owns a band of weight rows and writes them row-major
/// ([r][t]) so bands are disjoint slices; one transpose at the end gives [t][r].
fn batched(
    w: &QMatrix,
    acts: &QuantizedActs,
    out: &mut [f32],
    transposed: &mut Vec<f32>,
    threads: usize,
) -> Result<(), QuantError> {
    const TOKEN_TILE: usize = 64;
    let n = acts.n;
    let kernels = dot_kernels(w.ty)?;
    let cols = w.cols;
    let rows_per_chunk = (w.rows / (threads * 4)).clamp(4, 256).div_ceil(4) * 4;
    transposed.resize(n * w.rows, 0.0);
    transposed
        .par_chunks_mut(rows_per_chunk * n)
        .enumerate()
        .for_each(|(ci, band)| {
            let r0 = ci * rows_per_chunk;
            let band_rows = band.len() / n;
            for t0 in (0..n).step_by(TOKEN_TILE) {
                let t1 = (t0 + TOKEN_TILE).min(n);
                let mut i = 0;
                if let Some(gemm2) = kernels.gemm2 {
                    // Pairs of rows, four tokens at a time; leftovers go through the paths below.
                    while i + 2 <= band_rows {
                        let (w0, w1) = (w.row(r0 + i), w.row(r0 + i + 1));
                        let mut t = t0;
                        while t + 4 <= t1 {
                            let a = [0, 1, 2, 3].map(|k| acts.act_row(t + k));
                            let r = gemm2(cols, [w0, w1], a);
                            band[i * n + t..i * n + t + 4].copy_from_slice(&r[0]);
                            band[(i + 1) * n + t..(i + 1) * n + t + 4].copy_from_slice(&r[1]);
                            t += 4;
                        }
                        for tt in t..t1 {
                            band[i * n + tt] = (kernels.one)(cols, w0, acts.row(tt));
                            band[(i + 1) * n + tt] = (kernels.one)(cols, w1, acts.row(tt));
                        }
                        i += 2;
                    }
                }
                for i in i..band_rows {
                    let wr = w.row(r0 + i);
                    let out = &mut band[i * n + t0..i * n + t1];
                    let mut t = 0;
                    if let Some(gemm) = kernels.gemm {
                        while t + 4 <= out.len() {
                            let a = [0, 1, 2, 3].map(|k| acts.act_row(t0 + t + k));
                            out[t..t + 4].copy_from_slice(&gemm(cols, wr, a));
                            t += 4;
                        }
                    }
                    for (j, y) in out.iter_mut().enumerate().skip(t) {
                        *y = (kernels.one)(cols, wr, acts.row(t0 + j));
                    }
                }
            }
        });
    for (r, col) in transposed.chunks(n).enumerate() {
        for (t, &v) in col.iter().enumerate() {
            out[t * w.rows + r] = v;
        }
    }
    Ok(())
}
