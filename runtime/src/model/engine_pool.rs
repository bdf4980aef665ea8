//! The storage engine as the model's [`KvPool`]: every sequence's KV on flash, decode
//! attention computed next to the data in the mode each sequence was opened with.

use super::kv_cache::{KvError, KvShape};
use super::pool::{AttendItem, AttentionMode, KvPool, PoolStats, SeqKey};
use csd_engine::{AttendReq, AttnMode, Engine, EngineConfig, EngineStats, KvStore};

/// A pool of sequences held by a [`csd_engine::Engine`].
pub struct EnginePool {
    engine: Engine,
    shape: KvShape,
}

fn engine_err(e: csd_engine::KvError) -> KvError {
    match e {
        csd_engine::KvError::UnknownSequence(s) => KvError::UnknownSeq(s),
        other => KvError::Engine(other.to_string()),
    }
}

pub fn attn_mode(m: AttentionMode) -> AttnMode {
    match m {
        AttentionMode::Full => AttnMode::Full,
        AttentionMode::Flexgen => AttnMode::Flexgen,
        AttentionMode::Sparse => AttnMode::Sparse,
    }
}

fn pool_stats(s: &EngineStats) -> PoolStats {
    PoolStats {
        device_bytes_read: s.device_bytes_read,
        device_bytes_written: s.device_bytes_written,
        boundary_bytes: s.boundary_bytes,
        cache_lookups: s.cache_lookups,
        cache_hits: s.cache_hits,
    }
}

impl EnginePool {
    /// Run the engine over `store` for a model of KV shape `shape`.
    pub fn new(store: KvStore, shape: KvShape, cfg: EngineConfig) -> Result<Self, KvError> {
        let s = store.shape();
        if (s.layers as usize, s.kv_heads as usize, s.head_dim as usize)
            != (shape.n_layers, shape.n_kv_heads, shape.head_dim)
        {
            return Err(KvError::Shape(format!(
                "KV store shape {} layers × {} kv heads × {} head dim does not match the model's {} × {} × {}",
                s.layers, s.kv_heads, s.head_dim, shape.n_layers, shape.n_kv_heads, shape.head_dim
            )));
        }
        let engine = Engine::new(store, shape.n_heads, cfg).map_err(engine_err)?;
        Ok(Self { engine, shape })
    }

    /// The engine, for persistence, restore, cloning and its detailed counters.
    pub fn engine(&mut self) -> &mut Engine {
        &mut self.engine
    }

    pub fn engine_ref(&self) -> &Engine {
        &self.engine
    }
}

impl KvPool for EnginePool {
    fn shape(&self) -> KvShape {
        self.shape
    }

    fn open(&mut self, seq: SeqKey, mode: AttentionMode, capacity: usize) -> Result<(), KvError> {
        self.engine
            .open(seq, attn_mode(mode), capacity)
            .map_err(engine_err)
    }

    fn release(&mut self, seq: SeqKey) {
        if let Err(e) = self.engine.reclaim(seq) {
            if !matches!(e, csd_engine::KvError::UnknownSequence(_)) {
                tracing::warn!(seq, error = %e, "reclaiming a sequence failed");
            }
        }
    }

    fn len(&self, seq: SeqKey) -> Result<usize, KvError> {
        self.engine.len(seq).map_err(engine_err)
    }

    fn capacity(&self, seq: SeqKey) -> Result<usize, KvError> {
        self.engine.capacity(seq).map_err(engine_err)
    }

    fn append(
        &mut self,
        seq: SeqKey,
        layer: usize,
        k: &[f32],
        v: &[f32],
        q: &[f32],
    ) -> Result<(), KvError> {
        self.engine.append(seq, layer, k, v, q).map_err(engine_err)
    }

    fn attend(&mut self, layer: usize, items: &mut [AttendItem<'_>]) -> Vec<Result<(), KvError>> {
        let mut reqs: Vec<AttendReq<'_>> = items
            .iter_mut()
            .map(|it| AttendReq {
                seq: it.seq,
                q: it.q,
                first_pos: it.first_pos,
                out: &mut *it.out,
            })
            .collect();
        self.engine
            .attend(layer, &mut reqs)
            .into_iter()
            .map(|r| r.map_err(engine_err))
            .collect()
    }

    fn truncate(&mut self, seq: SeqKey, len: usize) {
        self.engine.truncate(seq, len);
    }

    fn stats(&self) -> PoolStats {
        pool_stats(&self.engine.totals().stats)
    }

    fn seq_stats(&self, seq: SeqKey) -> PoolStats {
        self.engine
            .seq_stats(seq)
            .map(|s| pool_stats(&s))
            .unwrap_or_default()
    }
}
