//! Small per-token operations of the transformer block: RMSNorm, RoPE, residual adds, and
//! the gated activations (SwiGLU, GeGLU).

pub use crate::simd_math::swiglu;
use half::f16;
use std::sync::OnceLock;

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

/// GELU, tanh approximation, in f32: `0.5·x·(1 + tanh(√(2/π)·x·(1 + 0.044715·x²)))`.
pub fn gelu_f32(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    const COEF_A: f32 = 0.044_715;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * (1.0 + COEF_A * x * x)).tanh())
}

/// GELU of every f16 value, rounded to f16: the table llama.cpp's CPU backend looks the f32
/// GELU up in (it rounds the input to f16 first), built once.
fn gelu_table() -> &'static [f16] {
    static TABLE: OnceLock<Vec<f16>> = OnceLock::new();
    TABLE.get_or_init(|| {
        (0..=u16::MAX)
            .map(|bits| f16::from_f32(gelu_f32(f16::from_bits(bits).to_f32())))
            .collect()
    })
}

/// GeGLU in place: `g[i] = gelu(g[i]) · u[i]`, with GELU taken as llama.cpp's CPU backend
/// takes it: 0 at or below -10, the identity at or above 10, and in between looked up by the
/// input rounded to f16 in a table of f16 results. Matching it keeps Gemma's logits on
/// llama.cpp's.
pub fn geglu(g: &mut [f32], u: &[f32]) {
    let table = gelu_table();
    for (x, &up) in g.iter_mut().zip(u) {
        let gx = if *x <= -10.0 {
            0.0
        } else if *x >= 10.0 {
            *x
        } else {
            table[f16::from_f32(*x).to_bits() as usize].to_f32()
        };
        *x = gx * up;
    }
}

#[cfg(test)]
mod gelu_tests {
    use super::*;

    #[test]
    fn geglu_follows_the_f32_formula_within_f16_rounding() {
        let g: Vec<f32> = (-1200..1200).map(|i| i as f32 * 0.01).collect();
        let u: Vec<f32> = (0..g.len()).map(|i| 1.0 + (i % 7) as f32 * 0.25).collect();
        let mut out = g.clone();
        geglu(&mut out, &u);
        for ((&x, &up), &y) in g.iter().zip(&u).zip(&out) {
            let want = if x <= -10.0 {
                0.0
            } else if x >= 10.0 {
                x * up
            } else {
                gelu_f32(x) * up
            };
            // Two f16 roundings (input and result): a relative error of about 2^-10 each,
            // plus the slope times the input's rounding.
            let tol = 2e-3 * want.abs().max(1.0) * up;
            assert!((y - want).abs() <= tol, "x {x}: {y} vs {want}");
        }
        // Known points of the formula.
        assert_eq!(gelu_f32(0.0), 0.0);
        assert!((gelu_f32(1.0) - 0.841_192).abs() < 1e-5);
        assert!((gelu_f32(-1.0) + 0.158_808).abs() < 1e-5);
    }
}
