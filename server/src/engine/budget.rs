//! The engine's memory budget (`MEMORY_BUDGET`, `docs/operations.md`, "Memory"): what
//! a device costs, computed from the allocations it makes, and the sum of what the
//! devices in memory hold, against the budget.
//!
//! Counted where memory is taken or given back, never per judged value: a device's
//! admission, its new metrics, a larger window asked for by a stream, and its removal
//! (idle eviction, probation eviction, hand-off). A metric is charged for its whole
//! window when it is created (its values grow to that window within the window's
//! first values), so what a device is charged is what it holds once its windows are
//! full, whatever the traffic does afterwards. The per-sample path only compares the
//! stream's window with the one the device was charged for (one load from a line it
//! writes anyway).

use std::{
    mem::size_of,
    sync::atomic::{AtomicUsize, Ordering},
};

use super::detector::robust::STATE_BYTES;
use super::pool::heap;
use super::resident::{Device, INLINE_ID, Metric};

/// Metrics a device keeps inline, in its own record; more live on the heap.
const INLINE_METRICS: usize = 2;

/// A device's share of its shard's index: one 8-byte bucket in a table kept between
/// 7/16 and 7/8 full (`index.rs`).
const INDEX_BYTES: usize = 19;

/// A device's share of its shard's probation queue: one 8-byte entry, in a queue
/// trimmed when it holds twice as many entries as the shard has devices (`shard.rs`).
const QUEUE_BYTES: usize = 16;

/// A device with no metric and an inline id: its record, its index bucket and its
/// probation entry.
pub(crate) const DEVICE_BYTES: usize = size_of::<Device>() + INDEX_BYTES + QUEUE_BYTES;

/// What a device with an id of `id_len` bytes and no metric costs.
pub(crate) const fn device_bytes(id_len: usize) -> usize {
    DEVICE_BYTES + if id_len > INLINE_ID { heap(id_len) } else { 0 }
}

/// What one metric's state costs beside its record, for a rolling window of `window`
/// values and, when `robust` is not 0, the robust detector's state for a baseline of
/// `robust` values.
pub(crate) fn metric_bytes(window: usize, robust: usize) -> usize {
    // The values live in the shard's pool, exactly `window` of them (`pool.rs`).
    let values = 8 * window;
    values + if robust > 0 { robust_bytes(robust) } else { 0 }
}

/// What the robust detector's state for a baseline of `window` values costs once its
/// window is full: itself and its daily profile (each boxed), its ring of values and
/// their order, as the allocator rounds them.
pub(crate) const fn robust_bytes(window: usize) -> usize {
    let (state, season) = STATE_BYTES;
    heap(state) + heap(window * size_of::<f64>()) + heap(window * size_of::<u16>()) + heap(season)
}

/// What the records of a device's metrics cost on the heap when it has room for
/// `capacity` of them (the first two are inline, in the device's record, until a
/// third comes: then all of them move to the heap).
pub(crate) const fn records_bytes(capacity: usize) -> usize {
    if capacity > INLINE_METRICS {
        heap(capacity * size_of::<Metric>())
    } else {
        0
    }
}

/// The room for metric records a device has after `new` metrics are added to `len`
/// metrics with room for `capacity`, the way `ingest.rs` adds them (room for exactly
/// the new metrics, reserved once the room is full).
pub(crate) const fn capacity_after(len: usize, capacity: usize, new: usize) -> usize {
    let (mut len, mut capacity, mut i) = (len, capacity, 0);
    while i < new {
        if len == capacity {
            capacity = len + new;
        }
        len += 1;
        i += 1;
    }
    capacity
}

/// What `device` is charged: its record and id, its metrics' records, and each metric
/// at the window (and robust baseline) the device was charged for.
pub(crate) fn device_cost(device: &Device) -> usize {
    device_bytes(device.id.as_bytes().len())
        + records_bytes(device.metrics.capacity().max(INLINE_METRICS))
        + device.metrics.len()
            * metric_bytes(
                usize::from(device.window),
                usize::from(device.robust_window),
            )
}

