//! Small per-token operations of the transformer block: RMSNorm, RoPE, residual adds.

pub use crate::simd_math::swiglu;

/// RMSNorm: `out = x / sqrt(mean(x²) + eps) * weight`. Squares are taken in f32 and summed
/// in f64, as llama.cpp does, so long rows do not lose precision and results round alike.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let ss: f64 = x.iter().map(|&v| (v * v) as f64).sum();
    let scale = 1.0 / ((ss / x.len() as f64) as f32 + eps).sqrt();
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = (v * scale) * w;
    }
}

/// `x += y`.
pub fn add_assign(x: &mut [f32], y: &[f32]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// How RoPE pairs the dimensions of a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs `(2i, 2i+1)`: GGUF `llama` (its Q/K weights are permuted for this).
    Interleaved,
    /// Halves `(i, i + n/2)`: GGUF `qwen2` and other "neox" models.
    Neox,
}

/// Rotary position embedding for one model.
///
/// Angles follow llama.cpp's float recipe exactly: per position, `theta` starts at the
/// position and is multiplied by `base^(-2/rot_dims)` pair after pair (divided by the
/// optional Llama-3 frequency factor), and the rotation uses fused multiply-adds. Matching
/// its rounding keeps our logits on top of llama.cpp's.
#[derive(Clone, Debug)]
pub struct Rope {
    style: RopeStyle,
    rot_dims: usize,
    theta_scale: f32,
    freq_factors: Option<Vec<f32>>,
}

impl Rope {
    /// `rot_dims` leading dimensions of each head are rotated (the rest pass through).
    /// `freq_factors` (Llama-3 style `rope_freqs`) divide the per-pair angles.
    pub fn new(style: RopeStyle, rot_dims: usize, base: f32, freq_factors: Option<&[f32]>) -> Self {
        let theta_scale = base.powf(-2.0 / rot_dims as f32);
        Self {
            style,
            rot_dims,
            theta_scale,
            freq_factors: freq_factors.map(<[f32]>::to_vec),
        }
    }

    /// Rotate every head of `x` (`n_heads × head_dim`) for position `pos`.
    pub fn apply(&self, x: &mut [f32], head_dim: usize, pos: usize) {
        let half = self.rot_dims / 2;
        let mut theta = pos as f32;
        for i in 0..half {
            let ff = self
                .freq_factors
                .as_ref()
                .and_then(|f| f.get(i).copied())
                .unwrap_or(1.0);
            let (sin, cos) = (theta / ff).sin_cos();
            theta *= self.theta_scale;
            let (a, b) = match self.style {
                RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                RopeStyle::Neox => (i, i + half),
            };
            for head in x.chunks_exact_mut(head_dim) {
                let (x0, x1) = (head[a], head[b]);
                head[a] = x0.mul_add(cos, -(x1 * sin));
                head[b] = x0.mul_add(sin, x1 * cos);
            }
        }
    }
}

/// Index of the largest value (first one on ties); `None` for an empty slice.
pub fn argmax(x: &[f32]) -> Option<usize> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &v) in x.iter().enumerate() {
        if best.is_none_or(|(_, b)| v > b) {
            best = Some((i, v));
        }
    }
    best.map(|(i, _)| i)
}
