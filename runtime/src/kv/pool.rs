//! KV for many sequences at once: what a batched forward step talks to.
//!
//! A [`KvPool`] owns the KV of every running sequence, keyed by a [`SeqId`] the caller
//! chooses. The forward pass appends each layer's K/V and asks for attention outputs for a
//! batch of (sequence, query rows); it never reads KV bytes itself. [`super::RamKvPool`]
//! keeps each sequence in a [`super::RamKvCache`]; [`super::EnginePool`] keeps them on flash
//! and attends next to the data. [`super::OneCache`] lets a single [`super::KvCache`] stand
//! in as a pool of one.

use csd_engine::{AttendReq, AttentionMode, EngineStats, KvError, KvShape, SeqId};

/// KV of many sequences. Every method names the sequence it acts on; an error concerns that
/// sequence only and leaves the others as they were.
pub trait KvPool: Send {
    /// The KV shape (layers, heads, head width) shared by every sequence of the pool.
    fn shape(&self) -> KvShape;
    /// Start an empty sequence `seq` that may grow to `capacity` tokens.
    fn open(&mut self, seq: SeqId, mode: AttentionMode, capacity: usize) -> Result<(), KvError>;
    /// Drop a sequence and free its KV at once. Unknown keys are ignored.
    fn release(&mut self, seq: SeqId);
    /// Tokens held by `seq` (all layers), or an error naming the unknown sequence.
    fn len(&self, seq: SeqId) -> Result<usize, KvError>;
    /// Most tokens `seq` may hold.
    fn capacity(&self, seq: SeqId) -> Result<usize, KvError>;
    /// Store K/V (`n × kv_heads·head_dim`, RoPE applied) of `n` new tokens of `seq` for
    /// `layer`. `q` holds the same tokens' queries (`n × heads·head_dim`), which an engine may
    /// fold into its activation statistics.
    fn append(
        &mut self,
        seq: SeqId,
        layer: usize,
        k: &[f32],
        v: &[f32],
        q: &[f32],
    ) -> Result<(), KvError>;
    /// Attention of `layer` for every item, causally masked over what each sequence holds.
    /// Returns one result per item, in order.
    fn attend(&mut self, layer: usize, items: &mut [AttendReq<'_>]) -> Vec<Result<(), KvError>>;
    /// Forget everything of `seq` after its first `len` tokens.
    fn truncate(&mut self, seq: SeqId, len: usize);
    /// Counters since the pool was made.
    fn stats(&self) -> EngineStats {
        EngineStats::default()
    }
    /// Counters for one sequence since it was opened.
    fn seq_stats(&self, _seq: SeqId) -> EngineStats {
        EngineStats::default()
    }
}
