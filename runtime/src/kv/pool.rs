//! KV for many sequences at once: what a batched forward step talks to.
//!
//! A [`KvPool`] owns the KV of every running sequence, keyed by a [`SeqId`] the caller
//! chooses. The forward pass appends each layer's K/V and asks for attention outputs for a
//! batch of (sequence, query rows); it never reads KV bytes itself. [`super::RamKvPool`]
//! keeps each sequence in a [`super::RamKvCache`]; [`super::EnginePool`] keeps them on flash
//! and attends next to the data. [`super::OneCache`] lets a single [`super::KvCache`] stand
//! in as a pool of one.

use csd_engine::{AttendReq, AttentionMode, EngineStats, KvError, KvShape, PrefixStats, SeqId};

/// What a request may do with the prefix cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CacheUse {
    /// Start on the longest cached prefix, and add this request's pages (the default).
    #[default]
    UseAndStore,
    /// Start on a cached prefix, but keep this request's pages off the cache.
    UseOnly,
    /// Neither: the prompt is prefilled in full and nothing of it stays on disk.
    Off,
}

impl CacheUse {
    /// Whether the request may start on cached pages.
    pub fn reads(self) -> bool {
        self != CacheUse::Off
    }

    /// Whether the request's pages join the cache.
    pub fn writes(self) -> bool {
        self == CacheUse::UseAndStore
    }
}

/// The prefix cache's figures, for a server's statistics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefixCacheStats {
    /// What the store's cache holds and has done.
    pub cache: PrefixStats,
    /// Prompt tokens looked up in the cache since start.
    pub lookup_tokens: u64,
    /// Of those, the tokens found (not prefilled again).
    pub hit_tokens: u64,
    /// Bytes of the KV store's data area, and of them not allocated.
    pub store_bytes: u64,
    /// Bytes of the KV store's data area not allocated.
    pub store_free_bytes: u64,
}

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
    /// Open `seq` for a request whose prompt is `prompt`, starting on the longest cached
    /// prefix of it that `cache` allows, and make room for `capacity` tokens before any
    /// prefill (a request that cannot fit is refused here). Returns the prompt tokens the
    /// sequence already holds; the caller prefills the rest. A pool without a prefix cache
    /// opens an empty sequence.
    fn open_cached(
        &mut self,
        seq: SeqId,
        mode: AttentionMode,
        capacity: usize,
        prompt: &[u32],
        cache: CacheUse,
    ) -> Result<usize, KvError> {
        let _ = (prompt, cache);
        self.open(seq, mode, capacity)?;
        Ok(0)
    }
    /// Add the full pages of `seq` to the prefix cache; `tokens` are the ids whose K/V it
    /// holds, first to last. Returns the pages added (0 without a prefix cache).
    fn publish(&mut self, seq: SeqId, tokens: &[u32]) -> Result<usize, KvError> {
        let _ = (seq, tokens);
        Ok(0)
    }
    /// Tokens per page of the prefix cache (what a page key covers); 0 without a prefix
    /// cache.
    fn cache_page_tokens(&self) -> usize {
        0
    }
    /// Empty the prefix cache; returns the pages dropped.
    fn clear_prefix_cache(&mut self) -> Result<u64, KvError> {
        Ok(0)
    }
    /// The prefix cache's figures, if the pool has one.
    fn prefix_stats(&self) -> Option<PrefixCacheStats> {
        None
    }
    /// The sliding window the pool keeps local layers in, if it does (see
    /// [`super::WindowedPool`]).
    fn sliding_window(&self) -> Option<usize> {
        None
    }
}

/// A pool behind a box or a mutable borrow is a pool: every call goes to it.
macro_rules! forward_pool {
    ($ty:ty) => {
        impl<T: KvPool + ?Sized> KvPool for $ty {
            fn shape(&self) -> KvShape {
                (**self).shape()
            }
            fn open(
                &mut self,
                seq: SeqId,
                mode: AttentionMode,
                capacity: usize,
            ) -> Result<(), KvError> {
                (**self).open(seq, mode, capacity)
            }
            fn release(&mut self, seq: SeqId) {
                (**self).release(seq)
            }
            fn len(&self, seq: SeqId) -> Result<usize, KvError> {
                (**self).len(seq)
            }
            fn capacity(&self, seq: SeqId) -> Result<usize, KvError> {
                (**self).capacity(seq)
            }
            fn append(
                &mut self,
                seq: SeqId,
                layer: usize,
                k: &[f32],
                v: &[f32],
                q: &[f32],
            ) -> Result<(), KvError> {
                (**self).append(seq, layer, k, v, q)
            }
            fn attend(
                &mut self,
                layer: usize,
                items: &mut [AttendReq<'_>],
            ) -> Vec<Result<(), KvError>> {
                (**self).attend(layer, items)
            }
            fn truncate(&mut self, seq: SeqId, len: usize) {
                (**self).truncate(seq, len)
            }
            fn stats(&self) -> EngineStats {
                (**self).stats()
            }
            fn seq_stats(&self, seq: SeqId) -> EngineStats {
                (**self).seq_stats(seq)
            }
            fn open_cached(
                &mut self,
                seq: SeqId,
                mode: AttentionMode,
                capacity: usize,
                prompt: &[u32],
                cache: CacheUse,
            ) -> Result<usize, KvError> {
                (**self).open_cached(seq, mode, capacity, prompt, cache)
            }
            fn publish(&mut self, seq: SeqId, tokens: &[u32]) -> Result<usize, KvError> {
                (**self).publish(seq, tokens)
            }
            fn cache_page_tokens(&self) -> usize {
                (**self).cache_page_tokens()
            }
            fn clear_prefix_cache(&mut self) -> Result<u64, KvError> {
                (**self).clear_prefix_cache()
            }
            fn prefix_stats(&self) -> Option<PrefixCacheStats> {
                (**self).prefix_stats()
            }
            fn sliding_window(&self) -> Option<usize> {
                (**self).sliding_window()
            }
        }
    };
}

forward_pool!(Box<T>);
forward_pool!(&mut T);
