//! The storage engine as the model's [`KvPool`]: every sequence's KV on flash, decode
//! attention computed next to the data in the mode each sequence was opened with. This is
//! also the one place where a KV store file is opened for a model: the daemon, the CLI and
//! the benchmarks all come through [`EnginePool::open_or_create`] or [`EnginePool::create`].

use super::KvPool;
use csd_engine::{
    AttendReq, AttentionMode, Engine, EngineConfig, EngineStats, KvError, KvShape, KvStore, SeqId,
    StoreConfig,
};
use std::path::Path;

/// Bytes of one kv head's keys in a page: 4 KiB, the flash page and the O_DIRECT alignment.
pub const PAGE_BYTES: u32 = 4096;

/// A pool of sequences held by a [`csd_engine::Engine`].
pub struct EnginePool {
    engine: Engine,
    shape: KvShape,
}

/// How a store file is opened.
#[derive(Clone, Copy)]
enum Open {
    /// Reuse a store of the same shape, or make one where there is none.
    Existing,
    /// Always format a new store.
    Fresh,
}

impl EnginePool {
    /// Open the KV store at `path` if it holds KV of `shape` (keeping what was persisted in
    /// it), or create a `store_bytes` store there (and its folder) if there is none; then run
    /// the engine over it with `cfg`. A file holding anything else is refused and left alone.
    pub fn open_or_create(
        path: &Path,
        store_bytes: u64,
        shape: KvShape,
        cfg: EngineConfig,
    ) -> Result<Self, KvError> {
        Self::start(path, store_bytes, shape, cfg, Open::Existing)
    }

    /// Format a new `store_bytes` store at `path` (and its folder) for KV of `shape`,
    /// replacing what was there, and run the engine over it with `cfg`.
    pub fn create(
        path: &Path,
        store_bytes: u64,
        shape: KvShape,
        cfg: EngineConfig,
    ) -> Result<Self, KvError> {
        Self::start(path, store_bytes, shape, cfg, Open::Fresh)
    }

    fn start(
        path: &Path,
        store_bytes: u64,
        shape: KvShape,
        cfg: EngineConfig,
        how: Open,
    ) -> Result<Self, KvError> {
        shape.validate()?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| KvError::Open {
                path: dir.display().to_string(),
                source,
            })?;
        }
        let config = StoreConfig {
            shape: shape.page_shape(PAGE_BYTES),
            capacity: store_bytes,
            options: Default::default(),
        };
        let store = match how {
            Open::Existing => KvStore::open_or_create(path, &config)?,
            Open::Fresh => KvStore::create(path, &config)?,
        };
        tracing::info!(path = %path.display(), io = %store.mode(), "KV cache on flash");
        Self::new(store, shape, cfg)
    }

    /// Run the engine over an open `store` for a model whose KV has `shape`.
    pub fn new(store: KvStore, shape: KvShape, cfg: EngineConfig) -> Result<Self, KvError> {
        let engine = Engine::new(store, shape, cfg)?;
        Ok(Self { engine, shape })
    }

    /// The engine, for persistence, restore, cloning and its detailed counters.
    pub fn engine(&mut self) -> &mut Engine {
        &mut self.engine
    }

    /// The engine, read-only.
    pub fn engine_ref(&self) -> &Engine {
        &self.engine
    }
}

impl KvPool for EnginePool {
    fn shape(&self) -> KvShape {
        self.shape
    }

    fn open(&mut self, seq: SeqId, mode: AttentionMode, capacity: usize) -> Result<(), KvError> {
        self.engine.open(seq, mode, capacity)
    }

    fn release(&mut self, seq: SeqId) {
        if let Err(e) = self.engine.reclaim(seq) {
            if !matches!(e, KvError::UnknownSequence(_)) {
                tracing::warn!(seq, error = %e, "reclaiming a sequence failed");
            }
        }
    }

    fn len(&self, seq: SeqId) -> Result<usize, KvError> {
        self.engine.len(seq)
    }

    fn capacity(&self, seq: SeqId) -> Result<usize, KvError> {
        self.engine.capacity(seq)
    }

    fn append(
        &mut self,
        seq: SeqId,
        layer: usize,
        k: &[f32],
        v: &[f32],
        q: &[f32],
    ) -> Result<(), KvError> {
        self.engine.append(seq, layer, k, v, q)
    }

    fn attend(&mut self, layer: usize, items: &mut [AttendReq<'_>]) -> Vec<Result<(), KvError>> {
        self.engine.attend(layer, items)
    }

    fn truncate(&mut self, seq: SeqId, len: usize) {
        self.engine.truncate(seq, len);
    }

    fn stats(&self) -> EngineStats {
        self.engine.totals().stats
    }

    fn seq_stats(&self, seq: SeqId) -> EngineStats {
        self.engine.seq_stats(seq).unwrap_or_default()
    }
}
