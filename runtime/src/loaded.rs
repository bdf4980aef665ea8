//! A model ready to run: weights, tokenizer and chat template from one GGUF file.

use crate::chat::{ChatError, ChatTemplate};
use crate::model::{Model, ModelError};
use crate::tokenizer::{Tokenizer, TokenizerError};
use std::path::{Path, PathBuf};

/// Why a model file could not be made ready to run.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The GGUF file, its shape or its weights.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The tokenizer stored in the file.
    #[error("building the tokenizer: {0}")]
    Tokenizer(#[from] TokenizerError),
    /// The chat template stored in the file.
    #[error("reading the chat template: {0}")]
    Chat(#[from] ChatError),
}

/// A model ready to serve: weights, tokenizer and chat template.
pub struct LoadedModel {
    /// Weights and shape.
    pub model: Model,
    /// The tokenizer built from the file's vocabulary.
    pub tokenizer: Tokenizer,
    /// The chat template, when the file has one.
    pub chat: Option<ChatTemplate>,
    /// Where the model was loaded from.
    pub path: PathBuf,
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel")
            .field("path", &self.path)
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}

impl LoadedModel {
    /// Load the GGUF model at `path` with its tokenizer and chat template.
    pub fn load(path: &Path) -> Result<Self, LoadError> {
        let model = Model::load(path)?;
        let tokenizer = Tokenizer::from_gguf(model.gguf())?;
        let chat = ChatTemplate::from_gguf(model.gguf())?;
        Ok(Self {
            model,
            tokenizer,
            chat,
            path: path.to_path_buf(),
        })
    }

    /// SHA-256 of the model file: what the prefix cache is keyed by, so KV computed by one
    /// model file never serves another. Reads the whole file (about 0.1 s per 100 MB).
    pub fn file_digest(&self) -> std::io::Result<[u8; 32]> {
        crate::fetch::file_sha256(&self.path)
    }
}
