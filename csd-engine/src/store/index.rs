//! The prefix index in RAM: page key → the page's block group in every layer and its page
//! checksums, with the parent link, a child count and a least-recently-used clock. Pure data:
//! the store (`share`) owns the units it names, takes references on them and journals every
//! change (`journal`).

use std::collections::{BTreeSet, HashMap};

use crate::prefix::BlockKey;

/// One cached page: a block of tokens, every layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The previous page's key (`None` for a sequence's first page).
    pub parent: Option<BlockKey>,
    /// The block group of every layer.
    pub units: Vec<u64>,
    /// The page checksums, layer-major then kv head.
    pub crcs: Vec<u32>,
    /// Cached pages whose parent this one is.
    pub children: u32,
    /// When it was last looked up or inserted (a logical clock).
    pub last_use: u64,
}

/// Key → entry, with a least-recently-used order over all entries.
#[derive(Default)]
pub struct PrefixIndex {
    entries: HashMap<BlockKey, Entry>,
    lru: BTreeSet<(u64, BlockKey)>,
    clock: u64,
}

impl PrefixIndex {
    /// Entries held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// The entry of `key`.
    pub fn get(&self, key: &BlockKey) -> Option<&Entry> {
        self.entries.get(key)
    }

    /// Every entry, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&BlockKey, &Entry)> {
        self.entries.iter()
    }

    /// How many of `keys` (a chain, first page first) the index holds, counted from the
    /// first; marks them used, later pages more recently than earlier ones.
    pub fn longest(&mut self, keys: &[BlockKey]) -> usize {
        let mut n = 0;
        for k in keys {
            if !self.entries.contains_key(k) {
                break;
            }
            self.touch(k);
            n += 1;
        }
        n
    }

    /// How many of `keys` the index holds, counted from the first, without marking them.
    pub fn peek(&self, keys: &[BlockKey]) -> usize {
        keys.iter()
            .take_while(|k| self.entries.contains_key(k))
            .count()
    }

    fn touch(&mut self, key: &BlockKey) {
        self.clock += 1;
        let now = self.clock;
        if let Some(e) = self.entries.get_mut(key) {
            self.lru.remove(&(e.last_use, *key));
            e.last_use = now;
            self.lru.insert((now, *key));
        }
    }

    /// Add `key` under `parent` (which must be held, unless `None`). Returns false, changing
    /// nothing, if the key is already held or the parent is not.
    pub fn insert(
        &mut self,
        key: BlockKey,
        parent: Option<BlockKey>,
        units: Vec<u64>,
        crcs: Vec<u32>,
    ) -> bool {
        if self.entries.contains_key(&key) {
            return false;
        }
        if let Some(p) = parent {
            match self.entries.get_mut(&p) {
                Some(pe) => pe.children += 1,
                None => return false,
            }
        }
        self.clock += 1;
        let now = self.clock;
        self.entries.insert(
            key,
            Entry {
                parent,
                units,
                crcs,
                children: 0,
                last_use: now,
            },
        );
        self.lru.insert((now, key));
        true
    }

    /// Remove a leaf (an entry without children). Returns it, or `None` if `key` is not held
    /// or still has children.
    pub fn remove_leaf(&mut self, key: &BlockKey) -> Option<Entry> {
        if self.entries.get(key)?.children > 0 {
            return None;
        }
        let e = self.entries.remove(key)?;
        self.lru.remove(&(e.last_use, *key));
        if let Some(p) = e.parent {
            if let Some(pe) = self.entries.get_mut(&p) {
                pe.children -= 1;
            }
        }
        Some(e)
    }

    /// `key` and every entry that descends from it, deepest first (the order in which
    /// [`Self::remove_leaf`] can take them).
    pub fn subtree(&self, key: &BlockKey) -> Vec<BlockKey> {
        if !self.entries.contains_key(key) {
            return Vec::new();
        }
        // Children are not linked downwards: one pass groups entries by parent.
        let mut kids: HashMap<BlockKey, Vec<BlockKey>> = HashMap::new();
        for (k, e) in &self.entries {
            if let Some(p) = e.parent {
                kids.entry(p).or_default().push(*k);
            }
        }
        let mut order = vec![*key];
        let mut i = 0;
        while i < order.len() {
            if let Some(c) = kids.get(&order[i]) {
                order.extend(c.iter().copied());
            }
            i += 1;
        }
        order.reverse();
        order
    }

    /// Leaves in least-recently-used order (oldest first).
    pub fn lru_leaves(&self) -> impl Iterator<Item = BlockKey> + '_ {
        self.lru
            .iter()
            .map(|&(_, k)| k)
            .filter(|k| self.entries.get(k).is_some_and(|e| e.children == 0))
    }

    /// Every key, parents before children (the order a checkpoint lists them in).
    pub fn parents_first(&self) -> Vec<BlockKey> {
        let mut depth: HashMap<BlockKey, u32> = HashMap::new();
        fn depth_of(
            k: BlockKey,
            entries: &HashMap<BlockKey, Entry>,
            memo: &mut HashMap<BlockKey, u32>,
        ) -> u32 {
            let mut chain = Vec::new();
            let mut cur = Some(k);
            let mut base = 0;
            while let Some(c) = cur {
                if let Some(&d) = memo.get(&c) {
                    base = d + 1;
                    break;
                }
                chain.push(c);
                cur = entries.get(&c).and_then(|e| e.parent);
            }
            for (i, c) in chain.iter().rev().enumerate() {
                memo.insert(*c, base + i as u32);
            }
            memo[&k]
        }
        let mut keys: Vec<(u32, BlockKey)> = self
            .entries
            .keys()
            .map(|&k| (depth_of(k, &self.entries, &mut depth), k))
            .collect();
        keys.sort_unstable();
        keys.into_iter().map(|(_, k)| k).collect()
    }

    /// Remove everything; returns the entries.
    pub fn take_all(&mut self) -> Vec<Entry> {
        self.lru.clear();
        self.entries.drain().map(|(_, e)| e).collect()
    }
}
