//! Locating and checking the tensors of a Llama-family (or Gemma 3) GGUF.

use super::config::{Arch, ModelConfig};
use super::gguf::{GgufFile, TensorInfo};
use instinfer_kernels::matmul::QMatrix;
use instinfer_kernels::quant::dequantize_row;
use instinfer_kernels::quant::x8;
use instinfer_kernels::GgmlType;
use std::sync::Arc;

/// Errors about the model's tensors.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    /// A tensor the model needs is absent.
    #[error("{path}: tensor '{name}' is missing")]
    Missing {
        /// The model file.
        path: String,
        /// The tensor's name.
        name: String,
    },
    /// A tensor's dimensions differ from those the model's shape calls for.
    #[error("{path}: tensor '{name}' has shape {found:?}, expected {expected:?}")]
    Shape {
        /// The model file.
        path: String,
        /// The tensor's name.
        name: String,
        /// Its dimensions, in ggml order (`[cols, rows]` for a matrix).
        found: Vec<u64>,
        /// The dimensions the model's shape calls for, in the same order.
        expected: Vec<u64>,
    },
    /// A tensor's type has no matrix-product kernel (for a matrix) or cannot be dequantized
    /// (for a vector) in this build.
    #[error("{path}: tensor '{name}' has type {ty}, which has no matrix kernel here")]
    NoKernel {
        /// The model file.
        path: String,
        /// The tensor's name.
        name: String,
        /// The tensor's type.
        ty: GgmlType,
    },
}

/// A weight matrix: where its bytes are in the file and how to read them, and, where this
/// CPU has kernels for it, a copy with its rows interleaved eight at a time
/// ([`instinfer_kernels::quant::x8`]) that the products use instead.
#[derive(Clone, Debug)]
pub struct MatW {
    /// Storage type of the elements.
    pub ty: GgmlType,
    /// Number of rows: the output width of a product with this matrix.
    pub rows: usize,
    /// Elements per row: the input width of a product with this matrix.
    pub cols: usize,
    start: usize,
    len: usize,
    interleaved: Option<Arc<[u8]>>,
}

impl MatW {
    /// A view for the matrix products: the interleaved copy where there is one, else the
    /// file's bytes (validated at load).
    pub fn view<'a>(&'a self, file: &'a [u8]) -> QMatrix<'a> {
        match &self.interleaved {
            Some(bytes) => QMatrix::interleaved(self.ty, self.rows, self.cols, bytes),
            None => QMatrix::new(
                self.ty,
                self.rows,
                self.cols,
                &file[self.start..self.start + self.len],
            ),
        }
        .expect("matrix validated at load")
    }

    /// Dequantize row `r` into `out` (`cols` values), e.g. an embedding lookup.
    pub fn dequantize_row(&self, file: &[u8], r: usize, out: &mut [f32]) {
        let rb = self.len / self.rows;
        let bytes = &file[self.start + r * rb..self.start + (r + 1) * rb];
        dequantize_row(self.ty, bytes, out).expect("row validated at load");
    }
}

/// The weights of one transformer block.
#[derive(Debug)]
pub struct LayerWeights {
    /// RMSNorm weight applied before attention (`dim` values).
    pub attn_norm: Vec<f32>,
    /// Query projection, `q_dim × dim`.
    pub wq: MatW,
    /// Key projection, `kv_dim × dim`.
    pub wk: MatW,
    /// Value projection, `kv_dim × dim`.
    pub wv: MatW,
    /// Query bias (`q_dim` values); required for Qwen2, used if present otherwise.
    pub bq: Option<Vec<f32>>,
    /// Key bias (`kv_dim` values); required for Qwen2, used if present otherwise.
    pub bk: Option<Vec<f32>>,
    /// Value bias (`kv_dim` values); required for Qwen2, used if present otherwise.
    pub bv: Option<Vec<f32>>,
    /// Attention output projection, `dim × q_dim`.
    pub wo: MatW,
    /// RMSNorm weight applied before the feed-forward block (`dim` values).
    pub ffn_norm: Vec<f32>,
    /// SwiGLU gate projection, `ffn_dim × dim`.
    pub w_gate: MatW,
    /// SwiGLU up projection, `ffn_dim × dim`.
    pub w_up: MatW,
    /// Feed-forward down projection, `dim × ffn_dim`.
    pub w_down: MatW,
    /// Gemma's extra norms, present exactly for Gemma architectures.
    pub gemma: Option<GemmaNorms>,
}

/// The norms a Gemma block has beyond the Llama block's two.
#[derive(Debug)]
pub struct GemmaNorms {
    /// RMSNorm weight for each query head (`head_dim` values), before RoPE.
    pub q_norm: Vec<f32>,
    /// RMSNorm weight for each key head (`head_dim` values), before RoPE.
    pub k_norm: Vec<f32>,
    /// RMSNorm weight on the attention output projection, before the residual add.
    pub post_attn_norm: Vec<f32>,
    /// RMSNorm weight on the feed-forward output, before the residual add.
    pub post_ffn_norm: Vec<f32>,
}

/// All weights of the model.
#[derive(Debug)]
pub struct Weights {
    /// Token embedding table, `vocab_size × dim`; row `t` is token `t`'s embedding.
    pub token_embd: MatW,
    /// RMSNorm weight applied after the last block (`dim` values).
    pub output_norm: Vec<f32>,
    /// The LM head; the token embedding when the model ties them.
    pub output: MatW,
    /// Llama-3 style RoPE frequency factors (`rope_dims / 2` values) that divide the
    /// per-pair angles, when the file has `rope_freqs.weight`.
    pub rope_freqs: Option<Vec<f32>>,
    /// The transformer blocks, in order.
    pub layers: Vec<LayerWeights>,
}

