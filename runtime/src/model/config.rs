//! Model hyper-parameters read from GGUF metadata.

use super::gguf::{GgufError, GgufFile};
use instinfer_kernels::ops::RopeStyle;

/// Architectures this runtime can run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// `llama`: Llama 1/2/3, TinyLlama, SmolLM, Mistral-style GGUFs.
    Llama,
    /// `qwen2`: the Llama block with biases on Q, K and V and neox RoPE.
    Qwen2,
    /// `gemma3`: RMSNorm on each head's Q and K, norms after attention and after the
    /// feed-forward block too, GeGLU, embeddings scaled by √dim, neox RoPE, and 5 of every 6
    /// layers attending over a sliding window with their own RoPE base.
    Gemma3,
}

impl Arch {
    /// The architecture's name as written in `general.architecture`.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Gemma3 => "gemma3",
        }
    }
    /// How this architecture pairs dimensions for RoPE.
    pub fn rope_style(self) -> RopeStyle {
        match self {
            Arch::Llama => RopeStyle::Interleaved,
            Arch::Qwen2 | Arch::Gemma3 => RopeStyle::Neox,
        }
    }
    /// Whether blocks have Gemma's extra norms (per-head Q/K norms, post-attention and
    /// post-feed-forward norms) and a GeGLU feed-forward block.
    pub fn is_gemma(self) -> bool {
        self == Arch::Gemma3
    }
}

/// Gemma 3's layer pattern: of every six layers, the first five attend over a sliding window
/// and the sixth over the whole context. The GGUF does not store it.
pub const GEMMA3_SWA_PERIOD: usize = 6;
/// Gemma 3's RoPE base on its sliding-window layers (the file's `rope.freq_base` is the
/// global layers'). The GGUF does not store it unless `rope.freq_base_swa` is present.
pub const GEMMA3_LOCAL_ROPE_BASE: f32 = 10_000.0;

/// Errors about the model's shape.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A metadata key is missing or has the wrong type.
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// `general.architecture` names an architecture other than `llama` or `qwen2`.
    #[error("{path}: architecture '{arch}' is not supported (supported: llama, qwen2, gemma3)")]
    UnknownArch {
        /// The model file.
        path: String,
        /// The architecture it names.
        arch: String,
    },
    /// The metadata describes an impossible shape (zero sizes, heads not divisible, bad head or
    /// RoPE dimension).
    #[error("{path}: inconsistent model shape: {msg}")]
    Shape {
        /// The model file.
        path: String,
        /// What is inconsistent.
        msg: String,
    },
}

/// The shape of a Llama-family model.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    /// The architecture (`general.architecture`).
    pub arch: Arch,
    /// Number of transformer blocks (`block_count`).
    pub n_layers: usize,
    /// Width of the residual stream / embeddings (`embedding_length`).
    pub dim: usize,
    /// Hidden width of the feed-forward block (`feed_forward_length`).
    pub ffn_dim: usize,
    /// Number of query heads (`attention.head_count`).
    pub n_heads: usize,
    /// Number of key/value heads (`attention.head_count_kv`, else `n_heads`); `n_heads` is a
    /// multiple of it.
    pub n_kv_heads: usize,
    /// Width of one head (`attention.key_length`, else `dim / n_heads`); a multiple of 8.
    pub head_dim: usize,
    /// Leading dimensions of each head that RoPE rotates (`rope.dimension_count`, else
    /// `head_dim`); even and at most `head_dim`.
    pub rope_dims: usize,
    /// RoPE frequency base (`rope.freq_base`, default 10000).
    pub rope_base: f32,
    /// RMSNorm epsilon (`attention.layer_norm_rms_epsilon`, default 1e-5).
    pub rms_eps: f32,
    /// Context length in tokens the model was built for (`context_length`, default 2048).
    pub context_len: usize,
    /// Number of tokens in the vocabulary (length of `tokenizer.ggml.tokens`).
    pub vocab_size: usize,
    /// Context length the model was trained for (`context_length`); `context_len` may be
    /// raised past it only on the user's explicit request.
    pub trained_context_len: usize,
    /// Sliding-window attention: the window in tokens (a query sees itself and the
    /// `window - 1` tokens before it) and which layers use it. `None` when every layer
    /// attends over the whole context.
    pub sliding: Option<SlidingWindow>,
}

/// Which layers attend over a sliding window, and how wide it is.
#[derive(Clone, Debug, PartialEq)]
pub struct SlidingWindow {
    /// Tokens a query sees: itself and the `window - 1` before it.
    pub window: usize,
    /// Per layer, whether it is a sliding-window ("local") layer.
    pub local: Vec<bool>,
    /// RoPE frequency base of the local layers.
    pub rope_base: f32,
}

impl SlidingWindow {
    /// Whether `layer` attends over the window only.
    pub fn is_local(&self, layer: usize) -> bool {
        self.local.get(layer).copied().unwrap_or(false)
    }

    /// The layers that attend over the whole context, in order.
    pub fn global_layers(&self) -> Vec<usize> {
        (0..self.local.len()).filter(|&l| !self.local[l]).collect()
    }
}

