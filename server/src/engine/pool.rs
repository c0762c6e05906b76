//! Where a shard keeps its windows' values: one pool of `f64` slots per shard, cut into
//! runs of exactly the length a window asks for.
//!
//! A window of 50 values is 400 bytes; as its own heap allocation it lands in the
//! allocator's 448-byte size class, and a million devices × 2 metrics paid 91 MiB for
//! the rounding alone. Here a run costs exactly its slots. Runs are carved from
//! 512 KiB chunks (allocated zeroed, so the pages a chunk has not used yet cost no
//! memory) and a freed run is kept on a free list for the next run of its length.

use hashbrown::HashMap;

/// The bytes the allocator hands out for a request of `bytes`: mimalloc's size
/// classes, 8-byte steps up to 64 bytes, then four classes per doubling.
pub(crate) const fn heap(bytes: usize) -> usize {
    if bytes == 0 {
        return 0;
    }
    let words = bytes.div_ceil(8);
    if words <= 8 {
        return words * 8;
    }
    let top = usize::BITS - 1 - words.leading_zeros();
    let step = 1 << (top - 2);
    words.div_ceil(step) * step * 8
}

/// Values per chunk (512 KiB). A run never spans two chunks, so a window holds at most
/// this many values (see `MAX_WINDOW_SIZE`).
const CHUNK: usize = 1 << 19;

/// The values of one shard's windows. A run is named by the offset of its first slot.
#[derive(Debug, Default)]
pub(crate) struct ValuePool {
    /// The chunks, each `CHUNK` values.
    chunks: Vec<Box<[f64]>>,
    /// The next offset never handed out (in the last chunk, or at its end).
    bump: usize,
    /// Freed runs, by length.
    free: HashMap<u16, Vec<u32>>,
    /// Slots in runs handed out and not freed.
    live: usize,
}

/// Free slots (freed runs, and the unusable ends of chunks) the pool tolerates before
/// it compacts: an eighth of the slots in use, and at least this many (1 MiB).
const COMPACT_MIN: usize = 1 << 17;

impl ValuePool {
    /// A run of `len` slots (their contents are whatever they held before).
    pub(crate) fn alloc(&mut self, len: u16) -> u32 {
        self.live += usize::from(len);
        if let Some(at) = self.free.get_mut(&len).and_then(Vec::pop) {
            return at;
        }
        let len = usize::from(len);
        if self.bump + len > self.chunks.len() * CHUNK {
            // The rest of the last chunk is too short for this run: it stays unused
            // (less than a run's length per chunk).
            self.bump = self.chunks.len() * CHUNK;
            self.chunks.push(vec![0.0; CHUNK].into_boxed_slice());
        }
        let at = self.bump;
        self.bump += len;
        u32::try_from(at).expect("a shard holds fewer than 2^32 window values")
    }

    /// Gives a run back for reuse.
    pub(crate) fn free(&mut self, at: u32, len: u16) {
        if len > 0 {
            self.live -= usize::from(len);
            self.free.entry(len).or_default().push(at);
        }
    }

    /// Whether the pool holds so many free slots that it should compact: freed runs
    /// are reused only for windows of their own length, so devices of one window
    /// length replacing devices of another would otherwise grow the pool past what
    /// the devices hold (and past `MEMORY_BUDGET`).
    pub(crate) fn wasteful(&self) -> bool {
        let free = self.bump - self.live;
        free > COMPACT_MIN.max(self.live / 8)
    }

    /// Moves every run in use down to the start of the pool, in order, and lets go of
    /// the chunks left empty. `runs` are the runs in use (offset, length), sorted by
    /// offset; returns their new offsets, in the same order. A run never moves up (a
    /// run placed earlier ends at or before where it was), so moving them in order
    /// overwrites nothing not yet moved.
    pub(crate) fn compact(&mut self, runs: &[(u32, u16)]) -> Vec<u32> {
        let mut moved = Vec::with_capacity(runs.len());
        let mut next = 0usize;
        for &(at, len) in runs {
            let (at, len) = (at as usize, usize::from(len));
            if next % CHUNK + len > CHUNK {
                next = (next / CHUNK + 1) * CHUNK;
            }
            debug_assert!(next <= at, "a run moves down");
            if next != at {
                let (from, to) = (at / CHUNK, next / CHUNK);
                let (src, dst) = (at % CHUNK, next % CHUNK);
                if from == to {
                    self.chunks[from].copy_within(src..src + len, dst);
                } else {
                    let (low, high) = self.chunks.split_at_mut(from);
                    low[to][dst..dst + len].copy_from_slice(&high[0][src..src + len]);
                }
            }
            moved.push(u32::try_from(next).expect("a shard holds fewer than 2^32 window values"));
            next += len;
        }
        self.chunks.truncate(next.div_ceil(CHUNK));
        self.bump = next;
        self.live = runs.iter().map(|&(_, len)| usize::from(len)).sum();
        self.free.clear();
        moved
    }

