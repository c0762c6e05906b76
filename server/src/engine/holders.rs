//! The devices each principal holds in memory, against its `devices` quota
//! (`docs/security.md`, "Quotas").
//!
//! The engine knows principals only as a name and a limit (an [`Owner`]), handed in
//! with a message or a restore. A device created for an owner is tagged with the
//! owner's slot in the [`Holders`] registry (a `u16` in the device's padding), and
//! the slot's count goes down wherever the device leaves memory (`Engine::release`:
//! idle and probation eviction, hand-off, removal). Taking is done at device creation
//! only (a cold path), giving back at removal only: the per-sample path of a device in
//! memory never comes here. Without an owner (no authentication, or no `devices`
//! quota) nothing is counted and the tag stays 0.
//!
//! A slot lives while its principal holds a device: when the count falls to 0 the
//! slot is freed for another name, so the registry holds at most the principals that
//! hold devices now (fewer than 65,536, or a new principal is refused).

use std::{
    collections::HashMap,
    sync::{Mutex, PoisonError},
};

use crate::error::SampleError;

/// Who a new device is created for: a principal's name and its `devices` quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner<'a> {
    /// The principal's name.
    pub name: &'a str,
    /// Devices it may hold in memory at once.
    pub limit: u64,
}

/// The tag of a device that nobody's quota counts.
pub(crate) const NOBODY: u16 = 0;

/// Every principal's count of devices held, by slot.
#[derive(Debug, Default)]
pub(crate) struct Holders {
    registry: Mutex<Registry>,
}

#[derive(Debug, Default)]
struct Registry {
    /// The slot of each principal that holds devices.
    by_name: HashMap<Box<str>, u16>,
    /// Slot `i` is `slots[i - 1]`: its principal and the devices it holds.
    slots: Vec<(Box<str>, u64)>,
    /// Slots whose principal holds nothing now, to reuse.
    free: Vec<u16>,
}

impl Holders {
    /// Counts one more device for `owner` and returns its slot (the device's tag), or
    /// refuses it: the owner holds its limit already, or the registry is full.
    pub(crate) fn take(&self, owner: Owner<'_>) -> Result<u16, SampleError> {
        let refused = || SampleError::DeviceQuota {
            principal: owner.name.to_owned(),
            limit: owner.limit,
        };
        let mut registry = self.registry.lock().unwrap_or_else(PoisonError::into_inner);
        let registry = &mut *registry;
        if let Some(&slot) = registry.by_name.get(owner.name) {
            let held = &mut registry.slots[usize::from(slot) - 1].1;
            if *held >= owner.limit {
                return Err(refused());
            }
            *held += 1;
            return Ok(slot);
        }
        if owner.limit == 0 {
            return Err(refused());
        }
        let slot = match registry.free.pop() {
            Some(slot) => {
                registry.slots[usize::from(slot) - 1] = (owner.name.into(), 1);
                slot
            }
            None => {
                let Ok(slot) = u16::try_from(registry.slots.len() + 1) else {
                    return Err(refused());
                };
                registry.slots.push((owner.name.into(), 1));
                slot
            }
        };
        registry.by_name.insert(owner.name.into(), slot);
        Ok(slot)
    }

    /// Gives back the device of slot `slot` (a device's tag; [`NOBODY`] is ignored).
    pub(crate) fn give(&self, slot: u16) {
        if slot == NOBODY {
            return;
        }
        let mut registry = self.registry.lock().unwrap_or_else(PoisonError::into_inner);
        let Some((name, held)) = registry.slots.get_mut(usize::from(slot) - 1) else {
            return;
        };
        if *held == 0 {
            // Free already (not reached: every tag is given back once).
            return;
        }
        *held -= 1;
        if *held == 0 {
            let name = std::mem::take(name);
            registry.by_name.remove(&name);
            registry.free.push(slot);
        }
    }

    /// The principal of slot `slot`, if it holds devices.
    pub(crate) fn name(&self, slot: u16) -> Option<Box<str>> {
        let registry = self.registry.lock().unwrap_or_else(PoisonError::into_inner);
        let (name, held) = registry.slots.get(usize::from(slot).checked_sub(1)?)?;
        (*held > 0).then(|| name.clone())
    }

    /// Devices `principal` holds now.
    pub(crate) fn held(&self, principal: &str) -> u64 {
        let registry = self.registry.lock().unwrap_or_else(PoisonError::into_inner);
        registry
            .by_name
            .get(principal)
            .map_or(0, |&slot| registry.slots[usize::from(slot) - 1].1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(name: &str, limit: u64) -> Owner<'_> {
        Owner { name, limit }
    }

    #[test]
    fn counts_per_principal_up_to_its_limit() {
        let holders = Holders::default();
        let a = holders.take(owner("a", 2)).unwrap();
        assert_eq!(holders.take(owner("a", 2)), Ok(a));
        assert_eq!(
            holders.take(owner("a", 2)),
            Err(SampleError::DeviceQuota {
                principal: "a".into(),
                limit: 2
            })
        );
        // Another principal is not affected, and gets its own slot.
        let b = holders.take(owner("b", 1)).unwrap();
        assert_ne!(a, b);
        assert_ne!(b, NOBODY);
        assert_eq!((holders.held("a"), holders.held("b")), (2, 1));
        // A device given back makes room; a raised limit (a reloaded policy) too.
        holders.give(a);
        assert_eq!(holders.held("a"), 1);
        assert_eq!(holders.take(owner("a", 2)), Ok(a));
        assert_eq!(holders.take(owner("a", 3)), Ok(a));
        assert_eq!(holders.held("a"), 3);
        assert!(holders.take(owner("nobody-may", 0)).is_err());
        holders.give(NOBODY);
    }

    #[test]
    fn a_slot_is_freed_with_its_last_device_and_reused() {
        let holders = Holders::default();
        let a = holders.take(owner("a", 5)).unwrap();
        assert_eq!(holders.name(a).as_deref(), Some("a"));
        holders.give(a);
        assert_eq!(holders.held("a"), 0);
        assert_eq!(holders.name(a), None);
        assert_eq!(holders.name(NOBODY), None);
        // Given back again (a bug elsewhere): the count does not wrap.
        holders.give(a);
        assert_eq!(holders.held("a"), 0);
        let b = holders.take(owner("b", 5)).unwrap();
        assert_eq!(b, a, "the free slot is reused");
        assert_eq!((holders.held("a"), holders.held("b")), (0, 1));
        let a = holders.take(owner("a", 5)).unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn the_registry_holds_at_most_u16_max_principals() {
        let holders = Holders::default();
        let names: Vec<String> = (0..usize::from(u16::MAX))
            .map(|i| format!("p{i}"))
            .collect();
        for name in &names {
            holders.take(owner(name, 1)).unwrap();
        }
        assert!(holders.take(owner("one-too-many", 1)).is_err());
        holders.give(7);
        assert_eq!(holders.held("p6"), 0);
        assert_eq!(holders.take(owner("one-too-many", 1)), Ok(7));
    }
}
