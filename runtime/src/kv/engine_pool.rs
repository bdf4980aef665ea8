//! The storage engine as the model's [`KvPool`]: every sequence's KV on flash, decode
//! attention computed next to the data in the mode each sequence was opened with. This is
//! also the one place where a KV store file is opened for a model: the daemon, the CLI and
//! the benchmarks all come through [`EnginePool::open_or_create`] or [`EnginePool::create`].

use super::{CacheUse, KvPool, PrefixCacheStats};
use csd_engine::device::OpenDeviceOptions;
use csd_engine::{
    prefix_keys, AttendReq, AttentionMode, Engine, EngineConfig, EngineStats, KvError, KvShape,
    KvStore, SeqId, StoreConfig, StoreOptions,
};
use std::path::Path;

/// Bytes of one kv head's keys in a page: 4 KiB, the flash page and the O_DIRECT alignment.
pub const PAGE_BYTES: u32 = 4096;

/// A pool of sequences held by a [`csd_engine::Engine`].
pub struct EnginePool {
    engine: Engine,
    shape: KvShape,
    /// The model file's digest, once bound: prefix caching is on from then.
    model: Option<[u8; 32]>,
    lookup_tokens: u64,
    hit_tokens: u64,
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
        Self::start(
            path,
            store_bytes,
            shape,
            cfg,
            Open::Existing,
            Default::default(),
        )
    }

    /// [`EnginePool::open_or_create`] with the store's device opened as `device` says (for
    /// example with injected faults).
    pub fn open_or_create_on(
        path: &Path,
        store_bytes: u64,
        shape: KvShape,
        cfg: EngineConfig,
        device: OpenDeviceOptions,
    ) -> Result<Self, KvError> {
        Self::start(path, store_bytes, shape, cfg, Open::Existing, device)
    }

    /// Format a new `store_bytes` store at `path` (and its folder) for KV of `shape`,
    /// replacing what was there, and run the engine over it with `cfg`.
    pub fn create(
        path: &Path,
        store_bytes: u64,
        shape: KvShape,
        cfg: EngineConfig,
    ) -> Result<Self, KvError> {
        Self::start(
            path,
            store_bytes,
            shape,
            cfg,
            Open::Fresh,
            Default::default(),
        )
    }

    fn start(
        path: &Path,
        store_bytes: u64,
        shape: KvShape,
        cfg: EngineConfig,
        how: Open,
        device: OpenDeviceOptions,
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
            options: StoreOptions {
                device,
                ..Default::default()
            },
        };
        let store = match how {
            Open::Existing => match KvStore::open_or_create(path, &config) {
                // The store is a cache of this daemon's own making: one written by another
                // format version or for another model's KV shape is replaced, never an
                // error at start. A file that is not a store at all is refused as before.
                Err(e @ (KvError::UnsupportedVersion { .. } | KvError::ShapeMismatch { .. })) => {
                    tracing::warn!(path = %path.display(), reason = %e, "KV store replaced: its cached pages cannot be used by this build or model");
                    KvStore::create(path, &config)?
                }
                r => r?,
            },
            Open::Fresh => KvStore::create(path, &config)?,
        };
        tracing::info!(path = %path.display(), io = %store.mode(), "KV cache on flash");
        Self::new(store, shape, cfg)
    }

    /// Run the engine over an open `store` for a model whose KV has `shape`.
    pub fn new(store: KvStore, shape: KvShape, cfg: EngineConfig) -> Result<Self, KvError> {
        let engine = Engine::new(store, shape, cfg)?;
        Ok(Self {
            engine,
            shape,
            model: None,
            lookup_tokens: 0,
            hit_tokens: 0,
        })
    }

    /// Turn the prefix cache on for the model whose file has digest `model` (see
    /// [`crate::LoadedModel::file_digest`]). Pages cached for another model are dropped, with
    /// a logged reason. Returns the pages dropped.
    pub fn bind_model(&mut self, model: [u8; 32]) -> Result<u64, KvError> {
        let dropped = self.engine.bind_model(model)?;
        self.model = Some(model);
        Ok(dropped)
    }

    /// The keys of `tokens`' full pages, if the cache is on.
    fn keys(&self, tokens: &[u32]) -> Vec<csd_engine::BlockKey> {
        match &self.model {
            Some(m) => prefix_keys(m, tokens, self.engine.block_tokens()),
            None => Vec::new(),
        }
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

    fn open_cached(
        &mut self,
        seq: SeqId,
        mode: AttentionMode,
        capacity: usize,
        prompt: &[u32],
        cache: CacheUse,
    ) -> Result<usize, KvError> {
        let mut keys = if cache.reads() {
            self.keys(prompt)
        } else {
            Vec::new()
        };
        // Leave at least two prompt tokens to prefill: the last one must run through the
        // model for the first token's logits, and a chunk of one token sums its dot products
        // in another order than the fresh prefill's batch did (the output would differ in
        // the last bits).
        let t = self.engine.block_tokens();
        keys.truncate(prompt.len().saturating_sub(2) / t);
        let held = self.engine.open_shared(seq, mode, capacity, &keys)?;
        if let Err(e) = self.engine.reserve(seq, capacity) {
            let _ = self.engine.reclaim(seq);
            return Err(e);
        }
        if self.model.is_some() && cache.reads() {
            self.lookup_tokens += prompt.len() as u64;
            self.hit_tokens += held as u64;
        }
        Ok(held)
    }

    fn publish(&mut self, seq: SeqId, tokens: &[u32]) -> Result<usize, KvError> {
        let keys = self.keys(tokens);
        if keys.is_empty() {
            return Ok(0);
        }
        self.engine.publish(seq, &keys)
    }

    fn cache_page_tokens(&self) -> usize {
        if self.model.is_some() {
            self.engine.block_tokens()
        } else {
            0
        }
    }

    fn clear_prefix_cache(&mut self) -> Result<u64, KvError> {
        self.engine.clear_prefix_cache()
    }

    fn prefix_stats(&self) -> Option<PrefixCacheStats> {
        let (cache, store_bytes, store_free_bytes) = self.engine.prefix_stats();
        Some(PrefixCacheStats {
            cache,
            lookup_tokens: self.lookup_tokens,
            hit_tokens: self.hit_tokens,
            store_bytes,
            store_free_bytes,
        })
    }
}
