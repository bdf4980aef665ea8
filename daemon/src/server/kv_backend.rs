//! The KV backend the scheduler runs on, chosen at start-up from the configuration: sequences
//! in the storage engine's store on flash (the default; `kv_store_path` is then resolved),
//! or in RAM with `kv_cache = "ram"`.

use crate::config::Config;
use csd_engine::device::OpenDeviceOptions;
use instinfer_runtime::kv::{EnginePool, KvError, KvPool, RamKvPool};
use instinfer_runtime::LoadedModel;

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

/// Build the pool `config` asks for, for `loaded`; on flash, with the prefix cache bound to
/// the model file (pages another model file cached are dropped, with a logged reason). A
/// model with sliding-window layers keeps those in RAM rings; the pool holds its global
/// layers.
pub fn build_pool(
    config: &Config,
    loaded: &LoadedModel,
) -> Result<(Box<dyn KvPool>, KvPlacement), KvError> {
    let model = &loaded.model;
    match &config.kv_store_path {
        None => Ok((
            model.windowed_pool(Box::new(RamKvPool::with_budget(
                model.stored_kv_shape(),
                config.kv_ram_bytes,
            ))),
            KvPlacement::Ram,
        )),
        Some(path) => {
            let device = OpenDeviceOptions {
                faults: config.fault_injection.and_then(|f| f.device_faults()),
                ..Default::default()
            };
            let mut pool = EnginePool::open_or_create_on(
                path,
                config.kv_store_bytes,
                model.stored_kv_shape(),
                config.engine,
                device,
            )?;
            let digest = loaded.file_digest().map_err(|source| KvError::Open {
                path: loaded.path.display().to_string(),
                source,
            })?;
            pool.bind_model(digest)?;
            Ok((model.windowed_pool(Box::new(pool)), KvPlacement::Flash))
        }
    }
}
