//! The prefix cache's side of the store: pages shared read-only by reference count, the
//! index of cached pages (`index`), its journal and checkpoints (`journal`), eviction of
//! least-recently-used unshared pages under the store's budget, and recovery at open.
//!
//! Ownership: a unit (one block group) has holders. The sequence whose extent has it holds
//! it; a sequence that borrows a cached page holds it too, and so does the index while the
//! page is cached. `refs` counts the holders of every unit the index holds or that more than
//! one holds; a unit is freed when its last holder lets go, so a page read by a running
//! sequence is never reused under it, whatever happens to the index.

use std::collections::{HashMap, HashSet};

use super::index::PrefixIndex;
use super::journal::{self, Op, Stop};
use super::{runs_of, units_for, KvStore};
use crate::alloc::Extent;
use crate::device::{ReadReq, WriteReq};
use crate::error::{KvError, SeqId};
use crate::prefix::{BlockKey, PrefixStats};
use crate::sys::AlignedBuf;

/// Journal room at least (bytes); more when the index is large (twice its checkpoint).
const MIN_JOURNAL_BYTES: u64 = 256 << 10;

impl KvStore {
    // -----------------------------------------------------------------------------------------
    // Holders
    // -----------------------------------------------------------------------------------------

    /// Give up one holder of every unit of `extents`; a unit left without holders is freed.
    pub(super) fn release(&mut self, extents: &[Extent]) {
        for &e in extents {
            if self.refs.is_empty() {
                self.alloc.free(e);
                continue;
            }
            let mut run: Option<Extent> = None;
            for u in e.start..e.end() {
                let last = match self.refs.get_mut(&u) {
                    None => true,
                    Some(c) => {
                        *c -= 1;
                        *c == 0
                    }
                };
                if last {
                    self.refs.remove(&u);
                    match run.as_mut() {
                        Some(r) if r.end() == u => r.len += 1,
                        _ => {
                            if let Some(r) = run.take() {
                                self.alloc.free(r);
                            }
                            run = Some(Extent { start: u, len: 1 });
                        }
                    }
                } else if let Some(r) = run.take() {
                    self.alloc.free(r);
                }
            }
            if let Some(r) = run {
                self.alloc.free(r);
            }
        }
    }

    /// Add a holder to a unit that has at least one.
    fn hold(&mut self, u: u64) {
        *self.refs.entry(u).or_insert(1) += 1;
    }

    /// Whether any page of `seq` is also held by the prefix cache or another sequence.
    pub(super) fn shares_units(&self, seq: SeqId) -> bool {
        !self.refs.is_empty()
            && self.seqs.get(&seq).is_some_and(|st| {
                st.layers.iter().any(|l| {
                    l.extents
                        .iter()
                        .any(|e| (e.start..e.end()).any(|u| self.refs.contains_key(&u)))
                })
            })
    }

    // -----------------------------------------------------------------------------------------
    // Room for metadata
    // -----------------------------------------------------------------------------------------

    /// Whether the prefix cache holds nothing and is bound to no model.
    pub(super) fn cache_empty(&self) -> bool {
        self.index.len() == 0 && self.model.is_none()
    }

    /// Units of a fresh journal: none while the cache is empty, else twice a checkpoint's
    /// size (at least [`MIN_JOURNAL_BYTES`]) and at most a 32nd of the store.
    pub(super) fn journal_units(&self) -> u64 {
        if self.cache_empty() {
            return 0;
        }
        let g = &self.geo;
        let per_entry = 64 + g.shape.layers as u64 * (8 + 4 * g.heads() as u64);
        let bytes = (2 * per_entry * self.index.len() as u64).max(MIN_JOURNAL_BYTES);
        bytes
            .div_ceil(g.unit_bytes as u64)
            .min((g.units / 32).max(1))
    }

    /// Units kept free for the next manifest and journal.
    pub(super) fn headroom_units(&self) -> u64 {
        self.manifest.map_or(1, |m| m.len) + self.journal_units()
    }

    // -----------------------------------------------------------------------------------------
    // Journal
    // -----------------------------------------------------------------------------------------

    /// The records a checkpoint holds: the model binding, then every entry, parents first.
    pub(super) fn checkpoint_ops(&self) -> Vec<Op> {
        let mut ops = Vec::with_capacity(self.index.len() + 1);
        if let Some(model) = self.model {
            ops.push(Op::Bind { model });
        }
        for key in self.index.parents_first() {
            let e = self.index.get(&key).expect("listed");
            ops.push(Op::Insert {
                key,
                parent: e.parent,
                units: e.units.clone(),
                crcs: e.crcs.clone(),
            });
        }
        ops
    }

