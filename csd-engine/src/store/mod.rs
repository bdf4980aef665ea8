//! The flash-resident KV store: append-only page groups in extents, a page index with a
//! CRC-32C per page, RAM tails, persistence through an atomically replaced manifest
//! (docs/STORAGE.md). Opening and formatting are in `open`.

pub(crate) mod index;
pub(crate) mod journal;
mod open;
mod share;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use half::f16;
use hdrhistogram::Histogram;

use crate::alloc::{Extent, ExtentAllocator};
use crate::device::{BlockDevice, DevError, IoMode, OpenDeviceOptions, ReadReq, WriteReq};
use crate::error::{KvError, SeqId};
use crate::format::{self, LayerSnap, Root, SeqSnap};
use crate::layout::{Geometry, PageShape};
use crate::prefix::PrefixStats;
use crate::read::LayerRead;
use crate::sys::{f16_as_bytes, AlignedBuf};
use index::PrefixIndex;

/// Tunables of a store (not part of the on-disk format).
#[derive(Clone, Copy, Debug)]
pub struct StoreOptions {
    /// Smallest extent (in block groups) a layer grows by.
    pub min_extent_blocks: u64,
    /// Largest extent a layer grows by at once (growth doubles up to this).
    pub max_extent_blocks: u64,
    /// How the device is opened (path-based constructors only).
    pub device: OpenDeviceOptions,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            min_extent_blocks: 16,
            max_extent_blocks: 1024,
            device: OpenDeviceOptions::default(),
        }
    }
}

/// What to create.
#[derive(Clone, Copy, Debug)]
pub struct StoreConfig {
    /// The page layout.
    pub shape: PageShape,
    /// Bytes of the store file (ignored for a block device, which is used whole).
    pub capacity: u64,
    /// Tunables and how the device is opened.
    pub options: StoreOptions,
}

/// Counters since the store was opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Bytes of block groups read (padding included).
    pub bytes_read: u64,
    /// Bytes of block groups written (padding included).
    pub bytes_written: u64,
    /// Device read requests issued by the store (after coalescing).
    pub read_ios: u64,
    /// Device write requests issued by appends (one per contiguous run).
    pub write_ios: u64,
    /// Pages (one kv head of one block) read and verified.
    pub pages_read: u64,
    /// Pages written.
    pub pages_written: u64,
    /// Block groups that rode along in a neighbour's request instead of needing their own.
    pub reads_coalesced: u64,
    /// Pages read back that failed their checksum.
    pub checksum_failures: u64,
    /// Manifests committed (persists and reclaims of persisted sequences).
    pub manifest_commits: u64,
    /// Times the device left a failed io_uring for pread/pwrite.
    pub ring_failovers: u64,
}

#[derive(Default)]
struct AtomicCounters {
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    read_ios: AtomicU64,
    write_ios: AtomicU64,
    pages_read: AtomicU64,
    pages_written: AtomicU64,
    reads_coalesced: AtomicU64,
    checksum_failures: AtomicU64,
    manifest_commits: AtomicU64,
}

/// A summary of one sequence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeqInfo {
    /// The sequence.
    pub seq: SeqId,
    /// Tokens held per layer.
    pub tokens: Vec<usize>,
    /// Whether it has been persisted (its state as of the last `persist` survives a restart).
    pub persisted: bool,
}

struct LayerState {
    extents: Vec<Extent>,
    full_blocks: u32,
    crcs: Vec<u32>,
    /// `kv_heads × block_tokens × head_dim`, head-major; the first `tail_tokens` rows of each
    /// head are live.
    tail_k: Vec<f16>,
    tail_v: Vec<f16>,
    tail_tokens: u32,
}

struct SeqState {
    layers: Vec<LayerState>,
    /// The state written by the last `persist`, if any.
    snapshot: Option<SeqSnap>,
}

/// The KV page store on one [`BlockDevice`]: sequences of KV pages, per (sequence, layer),
/// appended, read by block with every page verified, reclaimed, and persisted across restarts.
pub struct KvStore {
    /// Shared with reads in flight, which run without the store's lock (see
    /// [`KvStore::plan_read`]).
    dev: Arc<dyn BlockDevice>,
    geo: Geometry,
    store_id: u64,
    alloc: ExtentAllocator,
    seqs: HashMap<SeqId, SeqState>,
    generation: u64,
    manifest: Option<Extent>,
    opts: StoreOptions,
    counters: AtomicCounters,
    read_lat: Mutex<Histogram<u64>>,
    write_lat: Mutex<Histogram<u64>>,
    location: String,
    /// Holders of every unit that has more than its one owner, or that the prefix index
    /// holds (units absent here have exactly one holder: the sequence whose extent has them).
    refs: HashMap<u64, u32>,
    /// The prefix cache's pages (`share`).
    index: PrefixIndex,
    /// The model whose KV the prefix cache holds, once bound.
    model: Option<[u8; 32]>,
    /// The index journal's extent (changes since the manifest's checkpoint), the bytes of it
    /// written and the next batch's number.
    journal: Option<Extent>,
    journal_pos: u64,
    journal_seq: u64,
    prefix: PrefixStats,
}

