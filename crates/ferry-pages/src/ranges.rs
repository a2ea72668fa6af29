//! Sets of half-open address ranges, kept merged and sorted.

use std::collections::BTreeMap;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeSet {
    /// start → end, disjoint and never touching.
    map: BTreeMap<u64, u64>,
}

impl RangeSet {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Total length of the ranges.
    pub fn len(&self) -> u64 {
        self.map.iter().map(|(s, e)| e - s).sum()
    }

    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.map.iter().map(|(s, e)| (*s, *e))
    }

    pub fn first(&self) -> Option<(u64, u64)> {
        self.map.iter().next().map(|(s, e)| (*s, *e))
    }

    /// The range holding `addr`.
    pub fn containing(&self, addr: u64) -> Option<(u64, u64)> {
        self.map
            .range(..=addr)
            .next_back()
            .filter(|(_, e)| **e > addr)
            .map(|(s, e)| (*s, *e))
    }

    /// The start of the first range at or after `addr`.
    pub fn next_start(&self, addr: u64) -> Option<u64> {
        self.map.range(addr..).next().map(|(s, _)| *s)
    }

    pub fn insert(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let (mut s, mut e) = (start, end);
        if let Some((ps, pe)) = self.map.range(..=s).next_back().map(|(a, b)| (*a, *b)) {
            if pe >= s {
                s = ps;
                e = e.max(pe);
                self.map.remove(&ps);
            }
        }
        let covered: Vec<(u64, u64)> = self.map.range(s..=e).map(|(a, b)| (*a, *b)).collect();
        for (a, b) in covered {
            e = e.max(b);
            self.map.remove(&a);
        }
        self.map.insert(s, e);
    }

    pub fn remove(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let mut hit: Vec<(u64, u64)> = self.map.range(start..end).map(|(a, b)| (*a, *b)).collect();
        if let Some((ps, pe)) = self.map.range(..start).next_back().map(|(a, b)| (*a, *b)) {
            if pe > start {
                hit.push((ps, pe));
            }
        }
        for (a, b) in hit {
            self.map.remove(&a);
            if a < start {
                self.map.insert(a, start);
            }
            if b > end {
                self.map.insert(end, b);
            }
        }
    }

    /// The parts of `start..end` inside this set.
    pub fn intersection(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        if let Some((s, e)) = self.containing(start) {
            out.push((start, e.min(end)));
            let _ = s;
        }
        for (s, e) in self.map.range(start..end) {
            if *s == start {
                continue;
            }
            out.push((*s, (*e).min(end)));
        }
        out.retain(|(s, e)| s < e);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn inserts_merge_and_removes_split() {
        let mut r = RangeSet::new();
        r.insert(10, 20);
        r.insert(30, 40);
        r.insert(20, 30);
        assert_eq!(r.iter().collect::<Vec<_>>(), vec![(10, 40)]);
        r.remove(15, 25);
        assert_eq!(r.iter().collect::<Vec<_>>(), vec![(10, 15), (25, 40)]);
        assert_eq!(r.containing(26), Some((25, 40)));
        assert_eq!(r.containing(15), None);
        assert_eq!(r.next_start(16), Some(25));
        assert_eq!(r.intersection(12, 30), vec![(12, 15), (25, 30)]);
        assert_eq!(r.len(), 20);
    }

    proptest! {
        /// The set agrees with a plain bitmap of the same operations.
        #[test]
        fn agrees_with_a_bitmap(ops in proptest::collection::vec((any::<bool>(), 0u64..200, 0u64..40), 0..60)) {
            let mut set = RangeSet::new();
            let mut bits = vec![false; 260];
            for (add, s, l) in ops {
                if add { set.insert(s, s + l); } else { set.remove(s, s + l); }
                for b in &mut bits[s as usize..(s + l) as usize] { *b = add; }
            }
            for (i, b) in bits.iter().enumerate() {
                prop_assert_eq!(set.containing(i as u64).is_some(), *b, "at {}", i);
            }
            let ranges: Vec<_> = set.iter().collect();
            for w in ranges.windows(2) {
                prop_assert!(w[0].1 < w[1].0, "ranges touch or overlap: {:?}", ranges);
            }
            prop_assert_eq!(set.len(), bits.iter().filter(|b| **b).count() as u64);
            let inter = set.intersection(50, 150);
            let n: u64 = inter.iter().map(|(s, e)| e - s).sum();
            prop_assert_eq!(n, bits[50..150].iter().filter(|b| **b).count() as u64);
        }
    }
}
