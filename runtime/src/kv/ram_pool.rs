//! Sequences in RAM, each in its own [`RamKvCache`].

use super::{AttendReq, KvCache, KvPool, RamKvCache};
use csd_engine::{AttentionMode, KvError, KvShape, SeqId};
use std::collections::HashMap;

/// Sequences in RAM. Attention modes other than `full` need the storage engine and are
/// refused with a message saying so. Each sequence holds room for its whole capacity
/// against the pool's budget from the moment it opens, so that a request that fits is
/// never refused halfway.
pub struct RamKvPool {
    shape: KvShape,
    seqs: HashMap<SeqId, RamKvCache>,
    budget_bytes: u64,
    held_bytes: u64,
}

impl RamKvPool {
    /// An empty pool for KV of `shape`, without a budget.
    pub fn new(shape: KvShape) -> Self {
        Self::with_budget(shape, u64::MAX)
    }

    /// An empty pool for KV of `shape` whose sequences may hold `budget_bytes` of RAM in
    /// all (K and V of every token of their capacity).
    pub fn with_budget(shape: KvShape, budget_bytes: u64) -> Self {
        Self {
            shape,
            seqs: HashMap::new(),
            budget_bytes,
            held_bytes: 0,
        }
    }

    /// RAM a sequence of `tokens` tokens' capacity holds: K and V, f16, every layer and kv
    /// head.
    pub fn bytes_for(&self, tokens: usize) -> u64 {
        let s = &self.shape;
        tokens as u64 * s.layers as u64 * s.kv_heads as u64 * s.head_dim as u64 * 2 * 2
    }

    /// Sequences held.
    pub fn active(&self) -> usize {
        self.seqs.len()
    }

    fn get(&mut self, seq: SeqId) -> Result<&mut RamKvCache, KvError> {
        self.seqs.get_mut(&seq).ok_or(KvError::UnknownSequence(seq))
    }
}

impl KvPool for RamKvPool {
    fn shape(&self) -> KvShape {
        self.shape
    }

    fn open(&mut self, seq: SeqId, mode: AttentionMode, capacity: usize) -> Result<(), KvError> {
        if mode != AttentionMode::Full {
            return Err(KvError::ModeNeedsFlash(mode));
        }
        if self.seqs.contains_key(&seq) {
            return Err(KvError::SequenceExists(seq));
        }
        let needed = self.bytes_for(capacity);
        if self.held_bytes.saturating_add(needed) > self.budget_bytes {
            return Err(KvError::RamBudget {
                needed,
                budget: self.budget_bytes,
                held: self.held_bytes,
            });
        }
        self.held_bytes += needed;
        self.seqs.insert(seq, RamKvCache::new(self.shape, capacity));
        Ok(())
    }

    fn release(&mut self, seq: SeqId) {
        if let Some(c) = self.seqs.remove(&seq) {
            self.held_bytes -= self.bytes_for(c.capacity());
        }
    }

    fn len(&self, seq: SeqId) -> Result<usize, KvError> {
        self.seqs
            .get(&seq)
            .map(|c| c.len())
            .ok_or(KvError::UnknownSequence(seq))
    }

    fn capacity(&self, seq: SeqId) -> Result<usize, KvError> {
        self.seqs
            .get(&seq)
            .map(|c| c.capacity())
            .ok_or(KvError::UnknownSequence(seq))
    }

    fn append(
        &mut self,
        seq: SeqId,
        layer: usize,
        k: &[f32],
        v: &[f32],
        _q: &[f32],
    ) -> Result<(), KvError> {
        self.get(seq)?.append(layer, k, v)
    }

    fn attend(&mut self, layer: usize, items: &mut [AttendReq<'_>]) -> Vec<Result<(), KvError>> {
        items
            .iter_mut()
            .map(|it| self.get(it.seq)?.attend(layer, it.q, it.first_pos, it.out))
            .collect()
    }

    fn truncate(&mut self, seq: SeqId, len: usize) {
        if let Some(c) = self.seqs.get_mut(&seq) {
            c.truncate(len);
        }
    }
}