impl KvStore {
    // -----------------------------------------------------------------------------------------
    // Introspection
    // -----------------------------------------------------------------------------------------

    /// The page layout.
    pub fn shape(&self) -> PageShape {
        self.geo.shape
    }

    /// Where things are on the device.
    pub(crate) fn geometry(&self) -> &Geometry {
        &self.geo
    }

    /// The I/O engine and mode actually in use.
    pub fn mode(&self) -> IoMode {
        self.dev.mode()
    }

    /// The device the store runs on (for its counters and latencies).
    pub fn device(&self) -> &dyn BlockDevice {
        &*self.dev
    }

    /// Bytes of the data area (all block groups).
    pub fn capacity_bytes(&self) -> u64 {
        self.geo.data_bytes()
    }

    /// Bytes of the data area not allocated.
    pub fn free_bytes(&self) -> u64 {
        self.alloc.free_units() * self.geo.unit_bytes as u64
    }

    /// Sequence ids, ascending.
    pub fn sequences(&self) -> Vec<SeqId> {
        let mut v: Vec<_> = self.seqs.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// A summary of `seq`, if the store holds it.
    pub fn info(&self, seq: SeqId) -> Option<SeqInfo> {
        let st = self.seqs.get(&seq)?;
        let t = self.geo.block_tokens();
        Some(SeqInfo {
            seq,
            tokens: st
                .layers
                .iter()
                .map(|l| l.full_blocks as usize * t + l.tail_tokens as usize)
                .collect(),
            persisted: st.snapshot.is_some(),
        })
    }

    /// After a reopen: the restored sequence, or `UnknownSequence` if it was not persisted.
    pub fn restore(&self, seq: SeqId) -> Result<SeqInfo, KvError> {
        self.info(seq).ok_or(KvError::UnknownSequence(seq))
    }

    /// Number of full (on-flash) blocks of a (sequence, layer).
    pub fn full_blocks(&self, seq: SeqId, layer: u32) -> Result<u32, KvError> {
        Ok(self.layer(seq, layer)?.full_blocks)
    }

    /// Counters since the store was opened.
    pub fn counters(&self) -> Counters {
        let c = &self.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Counters {
            bytes_read: l(&c.bytes_read),
            bytes_written: l(&c.bytes_written),
            read_ios: l(&c.read_ios),
            write_ios: l(&c.write_ios),
            pages_read: l(&c.pages_read),
            pages_written: l(&c.pages_written),
            reads_coalesced: l(&c.reads_coalesced),
            checksum_failures: l(&c.checksum_failures),
            manifest_commits: l(&c.manifest_commits),
            ring_failovers: l(&self.dev.stats().ring_failovers),
        }
    }

    /// Latency of each page-set read call (`read_blocks`/`read_layer`), µs.
    pub fn read_latency(&self) -> Histogram<u64> {
        self.read_lat
            .lock()
            .map(|h| h.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Latency of each append that wrote pages, µs.
    pub fn write_latency(&self) -> Histogram<u64> {
        self.write_lat
            .lock()
            .map(|h| h.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    fn layer(&self, seq: SeqId, layer: u32) -> Result<&LayerState, KvError> {
        let st = self.seqs.get(&seq).ok_or(KvError::UnknownSequence(seq))?;
        st.layers.get(layer as usize).ok_or_else(|| {
            KvError::BadInput(format!(
                "layer {layer} out of range (store has {})",
                self.geo.shape.layers
            ))
        })
    }

    // -----------------------------------------------------------------------------------------
    // Append
    // -----------------------------------------------------------------------------------------

    /// Append `n` tokens of K and V for one layer of `seq` (created on first use). `k` and `v`
    /// are token-major: `n × kv_heads × head_dim`. Full pages go to flash in one batched
    /// write; the remainder stays in the sequence's RAM tail. On error nothing changes.
    pub fn append(&mut self, seq: SeqId, layer: u32, k: &[f16], v: &[f16]) -> Result<(), KvError> {
        let g = self.geo;
        let (h, d) = (g.heads(), g.head_dim());
        let row = h * d;
        if layer >= g.shape.layers {
            return Err(KvError::BadInput(format!(
                "layer {layer} out of range (store has {})",
                g.shape.layers
            )));
        }
        if k.len() != v.len() || k.len() % row != 0 {
            return Err(KvError::BadInput(format!(
                "append of {} K and {} V values is not n × {h} kv heads × {d} head_dim",
                k.len(),
                v.len()
            )));
        }
        let n = k.len() / row;
        if n == 0 {
            return Ok(());
        }
        let created = !self.seqs.contains_key(&seq);
        if created {
            let st = self.empty_seq();
            self.seqs.insert(seq, st);
        }
        let r = self.append_inner(seq, layer, k, v, n);
        if r.is_err() && created {
            self.seqs.remove(&seq);
        }
        r
    }

    fn append_inner(
        &mut self,
        seq: SeqId,
        layer: u32,
        k: &[f16],
        v: &[f16],
        n: usize,
    ) -> Result<(), KvError> {
        let g = self.geo;
        let (h, t, d) = (g.heads(), g.block_tokens(), g.head_dim());
        let ls = &self.seqs[&seq].layers[layer as usize];
        let tail = ls.tail_tokens as usize;
        let new_full = (tail + n) / t;
        let new_tail = (tail + n) % t;

        if new_full == 0 {
            let ls = &mut self.seqs.get_mut(&seq).expect("exists").layers[layer as usize];
            copy_tokens_to_tail(ls, t, h, d, tail, k, v, 0, n);
            ls.tail_tokens = new_tail as u32;
            return Ok(());
        }

        // 1. Room on flash.
        let (extents, grabbed) = self.grow(seq, layer, new_full as u64)?;

        // 2. Build the new block groups: head-major pages, K rows then V rows.
        let ls = &self.seqs[&seq].layers[layer as usize];
        let mut buf = AlignedBuf::new(new_full * g.unit_bytes, g.page_align as usize);
        {
            let out = buf.as_mut_slice();
            let rb = d * 2;
            for j in 0..new_full {
                for tok in 0..t {
                    let gi = j * t + tok; // index into tail ++ input
                    for head in 0..h {
                        let page = j * g.unit_bytes + head * g.head_page;
                        let (ks, vs) = if gi < tail {
                            let at = (head * t + gi) * d;
                            (&ls.tail_k[at..at + d], &ls.tail_v[at..at + d])
                        } else {
                            let at = ((gi - tail) * h + head) * d;
                            (&k[at..at + d], &v[at..at + d])
                        };
                        out[page + tok * rb..page + (tok + 1) * rb]
                            .copy_from_slice(f16_as_bytes(ks));
                        let vo = page + g.k_bytes + tok * rb;
                        out[vo..vo + rb].copy_from_slice(f16_as_bytes(vs));
                    }
                }
            }
        }
        let mut crcs = Vec::with_capacity(new_full * h);
        for j in 0..new_full {
            for head in 0..h {
                let page = j * g.unit_bytes + head * g.head_page;
                crcs.push(format::crc(&buf.as_slice()[page..page + g.head_page]));
            }
        }

        // 3. One write per physically contiguous run, all in one batch.
        let first = ls.full_blocks as u64;
        let units = units_of(&extents, first, new_full as u64);
        let runs = runs_of(&units);
        let reqs: Vec<WriteReq<'_>> = runs
            .iter()
            .map(|&(i, len, unit)| WriteReq {
                offset: g.unit_offset(unit),
                buf: &buf.as_slice()[i * g.unit_bytes..(i + len) * g.unit_bytes],
            })
            .collect();
        let t0 = Instant::now();
        if let Err(e) = self.dev.write_at(&reqs) {
            for x in grabbed {
                self.alloc.free(x);
            }
            return Err(KvError::io(
                format!("writing sequence {seq} layer {layer}"),
                e,
            ));
        }
        if let Ok(mut hst) = self.write_lat.lock() {
            hst.saturating_record((t0.elapsed().as_micros() as u64).max(1));
        }
        let c = &self.counters;
        c.bytes_written
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        c.write_ios.fetch_add(reqs.len() as u64, Ordering::Relaxed);
        c.pages_written
            .fetch_add((new_full * h) as u64, Ordering::Relaxed);
        drop(reqs);

        // 4. Commit the in-memory state.
        let consumed_from_input = new_full * t - tail.min(new_full * t);
        let ls = &mut self.seqs.get_mut(&seq).expect("exists").layers[layer as usize];
        ls.extents = extents;
        ls.full_blocks += new_full as u32;
        ls.crcs.extend(crcs);
        copy_tokens_to_tail(ls, t, h, d, 0, k, v, consumed_from_input, n);
        ls.tail_tokens = new_tail as u32;
        Ok(())
    }

    /// The extents of (seq, layer) with room for `blocks` more block groups beyond its full
    /// blocks, and the extents newly taken for that (to give back if the write fails). The
    /// layer itself is not modified.
    fn grow(
        &mut self,
        seq: SeqId,
        layer: u32,
        blocks: u64,
    ) -> Result<(Vec<Extent>, Vec<Extent>), KvError> {
        let ls = &self.seqs[&seq].layers[layer as usize];
        let cap: u64 = ls.extents.iter().map(|e| e.len).sum();
        let have = cap - ls.full_blocks as u64;
        let mut extents = ls.extents.clone();
        let mut grabbed: Vec<Extent> = Vec::new();
        if blocks <= have {
            return Ok((extents, grabbed));
        }
        let need = blocks - have;
        // Keep room for a manifest as large as the current one and a new journal, so that
        // reclaiming a persisted sequence and checkpointing the prefix index cannot fail for
        // lack of space.
        let headroom = self.headroom_units();
        if self.alloc.free_units() < need + headroom {
            self.trim_slack(Some((seq, layer)));
        }
        if self.alloc.free_units() < need + headroom {
            let short = need + headroom - self.alloc.free_units();
            self.evict_units(short);
        }
        if self.alloc.free_units() < need + headroom {
            return Err(KvError::StoreFull {
                seq,
                layer,
                needed: need * self.geo.unit_bytes as u64,
                free: self.free_bytes(),
                capacity: self.capacity_bytes(),
            });
        }
        // Grow geometrically (a layer of N blocks spans O(log N) extents), within bounds.
        let grow = cap
            .clamp(
                self.opts.min_extent_blocks.max(1),
                self.opts.max_extent_blocks.max(1),
            )
            .max(need);
        for attempt in 0..2 {
            if let Some(e) = extents
                .last()
                .copied()
                .and_then(|last| self.alloc.extend(last, need, grow))
            {
                grabbed.push(e);
                extents.last_mut().expect("non-empty").len += e.len;
                return Ok((extents, grabbed));
            }
            if let Some(e) = self.alloc.alloc(grow).or_else(|| self.alloc.alloc(need)) {
                grabbed.push(e);
                extents.push(e);
                return Ok((extents, grabbed));
            }
            if let Some(v) = self.alloc.alloc_scattered(need) {
                grabbed.extend(&v);
                extents.extend(v);
                return Ok((extents, grabbed));
            }
            if attempt == 0 && self.trim_slack(Some((seq, layer))) == 0 {
                break;
            }
        }
        Err(KvError::StoreFull {
            seq,
            layer,
            needed: need * self.geo.unit_bytes as u64,
            free: self.free_bytes(),
            capacity: self.capacity_bytes(),
        })
    }

    /// Give back the unused room at the end of every layer's extents (except `except`).
    /// Persisted snapshots are clipped the same way; the manifest on flash may still claim
    /// that room until the next commit, which is harmless: only a later commit (which writes
    /// the clipped snapshots) can persist data placed there. Returns the units freed.
    fn trim_slack(&mut self, except: Option<(SeqId, u32)>) -> u64 {
        let mut total = 0;
        for (&id, st) in self.seqs.iter_mut() {
            for (li, l) in st.layers.iter_mut().enumerate() {
                if except == Some((id, li as u32)) {
                    continue;
                }
                let mut cap: u64 = l.extents.iter().map(|e| e.len).sum();
                let used = l.full_blocks as u64;
                while cap > used {
                    let Some(last) = l.extents.last_mut() else {
                        break;
                    };
                    let slack = (cap - used).min(last.len);
                    let freed = Extent {
                        start: last.end() - slack,
                        len: slack,
                    };
                    last.len -= slack;
                    if last.len == 0 {
                        l.extents.pop();
                    }
                    cap -= slack;
                    if let Some(snap) = st.snapshot.as_mut() {
                        clip(&mut snap.layers[li].extents, freed);
                    }
                    self.alloc.free(freed);
                    total += slack;
                }
            }
        }
        total
    }

    /// Make room on flash for `tokens` tokens in every layer of `seq` (created if new), as
    /// one extent per layer where possible, so that a prefill of known length lands
    /// contiguously and a whole-layer scan is a single request.
    pub fn reserve(&mut self, seq: SeqId, tokens: usize) -> Result<(), KvError> {
        let g = self.geo;
        self.check_fits(seq, tokens)?;
        let created = !self.seqs.contains_key(&seq);
        if created {
            let st = self.empty_seq();
            self.seqs.insert(seq, st);
        }
        for layer in 0..g.shape.layers {
            let ls = &self.seqs[&seq].layers[layer as usize];
            let held = ls.full_blocks as usize * g.block_tokens() + ls.tail_tokens as usize;
            let want_full = tokens.div_ceil(g.block_tokens()) as u64;
            let blocks = want_full.saturating_sub(ls.full_blocks as u64);
            if tokens <= held || blocks == 0 {
                continue;
            }
            match self.grow(seq, layer, blocks) {
                Ok((extents, _)) => {
                    self.seqs.get_mut(&seq).expect("exists").layers[layer as usize].extents =
                        extents
                }
                Err(e) => {
                    if created && self.seqs[&seq].layers.iter().all(|l| l.extents.is_empty()) {
                        self.seqs.remove(&seq);
                    }
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Refuse at once a reservation that cannot fit even after evicting every cached page no
    /// sequence reads, so that a request that is refused anyway does not empty the cache.
    fn check_fits(&self, seq: SeqId, tokens: usize) -> Result<(), KvError> {
        let g = &self.geo;
        let want = tokens.div_ceil(g.block_tokens()) as u64;
        let need: u64 = match self.seqs.get(&seq) {
            Some(st) => st
                .layers
                .iter()
                .map(|l| want.saturating_sub(l.extents.iter().map(|e| e.len).sum()))
                .sum(),
            None => want * g.shape.layers as u64,
        };
        let evictable = self.evictable_pages() * g.shape.layers as u64;
        if need + self.headroom_units() > self.alloc.free_units() + evictable {
            return Err(KvError::StoreFull {
                seq,
                layer: 0,
                needed: need * g.unit_bytes as u64,
                free: self.free_bytes(),
                capacity: self.capacity_bytes(),
            });
        }
        Ok(())
    }

    fn empty_seq(&self) -> SeqState {
        let g = &self.geo;
        let n = g.heads() * g.block_tokens() * g.head_dim();
        let layers = (0..g.shape.layers)
            .map(|_| LayerState {
                extents: Vec::new(),
                full_blocks: 0,
                crcs: Vec::new(),
                tail_k: vec![f16::ZERO; n],
                tail_v: vec![f16::ZERO; n],
                tail_tokens: 0,
            })
            .collect();
        SeqState {
            layers,
            snapshot: None,
        }
    }

    /// Number of extents a (sequence, layer) occupies (= requests for a whole-layer scan).
    pub fn layer_extents(&self, seq: SeqId, layer: u32) -> Result<usize, KvError> {
        Ok(self.layer(seq, layer)?.extents.len())
    }

    // -----------------------------------------------------------------------------------------
    // Read
    // -----------------------------------------------------------------------------------------

    /// Read the given blocks (sorted and de-duplicated; adjacent ones coalesce into single
    /// requests) of one (sequence, layer), verify every page's checksum, and copy the RAM tail.
    /// On error `out` holds nothing.
    pub fn read_blocks(
        &self,
        seq: SeqId,
        layer: u32,
        blocks: &[u32],
        out: &mut LayerRead,
    ) -> Result<(), KvError> {
        let mut sel = blocks.to_vec();
        sel.sort_unstable();
        sel.dedup();
        self.read_sorted(seq, layer, sel, out)
    }

    /// Read every full block of one (sequence, layer) plus its tail: one sequential request
    /// per extent.
    pub fn read_layer(&self, seq: SeqId, layer: u32, out: &mut LayerRead) -> Result<(), KvError> {
        let n = self.layer(seq, layer)?.full_blocks;
        self.read_sorted(seq, layer, (0..n).collect(), out)
    }

    fn read_sorted(
        &self,
        seq: SeqId,
        layer: u32,
        sel: Vec<u32>,
        out: &mut LayerRead,
    ) -> Result<(), KvError> {
        let plan = self.plan_sorted(seq, layer, sel, out)?;
        let io = plan.run(out);
        self.finish_read(plan, io, out)
    }

    /// The first part of a read that runs without the store's lock: check the blocks, copy
    /// the RAM tail into `out`, and note where the pages are and their checksums. Then
    /// [`PlannedRead::run`] reads the device with no lock held (so appends and other reads
    /// go on meanwhile), and [`KvStore::finish_read`], under the lock again, counts it and
    /// tells a corrupt page from a sequence that changed in between. On error `out` holds
    /// nothing.
    pub fn plan_read(
        &self,
        seq: SeqId,
        layer: u32,
        blocks: &[u32],
        out: &mut LayerRead,
    ) -> Result<PlannedRead, KvError> {
        let mut sel = blocks.to_vec();
        sel.sort_unstable();
        sel.dedup();
        self.plan_sorted(seq, layer, sel, out)
    }

    fn plan_sorted(
        &self,
        seq: SeqId,
        layer: u32,
        sel: Vec<u32>,
        out: &mut LayerRead,
    ) -> Result<PlannedRead, KvError> {
        let g = &self.geo;
        let ls = match self.layer(seq, layer) {
            Ok(ls) => ls,
            Err(e) => {
                out.clear();
                return Err(e);
            }
        };
        if let Some(&b) = sel.last() {
            if b >= ls.full_blocks {
                out.clear();
                return Err(KvError::BadInput(format!(
                    "block {b} of sequence {seq} layer {layer} is not on flash ({} full blocks)",
                    ls.full_blocks
                )));
            }
        }
        out.reset(g, sel.len());
        let units = units_for(&ls.extents, &sel);
        // Runs: consecutive selected blocks that are also physically consecutive.
        let mut runs: Vec<(usize, usize, u64)> = Vec::new();
        for (i, &u) in units.iter().enumerate() {
            match runs.last_mut() {
                Some((s, len, u0))
                    if sel[*s + *len - 1] + 1 == sel[i] && *u0 + *len as u64 == u =>
                {
                    *len += 1
                }
                _ => runs.push((i, 1, u)),
            }
        }
        let h = g.heads();
        let crcs = sel
            .iter()
            .flat_map(|&b| (0..h).map(move |head| ls.crcs[b as usize * h + head]))
            .collect();
        // The RAM tail, compacted per head.
        let (t, d) = (g.block_tokens(), g.head_dim());
        let n = ls.tail_tokens as usize * d;
        out.tail_k.clear();
        out.tail_v.clear();
        for head in 0..h {
            out.tail_k
                .extend_from_slice(&ls.tail_k[head * t * d..head * t * d + n]);
            out.tail_v
                .extend_from_slice(&ls.tail_v[head * t * d..head * t * d + n]);
        }
        out.tail_tokens = ls.tail_tokens as usize;
        out.tail_first_pos = ls.full_blocks as usize * t;
        Ok(PlannedRead {
            dev: self.dev.clone(),
            geo: *g,
            seq,
            layer,
            sel,
            units,
            runs,
            crcs,
            started: Instant::now(),
        })
    }

    /// Count a read run by [`PlannedRead::run`] and give its result. A page whose checksum
    /// failed is a corrupt page (counted, `ChecksumMismatch`) only if the sequence still
    /// holds it where the plan found it; otherwise the sequence was reclaimed during the
    /// read (`UnknownSequence`, or `BadInput` if its id was reused). On error `out` holds
    /// nothing.
    pub fn finish_read(
        &self,
        plan: PlannedRead,
        io: Result<(), ReadFault>,
        out: &mut LayerRead,
    ) -> Result<(), KvError> {
        let (seq, layer) = (plan.seq, plan.layer);
        let g = &self.geo;
        let result = match io {
            Ok(()) => Ok(()),
            Err(ReadFault::Device(e)) => Err(KvError::io(
                format!("reading sequence {seq} layer {layer}"),
                e,
            )),
            Err(ReadFault::Checksum {
                index,
                head,
                expected,
                found,
            }) => {
                let block = plan.sel[index];
                match self.layer(seq, layer) {
                    Ok(ls) if units_for(&ls.extents, &plan.sel) == plan.units => {
                        self.counters
                            .checksum_failures
                            .fetch_add(1, Ordering::Relaxed);
                        Err(KvError::ChecksumMismatch {
                            seq,
                            layer,
                            block,
                            head: head as u32,
                            expected,
                            found,
                        })
                    }
                    Ok(_) => Err(KvError::BadInput(format!(
                        "sequence {seq} was replaced while layer {layer} was read"
                    ))),
                    Err(e) => Err(e),
                }
            }
        };
        if let Err(e) = result {
            out.clear();
            return Err(e);
        }
        let c = &self.counters;
        let n = plan.sel.len();
        c.bytes_read
            .fetch_add((n * g.unit_bytes) as u64, Ordering::Relaxed);
        c.read_ios
            .fetch_add(plan.runs.len() as u64, Ordering::Relaxed);
        c.pages_read
            .fetch_add((n * g.heads()) as u64, Ordering::Relaxed);
        c.reads_coalesced
            .fetch_add((n - plan.runs.len()) as u64, Ordering::Relaxed);
        out.blocks = plan.sel;
        if let Ok(mut hst) = self.read_lat.lock() {
            hst.saturating_record((plan.started.elapsed().as_micros() as u64).max(1));
        }
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // Reclaim and persistence
    // -----------------------------------------------------------------------------------------

    /// End a sequence: drop its tail and free its extents. A persisted sequence is first
    /// removed from the manifest (so a crash cannot resurrect pages that get reused).
    pub fn reclaim(&mut self, seq: SeqId) -> Result<(), KvError> {
        let mut st = self
            .seqs
            .remove(&seq)
            .ok_or(KvError::UnknownSequence(seq))?;
        if let Some(snap) = &st.snapshot {
            let mut r = self.commit(true);
            if matches!(r, Err(KvError::ManifestNoSpace { .. })) {
                // Give back what the durable manifest does not reference, then retry.
                for (l, s) in st.layers.iter_mut().zip(&snap.layers) {
                    let mut keep = Vec::new();
                    for &e in &l.extents {
                        let mut rest = vec![e];
                        for &se in &s.extents {
                            rest = rest.into_iter().flat_map(|x| split_off(x, se)).collect();
                        }
                        self.release(&rest);
                        keep.extend(
                            s.extents
                                .iter()
                                .filter(|se| se.start < e.end() && e.start < se.end()),
                        );
                    }
                    keep.sort();
                    keep.dedup();
                    l.extents = keep;
                }
                r = self.commit(true);
            }
            if let Err(e) = r {
                self.seqs.insert(seq, st);
                return Err(e);
            }
        }
        for l in &st.layers {
            self.release(&l.extents);
        }
        Ok(())
    }

    /// Make `seq`, as it is now (pages, index and tail), survive a restart. Atomic: after a
    /// crash the store holds either the previous persisted state or this one.
    pub fn persist(&mut self, seq: SeqId) -> Result<(), KvError> {
        let g = self.geo;
        if self.shares_units(seq) {
            return Err(KvError::BadInput(format!(
                "sequence {seq} shares pages with the prefix cache and cannot be persisted on its own"
            )));
        }
        let st = self
            .seqs
            .get_mut(&seq)
            .ok_or(KvError::UnknownSequence(seq))?;
        let (h, t, d) = (g.heads(), g.block_tokens(), g.head_dim());
        let layers = st
            .layers
            .iter()
            .map(|l| {
                let n = l.tail_tokens as usize * d;
                let mut tail_k = Vec::with_capacity(h * n);
                let mut tail_v = Vec::with_capacity(h * n);
                for head in 0..h {
                    tail_k.extend_from_slice(&l.tail_k[head * t * d..head * t * d + n]);
                    tail_v.extend_from_slice(&l.tail_v[head * t * d..head * t * d + n]);
                }
                LayerSnap {
                    extents: l.extents.clone(),
                    full_blocks: l.full_blocks,
                    crcs: l.crcs.clone(),
                    tail_tokens: l.tail_tokens,
                    tail_k,
                    tail_v,
                }
            })
            .collect();
        let prev = st.snapshot.replace(SeqSnap { seq, layers });
        if let Err(e) = self.commit(false) {
            self.seqs.get_mut(&seq).expect("exists").snapshot = prev;
            return Err(e);
        }
        Ok(())
    }

    /// Whether `seq` has been persisted.
    pub fn is_persisted(&self, seq: SeqId) -> bool {
        self.seqs.get(&seq).is_some_and(|s| s.snapshot.is_some())
    }

    /// Write a manifest of every persisted snapshot and the prefix index (a checkpoint),
    /// give the index a fresh, empty journal, and switch the root to both.
    fn commit(&mut self, shrinking: bool) -> Result<(), KvError> {
        let g = self.geo;
        let io = |what: &str, e| KvError::io(format!("persisting: {what}"), e);
        // Data pages are written before any manifest that points at them is.
        self.dev.sync().map_err(|e| io("flushing pages", e))?;
        let generation = self.generation + 1;
        let empty = Extent { start: 0, len: 0 };
        let root = if !self.seqs.values().any(|s| s.snapshot.is_some()) && self.cache_empty() {
            // Nothing persisted: the root alone says so, no manifest extent needed.
            Root {
                store_id: self.store_id,
                generation,
                manifest: empty,
                manifest_len: 0,
                manifest_crc: 0,
                journal: empty,
            }
        } else {
            let mut bytes = self.encode_manifest(generation);
            let mut units = (bytes.len() as u64).div_ceil(g.unit_bytes as u64);
            let journal = self.journal_units();
            // A growing manifest must leave room for one more of its size, so that a later
            // reclaim (whose manifest is smaller) can always be committed.
            let want = |units: u64, m: Option<Extent>| {
                let grows = m.is_none_or(|m| units > m.len) && !shrinking;
                if grows {
                    2 * units
                } else {
                    units
                }
            };
            if self.alloc.free_units() < want(units, self.manifest) && self.trim_slack(None) > 0 {
                // Trimming clipped snapshots: encode them as they are now.
                bytes = self.encode_manifest(generation);
                units = (bytes.len() as u64).div_ceil(g.unit_bytes as u64);
            }
            let want_free = want(units, self.manifest);
            let free = self.free_bytes();
            let no_space = || KvError::ManifestNoSpace {
                needed: want_free * g.unit_bytes as u64,
                free,
            };
            if self.alloc.free_units() < want_free {
                return Err(no_space());
            }
            let ext = self.alloc.alloc(units).ok_or_else(no_space)?;
            // The journal takes what it can get, up to `journal` units in one run (free space
            // may be fragmented); none at all only means that every change of the prefix
            // index commits a checkpoint.
            let jext = {
                let mut n = journal.min(self.alloc.free_units());
                loop {
                    if n == 0 {
                        break Extent { start: 0, len: 0 };
                    }
                    if let Some(e) = self.alloc.alloc(n) {
                        break e;
                    }
                    n /= 2;
                }
            };
            let mut buf = AlignedBuf::new(units as usize * g.unit_bytes, g.page_align as usize);
            buf.as_mut_slice()[..bytes.len()].copy_from_slice(&bytes);
            let w = self
                .dev
                .write_at(&[WriteReq {
                    offset: g.unit_offset(ext.start),
                    buf: buf.as_slice(),
                }])
                .and_then(|_| self.dev.sync());
            if let Err(e) = w {
                self.alloc.free(ext);
                if jext.len > 0 {
                    self.alloc.free(jext);
                }
                return Err(io("writing the manifest", e));
            }
            Root {
                store_id: self.store_id,
                generation,
                manifest: ext,
                manifest_len: bytes.len() as u64,
                manifest_crc: format::crc(&bytes),
                journal: jext,
            }
        };
        let ext = (root.manifest_len > 0).then_some(root.manifest);
        let jext = (root.journal.len > 0).then_some(root.journal);
        let pa = g.page_align as usize;
        let mut rb = AlignedBuf::new(pa, pa);
        root.encode(rb.as_mut_slice());
        let w = self
            .dev
            .write_at(&[WriteReq {
                offset: g.root_offset(generation % 2),
                buf: rb.as_slice(),
            }])
            .and_then(|_| self.dev.sync());
        if let Err(e) = w {
            // The root may or may not have landed: keep the new manifest's and journal's
            // extents allocated (they are recovered at the next open) and keep the old ones,
            // which the other slot still points at.
            return Err(io("writing the root", e));
        }
        if let Some(old) = std::mem::replace(&mut self.manifest, ext) {
            self.alloc.free(old);
        }
        if let Some(old) = std::mem::replace(&mut self.journal, jext) {
            self.alloc.free(old);
        }
        self.journal_pos = 0;
        self.journal_seq = 0;
        self.generation = generation;
        self.counters
            .manifest_commits
            .fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn encode_manifest(&self, generation: u64) -> Vec<u8> {
        let snaps: BTreeMap<SeqId, &SeqSnap> = self
            .seqs
            .iter()
            .filter_map(|(&id, s)| s.snapshot.as_ref().map(|sn| (id, sn)))
            .collect();
        let list: Vec<(u64, &SeqSnap)> = snaps.into_iter().collect();
        let index = journal::encode_ops(&self.checkpoint_ops());
        format::encode_manifest(self.store_id, generation, &list, &index)
    }

    /// Flush device caches (pages are written synchronously; this is the durability barrier).
    pub fn sync(&self) -> Result<(), KvError> {
        self.dev.sync().map_err(|e| KvError::io("sync", e))
    }

    /// Where the store lives (for messages).
    pub fn location(&self) -> &str {
        &self.location
    }
}

/// Copy input tokens `from..to` (token-major `k`/`v`) into the tail starting at row `at`.
#[allow(clippy::too_many_arguments)]
fn copy_tokens_to_tail(
    ls: &mut LayerState,
    t: usize,
    h: usize,
    d: usize,
    at: usize,
    k: &[f16],
    v: &[f16],
    from: usize,
    to: usize,
) {
    for (row, tok) in (at..).zip(from..to) {
        for head in 0..h {
            let src = (tok * h + head) * d;
            let dst = (head * t + row) * d;
            ls.tail_k[dst..dst + d].copy_from_slice(&k[src..src + d]);
            ls.tail_v[dst..dst + d].copy_from_slice(&v[src..src + d]);
        }
    }
}

/// The parts of `e` outside `cut`.
fn split_off(e: Extent, cut: Extent) -> Vec<Extent> {
    let mut v = vec![e];
    clip(&mut v, cut);
    v
}

/// Remove `freed` from a list of extents.
fn clip(extents: &mut Vec<Extent>, freed: Extent) {
    let mut out = Vec::with_capacity(extents.len());
    for &e in extents.iter() {
        if e.end() <= freed.start || e.start >= freed.end() {
            out.push(e);
            continue;
        }
        if e.start < freed.start {
            out.push(Extent {
                start: e.start,
                len: freed.start - e.start,
            });
        }
        if e.end() > freed.end() {
            out.push(Extent {
                start: freed.end(),
                len: e.end() - freed.end(),
            });
        }
    }
    *extents = out;
}

/// A read planned under the store's lock, to run without it (see [`KvStore::plan_read`]).
pub struct PlannedRead {
    dev: Arc<dyn BlockDevice>,
    geo: Geometry,
    seq: SeqId,
    layer: u32,
    sel: Vec<u32>,
    units: Vec<u64>,
    runs: Vec<(usize, usize, u64)>,
    /// Expected checksum per selected block and head.
    crcs: Vec<u32>,
    started: Instant,
}

/// How a planned read failed on the device or its checksums.
#[derive(Debug)]
pub enum ReadFault {
    /// The device failed.
    Device(DevError),
    /// A page's checksum failed.
    Checksum {
        /// Index of the block among those read.
        index: usize,
        /// The kv head whose page failed.
        head: usize,
        /// The checksum the store holds for the page.
        expected: u32,
        /// The checksum of what was read.
        found: u32,
    },
}

impl PlannedRead {
    /// Read the pages into `out` (sized by the plan) and verify every page's checksum.
    pub fn run(&self, out: &mut LayerRead) -> Result<(), ReadFault> {
        let g = &self.geo;
        {
            let mut rest: &mut [u8] = out.buf.as_mut_slice();
            let mut reqs = Vec::with_capacity(self.runs.len());
            for &(_, len, unit) in &self.runs {
                let (head, tail) = rest.split_at_mut(len * g.unit_bytes);
                reqs.push(ReadReq {
                    offset: g.unit_offset(unit),
                    buf: head,
                });
                rest = tail;
            }
            self.dev.read_at(&mut reqs).map_err(ReadFault::Device)?;
        }
        let h = g.heads();
        for i in 0..self.sel.len() {
            for head in 0..h {
                let at = i * g.unit_bytes + head * g.head_page;
                let found = format::crc(&out.buf.as_slice()[at..at + g.head_page]);
                let expected = self.crcs[i * h + head];
                if found != expected {
                    return Err(ReadFault::Checksum {
                        index: i,
                        head,
                        expected,
                        found,
                    });
                }
            }
        }
        Ok(())
    }
}

/// Physical unit of each of `count` consecutive blocks starting at block `first`.
fn units_of(extents: &[Extent], first: u64, count: u64) -> Vec<u64> {
    let mut out = Vec::with_capacity(count as usize);
    let mut base = 0u64;
    let mut b = first;
    let end = first + count;
    for e in extents {
        while b < end && b < base + e.len {
            if b >= base {
                out.push(e.start + (b - base));
            }
            b += 1;
        }
        base += e.len;
        if b >= end {
            break;
        }
    }
    out
}

/// Physical unit of each sorted block in `sel`.
fn units_for(extents: &[Extent], sel: &[u32]) -> Vec<u64> {
    let mut out = Vec::with_capacity(sel.len());
    let mut ei = 0;
    let mut base = 0u64;
    for &b in sel {
        let b = b as u64;
        while ei < extents.len() && b >= base + extents[ei].len {
            base += extents[ei].len;
            ei += 1;
        }
        out.push(extents[ei].start + (b - base));
    }
    out
}

/// (index, length, first unit) of each physically contiguous run in `units`.
fn runs_of(units: &[u64]) -> Vec<(usize, usize, u64)> {
    let mut runs: Vec<(usize, usize, u64)> = Vec::new();
    for (i, &u) in units.iter().enumerate() {
        match runs.last_mut() {
            Some((_, len, u0)) if *u0 + *len as u64 == u => *len += 1,
            _ => runs.push((i, 1, u)),
        }
    }
    runs
}
