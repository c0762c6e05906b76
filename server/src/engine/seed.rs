//! The hasher of the device and metric-name indexes, seeded at random once per
//! process (`docs/architecture.md`, "Engine semantics", hash flooding).
//!
//! With a seed written in the source, anyone can compute offline which device ids land
//! in the same index bucket and send thousands of them: every lookup then walks one
//! long chain. A seed drawn from the operating system at start makes those
//! collisions a guess. One seed serves the whole process, so a device's shard and
//! bucket stay the same for as long as the process lives (the ingest path hashes a
//! device id once and uses the hash for both), and nothing persisted depends on it.

use std::{
    hash::{BuildHasher, RandomState},
    sync::OnceLock,
};

use foldhash::{SharedSeed, fast::SeedableRandomState};

/// The hasher of device ids and metric names.
pub(crate) type IdHasher = SeedableRandomState;

/// The process's hasher: the same for every caller, random from one process to the
/// next.
pub(crate) fn id_hasher() -> IdHasher {
    static SEED: OnceLock<(u64, SharedSeed)> = OnceLock::new();
    let (per_hasher, shared) =
        SEED.get_or_init(|| (random_u64(), SharedSeed::from_u64(random_u64())));
    SeedableRandomState::with_seed(*per_hasher, shared)
}

/// 64 random bits from the operating system: std's `RandomState` keys its SipHash
/// with bits from the OS random source (`getrandom`), so its hash of a constant is as
/// unpredictable as those keys.
fn random_u64() -> u64 {
    RandomState::new().hash_one(0x7469_6465_7761_7463_u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_seed_per_process() {
        let id = b"fleet-a/pump-1".as_slice();
        assert_eq!(id_hasher().hash_one(id), id_hasher().hash_one(id));
    }

    #[test]
    fn the_source_is_random() {
        let draws: std::collections::HashSet<u64> = (0..8).map(|_| random_u64()).collect();
        assert_eq!(draws.len(), 8);
    }

    #[test]
    fn the_seed_is_not_the_one_in_the_source() {
        // The fixed seed the indexes used before: ids that collide under it must not
        // collide here.
        let fixed = foldhash::fast::FixedState::with_seed(0x7469_6465_7761_7463);
        let id = b"device-1".as_slice();
        assert_ne!(fixed.hash_one(id), id_hasher().hash_one(id));
    }
}
