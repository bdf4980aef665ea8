//! The prefix cache through the engine: open a sequence on cached pages, publish a
//! sequence's full pages, reserve a request's room before its prefill, and the cache's
//! commands (bind, clear, statistics).

use super::{AttentionMode, Engine};
use crate::error::{KvError, SeqId};
use crate::prefix::{BlockKey, PrefixStats};

impl Engine {
    /// Bind the store's prefix cache to a model (its file's digest): a cache another model
    /// built is dropped, with a logged reason. Returns the pages dropped.
    pub fn bind_model(&mut self, model: [u8; 32]) -> Result<u64, KvError> {
        self.writer.barrier();
        self.store_mut().bind_model(model)
    }

    /// Tokens per page (the granularity of prefix sharing).
    pub fn block_tokens(&self) -> usize {
        self.geo.block_tokens()
    }

    /// Start `seq` on the longest cached prefix among `keys`: its pages are shared
    /// read-only, their checksums are verified and their summaries rebuilt as they are read,
    /// and a page that fails its checksum is dropped from the cache (with every page after
    /// it) and the sequence starts on the pages before it. Returns the tokens the sequence
    /// holds (a multiple of [`Self::block_tokens`]; 0 on a miss).
    pub fn open_shared(
        &mut self,
        seq: SeqId,
        mode: AttentionMode,
        capacity: usize,
        keys: &[BlockKey],
    ) -> Result<usize, KvError> {
        if self.seqs.contains_key(&seq) || self.with_store(|s| s.info(seq).is_some()) {
            return Err(KvError::SequenceExists(seq));
        }
        let t = self.geo.block_tokens();
        let keys = &keys[..keys.len().min(capacity / t.max(1))];
        loop {
            let shared = self.store_mut().share_prefix(seq, keys)?;
            if shared == 0 {
                self.open(seq, mode, capacity)?;
                return Ok(0);
            }
            match self.restore(seq, mode, capacity) {
                Ok(tokens) => return Ok(tokens),
                Err(KvError::ChecksumMismatch { block, layer, .. }) => {
                    let mut st = self.store_mut();
                    let _ = st.reclaim(seq);
                    let n = st.drop_cached(&keys[block as usize]);
                    tracing::warn!(
                        seq,
                        layer,
                        block,
                        dropped = n,
                        "a cached page failed its checksum; it and the pages after it leave the cache"
                    );
                }
                Err(e) => {
                    let _ = self.store_mut().reclaim(seq);
                    return Err(e);
                }
            }
        }
    }

    /// How many of `keys` the cache holds, from the first (no side effects).
    pub fn cached_prefix(&self, keys: &[BlockKey]) -> usize {
        self.with_store(|s| s.cached_prefix(keys))
    }

    /// Add `seq`'s full pages, named by `keys` (page `i` under `keys[i]`), to the cache,
    /// after every pending write of it has landed. Returns the pages added.
    pub fn publish(&mut self, seq: SeqId, keys: &[BlockKey]) -> Result<usize, KvError> {
        let st = self.seqs.get(&seq).ok_or(KvError::UnknownSequence(seq))?;
        super::sequence::check_usable(seq, st)?;
        self.writer.barrier();
        if let Some(e) = st.shared.error() {
            return Err(KvError::SequenceBroken { seq, cause: e });
        }
        let len = self.len(seq)?;
        let keys = &keys[..keys.len().min(len / self.geo.block_tokens().max(1))];
        self.store_mut().publish(seq, keys)
    }

    /// Make room on flash for `seq` to hold `tokens` tokens in every layer, evicting cached
    /// pages no sequence reads if needed, so that a request is admitted or refused before its
    /// prefill starts. Refused: [`KvError::StoreBudget`].
    pub fn reserve(&mut self, seq: SeqId, tokens: usize) -> Result<(), KvError> {
        let st = self.seqs.get(&seq).ok_or(KvError::UnknownSequence(seq))?;
        super::sequence::check_usable(seq, st)?;
        self.writer.barrier();
        let mut store = self.store_mut();
        match store.reserve(seq, tokens) {
            Err(KvError::StoreFull { needed, .. }) => Err(KvError::StoreBudget {
                needed,
                budget: store.capacity_bytes(),
                held: store.held_by_running_bytes(),
            }),
            r => r,
        }
    }

    /// Empty the prefix cache (pages running sequences read stay theirs until they end).
    /// Returns the pages dropped.
    pub fn clear_prefix_cache(&mut self) -> Result<u64, KvError> {
        self.writer.barrier();
        self.store_mut().clear_prefix_cache()
    }

    /// What the prefix cache holds and has done, with the store's size and free space.
    pub fn prefix_stats(&self) -> (PrefixStats, u64, u64) {
        self.with_store(|s| (s.prefix_stats(), s.capacity_bytes(), s.free_bytes()))
    }

    fn store_mut(&self) -> std::sync::RwLockWriteGuard<'_, crate::store::KvStore> {
        self.store.write().unwrap_or_else(|p| p.into_inner())
    }
}
