//! Per-principal limits in force: a token bucket for samples per second, and counters
//! of open streams and watchers. One tenant reaching its limits is refused
//! (`RESOURCE_EXHAUSTED` with `grpc-retry-pushback-ms`, HTTP 429 with `Retry-After`);
//! no other tenant notices. The `devices` quota is counted by the engine, where
//! devices enter and leave memory (`engine/holders.rs`): a sample past it gets the
//! `device_quota` verdict error.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use super::policy::{Principal, QuotaLimits};

/// A refill-as-you-go token bucket.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    /// A full bucket of `burst` tokens refilled at `rate` per second.
    pub fn new(rate: f64, burst: f64, now: Instant) -> Self {
        let burst = burst.max(1.0);
        Self {
            rate: rate.max(f64::MIN_POSITIVE),
            burst,
            state: Mutex::new((burst, now)),
        }
    }

    /// Takes `n` tokens, or says how long until they would be there. A request larger
    /// than the whole bucket is let through when the bucket is full, so no request
    /// size is refused forever; it leaves the bucket in debt.
    pub fn try_take(&self, n: f64, now: Instant) -> Result<(), Duration> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (tokens, last) = &mut *state;
        let elapsed = now.saturating_duration_since(*last).as_secs_f64();
        *tokens = (*tokens + elapsed * self.rate).min(self.burst);
        *last = now;
        if *tokens >= n || *tokens >= self.burst {
            *tokens -= n;
            Ok(())
        } else {
            let missing = n.min(self.burst) - *tokens;
            Err(Duration::from_secs_f64(missing / self.rate).max(Duration::from_millis(1)))
        }
    }
}

/// What one principal uses now.
#[derive(Debug)]
pub struct Usage {
    limits: QuotaLimits,
    samples: Option<TokenBucket>,
    streams: AtomicU64,
    watchers: AtomicU64,
}

/// A limit that is reached.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuotaError {
    /// Samples per second; retry after the duration.
    #[error("quota: principal {principal:?} sends more than {rate} samples per second")]
    Rate {
        /// Who.
        principal: String,
        /// Its rate.
        rate: u64,
        /// When the samples would fit.
        retry_after: Duration,
    },
    /// Open streams or watchers.
    #[error("quota: principal {principal:?} has {limit} {what} open; limit reached")]
    Count {
        /// Who.
        principal: String,
        /// Which counter.
        what: &'static str,
        /// Its limit.
        limit: u64,
    },
}

impl QuotaError {
    /// How long the caller should wait before trying again, when that is known.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Rate { retry_after, .. } => Some(*retry_after),
            Self::Count { .. } => None,
        }
    }
}

/// Held while a stream or watcher is open; gives its slot back on drop.
#[derive(Debug)]
pub struct Slot {
    usage: Arc<Usage>,
    which: Counter,
}

#[derive(Debug, Clone, Copy)]
enum Counter {
    Streams,
    Watchers,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.usage
            .counter(self.which)
            .fetch_sub(1, Ordering::Relaxed);
    }
}

impl Usage {
    fn new(limits: QuotaLimits, now: Instant) -> Self {
        let samples = limits
            .samples_per_second
            .map(|rate| TokenBucket::new(rate, limits.burst.unwrap_or(rate), now));
        Self {
            limits,
            samples,
            streams: AtomicU64::new(0),
            watchers: AtomicU64::new(0),
        }
    }

    fn counter(&self, which: Counter) -> &AtomicU64 {
        match which {
            Counter::Streams => &self.streams,
            Counter::Watchers => &self.watchers,
        }
    }

    /// Takes `samples` from the principal's rate.
    pub fn take_samples(
        &self,
        principal: &str,
        samples: usize,
        now: Instant,
    ) -> Result<(), QuotaError> {
        match &self.samples {
            Some(bucket) => {
                bucket
                    .try_take(samples as f64, now)
                    .map_err(|retry_after| QuotaError::Rate {
                        principal: principal.into(),
                        rate: self.limits.samples_per_second.unwrap_or_default() as u64,
                        retry_after,
                    })
            }
            None => Ok(()),
        }
    }

