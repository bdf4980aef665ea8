//! The engine's RAM page cache: verified block groups kept under a byte budget.
//!
//! Eviction is random, not least-recently-used. A decode step touches each sequence's pages
//! layer by layer in the same order every step, so when the pages of all running sequences
//! slightly exceed the budget, LRU evicts exactly the page needed next and hits nothing
//! (measured: 0% hits for 4 sequences whose pages were 1.2× a 32 MiB budget).
//!
//! Admission follows TinyLFU: every lookup is counted in a small count-min sketch (halved
//! periodically, so counts follow recent use), and once the cache is full a missed page is
//! kept only if it has been asked for more often than a randomly chosen resident page, which
//! then makes room. When the working set is several times the budget (many sequences), the
//! cache then holds a stable share of it instead of churning (random eviction with every
//! miss admitted kept under 1% hits for 8 sequences at 5× the budget), and the pages it turns
//! away are never copied. Sinks and pages selected step after step gather the highest counts.

use half::f16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::sync::Arc;

use crate::error::SeqId;

/// (sequence, layer, block).
pub type PageKey = (SeqId, u32, u32);

/// One block group in RAM: per kv head, the K rows then the V rows.
pub type BlockData = Arc<Vec<f16>>;

/// The cache: pages under a byte budget, random eviction, TinyLFU admission.
pub struct PageCache {
    budget_bytes: u64,
    held_bytes: u64,
    entries: Vec<(PageKey, BlockData)>,
    index: HashMap<PageKey, usize>,
    /// Picks victims; a fixed seed, so runs are repeatable.
    rng: ChaCha8Rng,
    freq: Frequency,
    /// The resident page a successful [`PageCache::admit`] chose to make room.
    victim: Option<PageKey>,
    pub lookups: u64,
    pub hits: u64,
}

/// Counters of the sketch (a power of two).
const SKETCH_WIDTH: usize = 1 << 16;

/// A count-min sketch of recent lookups per page: four 8-bit counters per key, the key's
/// count is their minimum; every `period` increments all counters are halved (TinyLFU's
/// sample: ten lookups per page the budget holds).
struct Frequency {
    counts: Vec<u8>,
    added: usize,
    period: usize,
}

impl Frequency {
    fn new() -> Self {
        Frequency {
            counts: vec![0; SKETCH_WIDTH],
            added: 0,
            period: SKETCH_WIDTH,
        }
    }

    /// The key's four counters: a hash of the key (splitmix64's finaliser over the packed
    /// key; a hash, not a random stream), each 16-bit quarter picking one counter.
    fn slots(key: PageKey) -> [usize; 4] {
        let mut z = key
            .0
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(((key.1 as u64) << 32) | key.2 as u64);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let m = SKETCH_WIDTH - 1;
        [0, 16, 32, 48].map(|s| ((z >> s) as usize) & m)
    }

    fn add(&mut self, key: PageKey) {
        for i in Self::slots(key) {
            self.counts[i] = self.counts[i].saturating_add(1);
        }
        self.added += 1;
        if self.added >= self.period {
            self.added = 0;
            self.counts.iter_mut().for_each(|c| *c /= 2);
        }
    }

    fn count(&self, key: PageKey) -> u8 {
        Self::slots(key)
            .iter()
            .map(|&i| self.counts[i])
            .min()
            .unwrap_or(0)
    }
}

/// Seed of the victim picker.
const RNG_SEED: u64 = 0x9E37_79B9_7F4A_7C15;

fn bytes(d: &BlockData) -> u64 {
    (d.len() * 2) as u64
}

impl PageCache {
    pub fn new(budget_bytes: u64) -> Self {
        PageCache {
            budget_bytes,
            held_bytes: 0,
            entries: Vec::new(),
            index: HashMap::new(),
            rng: ChaCha8Rng::seed_from_u64(RNG_SEED),
            freq: Frequency::new(),
            victim: None,
            lookups: 0,
            hits: 0,
        }
    }

    pub fn held_bytes(&self) -> u64 {
        self.held_bytes
    }

    pub fn budget_bytes(&self) -> u64 {
        self.budget_bytes
    }

    /// Whether the cache holds a page (not counted as a lookup).
    pub fn holds(&self, key: PageKey) -> bool {
        self.index.contains_key(&key)
    }

    /// Look a page up, counting the lookup.
    pub fn get(&mut self, key: PageKey) -> Option<BlockData> {
        self.lookups += 1;
        self.freq.add(key);
        let &i = self.index.get(&key)?;
        self.hits += 1;
        Some(self.entries[i].1.clone())
    }

