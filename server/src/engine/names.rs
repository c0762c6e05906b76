//! The metric names of one shard, each kept once: a metric holds a 4-byte id instead
//! of its own copy of the name (a million devices all name their metrics "cpu" and
//! "mem"). A name is dropped when the last metric holding it leaves.

use std::hash::BuildHasher;

use foldhash::fast::FixedState;
use hashbrown::HashTable;

use super::pool::heap;

/// What a name of `len` bytes costs while interned (`budget.rs`): its entry (the
/// name's pointer and length, and its count), its slot in the lookup table, and its
/// bytes as the allocator rounds them.
pub(crate) const fn name_bytes(len: usize) -> usize {
    size_of::<(Box<str>, u32)>() + 8 + heap(len)
}

/// Interned metric names with reference counts.
#[derive(Debug)]
pub(crate) struct Names {
    /// By id: the name and how many metrics hold it ("" and 0 when the id is free).
    entries: Vec<(Box<str>, u32)>,
    /// Ids by the hash of their name.
    lookup: HashTable<u32>,
    /// Free ids.
    free: Vec<u32>,
    hasher: FixedState,
    /// What the names held cost (`budget.rs`).
    bytes: usize,
}

impl Default for Names {
    fn default() -> Self {
        Self {
            entries: Vec::new(),
            lookup: HashTable::new(),
            free: Vec::new(),
            hasher: FixedState::with_seed(0x6e61_6d65),
            bytes: 0,
        }
    }
}

impl Names {
    /// The name of `id`.
    #[inline]
    pub(crate) fn get(&self, id: u32) -> &str {
        &self.entries[id as usize].0
    }

    /// The id of `name`, held once more.
    pub(crate) fn intern(&mut self, name: &str) -> u32 {
        let hash = self.hasher.hash_one(name);
        let entries = &mut self.entries;
        if let Some(&id) = self
            .lookup
            .find(hash, |&id| &*entries[id as usize].0 == name)
        {
            entries[id as usize].1 += 1;
            return id;
        }
        self.bytes += name_bytes(name.len());
        let id = match self.free.pop() {
            Some(id) => {
                entries[id as usize] = (name.into(), 1);
                id
            }
            None => {
                entries.push((name.into(), 1));
                u32::try_from(entries.len() - 1).expect("fewer than 2^32 metric names")
            }
        };
        let hasher = &self.hasher;
        self.lookup
            .insert_unique(hash, id, |&id| hasher.hash_one(&*entries[id as usize].0));
        id
    }

    /// Lets go of `id` once; the name goes when nothing holds it.
    pub(crate) fn release(&mut self, id: u32) {
        let entry = &mut self.entries[id as usize];
        entry.1 -= 1;
        if entry.1 == 0 {
            self.bytes -= name_bytes(entry.0.len());
            let hash = self.hasher.hash_one(&*entry.0);
            if let Ok(found) = self.lookup.find_entry(hash, |&i| i == id) {
                found.remove();
            }
            entry.0 = Box::default();
            self.free.push(id);
        }
    }

    /// What the names held cost, in bytes (`budget.rs`).
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Distinct names held.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lookup.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_copy_per_name_until_the_last_holder_leaves() {
        let mut names = Names::default();
        let cpu = names.intern("cpu");
        let mem = names.intern("mem");
        assert_ne!(cpu, mem);
        assert_eq!(names.intern("cpu"), cpu);
        assert_eq!(
            (names.get(cpu), names.get(mem), names.len()),
            ("cpu", "mem", 2)
        );
        names.release(cpu);
        assert_eq!(names.get(cpu), "cpu", "still held once");
        names.release(cpu);
        assert_eq!(names.len(), 1);
        // The freed id is reused for the next new name, and "cpu" is new again.
        let disk = names.intern("disk");
        assert_eq!((disk, names.get(disk)), (cpu, "disk"));
        let cpu2 = names.intern("cpu");
        assert_eq!(names.get(cpu2), "cpu");
        assert_eq!(names.len(), 3);
        assert_eq!(names.bytes(), 2 * name_bytes(3) + name_bytes(4));
    }
}