    /// Make changes already applied to the index durable: one journal batch, written after
    /// the pages it names are, or a checkpoint when the journal is full.
    fn log(&mut self, ops: Vec<Op>) -> Result<(), KvError> {
        let g = self.geo;
        let pa = g.page_align as usize;
        let batch =
            journal::encode_batch(self.store_id, self.generation, self.journal_seq, &ops, pa);
        let room = self.journal.map_or(0, |j| j.len * g.unit_bytes as u64);
        self.prefix.journal_records += ops.len() as u64;
        if self.journal_pos + batch.len() as u64 > room {
            self.prefix.checkpoints += 1;
            return self.commit(false);
        }
        let j = self.journal.expect("room > 0");
        let mut buf = AlignedBuf::new(batch.len(), pa);
        buf.as_mut_slice().copy_from_slice(&batch);
        let io = |what: &str, e| KvError::io(format!("prefix cache journal: {what}"), e);
        self.dev.sync().map_err(|e| io("flushing pages", e))?;
        self.dev
            .write_at(&[WriteReq {
                offset: g.unit_offset(j.start) + self.journal_pos,
                buf: buf.as_slice(),
            }])
            .and_then(|_| self.dev.sync())
            .map_err(|e| io("writing a batch", e))?;
        self.journal_pos += batch.len() as u64;
        self.journal_seq += 1;
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // Commands
    // -----------------------------------------------------------------------------------------

    /// Bind the cache to a model (by its file's digest). A cache built by another model is
    /// emptied, with a logged reason; returns the pages dropped.
    pub fn bind_model(&mut self, model: [u8; 32]) -> Result<u64, KvError> {
        if self.model == Some(model) {
            return Ok(0);
        }
        let saved = self.saved_entries();
        let entries = self.index.take_all();
        let dropped = entries.len() as u64;
        let before = self.model;
        if let Some(old) = self.model {
            if dropped > 0 {
                tracing::warn!(
                    store = %self.location,
                    pages = dropped,
                    old = %hex8(&old),
                    new = %hex8(&model),
                    "prefix cache was built by another model file; its pages are dropped"
                );
            }
        }
        self.model = Some(model);
        if let Err(e) = self.log(vec![Op::Clear, Op::Bind { model }]) {
            // Not recorded: the cache stays bound and filled as it was.
            self.model = before;
            self.restore_entries(saved);
            return Err(e);
        }
        for e in entries {
            self.release_units(&e.units);
        }
        self.prefix.cleared_pages += dropped;
        Ok(dropped)
    }

    /// Start `seq` on the longest run of `keys` (first page first) the cache holds: its
    /// layers borrow those pages read-only. Returns the pages shared (0: nothing cached, and
    /// `seq` is not created).
    pub fn share_prefix(&mut self, seq: SeqId, keys: &[BlockKey]) -> Result<usize, KvError> {
        if self.seqs.contains_key(&seq) {
            return Err(KvError::SequenceExists(seq));
        }
        let k = self.index.longest(keys);
        if k == 0 {
            return Ok(0);
        }
        let mut st = self.empty_seq();
        let h = self.geo.heads();
        let mut held = Vec::with_capacity(k * st.layers.len());
        for (li, l) in st.layers.iter_mut().enumerate() {
            let mut units = Vec::with_capacity(k);
            for key in &keys[..k] {
                let e = self.index.get(key).expect("counted by longest");
                units.push(e.units[li]);
                l.crcs.extend_from_slice(&e.crcs[li * h..(li + 1) * h]);
            }
            l.extents = runs_of(&units)
                .into_iter()
                .map(|(_, len, start)| Extent {
                    start,
                    len: len as u64,
                })
                .collect();
            l.full_blocks = k as u32;
            held.extend(units);
        }
        for u in held {
            self.hold(u);
        }
        self.seqs.insert(seq, st);
        Ok(k)
    }

    /// How many of `keys` (first page first) the cache holds, without marking them used.
    pub fn cached_prefix(&self, keys: &[BlockKey]) -> usize {
        self.index.peek(keys)
    }

    /// Add the full pages of `seq` named by `keys` (page `i` of every layer under `keys[i]`)
    /// to the cache; pages already cached are skipped. Returns the pages added.
    pub fn publish(&mut self, seq: SeqId, keys: &[BlockKey]) -> Result<usize, KvError> {
        let st = self.seqs.get(&seq).ok_or(KvError::UnknownSequence(seq))?;
        let full = st.layers.iter().map(|l| l.full_blocks).min().unwrap_or(0) as usize;
        let h = self.geo.heads();
        let mut ops = Vec::new();
        // Units held for the index, and whether each had no other holder than its sequence
        // before (to undo the holds exactly if the journal cannot be written).
        let mut held: Vec<(u64, bool)> = Vec::new();
        let mut parent = None;
        for (i, &key) in keys.iter().enumerate().take(full) {
            if self.index.get(&key).is_none() {
                let st = &self.seqs[&seq];
                let units: Vec<u64> = st
                    .layers
                    .iter()
                    .map(|l| units_for(&l.extents, &[i as u32])[0])
                    .collect();
                let crcs: Vec<u32> = st
                    .layers
                    .iter()
                    .flat_map(|l| l.crcs[i * h..(i + 1) * h].iter().copied())
                    .collect();
                if !self.index.insert(key, parent, units.clone(), crcs.clone()) {
                    break;
                }
                for &u in &units {
                    held.push((u, !self.refs.contains_key(&u)));
                    self.hold(u);
                }
                ops.push(Op::Insert {
                    key,
                    parent,
                    units,
                    crcs,
                });
            }
            parent = Some(key);
        }
        let added = ops.len();
        if added > 0 {
            let inserted: Vec<BlockKey> = ops
                .iter()
                .filter_map(|op| match op {
                    Op::Insert { key, .. } => Some(*key),
                    _ => None,
                })
                .collect();
            if let Err(e) = self.log(ops) {
                // Not recorded: take the pages out again (newest first: each is a leaf by
                // then) and give back the index's holds, so that the cache holds what a
                // restart would find, and a retry publishes them.
                for key in inserted.iter().rev() {
                    self.index.remove_leaf(key);
                }
                for (u, alone) in held {
                    if let Some(c) = self.refs.get_mut(&u) {
                        *c -= 1;
                        if alone {
                            self.refs.remove(&u);
                        }
                    }
                }
                return Err(e);
            }
        }
        self.prefix.inserted_pages += added as u64;
        Ok(added)
    }

    /// Free at least `short` units by evicting least-recently-used cached pages that no
    /// running sequence reads (leaves first, so every cached page keeps its parent). Returns
    /// the units freed.
    pub(super) fn evict_units(&mut self, short: u64) -> u64 {
        let layers = self.geo.shape.layers as u64;
        let mut victims: Vec<(BlockKey, super::index::Entry)> = Vec::new();
        let mut freed = 0u64;
        while freed < short {
            let before = victims.len();
            let pass: Vec<BlockKey> = self
                .index
                .lru_leaves()
                .filter(|k| {
                    let e = self.index.get(k).expect("listed");
                    e.units.iter().all(|u| self.refs.get(u) == Some(&1))
                })
                .take(((short - freed).div_ceil(layers)) as usize)
                .collect();
            for k in pass {
                if let Some(e) = self.index.remove_leaf(&k) {
                    victims.push((k, e));
                    freed += layers;
                }
            }
            if victims.len() == before {
                break;
            }
        }
        if victims.is_empty() {
            return 0;
        }
        self.finish_removal(victims, true)
    }

    /// Journal the removal of entries already taken out of the index, then free their units.
    /// If the journal cannot be written the units stay allocated (a restart brings the
    /// entries back, intact), and evicted entries go back into the index (an eviction that
    /// is not recorded is undone: the pages stay cached, usable and evictable later, rather
    /// than allocated to no one until a restart). Returns the units freed.
    fn finish_removal(&mut self, gone: Vec<(BlockKey, super::index::Entry)>, evicted: bool) -> u64 {
        let n = gone.len() as u64;
        let mut units = Vec::with_capacity(gone.len() * self.geo.shape.layers as usize);
        let mut ops = Vec::with_capacity(gone.len());
        for (key, e) in &gone {
            units.extend_from_slice(&e.units);
            ops.push(Op::Remove { key: *key });
        }
        if let Err(e) = self.log(ops) {
            tracing::warn!(error = %e, evicted, "prefix cache: journaling a removal failed; its pages stay allocated");
            if evicted {
                // Victims were taken leaves first: put them back parents first.
                for (key, e) in gone.into_iter().rev() {
                    self.index.insert(key, e.parent, e.units, e.crcs);
                }
            }
            return 0;
        }
        if evicted {
            self.prefix.evicted_pages += n;
        }
        let before = self.alloc.free_units();
        self.release_units(&units);
        self.alloc.free_units() - before
    }

    /// Every entry, parents first (to put back with [`Self::restore_entries`]).
    fn saved_entries(&self) -> Vec<(BlockKey, super::index::Entry)> {
        self.index
            .parents_first()
            .into_iter()
            .map(|k| (k, self.index.get(&k).expect("listed").clone()))
            .collect()
    }

    /// Put back entries taken out of the index whose removal could not be recorded; their
    /// units were never released.
    fn restore_entries(&mut self, saved: Vec<(BlockKey, super::index::Entry)>) {
        for (key, e) in saved {
            self.index.insert(key, e.parent, e.units, e.crcs);
        }
    }

    fn release_units(&mut self, units: &[u64]) {
        let extents: Vec<Extent> = units.iter().map(|&u| Extent { start: u, len: 1 }).collect();
        self.release(&extents);
    }

    /// Drop `key` and every cached page that descends from it (a page failed its checksum).
    /// Returns the pages dropped.
    pub fn drop_cached(&mut self, key: &BlockKey) -> u64 {
        let keys = self.index.subtree(key);
        let mut gone = Vec::new();
        for k in keys {
            if let Some(e) = self.index.remove_leaf(&k) {
                gone.push((k, e));
            }
        }
        let n = gone.len() as u64;
        self.prefix.dropped_at_recovery += n;
        self.finish_removal(gone, false);
        n
    }

    /// Empty the prefix cache. Pages that running sequences read stay theirs until they end.
    /// Returns the pages dropped.
    pub fn clear_prefix_cache(&mut self) -> Result<u64, KvError> {
        let saved = self.saved_entries();
        let entries = self.index.take_all();
        let n = entries.len() as u64;
        if let Err(e) = self.log(vec![Op::Clear]) {
            // Not recorded: the cache stays as it was (and as a restart would find it).
            self.restore_entries(saved);
            return Err(e);
        }
        for e in entries {
            self.release_units(&e.units);
        }
        self.prefix.cleared_pages += n;
        Ok(n)
    }

    /// Cached pages no sequence reads (each layer's block group held by the index alone):
    /// what eviction can free.
    pub(super) fn evictable_pages(&self) -> u64 {
        self.index
            .iter()
            .filter(|(_, e)| e.units.iter().all(|u| self.refs.get(u) == Some(&1)))
            .count() as u64
    }

    /// The bytes running sequences hold (their own pages and the cached pages they read):
    /// the part of the budget eviction cannot give back.
    pub fn held_by_running_bytes(&self) -> u64 {
        let evictable =
            self.evictable_pages() * self.geo.shape.layers as u64 * self.geo.unit_bytes as u64;
        self.capacity_bytes()
            .saturating_sub(self.free_bytes() + evictable)
    }

    /// What the prefix cache holds and has done.
    pub fn prefix_stats(&self) -> PrefixStats {
        let mut s = self.prefix;
        s.pages = self.index.len() as u64;
        s.bytes = s.pages * self.geo.shape.layers as u64 * self.geo.unit_bytes as u64;
        // Every unit the index names has a holder count; a page is shared unless the index
        // is its only holder.
        s.shared_pages = s.pages - self.evictable_pages();
        s
    }

    // -----------------------------------------------------------------------------------------
    // Recovery
    // -----------------------------------------------------------------------------------------

    /// Rebuild the prefix index at open from the manifest's checkpoint (`checkpoint`) and the
    /// journal after it, and take its units and the journal's extent out of the free space.
    /// Entries that cannot be trusted are dropped and counted, never an error.
    pub(super) fn recover_index(&mut self, checkpoint: &[u8], jext: Extent) -> Result<(), KvError> {
        let g = self.geo;
        let mut ops = match journal::decode_ops(checkpoint) {
            Ok(ops) => ops,
            Err(e) => {
                tracing::warn!(store = %self.location, error = %e, "prefix cache checkpoint unreadable; starting empty");
                self.prefix.dropped_at_recovery += 1;
                Vec::new()
            }
        };
        if jext.len > 0 {
            if jext.end() > g.units || !self.alloc.reserve(jext) {
                return Err(KvError::ManifestCorrupt {
                    path: self.location.clone(),
                    generation: self.generation,
                    reason: format!("journal extent {jext:?} is outside the store or overlaps"),
                });
            }
            let mut buf = AlignedBuf::new(jext.len as usize * g.unit_bytes, g.page_align as usize);
            self.dev
                .read_at(&mut [ReadReq {
                    offset: g.unit_offset(jext.start),
                    buf: buf.as_mut_slice(),
                }])
                .map_err(|e| KvError::io("reading the prefix cache journal", e))?;
            let (more, pos, seq, stop) = journal::replay(
                buf.as_slice(),
                self.store_id,
                self.generation,
                g.page_align as usize,
            );
            if let Stop::Torn(why) = stop {
                tracing::warn!(store = %self.location, reason = %why, "prefix cache journal ends in a torn batch; its records are dropped");
                self.prefix.dropped_at_recovery += 1;
            }
            ops.extend(more);
            self.journal = Some(jext);
            self.journal_pos = pos as u64;
            self.journal_seq = seq;
        }
        let dropped = self.apply_recovered(ops);
        self.prefix.dropped_at_recovery += dropped;
        self.prefix.recovered_pages = self.index.len() as u64;
        if dropped > 0 || self.index.len() > 0 {
            tracing::info!(store = %self.location, pages = self.index.len(), dropped, "prefix cache recovered");
        }
        Ok(())
    }

    /// Replay recovered records into the index, check every entry's units (in range, not
    /// metadata, not claimed twice) and reserve them. Returns the entries dropped.
    fn apply_recovered(&mut self, ops: Vec<Op>) -> u64 {
        let g = self.geo;
        let (layers, h) = (g.shape.layers as usize, g.heads());
        let mut dropped = 0u64;
        let mut index = PrefixIndex::default();
        for op in ops {
            match op {
                Op::Bind { model } => self.model = Some(model),
                Op::Clear => {
                    index.take_all();
                }
                Op::Remove { key } => {
                    for k in index.subtree(&key) {
                        index.remove_leaf(&k);
                    }
                }
                Op::Insert {
                    key,
                    parent,
                    units,
                    crcs,
                } => {
                    let sane = units.len() == layers
                        && crcs.len() == layers * h
                        && units.iter().all(|&u| u < g.units);
                    if !sane || !index.insert(key, parent, units, crcs) {
                        dropped += 1;
                    }
                }
            }
        }
        // A persisted sequence's extents, as its manifest lists them, may run past its full
        // blocks (room it had not written when persisted). That room may since have been
        // written by the sequence itself (appends after the persist) or, trimmed back under
        // pressure, by another sequence, and published: a journal batch makes such a page
        // durable without a new manifest. Were the room restored, the sequence would append
        // over the cached page (while counting it as its own). So when the cache holds
        // anything, restored sequences keep only their full blocks; the room goes back to
        // free space (and out of their snapshots) before the index's units are taken up.
        if index.len() > 0 {
            self.trim_slack(None);
        }
        // Units the persisted sequences hold may be shared with cached pages; units of the
        // manifest or journal, or claimed by two entries, may not.
        let mut snap_units: HashMap<u64, u32> = HashMap::new();
        for st in self.seqs.values() {
            for l in &st.layers {
                for e in &l.extents {
                    for u in e.start..e.end() {
                        *snap_units.entry(u).or_insert(0) += 1;
                    }
                }
            }
        }
        let meta: Vec<Extent> = self.manifest.into_iter().chain(self.journal).collect();
        let mut seen: HashSet<u64> = HashSet::new();
        let mut bad: Vec<BlockKey> = Vec::new();
        for key in index.parents_first() {
            let e = index.get(&key).expect("listed");
            let ok = e
                .units
                .iter()
                .all(|&u| !meta.iter().any(|m| m.start <= u && u < m.end()) && seen.insert(u));
            if !ok {
                bad.push(key);
            }
        }
        for key in bad {
            let sub = index.subtree(&key);
            for k in sub {
                if index.remove_leaf(&k).is_some() {
                    dropped += 1;
                }
            }
        }
        for (_, e) in index.iter() {
            for &u in &e.units {
                match snap_units.get(&u) {
                    Some(&n) => {
                        self.refs.insert(u, n + 1);
                    }
                    None => {
                        let ok = self.alloc.reserve(Extent { start: u, len: 1 });
                        debug_assert!(ok, "unit {u} checked free");
                        self.refs.insert(u, 1);
                    }
                }
            }
        }
        self.index = index;
        dropped
    }
}

/// The first 8 bytes of a digest, in hex.
fn hex8(d: &[u8; 32]) -> String {
    d[..8].iter().map(|b| format!("{b:02x}")).collect()
}
