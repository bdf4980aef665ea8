//! Multi-threaded products of a quantized weight matrix with f32 activations.
//!
//! Activations are first quantized to the weight type's `vec_dot_type` (once, and reusable
//! across matrices that share it, e.g. Q/K/V), then each output row is a dot product of one
//! weight row with each activation row. Work is split over rows with rayon; the caller picks
//! the thread count by running inside a rayon pool.

use crate::quant::{dispatch_dot_fn, quantize_row, GgmlType, QuantError};
use rayon::prelude::*;

/// A row-major weight matrix of `rows` rows of `cols` values of type `ty`.
#[derive(Clone, Copy, Debug)]
pub struct QMatrix<'a> {
    ty: GgmlType,
    rows: usize,
    cols: usize,
    data: &'a [u8],
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
            data,
        })
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

    /// Bytes of one row.
    pub fn row_bytes(&self) -> usize {
        self.data.len() / self.rows.max(1)
    }

    /// The bytes of row `r`.
    pub fn row(&self, r: usize) -> &'a [u8] {
        let rb = self.row_bytes();
        &self.data[r * rb..(r + 1) * rb]
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
        Ok(())
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
    if acts.ty != Some(w.ty.vec_dot_type()) || acts.cols != w.cols {
        return Err(QuantError::BadRowLength {
            ty: w.ty,
            len: acts.cols,
            block: w.cols,
        });
    }
    let n = acts.n;
    assert_eq!(out.len(), n * w.rows, "output buffer is not n x rows");
    let dot = dispatch_dot_fn(w.ty)?;
    let cols = w.cols;
    let threads = rayon::current_num_threads().max(1);
    // Enough chunks per thread to balance, few enough to keep scheduling cheap.
    let rows_per_chunk = (w.rows / (threads * 4)).clamp(4, 256);
    if n == 1 {
        let a = acts.row(0);
        out.par_chunks_mut(rows_per_chunk)
            .enumerate()
            .for_each(|(ci, o)| {
                let r0 = ci * rows_per_chunk;
                for (i, y) in o.iter_mut().enumerate() {
                    *y = dot(cols, w.row(r0 + i), a);
                }
            });
        return Ok(());
    }
    // Batched: each task owns a band of rows and writes them row-major ([r][t]) so bands
    // are disjoint slices; one transpose at the end gives [t][r].
    const TOKEN_TILE: usize = 64;
    transposed.resize(n * w.rows, 0.0);
    transposed
        .par_chunks_mut(rows_per_chunk * n)
        .enumerate()
        .for_each(|(ci, band)| {
            let r0 = ci * rows_per_chunk;
            let band_rows = band.len() / n;
            for t0 in (0..n).step_by(TOKEN_TILE) {
                let t1 = (t0 + TOKEN_TILE).min(n);
                for i in 0..band_rows {
                    let wr = w.row(r0 + i);
                    for t in t0..t1 {
                        band[i * n + t] = dot(cols, wr, acts.row(t));
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