    /// Opens a stream slot.
    pub fn open_stream(self: &Arc<Self>, principal: &str) -> Result<Slot, QuotaError> {
        self.open(principal, Counter::Streams, self.limits.streams, "streams")
    }

    /// Opens a watcher slot.
    pub fn open_watcher(self: &Arc<Self>, principal: &str) -> Result<Slot, QuotaError> {
        self.open(
            principal,
            Counter::Watchers,
            self.limits.watchers,
            "watchers",
        )
    }

    fn open(
        self: &Arc<Self>,
        principal: &str,
        which: Counter,
        limit: Option<u32>,
        what: &'static str,
    ) -> Result<Slot, QuotaError> {
        let counter = self.counter(which);
        let before = counter.fetch_add(1, Ordering::Relaxed);
        if let Some(limit) = limit
            && before >= u64::from(limit)
        {
            counter.fetch_sub(1, Ordering::Relaxed);
            return Err(QuotaError::Count {
                principal: principal.into(),
                what,
                limit: u64::from(limit),
            });
        }
        Ok(Slot {
            usage: Arc::clone(self),
            which,
        })
    }
}

/// Every principal's [`Usage`], created on first use.
#[derive(Debug, Default)]
pub struct Quotas {
    by_name: Mutex<HashMap<Arc<str>, Arc<Usage>>>,
}

impl Quotas {
    /// The usage of `principal` (limits taken from it when first seen, and updated
    /// when a reloaded policy changed them).
    pub fn usage(&self, principal: &Principal) -> Arc<Usage> {
        let mut map = self.by_name.lock().unwrap_or_else(|e| e.into_inner());
        match map.get_mut(&principal.name) {
            Some(usage) if usage.limits == principal.quota => Arc::clone(usage),
            Some(usage) => {
                let mut fresh = Usage::new(principal.quota, Instant::now());
                // Open slots stay counted across a policy change.
                fresh.streams = AtomicU64::new(usage.streams.load(Ordering::Relaxed));
                fresh.watchers = AtomicU64::new(usage.watchers.load(Ordering::Relaxed));
                *usage = Arc::new(fresh);
                Arc::clone(usage)
            }
            None => {
                let usage = Arc::new(Usage::new(principal.quota, Instant::now()));
                map.insert(Arc::clone(&principal.name), Arc::clone(&usage));
                usage
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::security::policy::{DeviceNamespace, Scopes};

    #[test]
    fn bucket_refills_at_its_rate_and_says_when() {
        let t0 = Instant::now();
        let bucket = TokenBucket::new(100.0, 10.0, t0);
        assert!(bucket.try_take(10.0, t0).is_ok());
        let wait = bucket.try_take(5.0, t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(50));
        assert!(bucket.try_take(5.0, t0 + Duration::from_millis(50)).is_ok());
        // A request larger than the bucket passes once the bucket is full.
        assert!(bucket.try_take(50.0, t0 + Duration::from_secs(1)).is_ok());
        assert!(bucket.try_take(1.0, t0 + Duration::from_secs(1)).is_err());
    }

    #[test]
    fn slots_are_counted_and_given_back() {
        let principal = Principal {
            name: "t".into(),
            scopes: Scopes::ALL,
            devices: DeviceNamespace::everything(),
            quota: QuotaLimits {
                streams: Some(2),
                ..QuotaLimits::default()
            },
        };
        let quotas = Quotas::default();
        let usage = quotas.usage(&principal);
        let a = usage.open_stream("t").unwrap();
        let _b = usage.open_stream("t").unwrap();
        assert!(matches!(
            usage.open_stream("t"),
            Err(QuotaError::Count { limit: 2, .. })
        ));
        drop(a);
        assert!(usage.open_stream("t").is_ok());
        assert!(
            usage.open_watcher("t").is_ok(),
            "watchers have no limit here"
        );
    }
}
