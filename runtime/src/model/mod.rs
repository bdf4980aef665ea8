//! The Llama-family model runtime: GGUF loading and the forward pass.

pub mod config;
mod forward;
pub mod gguf;
mod mmap;
pub mod weights;

use crate::kv::{KvCache, KvError, KvPool, KvShape, RamKvCache, WindowedCache, WindowedPool};
pub use config::{Arch, ConfigError, ModelConfig, SlidingWindow};
pub use forward::{Logits, SeqChunk, Workspace};
pub use gguf::{GgufError, GgufFile};
pub use weights::{Weights, WeightsError};

use instinfer_kernels::ops::Rope;
use std::path::Path;

/// Errors from loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// Opening or parsing the GGUF file failed.
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// The metadata does not describe a supported model shape.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A tensor is missing or unusable.
    #[error(transparent)]
    Weights(#[from] WeightsError),
    /// The KV cache or pool refused an operation.
    #[error(transparent)]
    Kv(#[from] KvError),
    /// A token id is not in the vocabulary.
    #[error("token id {id} is outside the vocabulary of {vocab} tokens")]
    BadToken {
        /// The token id.
        id: u32,
        /// The vocabulary size; valid ids are `0..vocab`.
        vocab: usize,
    },
    /// A chunk of a batch had no tokens.
    #[error("sequence {seq} was given no tokens")]
    EmptyChunk {
        /// The chunk's sequence.
        seq: u64,
    },
    /// A chunk would run past the context: the model's context length or the sequence's KV
    /// capacity, whichever is smaller.
    #[error("{needed} tokens exceed the context length of {context}")]
    ContextFull {
        /// Positions the sequence would hold after the chunk.
        needed: usize,
        /// Positions it may hold.
        context: usize,
    },
    /// A context longer than the model was trained for was asked for without allowing it.
    #[error("a context of {asked} tokens exceeds the model's trained context of {trained} tokens; allow it explicitly (--allow-untrained-context, config allow_untrained_context = true) to run RoPE past what the model learned")]
    UntrainedContext {
        /// The context asked for.
        asked: usize,
        /// The context the model was trained for.
        trained: usize,
    },
    /// The KV pool does not keep this model's sliding-window layers as the model needs
    /// (a pool for a windowed model is made with [`Model::windowed_pool`]).
    #[error("the KV pool's sliding window ({pool:?} tokens) does not match the model's ({model:?}); make the pool with Model::windowed_pool")]
    WindowMismatch {
        /// The model's window, if it has one.
        model: Option<usize>,
        /// The pool's.
        pool: Option<usize>,
    },
}

/// A loaded model: the mapped file, its shape and its weights.
pub struct Model {
    file: GgufFile,
    /// The model's shape.
    pub config: ModelConfig,
    /// The model's weights (their bytes stay in the mapped file).
    pub weights: Weights,
    rope: Rope,
    /// RoPE of the sliding-window layers, when their base differs.
    rope_local: Option<Rope>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("file", &self.file)
            .field("config", &self.config)
            .finish()
    }
}

impl Model {
    /// Load a GGUF model, checking its architecture, shape and every tensor it needs.
    pub fn load(path: &Path) -> Result<Self, ModelError> {
        let file = GgufFile::open(path)?;
        Self::from_gguf(file)
    }

    /// Build a model from an opened GGUF file, checking its architecture, shape and tensors.
    pub fn from_gguf(file: GgufFile) -> Result<Self, ModelError> {
        let config = ModelConfig::from_gguf(&file)?;
        let weights = Weights::load(&file, &config)?;
        let rope = Rope::new(
            config.arch.rope_style(),
            config.rope_dims,
            config.rope_base,
            weights.rope_freqs.as_deref(),
        );
        let rope_local = config.sliding.as_ref().map(|s| {
            Rope::new(
                config.arch.rope_style(),
                config.rope_dims,
                s.rope_base,
                weights.rope_freqs.as_deref(),
            )
        });
        tracing::info!(
            path = %file.path().display(),
            arch = config.arch.name(),
            layers = config.n_layers,
            dim = config.dim,
            heads = config.n_heads,
            kv_heads = config.n_kv_heads,
            quant = %weights.main_type(),
            "model loaded"
        );
        Ok(Self {
            file,
            config,
            weights,
            rope,
            rope_local,
        })
    }

    /// Serve a context of `tokens` tokens. Past the trained context it is refused unless
    /// `allow_untrained` is set, and then logged as a warning.
    pub fn set_context(&mut self, tokens: usize, allow_untrained: bool) -> Result<(), ModelError> {
        let trained = self.config.trained_context_len;
        if tokens > trained {
            if !allow_untrained {
                return Err(ModelError::UntrainedContext {
                    asked: tokens,
                    trained,
                });
            }
            tracing::warn!(
                context_tokens = tokens,
                trained,
                "serving past the model's trained context: RoPE runs beyond what it learned, so quality may drop"
            );
        }
        self.config.context_len = tokens;
        Ok(())
    }

    /// The RoPE of `layer`.
    fn rope_for(&self, layer: usize) -> &Rope {
        match (&self.config.sliding, &self.rope_local) {
            (Some(s), Some(r)) if s.is_local(layer) => r,
            _ => &self.rope,
        }
    }

    /// The GGUF file the model was loaded from.
    pub fn gguf(&self) -> &GgufFile {
        &self.file
    }

    /// A RAM KV cache sized for this model's full context; a model with sliding-window
    /// layers keeps those in a window-sized ring beside it.
    pub fn new_ram_cache(&self) -> Box<dyn KvCache> {
        let inner = RamKvCache::new(self.stored_kv_shape(), self.config.context_len);
        match &self.config.sliding {
            Some(s) => Box::new(WindowedCache::new(inner, self.kv_shape(), s.clone())),
            None => Box::new(inner),
        }
    }

    /// The per-token KV shape of this model's attention (every layer, query and kv heads,
    /// head width).
    pub fn kv_shape(&self) -> KvShape {
        let c = &self.config;
        KvShape {
            layers: c.n_layers,
            q_heads: c.n_heads,
            kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
        }
    }

    /// The KV shape a pool or store holds for this model: every layer, or, for a model with
    /// sliding-window layers, only the layers that attend over the whole context (the
    /// window's KV stays in RAM, see [`Model::windowed_pool`]).
    pub fn stored_kv_shape(&self) -> KvShape {
        let layers = self
            .config
            .sliding
            .as_ref()
            .map_or(self.config.n_layers, |s| s.global_layers().len());
        KvShape {
            layers,
            ..self.kv_shape()
        }
    }

    /// The pool the forward pass uses, around `inner` (made for [`Model::stored_kv_shape`]):
    /// `inner` itself, or, for a model with sliding-window layers, `inner` for the global
    /// layers with a RAM ring per sequence for each local layer.
    pub fn windowed_pool<'p>(&self, inner: Box<dyn KvPool + 'p>) -> Box<dyn KvPool + 'p> {
        match &self.config.sliding {
            Some(s) => Box::new(WindowedPool::new(inner, self.kv_shape(), s.clone())),
            None => inner,
        }
    }
}
