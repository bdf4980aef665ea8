//! The KV cache of one sequence, as the forward pass sees it. The model runtime only appends
//! K/V and asks for attention outputs; it never reads KV bytes itself, so the storage engine
//! can hold the KV on flash behind the same calls. [`super::RamKvCache`] keeps it in memory.

use csd_engine::{KvError, KvShape};

/// One sequence's KV cache.
pub trait KvCache: Send {
    /// The shape of the K/V held.
    fn shape(&self) -> KvShape;
    /// Tokens whose K/V all layers hold.
    fn len(&self) -> usize;
    /// Whether no token is stored.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Most tokens this cache can hold.
    fn capacity(&self) -> usize;
    /// Store K and V (`n × kv_heads·head_dim` each, RoPE already applied) of `n` new tokens
    /// for `layer`.
    fn append(&mut self, layer: usize, k: &[f32], v: &[f32]) -> Result<(), KvError>;
    /// Attention for `n` queries (`n × heads·head_dim`) at positions `first_pos..first_pos+n`
    /// over everything appended for `layer`, causally masked. Writes `n × heads·head_dim`.
    fn attend(
        &mut self,
        layer: usize,
        q: &[f32],
        first_pos: usize,
        out: &mut [f32],
    ) -> Result<(), KvError>;
    /// Forget everything after the first `len` tokens (all layers).
    fn truncate(&mut self, len: usize);
    /// The sliding window this cache keeps local layers in, if it does (see
    /// [`super::WindowedCache`]).
    fn sliding_window(&self) -> Option<usize> {
        None
    }
}

impl<T: KvCache + ?Sized> KvCache for Box<T> {
    fn shape(&self) -> KvShape {
        (**self).shape()
    }
    fn len(&self) -> usize {
        (**self).len()
    }
    fn capacity(&self) -> usize {
        (**self).capacity()
    }
    fn append(&mut self, layer: usize, k: &[f32], v: &[f32]) -> Result<(), KvError> {
        (**self).append(layer, k, v)
    }
    fn attend(
        &mut self,
        layer: usize,
        q: &[f32],
        first_pos: usize,
        out: &mut [f32],
    ) -> Result<(), KvError> {
        (**self).attend(layer, q, first_pos, out)
    }
    fn truncate(&mut self, len: usize) {
        (**self).truncate(len)
    }
    fn sliding_window(&self) -> Option<usize> {
        (**self).sliding_window()
    }
}
