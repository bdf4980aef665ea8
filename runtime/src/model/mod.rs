//! The Llama-family model runtime: GGUF loading and the forward pass.

pub mod config;
mod forward;
pub mod gguf;
mod mmap;
pub mod weights;

use crate::kv::{KvError, KvShape, RamKvCache};
pub use config::{Arch, ConfigError, ModelConfig};
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
}

/// A loaded model: the mapped file, its shape and its weights.
pub struct Model {
    file: GgufFile,
    /// The model's shape.
    pub config: ModelConfig,
    /// The model's weights (their bytes stay in the mapped file).
    pub weights: Weights,
    rope: Rope,
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
        })
    }

    /// The GGUF file the model was loaded from.
    pub fn gguf(&self) -> &GgufFile {
        &self.file
    }

    /// A RAM KV cache sized for this model's full context.
    pub fn new_ram_cache(&self) -> RamKvCache {
        RamKvCache::new(self.kv_shape(), self.config.context_len)
    }

    /// The per-token KV shape of this model (layers, query and kv heads, head width).
    pub fn kv_shape(&self) -> KvShape {
        let c = &self.config;
        KvShape {
            layers: c.n_layers,
            q_heads: c.n_heads,
            kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
        }
    }
}