struct Loader<'a> {
    f: &'a GgufFile,
    path: String,
}

impl Loader<'_> {
    fn info(&self, name: &str) -> Result<&TensorInfo, WeightsError> {
        self.f.tensor(name).ok_or_else(|| WeightsError::Missing {
            path: self.path.clone(),
            name: name.into(),
        })
    }

    fn check_dims(&self, t: &TensorInfo, expected: &[u64]) -> Result<(), WeightsError> {
        if t.dims != expected {
            return Err(WeightsError::Shape {
                path: self.path.clone(),
                name: t.name.clone(),
                found: t.dims.clone(),
                expected: expected.to_vec(),
            });
        }
        Ok(())
    }

    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<MatW, WeightsError> {
        let t = self.info(name)?;
        self.check_dims(t, &[cols as u64, rows as u64])?;
        let data = self.f.tensor_data(t);
        if QMatrix::new(t.ty, rows, cols, data).is_err() {
            return Err(WeightsError::NoKernel {
                path: self.path.clone(),
                name: name.into(),
                ty: t.ty,
            });
        }
        let interleaved = if x8::interleaves(t.ty, rows) {
            x8::interleave(t.ty, rows, cols, data).map(Arc::from)
        } else {
            None
        };
        Ok(MatW {
            ty: t.ty,
            rows,
            cols,
            start: t.start,
            len: t.len,
            interleaved,
        })
    }

    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>, WeightsError> {
        let t = self.info(name)?;
        self.check_dims(t, &[len as u64])?;
        let mut v = vec![0.0; len];
        dequantize_row(t.ty, self.f.tensor_data(t), &mut v).map_err(|_| {
            WeightsError::NoKernel {
                path: self.path.clone(),
                name: name.into(),
                ty: t.ty,
            }
        })?;
        Ok(v)
    }

    fn opt_vector(&self, name: &str, len: usize) -> Result<Option<Vec<f32>>, WeightsError> {
        if self.f.tensor(name).is_none() {
            return Ok(None);
        }
        self.vector(name, len).map(Some)
    }
}

impl Weights {
    /// Locate every tensor the model of shape `c` needs in `f` and check its shape and type.
    /// Matrices stay in the file; norms, biases and RoPE factors are dequantized to f32 here.
    pub fn load(f: &GgufFile, c: &ModelConfig) -> Result<Self, WeightsError> {
        let l = Loader {
            f,
            path: f.path().display().to_string(),
        };
        let token_embd = l.matrix("token_embd.weight", c.vocab_size, c.dim)?;
        let output = match f.tensor("output.weight") {
            Some(_) => l.matrix("output.weight", c.vocab_size, c.dim)?,
            None => token_embd.clone(),
        };
        let output_norm = l.vector("output_norm.weight", c.dim)?;
        let rope_freqs = l.opt_vector("rope_freqs.weight", c.rope_dims / 2)?;
        let biased = c.arch == Arch::Qwen2;
        let mut layers = Vec::new();
        for i in 0..c.n_layers {
            let n = |s: &str| format!("blk.{i}.{s}");
            let bias = |s: &str, len: usize| {
                if biased {
                    l.vector(&n(s), len).map(Some)
                } else {
                    l.opt_vector(&n(s), len)
                }
            };
            let gemma = if c.arch.is_gemma() {
                Some(GemmaNorms {
                    q_norm: l.vector(&n("attn_q_norm.weight"), c.head_dim)?,
                    k_norm: l.vector(&n("attn_k_norm.weight"), c.head_dim)?,
                    post_attn_norm: l.vector(&n("post_attention_norm.weight"), c.dim)?,
                    post_ffn_norm: l.vector(&n("post_ffw_norm.weight"), c.dim)?,
                })
            } else {
                None
            };
            layers.push(LayerWeights {
                attn_norm: l.vector(&n("attn_norm.weight"), c.dim)?,
                wq: l.matrix(&n("attn_q.weight"), c.q_dim(), c.dim)?,
                wk: l.matrix(&n("attn_k.weight"), c.kv_dim(), c.dim)?,
                wv: l.matrix(&n("attn_v.weight"), c.kv_dim(), c.dim)?,
                bq: bias("attn_q.bias", c.q_dim())?,
                bk: bias("attn_k.bias", c.kv_dim())?,
                bv: bias("attn_v.bias", c.kv_dim())?,
                wo: l.matrix(&n("attn_output.weight"), c.dim, c.q_dim())?,
                ffn_norm: l.vector(&n("ffn_norm.weight"), c.dim)?,
                w_gate: l.matrix(&n("ffn_gate.weight"), c.ffn_dim, c.dim)?,
                w_up: l.matrix(&n("ffn_up.weight"), c.ffn_dim, c.dim)?,
                w_down: l.matrix(&n("ffn_down.weight"), c.dim, c.ffn_dim)?,
                gemma,
            });
        }
        Ok(Self {
            token_embd,
            output_norm,
            output,
            rope_freqs,
            layers,
        })
    }

    /// The most common matrix type, for reports ("Q4_1").
    pub fn main_type(&self) -> GgmlType {
        self.layers
            .first()
            .map(|l| l.w_gate.ty)
            .unwrap_or(self.token_embd.ty)
    }
}
