//! Free-extent allocator over a range of allocation units.
//!
//! Free space is a set of disjoint, non-adjacent `[start, start+len)` ranges kept in a
//! `BTreeMap`; freeing merges neighbours. Allocation prefers extending a given extent in place
//! (so a growing layer stays contiguous), then the smallest free range that fits (best fit),
//! and can split a request over several ranges when no single one is large enough.

use std::collections::BTreeMap;

/// A run of allocation units.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Extent {
    pub start: u64,
    pub len: u64,
}

impl Extent {
    /// One past the last unit. Saturates: an extent decoded from a corrupt header whose end
    /// overflows compares as past any store's end (found by the store fuzz target).
    pub fn end(&self) -> u64 {
        self.start.saturating_add(self.len)
    }
}

#[derive(Clone, Debug)]
pub struct ExtentAllocator {
    total: u64,
    free: BTreeMap<u64, u64>,
    free_units: u64,
}

impl ExtentAllocator {
    /// All of `[0, total)` free.
    pub fn new(total: u64) -> ExtentAllocator {
        let mut free = BTreeMap::new();
        if total > 0 {
            free.insert(0, total);
        }
        ExtentAllocator {
            total,
            free,
            free_units: total,
        }
    }

    pub fn free_units(&self) -> u64 {
        self.free_units
    }

    /// The largest single free range.
    #[cfg(test)]
    pub fn largest_free(&self) -> u64 {
        self.free.values().copied().max().unwrap_or(0)
    }

    /// Mark `e` used. Returns false (changing nothing) unless all of it is currently free.
    pub fn reserve(&mut self, e: Extent) -> bool {
        if e.len == 0 || e.end() > self.total {
            return e.len == 0;
        }
        let Some((&fs, &fl)) = self.free.range(..=e.start).next_back() else {
            return false;
        };
        if fs + fl < e.end() {
            return false;
        }
        self.free.remove(&fs);
        if fs < e.start {
            self.free.insert(fs, e.start - fs);
        }
        if e.end() < fs + fl {
            self.free.insert(e.end(), fs + fl - e.end());
        }
        self.free_units -= e.len;
        true
    }

    /// Up to `max` units directly after `e` if they are free, at least `min`.
    pub fn extend(&mut self, e: Extent, min: u64, max: u64) -> Option<Extent> {
        let &fl = self.free.get(&e.end())?;
        if fl < min {
            return None;
        }
        let n = fl.min(max);
        let ext = Extent {
            start: e.end(),
            len: n,
        };
        self.reserve(ext).then_some(ext)
    }

    /// One contiguous extent of exactly `len` units (best fit).
    pub fn alloc(&mut self, len: u64) -> Option<Extent> {
        if len == 0 {
            return None;
        }
        let (&start, _) = self
            .free
            .iter()
            .filter(|(_, &l)| l >= len)
            .min_by_key(|(&s, &l)| (l, s))?;
        let e = Extent { start, len };
        self.reserve(e).then_some(e)
    }

    /// `len` units as few extents as possible: one if any range fits, else the largest ranges
    /// first. `None` (allocating nothing) if fewer than `len` units are free.
    pub fn alloc_scattered(&mut self, len: u64) -> Option<Vec<Extent>> {
        if len > self.free_units {
            return None;
        }
        if let Some(e) = self.alloc(len) {
            return Some(vec![e]);
        }
        let mut ranges: Vec<(u64, u64)> = self.free.iter().map(|(&s, &l)| (s, l)).collect();
        ranges.sort_by_key(|&(s, l)| (std::cmp::Reverse(l), s));
        let mut out = Vec::new();
        let mut left = len;
        for (s, l) in ranges {
            if left == 0 {
                break;
            }
            let e = Extent {
                start: s,
                len: l.min(left),
            };
            let ok = self.reserve(e);
            debug_assert!(ok);
            left -= e.len;
            out.push(e);
        }
        out.sort();
        Some(out)
    }

    /// Return `e` to the free set. Returns false (changing nothing) if any of it is already
    /// free or out of range.
    pub fn free(&mut self, e: Extent) -> bool {
        if e.len == 0 {
            return true;
        }
        if e.end() > self.total {
            return false;
        }
        // Overlap checks against the neighbours.
        let prev = self
            .free
            .range(..=e.start)
            .next_back()
            .map(|(&s, &l)| (s, l));
        if let Some((s, l)) = prev {
            if s + l > e.start {
                return false;
            }
        }
        let next = self.free.range(e.start..).next().map(|(&s, &l)| (s, l));
        if let Some((s, _)) = next {
            if s < e.end() {
                return false;
            }
        }
        let (mut start, mut len) = (e.start, e.len);
        if let Some((s, l)) = prev {
            if s + l == start {
                self.free.remove(&s);
                start = s;
                len += l;
            }
        }
        if let Some((s, l)) = next {
            if s == e.end() {
                self.free.remove(&s);
                len += l;
            }
        }
        self.free.insert(start, len);
        self.free_units += e.len;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_free_merge() {
        let mut a = ExtentAllocator::new(100);
        let x = a.alloc(10).unwrap();
        let y = a.alloc(20).unwrap();
        let z = a.alloc(30).unwrap();
        assert_eq!(a.free_units(), 40);
        assert!(a.free(y));
        assert!(!a.free(y), "double free refused");
        // Best fit: a 15-unit request takes the 20-unit hole, not the 40-unit tail.
        let w = a.alloc(15).unwrap();
        assert_eq!(w.start, y.start);
        assert!(a.free(w));
        assert!(a.free(x));
        assert!(a.free(z));
        assert_eq!(a.free_units(), 100);
        assert_eq!(a.largest_free(), 100);
    }

    #[test]
    fn extend_in_place_and_scatter() {
        let mut a = ExtentAllocator::new(50);
        let x = a.alloc(10).unwrap();
        let e = a.extend(x, 1, 5).unwrap();
        assert_eq!(e, Extent { start: 10, len: 5 });
        let _hole = a.alloc(35).unwrap();
        assert!(a.alloc(1).is_none());
        assert!(a.free(Extent { start: 2, len: 3 }));
        assert!(a.free(Extent { start: 20, len: 4 }));
        assert!(a.alloc_scattered(8).is_none());
        let v = a.alloc_scattered(7).unwrap();
        assert_eq!(v.iter().map(|e| e.len).sum::<u64>(), 7);
        assert_eq!(a.free_units(), 0);
    }

    #[test]
    fn reserve_checks() {
        let mut a = ExtentAllocator::new(10);
        assert!(a.reserve(Extent { start: 2, len: 3 }));
        assert!(!a.reserve(Extent { start: 4, len: 2 }));
        assert!(!a.reserve(Extent { start: 8, len: 3 }));
        assert_eq!(a.free_units(), 7);
    }
}
