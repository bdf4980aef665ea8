//! The KV pool the scheduler runs on, chosen at start-up from the configuration: sequences
//! in RAM, or (with `kv_store_path`) in the storage engine's store on flash.

use crate::config::Config;
use instinfer_runtime::model::{EnginePool, KvPool, Model, RamKvPool};

/// Why no pool could be built.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("KV store {path}: {reason}")]
    Store { path: String, reason: String },
}

/// Where the KV cache lives, as reported by GetModelInfo.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvPlacement {
    Ram,
    Flash,
}

impl KvPlacement {
    pub fn as_str(self) -> &'static str {
        match self {
            KvPlacement::Ram => "ram",
            KvPlacement::Flash => "flash",
        }
    }
}

/// Build the pool `config` asks for, for `model`.
pub fn build_pool(
    config: &Config,
    model: &Model,
) -> Result<(Box<dyn KvPool>, KvPlacement), PoolError> {
    match &config.kv_store_path {
        None => Ok((Box::new(RamKvPool::new(model.kv_shape())), KvPlacement::Ram)),
        Some(path) => {
            let err = |reason: String| PoolError::Store {
                path: path.display().to_string(),
                reason,
            };
            let c = &model.config;
            let shape = csd_engine::KvShape::with_page_bytes(
                c.n_layers as u32,
                c.n_kv_heads as u32,
                c.head_dim as u32,
                4096,
            );
            let store = csd_engine::KvStore::open_or_create(
                path,
                &csd_engine::StoreConfig {
                    shape,
                    capacity: config.kv_store_bytes,
                    options: Default::default(),
                },
            )
            .map_err(|e| err(e.to_string()))?;
            tracing::info!(path = %path.display(), io = %store.mode(), "KV cache on flash");
            let pool =
                EnginePool::new(store, model.kv_shape(), csd_engine::EngineConfig::default())
                    .map_err(|e| err(e.to_string()))?;
            Ok((Box::new(pool), KvPlacement::Flash))
        }
    }
}
