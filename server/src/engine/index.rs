//! The index of a shard's devices: their positions by the hash of their id, in an
//! open-addressed table with linear probing.
//!
//! A bucket is one `u64`: the low 32 bits of the id's hash (the tag) in its high half,
//! the position + 1 in its low half, 0 when empty. The bucket a hash starts probing at
//! is its tag masked to the table's size, so the address of a sample's first bucket
//! is known from its hash alone and can be prefetched before anything else of the
//! sample is read (see `Engine::ingest_batch_with`); `hashbrown`'s table, which this
//! replaced, does not say where it will look. The table is at most 7/8 full and
//! doubles when it would be fuller: 9 to 18 bytes per device. Removal shifts the
//! following entries back instead of leaving tombstones, so probes stay short however
//! many devices come and go.

use super::prefetch::prefetch;

/// Positions by id hash.
#[derive(Debug, Default)]
pub(crate) struct Index {
    /// The buckets (a power of two of them, or none).
    buckets: Vec<u64>,
    /// Entries.
    len: usize,
}

/// The tag of a hash: its low 32 bits (the shard was picked by the high 32).
#[inline]
fn tag(hash: u64) -> u32 {
    hash as u32
}

#[inline]
fn entry(tag: u32, pos: usize) -> u64 {
    let pos = u32::try_from(pos + 1).expect("a shard holds fewer than 2^32 - 1 devices");
    u64::from(tag) << 32 | u64::from(pos)
}

#[inline]
fn tag_of(entry: u64) -> u32 {
    (entry >> 32) as u32
}

#[inline]
fn pos_of(entry: u64) -> usize {
    (entry as u32 - 1) as usize
}

impl Index {
    /// Entries.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    #[inline]
    fn mask(&self) -> usize {
        self.buckets.len().wrapping_sub(1)
    }

    /// Prefetches the bucket a lookup of `hash` starts at.
    #[inline]
    pub(crate) fn prefetch(&self, hash: u64) {
        if let Some(bucket) = self.buckets.get(tag(hash) as usize & self.mask()) {
            prefetch(bucket);
        }
    }

    /// The positions whose entries carry `hash`'s tag, in probe order (almost always
    /// at most one; the caller compares ids).
    #[inline]
    pub(crate) fn candidates(&self, hash: u64) -> impl Iterator<Item = usize> + '_ {
        self.probe(hash).map(|(_, pos)| pos)
    }

    /// The buckets (and their positions) whose entries carry `hash`'s tag, in probe
    /// order.
    #[inline]
    fn probe(&self, hash: u64) -> Probe<'_> {
        let tag = tag(hash);
        Probe {
            buckets: &self.buckets,
            at: tag as usize & self.mask(),
            tag,
        }
    }

    /// Adds `pos` under `hash` (the caller knows it is not there yet).
    pub(crate) fn insert(&mut self, hash: u64, pos: usize) {
        if (self.len + 1) * 8 > self.buckets.len() * 7 {
            self.grow();
        }
        self.place(entry(tag(hash), pos));
        self.len += 1;
    }

    /// Writes `entry` into the first empty bucket of its probe sequence.
    fn place(&mut self, entry: u64) {
        let mask = self.mask();
        let mut at = tag_of(entry) as usize & mask;
        while self.buckets[at] != 0 {
            at = (at + 1) & mask;
        }
        self.buckets[at] = entry;
    }

    /// Doubles the buckets (16 at first) and places every entry again.
    fn grow(&mut self) {
        let size = (self.buckets.len() * 2).max(16);
        let old = std::mem::replace(&mut self.buckets, vec![0; size]);
        for entry in old.into_iter().filter(|&e| e != 0) {
            self.place(entry);
        }
    }

    /// The bucket holding `pos` under `hash`.
    fn bucket_of(&self, hash: u64, pos: usize) -> Option<usize> {
        self.probe(hash)
            .find(|&(_, p)| p == pos)
            .map(|(bucket, _)| bucket)
    }

    /// Removes `pos` (stored under `hash`); whether it was there.
    pub(crate) fn remove(&mut self, hash: u64, pos: usize) -> bool {
        let Some(mut hole) = self.bucket_of(hash, pos) else {
            return false;
        };
        // Backward shift: every later entry of the run whose probe sequence passes the
        // hole moves into it, so no lookup ever stops early at the emptied bucket.
        let mask = self.mask();
        let mut at = (hole + 1) & mask;
        while self.buckets[at] != 0 {
            let home = tag_of(self.buckets[at]) as usize & mask;
            if (at.wrapping_sub(home) & mask) >= (at.wrapping_sub(hole) & mask) {
                self.buckets[hole] = self.buckets[at];
                hole = at;
            }
            at = (at + 1) & mask;
        }
        self.buckets[hole] = 0;
        self.len -= 1;
        true
    }

    /// Stores `to` instead of `from` (under `hash`); whether `from` was there.
    pub(crate) fn replace(&mut self, hash: u64, from: usize, to: usize) -> bool {
        match self.bucket_of(hash, from) {
            Some(at) => {
                self.buckets[at] = entry(tag(hash), to);
                true
            }
            None => false,
        }
    }
}