    /// Slots in runs in use.
    #[cfg(test)]
    pub(crate) fn live(&self) -> usize {
        self.live
    }

    /// Values ever handed out, used or free (how far the pool has grown).
    #[cfg(test)]
    pub(crate) fn bump(&self) -> usize {
        self.bump
    }

    /// The run of `len` slots at `at`.
    #[inline]
    pub(crate) fn run(&self, at: u32, len: usize) -> &[f64] {
        let at = at as usize;
        &self.chunks[at / CHUNK][at % CHUNK..at % CHUNK + len]
    }

    /// The run of `len` slots at `at`, to write.
    #[inline]
    pub(crate) fn run_mut(&mut self, at: u32, len: usize) -> &mut [f64] {
        let at = at as usize;
        &mut self.chunks[at / CHUNK][at % CHUNK..at % CHUNK + len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heap_rounds_to_mimalloc_size_classes() {
        assert_eq!(heap(0), 0);
        assert_eq!(heap(1), 8);
        assert_eq!(heap(64), 64);
        assert_eq!(heap(65), 80);
        assert_eq!(heap(432), 448);
        assert_eq!(heap(1024), 1024);
        assert_eq!(heap(1025), 1280);
        assert_eq!(heap(3 * 72), 224);
    }

    #[test]
    fn runs_are_exact_disjoint_and_reused() {
        let mut pool = ValuePool::default();
        let a = pool.alloc(50);
        let b = pool.alloc(50);
        assert_eq!(b - a, 50, "runs are packed with no rounding");
        pool.run_mut(a, 50).fill(1.0);
        pool.run_mut(b, 50).fill(2.0);
        assert!(pool.run(a, 50).iter().all(|&v| v == 1.0));
        pool.free(a, 50);
        assert_eq!(pool.alloc(50), a, "a freed run is reused for its length");
        assert_ne!(pool.alloc(49), a);
    }

    #[test]
    fn compaction_keeps_every_value_and_gives_chunks_back() {
        let mut pool = ValuePool::default();
        // Runs of two lengths filling three chunks; every other one freed.
        let mut runs = Vec::new();
        let mut i = 0u32;
        while pool.chunks.len() < 3 {
            let len = if i.is_multiple_of(3) { 4096 } else { 50 };
            let at = pool.alloc(len);
            pool.run_mut(at, len.into()).fill(f64::from(i));
            runs.push((at, len, i));
            i += 1;
        }
        let before = pool.live();
        let mut kept = Vec::new();
        for (k, &(at, len, tag)) in runs.iter().enumerate() {
            if k % 2 == 0 {
                pool.free(at, len);
            } else {
                kept.push((at, len, tag));
            }
        }
        assert!(pool.live() < before);
        assert!(pool.wasteful());
        kept.sort_by_key(|&(at, ..)| at);
        let positions: Vec<(u32, u16)> = kept.iter().map(|&(at, len, _)| (at, len)).collect();
        let moved = pool.compact(&positions);
        assert!(pool.chunks.len() < 3, "half the values fit in fewer chunks");
        assert!(!pool.wasteful());
        assert_eq!(
            pool.live(),
            kept.iter()
                .map(|&(_, len, _)| usize::from(len))
                .sum::<usize>()
        );
        for (&(_, len, tag), &at) in kept.iter().zip(&moved) {
            assert!(
                pool.run(at, len.into())
                    .iter()
                    .all(|&v| v == f64::from(tag)),
                "run {tag}"
            );
            assert!(at as usize % CHUNK + usize::from(len) <= CHUNK);
        }
        // Allocation goes on after the compacted runs.
        let next = pool.alloc(50);
        assert!(moved.iter().all(|&at| at < next));
    }

    #[test]
    fn a_run_never_spans_two_chunks() {
        let mut pool = ValuePool::default();
        let mut last = 0;
        for _ in 0..(CHUNK / 1000 + 2) {
            last = pool.alloc(1000);
            let start = last as usize % CHUNK;
            assert!(start + 1000 <= CHUNK);
        }
        assert_eq!(pool.chunks.len(), 2);
        assert_eq!(last as usize / CHUNK, 1);
        // Runs of the largest window fill the second chunk, then start a third.
        let mut big = 0;
        while pool.chunks.len() == 2 {
            big = pool.alloc(u16::MAX);
            assert!(big as usize % CHUNK + usize::from(u16::MAX) <= CHUNK);
        }
        assert_eq!(
            big as usize % CHUNK,
            0,
            "the run that did not fit starts a chunk"
        );
        assert_eq!(pool.run(big, u16::MAX.into()).len(), usize::from(u16::MAX));
    }
}
