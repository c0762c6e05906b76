//! The engine clock: the idle tick devices are evicted by, and receive times from one
//! monotonic clock read per message.

use std::{
    sync::atomic::{AtomicI64, AtomicU32, Ordering},
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use tidewatch_proto::pbjson_types::Timestamp;

/// Seconds since the engine started (the tick), and the wall clock anchored to it.
#[derive(Debug)]
pub(super) struct Clock {
    /// Start of the engine clock that idle eviction counts in.
    epoch: Instant,
    /// Unix time of `epoch` in nanoseconds, as of the last re-anchoring: receive times
    /// are this plus the monotonic time since `epoch`, so a message reads the clock
    /// once (see [`Clock::read`]).
    wall_at_epoch: AtomicI64,
    /// The tick `wall_at_epoch` was last taken in; `u32::MAX` before the first message.
    wall_tick: AtomicU32,
}

impl Clock {
    /// A clock starting now.
    pub(super) fn new() -> Self {
        Self {
            epoch: Instant::now(),
            wall_at_epoch: AtomicI64::new(0),
            wall_tick: AtomicU32::new(u32::MAX),
        }
    }

    /// The current tick.
    pub(super) fn tick(&self) -> u32 {
        self.epoch.elapsed().as_secs().min(u64::from(u32::MAX - 1)) as u32
    }

    /// The tick of `now`, unbounded (what idle eviction compares with).
    pub(super) fn seconds_at(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_secs()
    }

    /// The tick (for idle eviction) and the wall-clock receive time of a message
    /// received at `now`, from that one monotonic clock read. The wall clock itself
    /// is read once per second of the engine clock (to follow adjustments of the
    /// system time); in between, the receive time is the last reading plus the
    /// monotonic time since, which differs from a fresh reading only by the clock's
    /// slew within that second.
    pub(super) fn read(&self, now: Instant) -> (Timestamp, u32) {
        let since = now.saturating_duration_since(self.epoch);
        let tick = since.as_secs().min(u64::from(u32::MAX - 1)) as u32;
        let since_nanos = i64::try_from(since.as_nanos()).unwrap_or(i64::MAX);
        let wall_at_epoch = if self.wall_tick.load(Ordering::Relaxed) == tick {
            self.wall_at_epoch.load(Ordering::Relaxed)
        } else {
            let wall = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos();
            let at_epoch = i64::try_from(wall)
                .unwrap_or(i64::MAX)
                .saturating_sub(since_nanos);
            self.wall_at_epoch.store(at_epoch, Ordering::Relaxed);
            self.wall_tick.store(tick, Ordering::Relaxed);
            at_epoch
        };
        let wall = wall_at_epoch.saturating_add(since_nanos);
        let received = Timestamp {
            seconds: wall.div_euclid(1_000_000_000),
            nanos: wall.rem_euclid(1_000_000_000) as i32,
        };
        (received, tick)
    }
}

/// The current wall-clock time as a protobuf timestamp.
pub fn now_timestamp() -> Timestamp {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    Timestamp {
        seconds: since.as_secs() as i64,
        nanos: since.subsec_nanos() as i32,
    }
}
