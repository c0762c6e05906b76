//! One shard of the device table: a plain mutex over a hash table of devices.
//!
//! The lock is never held across an `.await` (every method here is synchronous), so a
//! `std::sync::Mutex` is the right tool: it is cheaper than an async mutex and a task
//! can never be parked while holding it (mini-redis `db.rs` explains the reasoning).

use std::sync::{Mutex, MutexGuard, PoisonError};

use hashbrown::HashTable;

use super::device::DeviceState;

/// A shard, padded to its own cache lines so that two cores working on neighbouring
/// shards do not fight over one line.
#[repr(align(128))]
#[derive(Debug, Default)]
pub(crate) struct Shard {
    /// The devices of this shard, keyed by the precomputed hash of their id.
    devices: Mutex<HashTable<DeviceState>>,
}

impl Shard {
    /// Locks the shard. A panic while holding the lock cannot leave a device half
    /// updated in a way that matters more than losing the shard would, so poisoning is
    /// ignored instead of turning every later request into a panic.
    pub(crate) fn lock(&self) -> MutexGuard<'_, HashTable<DeviceState>> {
        self.devices.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