impl ModelConfig {
    /// Read the shape from `f`'s metadata (keys prefixed with the architecture name), filling
    /// in defaults for optional keys and checking that it is consistent.
    pub fn from_gguf(f: &GgufFile) -> Result<Self, ConfigError> {
        let path = f.path().display().to_string();
        let arch_name = f.req_str("general.architecture")?;
        let arch = match arch_name {
            "llama" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            "gemma3" => Arch::Gemma3,
            other => {
                return Err(ConfigError::UnknownArch {
                    path,
                    arch: other.into(),
                })
            }
        };
        let k = |s: &str| format!("{arch_name}.{s}");
        let n_layers = f.req_u64(&k("block_count"))? as usize;
        let dim = f.req_u64(&k("embedding_length"))? as usize;
        let ffn_dim = f.req_u64(&k("feed_forward_length"))? as usize;
        let n_heads = f.req_u64(&k("attention.head_count"))? as usize;
        let n_kv_heads = f
            .opt_u64(&k("attention.head_count_kv"))?
            .map(|v| v as usize)
            .unwrap_or(n_heads);
        let shape_err = |msg: String| ConfigError::Shape {
            path: path.clone(),
            msg,
        };
        if n_heads == 0 || n_kv_heads == 0 || n_layers == 0 || dim == 0 {
            return Err(shape_err(format!(
                "zero-sized dimension (layers {n_layers}, dim {dim}, heads {n_heads}/{n_kv_heads})"
            )));
        }
        let head_dim = f
            .opt_u64(&k("attention.key_length"))?
            .map(|v| v as usize)
            .unwrap_or(dim / n_heads);
        if !n_heads.is_multiple_of(n_kv_heads) {
            return Err(shape_err(format!(
                "{n_heads} heads are not a multiple of {n_kv_heads} kv heads"
            )));
        }
        if head_dim % 8 != 0 {
            return Err(shape_err(format!(
                "head dimension {head_dim} is not a multiple of 8"
            )));
        }
        let rope_dims = f
            .opt_u64(&k("rope.dimension_count"))?
            .map(|v| v as usize)
            .unwrap_or(head_dim);
        if rope_dims > head_dim || rope_dims % 2 != 0 {
            return Err(shape_err(format!(
                "rope dimension count {rope_dims} does not fit head dimension {head_dim}"
            )));
        }
        let rope_base = f.opt_f64(&k("rope.freq_base"))?.unwrap_or(10_000.0) as f32;
        let rms_eps = f
            .opt_f64(&k("attention.layer_norm_rms_epsilon"))?
            .unwrap_or(1e-5) as f32;
        let context_len = f
            .opt_u64(&k("context_length"))?
            .map(|v| v as usize)
            .unwrap_or(2048);
        let vocab_size = f.req_strings("tokenizer.ggml.tokens")?.len();
        // Each block has several tensors: a count beyond the file's tensors is a corrupt (or
        // hostile) header, refused before anything is sized by it.
        if n_layers > f.tensors.len() {
            return Err(shape_err(format!(
                "block_count {n_layers} but the file holds only {} tensors",
                f.tensors.len()
            )));
        }
        let sliding = match arch {
            Arch::Gemma3 => Some(gemma3_window(f, &k, n_layers, &shape_err)?),
            _ => None,
        };
        Ok(Self {
            arch,
            n_layers,
            dim,
            ffn_dim,
            n_heads,
            n_kv_heads,
            head_dim,
            rope_dims,
            rope_base,
            rms_eps,
            context_len,
            vocab_size,
            trained_context_len: context_len,
            sliding,
        })
    }

    /// The RoPE base of `layer`: the local one on a sliding-window layer.
    pub fn layer_rope_base(&self, layer: usize) -> f32 {
        match &self.sliding {
            Some(s) if s.is_local(layer) => s.rope_base,
            _ => self.rope_base,
        }
    }

    /// Width of one token's K (or V) across all kv heads.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Width of one token's Q across all heads.
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    /// Query heads per kv head.
    pub fn group(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }
}

/// Gemma 3's sliding window: `attention.sliding_window` tokens (required), five local layers
/// then one global in every six, and the local RoPE base (`rope.freq_base_swa`, else 10,000).
fn gemma3_window(
    f: &GgufFile,
    k: &dyn Fn(&str) -> String,
    n_layers: usize,
    shape_err: &dyn Fn(String) -> ConfigError,
) -> Result<SlidingWindow, ConfigError> {
    let window = f.req_u64(&k("attention.sliding_window"))? as usize;
    if window == 0 {
        return Err(shape_err("attention.sliding_window is 0".into()));
    }
    let rope_base = f
        .opt_f64(&k("rope.freq_base_swa"))?
        .map_or(GEMMA3_LOCAL_ROPE_BASE, |v| v as f32);
    Ok(SlidingWindow {
        window,
        local: (0..n_layers)
            .map(|l| l % GEMMA3_SWA_PERIOD < GEMMA3_SWA_PERIOD - 1)
            .collect(),
        rope_base,
    })
}