/// The budget and what is in use of it.
#[derive(Debug)]
pub(crate) struct Budget {
    /// `MEMORY_BUDGET`, in bytes.
    limit: usize,
    /// Bytes held by the devices in memory.
    used: AtomicUsize,
}

impl Budget {
    /// A budget of `limit` bytes, none of them in use.
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            limit,
            used: AtomicUsize::new(0),
        }
    }

    /// The budget, in bytes.
    pub(crate) fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes in use.
    pub(crate) fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Whether `bytes` more fit now.
    pub(crate) fn fits(&self, bytes: usize) -> bool {
        self.used().saturating_add(bytes) <= self.limit
    }

    /// Takes `bytes` if they fit; otherwise takes nothing and returns the bytes in use.
    /// Exact under concurrency: two takes that would together exceed the budget
    /// cannot both succeed.
    pub(crate) fn take(&self, bytes: usize) -> Result<(), usize> {
        if bytes == 0 {
            return Ok(());
        }
        let before = self.used.fetch_add(bytes, Ordering::Relaxed);
        if before.saturating_add(bytes) > self.limit {
            self.used.fetch_sub(bytes, Ordering::Relaxed);
            return Err(before);
        }
        Ok(())
    }

    /// Takes `bytes` whether they fit or not (memory already allocated, such as the
    /// names of metrics the budget admitted).
    pub(crate) fn force(&self, bytes: usize) {
        if bytes > 0 {
            self.used.fetch_add(bytes, Ordering::Relaxed);
        }
    }

    /// Gives `bytes` back.
    pub(crate) fn give(&self, bytes: usize) {
        if bytes > 0 {
            self.used.fetch_sub(bytes, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_grows_the_way_ingest_pushes() {
        assert_eq!(capacity_after(0, 2, 2), 2);
        assert_eq!(capacity_after(0, 2, 3), 5);
        assert_eq!(capacity_after(1, 2, 3), 5);
        assert_eq!(capacity_after(2, 2, 30), 32);
        assert_eq!(capacity_after(5, 5, 1), 6);
        let mut v: smallvec::SmallVec<[u8; 2]> = smallvec::SmallVec::new();
        for (len, new) in [(0, 1), (1, 3), (4, 1), (5, 10)] {
            assert_eq!(v.len(), len);
            let want = capacity_after(v.len(), v.capacity(), new);
            for _ in 0..new {
                if v.len() == v.capacity() {
                    v.reserve_exact(new);
                }
                v.push(0);
            }
            assert_eq!(v.capacity(), want, "after {new} more");
        }
    }

    #[test]
    fn the_robust_state_costs_what_the_docs_say() {
        // docs/operations.md, "Memory": 192 + 10 × the baseline + 448.
        assert_eq!(robust_bytes(128), 192 + 1024 + 256 + 448);
        assert_eq!(robust_bytes(4096), 192 + 40960 + 448);
        assert_eq!(DEVICE_BYTES, 259);
    }

    #[test]
    fn a_take_beyond_the_budget_takes_nothing() {
        let budget = Budget::new(1000);
        assert_eq!(budget.take(600), Ok(()));
        assert_eq!(budget.take(401), Err(600));
        assert_eq!(budget.used(), 600);
        assert!(budget.fits(400));
        assert_eq!(budget.take(400), Ok(()));
        budget.give(1000);
        assert_eq!(budget.used(), 0);
        budget.force(2000);
        assert!(!budget.fits(0));
    }

    #[test]
    fn a_window_of_4096_with_32_metrics_costs_what_it_allocates() {
        // 32 windows of 4,096 values, the 32 metric records on the heap, the record.
        let zscore = DEVICE_BYTES + heap(32 * size_of::<Metric>()) + 32 * 8 * 4096;
        assert_eq!(
            DEVICE_BYTES + records_bytes(capacity_after(0, 2, 32)) + 32 * metric_bytes(4096, 0),
            zscore
        );
        assert!((1_050_000..1_060_000).contains(&zscore), "{zscore}");
    }
}
