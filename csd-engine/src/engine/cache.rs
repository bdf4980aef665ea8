//! The engine's RAM page cache: verified block groups kept under a byte budget.
//!
//! Eviction is random, not least-recently-used. A decode step touches each sequence's pages
//! layer by layer in the same order every step, so when the pages of all running sequences
//! slightly exceed the budget, LRU evicts exactly the page needed next and hits nothing
//! (measured: 0% hits for 4 sequences whose pages were 1.2× a 32 MiB budget). Random
//! eviction keeps about budget / working-set of them. Sink pages and pages selected step
//! after step stay resident as long as the working set fits.

use half::f16;
use std::collections::HashMap;
use std::sync::Arc;

use crate::error::SeqId;

/// (sequence, layer, block).
pub type PageKey = (SeqId, u32, u32);

/// One block group in RAM: per kv head, the K rows then the V rows.
pub type BlockData = Arc<Vec<f16>>;

pub struct PageCache {
    budget_bytes: u64,
    held_bytes: u64,
    entries: Vec<(PageKey, BlockData)>,
    index: HashMap<PageKey, usize>,
    rng: u64,
    pub lookups: u64,
    pub hits: u64,
}

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
            rng: 0x9E37_79B9_7F4A_7C15,
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

    /// Look a page up, counting the lookup.
    pub fn get(&mut self, key: PageKey) -> Option<BlockData> {
        self.lookups += 1;
        let &i = self.index.get(&key)?;
        self.hits += 1;
        Some(self.entries[i].1.clone())
    }

    /// Keep a page, evicting random pages until it fits. A page larger than the whole budget
    /// is not kept.
    pub fn insert(&mut self, key: PageKey, data: BlockData) {
        let size = bytes(&data);
        if size > self.budget_bytes {
            return;
        }
        self.remove(key);
        while self.held_bytes + size > self.budget_bytes && !self.entries.is_empty() {
            let victim = (self.next_random() % self.entries.len() as u64) as usize;
            self.remove_at(victim);
        }
        self.index.insert(key, self.entries.len());
        self.entries.push((key, data));
        self.held_bytes += size;
    }

    /// xorshift64*: a fixed seed, so runs are repeatable.
    fn next_random(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
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
}
