//! The KV backend the scheduler runs on, chosen at start-up from the configuration: sequences
//! in RAM, or (with `kv_store_path`) in the storage engine's store on flash.

use crate::config::Config;
use instinfer_runtime::kv::{EnginePool, KvError, KvPool, RamKvPool};
use instinfer_runtime::model::Model;

/// Where the KV cache lives, as reported by GetModelInfo.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvPlacement {
    /// Every sequence's KV in RAM.
    Ram,
    /// Every sequence's KV in the storage engine's store on flash.
    Flash,
}

impl KvPlacement {
    /// The placement's name in GetModelInfo.
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
) -> Result<(Box<dyn KvPool>, KvPlacement), KvError> {
    match &config.kv_store_path {
        None => Ok((Box::new(RamKvPool::new(model.kv_shape())), KvPlacement::Ram)),
        Some(path) => {
            let pool = EnginePool::open_or_create(
                path,
                config.kv_store_bytes,
                model.kv_shape(),
                config.engine,
            )?;
            Ok((Box::new(pool), KvPlacement::Flash))
        }
    }
}
