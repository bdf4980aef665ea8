//! A sequence's KV cache on flash: the model's [`KvCache`] trait over csd-engine's
//! [`KvStore`]. Full pages go to the store (O_DIRECT, checksummed), the partial last page
//! stays in the store's RAM tail, and attention reads every page of the layer back and runs
//! the same kernel as the RAM cache over them, so results are identical. This is the engine's
//! `full` mode; page selection (`sparse`) and the FlexGen baseline build on it.

use super::kv_cache::{attend_heads, KvCache, KvError, KvShape};
use csd_engine::{KvStore, LayerRead, SeqId};
use half::f16;

/// One sequence of a [`KvStore`] seen as a KV cache.
pub struct FlashKvCache<'s> {
    store: &'s mut KvStore,
    seq: SeqId,
    shape: KvShape,
    capacity: usize,
    lens: Vec<usize>,
    read: LayerRead,
    k16: Vec<f16>,
    v16: Vec<f16>,
    /// Set when a failed step left tokens in the store that the model has forgotten.
    broken: bool,
}

impl<'s> FlashKvCache<'s> {
    /// Use sequence `seq` of `store` (which must hold the model's layer, kv-head and head-dim
    /// shape) for up to `capacity` tokens. The sequence must be new or empty.
    pub fn new(
        store: &'s mut KvStore,
        seq: SeqId,
        shape: KvShape,
        capacity: usize,
    ) -> Result<Self, KvError> {
        let s = store.shape();
        if (s.layers as usize, s.kv_heads as usize, s.head_dim as usize)
            != (shape.n_layers, shape.n_kv_heads, shape.head_dim)
        {
            return Err(KvError::Shape(format!(
                "KV store shape {} layers × {} kv heads × {} head dim does not match the model's {} × {} × {}",
                s.layers, s.kv_heads, s.head_dim, shape.n_layers, shape.n_kv_heads, shape.head_dim
            )));
        }
        if store
            .info(seq)
            .is_some_and(|i| i.tokens.iter().any(|&t| t > 0))
        {
            return Err(KvError::Shape(format!(
                "sequence {seq} already holds tokens"
            )));
        }
        Ok(Self {
            store,
            seq,
            shape,
            capacity,
            lens: vec![0; shape.n_layers],
            read: LayerRead::new(),
            k16: Vec::new(),
            v16: Vec::new(),
            broken: false,
        })
    }

    /// The store behind this cache (counters, persistence).
    pub fn store(&self) -> &KvStore {
        self.store
    }

    fn check(&self) -> Result<(), KvError> {
        if self.broken {
            return Err(KvError::Engine(format!(
                "sequence {} lost its state after a failed step; reclaim it and start again",
                self.seq
            )));
        }
        Ok(())
    }
}

fn engine(e: csd_engine::KvError) -> KvError {
    KvError::Engine(e.to_string())
}

impl KvCache for FlashKvCache<'_> {
    fn shape(&self) -> KvShape {
        self.shape
    }

    fn len(&self) -> usize {
        self.lens.iter().copied().min().unwrap_or(0)
    }

    fn capacity(&self) -> usize {
        self.capacity
    }

    fn append(&mut self, layer: usize, k: &[f32], v: &[f32]) -> Result<(), KvError> {
        self.check()?;
        let held = self.lens.get(layer).copied().unwrap_or(0);
        let n = self.shape.check_append(layer, k, v, held, self.capacity)?;
        // Token-major n × kv_heads × head_dim, the layout both sides use.
        self.k16.clear();
        self.k16.extend(k.iter().map(|&x| f16::from_f32(x)));
        self.v16.clear();
        self.v16.extend(v.iter().map(|&x| f16::from_f32(x)));
        self.store
            .append(self.seq, layer as u32, &self.k16, &self.v16)
            .map_err(engine)?;
        self.lens[layer] = held + n;
        Ok(())
    }

    fn attend(
        &mut self,
        layer: usize,
        q: &[f32],
        first_pos: usize,
        out: &mut [f32],
    ) -> Result<(), KvError> {
        self.check()?;
        let s = self.shape;
        s.check_attend(layer, q, out)?;
        self.store
            .read_layer(self.seq, layer as u32, &mut self.read)
            .map_err(engine)?;
        let segments: Vec<_> = (0..s.n_kv_heads).map(|h| self.read.segments(h)).collect();
        attend_heads(s, q, first_pos, &segments, self.lens[layer], out);
        Ok(())
    }

    fn truncate(&mut self, len: usize) {
        if len >= self.len() && self.lens.iter().all(|&l| l == len) {
            return;
        }
        // The store appends only; forgetting tokens means dropping the whole sequence.
        if len == 0 && self.store.reclaim(self.seq).is_ok() {
            self.lens.fill(0);
            self.broken = false;
            return;
        }
        self.broken = true;
    }
}
