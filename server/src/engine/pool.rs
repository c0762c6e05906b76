//! Where a shard keeps its windows' values: one pool of `f64` slots per shard, cut into
//! runs of exactly the length a window asks for.
//!
//! A window of 50 values is 400 bytes; as its own heap allocation it lands in the
//! allocator's 448-byte size class, and a million devices × 2 metrics paid 91 MiB for
//! the rounding alone. Here a run costs exactly its slots. Runs are carved from
//! 512 KiB chunks (allocated zeroed, so the pages a chunk has not used yet cost no
//! memory) and a freed run is kept on a free list for the next run of its length.

use hashbrown::HashMap;

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
}

impl ValuePool {
    /// A run of `len` slots (their contents are whatever they held before).
    pub(crate) fn alloc(&mut self, len: u16) -> u32 {
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
            self.free.entry(len).or_default().push(at);
        }
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
