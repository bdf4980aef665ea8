//! KV cache backends: where the forward pass keeps K/V and gets attention from.
//!
//! * [`KvCache`]: one sequence ([`RamKvCache`] in RAM);
//! * [`KvPool`]: many sequences for a batched step ([`RamKvPool`] in RAM, [`EnginePool`] on
//!   flash through the storage engine, [`OneCache`] to use one cache as a pool);
//! * [`WindowedPool`] / [`WindowedCache`]: a model's sliding-window layers in RAM rings
//!   beside a pool or cache that holds only its global layers;
//! * [`EngineArgs`]: the engine's tunables as command-line flags.
//!
//! The KV shape, the attention modes, the errors and the counters are the storage engine's
//! own types ([`csd_engine::KvShape`], [`csd_engine::AttentionMode`], [`csd_engine::KvError`],
//! [`csd_engine::EngineStats`]), re-exported here.

mod args;
mod cache;
mod engine_pool;
mod one_cache;
mod pool;
mod ram_cache;
mod ram_pool;
mod window;

pub use args::EngineArgs;
pub use cache::KvCache;
pub use csd_engine::{AttendReq, AttentionMode, EngineStats, KvError, KvShape, PrefixStats, SeqId};
pub use engine_pool::{EnginePool, PAGE_BYTES};
pub use one_cache::{OneCache, ONE_CACHE_SEQ};
pub use pool::{CacheUse, KvPool, PrefixCacheStats};
pub use ram_cache::RamKvCache;
pub use ram_pool::RamKvPool;
pub use window::{WindowedCache, WindowedPool};
