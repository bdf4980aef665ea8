//! Sequences in RAM, each in its own [`RamKvCache`].

use super::{AttendReq, KvCache, KvPool, RamKvCache};
use csd_engine::{AttentionMode, KvError, KvShape, SeqId};
use std::collections::HashMap;

/// Sequences in RAM. Attention modes other than `full` need the storage engine and are
/// refused with a message saying so.
pub struct RamKvPool {
    shape: KvShape,
    seqs: HashMap<SeqId, RamKvCache>,
}

impl RamKvPool {
    /// An empty pool for KV of `shape`.
    pub fn new(shape: KvShape) -> Self {
        Self {
            shape,
            seqs: HashMap::new(),
        }
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
        self.seqs.insert(seq, RamKvCache::new(self.shape, capacity));
        Ok(())
    }

    fn release(&mut self, seq: SeqId) {
        self.seqs.remove(&seq);
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
