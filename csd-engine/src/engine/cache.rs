//! The engine's RAM page cache: verified block groups kept under a byte budget, least
//! recently used out first. Sink pages and pages selected step after step stay hot.

use half::f16;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::error::SeqId;

/// (sequence, layer, block).
pub type PageKey = (SeqId, u32, u32);

/// One block group in RAM: per kv head, the K rows then the V rows.
pub type BlockData = Arc<Vec<f16>>;

pub struct PageCache {
    budget_bytes: u64,
    held_bytes: u64,
    tick: u64,
    map: HashMap<PageKey, (BlockData, u64)>,
    by_age: BTreeMap<u64, PageKey>,
    pub lookups: u64,
    pub hits: u64,
}

impl PageCache {
    pub fn new(budget_bytes: u64) -> Self {
        PageCache {
            budget_bytes,
            held_bytes: 0,
            tick: 0,
            map: HashMap::new(),
            by_age: BTreeMap::new(),
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

    /// Look a page up, counting the lookup; a hit becomes the most recently used.
    pub fn get(&mut self, key: PageKey) -> Option<BlockData> {
        self.lookups += 1;
        let (data, age) = self.map.get_mut(&key)?;
        self.hits += 1;
        self.by_age.remove(age);
        self.tick += 1;
        *age = self.tick;
        self.by_age.insert(self.tick, key);
        Some(data.clone())
    }

    /// Keep a page, evicting the least recently used until it fits. A page larger than the
    /// whole budget is not kept.
    pub fn insert(&mut self, key: PageKey, data: BlockData) {
        let size = (data.len() * 2) as u64;
        if size > self.budget_bytes {
            return;
        }
        self.remove(key);
        while self.held_bytes + size > self.budget_bytes {
            let Some((_, old)) = self.by_age.pop_first() else {
                break;
            };
            if let Some((d, _)) = self.map.remove(&old) {
                self.held_bytes -= (d.len() * 2) as u64;
            }
        }
        self.tick += 1;
        self.by_age.insert(self.tick, key);
        self.map.insert(key, (data, self.tick));
        self.held_bytes += size;
    }

    fn remove(&mut self, key: PageKey) {
        if let Some((d, age)) = self.map.remove(&key) {
            self.by_age.remove(&age);
            self.held_bytes -= (d.len() * 2) as u64;
        }
    }

    /// Drop every page of `seq` (it was reclaimed).
    pub fn forget_seq(&mut self, seq: SeqId) {
        let keys: Vec<PageKey> = self.map.keys().filter(|k| k.0 == seq).copied().collect();
        for k in keys {
            self.remove(k);
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
    fn evicts_least_recently_used_within_budget() {
        let mut c = PageCache::new(3 * 200);
        for b in 0..3 {
            c.insert((1, 0, b), page(100));
        }
        assert!(c.get((1, 0, 0)).is_some()); // 0 is now the newest
        c.insert((1, 0, 3), page(100)); // evicts 1
        assert!(c.get((1, 0, 1)).is_none());
        assert!(c.get((1, 0, 0)).is_some());
        assert!(c.held_bytes() <= c.budget_bytes());
        assert_eq!((c.lookups, c.hits), (3, 2));
        c.forget_seq(1);
        assert_eq!(c.held_bytes(), 0);
        c.insert((2, 0, 0), page(1000)); // larger than the budget: not kept
        assert!(c.get((2, 0, 0)).is_none());
    }
}