/// The buckets whose entries carry one tag, with their positions ([`Index::probe`]).
#[derive(Debug)]
struct Probe<'a> {
    buckets: &'a [u64],
    /// The next bucket to look at.
    at: usize,
    tag: u32,
}

impl Iterator for Probe<'_> {
    type Item = (usize, usize);

    #[inline]
    fn next(&mut self) -> Option<(usize, usize)> {
        let mask = self.buckets.len().wrapping_sub(1);
        loop {
            let bucket = self.at;
            let entry = *self.buckets.get(bucket)?;
            if entry == 0 {
                return None;
            }
            self.at = (bucket + 1) & mask;
            if tag_of(entry) == self.tag {
                return Some((bucket, pos_of(entry)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    /// The positions stored under `hash`, sorted.
    fn under(index: &Index, hash: u64) -> Vec<usize> {
        let mut found: Vec<usize> = index.candidates(hash).collect();
        found.sort_unstable();
        found
    }

    #[test]
    fn an_empty_index_finds_nothing() {
        let index = Index::default();
        assert_eq!(index.candidates(42).next(), None);
        index.prefetch(42);
        assert!(!Index::default().remove(42, 0));
    }

    #[test]
    fn colliding_tags_probe_past_each_other_and_removal_keeps_them_reachable() {
        let mut index = Index::default();
        // Ten hashes with one tag, and ten whose tags share the first bucket.
        let same_tag: Vec<u64> = (0..10).map(|i| (i << 32) | 7).collect();
        let same_home: Vec<u64> = (1..=10).map(|i| 7 + (i << 20)).collect();
        for (pos, &hash) in same_tag.iter().chain(&same_home).enumerate() {
            index.insert(hash, pos);
        }
        assert_eq!(under(&index, same_tag[0]), (0..10).collect::<Vec<_>>());
        for (i, &hash) in same_home.iter().enumerate() {
            assert!(index.candidates(hash).any(|p| p == 10 + i));
        }
        // Remove from the middle of the run: everything else stays reachable.
        assert!(index.remove(same_tag[3], 3));
        assert!(!index.remove(same_tag[3], 3), "removed once");
        assert!(index.remove(same_home[0], 10));
        assert_eq!(under(&index, same_tag[0]), vec![0, 1, 2, 4, 5, 6, 7, 8, 9]);
        for (i, &hash) in same_home.iter().enumerate().skip(1) {
            assert!(index.candidates(hash).any(|p| p == 10 + i), "{i}");
        }
        assert!(index.replace(same_tag[9], 9, 3));
        assert_eq!(under(&index, same_tag[0]), vec![0, 1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(index.len(), 18);
    }

    proptest! {
        /// Any sequence of inserts, removals and moves leaves the index holding exactly
        /// what a map of position to hash holds, and at most 7/8 full.
        #[test]
        fn agrees_with_a_map(ops in prop::collection::vec((0u8..3, 0usize..200, 0u64..64), 1..400)) {
            let mut index = Index::default();
            let mut model: HashMap<usize, u64> = HashMap::new();
            // Few distinct hashes and tags, so probe runs are long and wrap around.
            let hash_of = |h: u64| (h % 5) << 40 | (h * 0x9E37_79B9) as u32 as u64;
            for (op, pos, h) in ops {
                match op {
                    0 if !model.contains_key(&pos) => {
                        index.insert(hash_of(h), pos);
                        model.insert(pos, hash_of(h));
                    }
                    1 => {
                        let there = model.remove(&pos);
                        prop_assert_eq!(index.remove(there.unwrap_or(hash_of(h)), pos), there.is_some());
                    }
                    2 => {
                        if let Some(hash) = model.get(&pos).copied() {
                            let to = pos + 1000;
                            if !model.contains_key(&to) {
                                prop_assert!(index.replace(hash, pos, to));
                                model.remove(&pos);
                                model.insert(to, hash);
                            }
                        }
                    }
                    _ => {}
                }
                prop_assert_eq!(index.len(), model.len());
                prop_assert!(index.len() * 8 <= index.buckets.len() * 7);
            }
            for (&pos, &hash) in &model {
                prop_assert!(index.candidates(hash).any(|p| p == pos), "{} lost", pos);
            }
            let stored = index.buckets.iter().filter(|&&e| e != 0).count();
            prop_assert_eq!(stored, model.len());
        }
    }
}
