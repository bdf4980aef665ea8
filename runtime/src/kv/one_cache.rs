//! One [`KvCache`] seen as a [`KvPool`] of a single sequence, so the single-sequence
//! generator and the batched forward pass share one code path.

use super::{AttendReq, KvCache, KvPool};
use csd_engine::{AttentionMode, KvError, KvShape, SeqId};

/// One [`KvCache`] seen as a pool holding the single sequence 0.
pub struct OneCache<'c>(pub &'c mut dyn KvCache);

/// The key [`OneCache`] answers to.
pub const ONE_CACHE_SEQ: SeqId = 0;

impl OneCache<'_> {
    fn check(&self, seq: SeqId) -> Result<(), KvError> {
        if seq == ONE_CACHE_SEQ {
            Ok(())
        } else {
            Err(KvError::UnknownSequence(seq))
        }
    }
}

impl KvPool for OneCache<'_> {
    fn shape(&self) -> KvShape {
        self.0.shape()
    }

    fn open(&mut self, seq: SeqId, _: AttentionMode, _: usize) -> Result<(), KvError> {
        Err(KvError::BadInput(format!(
            "a single KV cache cannot open sequence {seq}"
        )))
    }

    fn release(&mut self, _seq: SeqId) {}

    fn len(&self, seq: SeqId) -> Result<usize, KvError> {
        self.check(seq)?;
        Ok(self.0.len())
    }

    fn capacity(&self, seq: SeqId) -> Result<usize, KvError> {
        self.check(seq)?;
        Ok(self.0.capacity())
    }

    fn append(
        &mut self,
        seq: SeqId,
        layer: usize,
        k: &[f32],
        v: &[f32],
        _q: &[f32],
    ) -> Result<(), KvError> {
        self.check(seq)?;
        self.0.append(layer, k, v)
    }

    fn attend(&mut self, layer: usize, items: &mut [AttendReq<'_>]) -> Vec<Result<(), KvError>> {
        items
            .iter_mut()
            .map(|it| {
                self.check(it.seq)?;
                self.0.attend(layer, it.q, it.first_pos, it.out)
            })
            .collect()
    }

    fn truncate(&mut self, seq: SeqId, len: usize) {
        if seq == ONE_CACHE_SEQ {
            self.0.truncate(len);
        }
    }

    fn sliding_window(&self) -> Option<usize> {
        self.0.sliding_window()
    }
}