    /// Whether a missed page of `size` bytes should be kept (see the module comment): always
    /// while it fits, never when it exceeds the whole budget, and otherwise only if it was
    /// looked up more often lately than a random resident page, which the next
    /// [`PageCache::insert`] evicts first.
    pub fn admit(&mut self, key: PageKey, size: u64) -> bool {
        self.victim = None;
        if size > self.budget_bytes {
            return false;
        }
        let pages = (self.budget_bytes / size.max(1)) as usize;
        self.freq.period = pages.saturating_mul(10).clamp(64, SKETCH_WIDTH);
        if self.held_bytes + size <= self.budget_bytes
            || self.entries.is_empty()
            || self.index.contains_key(&key)
        {
            return true;
        }
        let i = self.rng.random_range(0..self.entries.len());
        let victim = self.entries[i].0;
        let keep = self.freq.count(key) > self.freq.count(victim);
        if keep {
            self.victim = Some(victim);
        }
        keep
    }

    /// Keep a page, evicting the admitted page's victim first, then random pages, until it
    /// fits. A page larger than the whole budget is not kept.
    pub fn insert(&mut self, key: PageKey, data: BlockData) {
        let size = bytes(&data);
        if size > self.budget_bytes {
            return;
        }
        self.remove(key);
        if let Some(v) = self.victim.take() {
            self.remove(v);
        }
        while self.held_bytes + size > self.budget_bytes && !self.entries.is_empty() {
            let victim = self.rng.random_range(0..self.entries.len());
            self.remove_at(victim);
        }
        self.index.insert(key, self.entries.len());
        self.entries.push((key, data));
        self.held_bytes += size;
    }

    fn remove(&mut self, key: PageKey) {
        if let Some(&i) = self.index.get(&key) {
            self.remove_at(i);
        }
    }

    fn remove_at(&mut self, i: usize) {
        let (key, data) = self.entries.swap_remove(i);
        self.index.remove(&key);
        self.held_bytes -= bytes(&data);
        if let Some((moved, _)) = self.entries.get(i) {
            self.index.insert(*moved, i);
        }
    }

    /// Drop every page of `seq` (it was reclaimed).
    pub fn forget_seq(&mut self, seq: SeqId) {
        let mut i = 0;
        while i < self.entries.len() {
            if self.entries[i].0 .0 == seq {
                self.remove_at(i);
            } else {
                i += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(n: usize) -> BlockData {
        Arc::new(vec![f16::ZERO; n])
    }

    #[test]
    fn keeps_within_budget_and_forgets_sequences() {
        let mut c = PageCache::new(3 * 200);
        for b in 0..3 {
            c.insert((1, 0, b), page(100));
        }
        for b in 0..3 {
            assert!(c.get((1, 0, b)).is_some());
        }
        c.insert((2, 0, 0), page(100)); // evicts one of sequence 1's pages
        assert!(c.get((2, 0, 0)).is_some());
        assert_eq!((0..3).filter(|&b| c.get((1, 0, b)).is_some()).count(), 2);
        assert!(c.held_bytes() <= c.budget_bytes());
        c.forget_seq(1);
        assert_eq!(c.held_bytes(), 200);
        assert!(c.get((2, 0, 0)).is_some());
        c.insert((3, 0, 0), page(1000)); // larger than the budget: not kept
        assert!(c.get((3, 0, 0)).is_none());
    }

    #[test]
    fn a_cyclic_working_set_larger_than_the_budget_still_hits() {
        // 12 pages cycled through a cache of 10: LRU would hit nothing.
        let mut c = PageCache::new(10 * 200);
        for _round in 0..50 {
            for b in 0..12 {
                if c.get((1, 0, b)).is_none() {
                    c.insert((1, 0, b), page(100));
                }
            }
        }
        let rate = c.hits as f64 / c.lookups as f64;
        assert!(rate > 0.5, "hit rate {rate}");
    }

    /// A working set five times the budget, cycled: the pages admitted first stay (equal
    /// counts never displace them), so the cache keeps about a fifth of the set and hits it,
    /// where admitting every miss churns it to almost nothing. A page asked for more often
    /// than the residents still gets in.
    #[test]
    fn a_working_set_far_larger_than_the_budget_is_not_churned() {
        let mut c = PageCache::new(10 * 200);
        let mut copies = 0;
        for _round in 0..40 {
            for b in 0..50 {
                if c.get((1, 0, b)).is_none() && c.admit((1, 0, b), 200) {
                    copies += 1;
                    c.insert((1, 0, b), page(100));
                }
            }
        }
        let rate = c.hits as f64 / c.lookups as f64;
        assert!(rate > 0.15, "hit rate {rate}");
        assert!(copies < 100, "{copies} pages copied in");
        assert!(c.held_bytes() <= c.budget_bytes());
        // A hot page (looked up every time) displaces a resident one.
        for _ in 0..5 {
            assert!(c.get((2, 0, 0)).is_none());
        }
        assert!(c.admit((2, 0, 0), 200));
        c.insert((2, 0, 0), page(100));
        assert!(c.get((2, 0, 0)).is_some());
        assert!(c.held_bytes() <= c.budget_bytes());
    }
}
