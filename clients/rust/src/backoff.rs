//! Exponential backoff with jitter for reconnecting broken Ingest streams.
//!
//! The jitter (a uniformly random delay between half the exponential cap and the cap)
//! spreads the reconnects of many devices after a server restart, so they do not arrive
//! as one wave at the new replica, while the delay still grows with every attempt.

use std::time::Duration;

/// Backoff settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// Cap of the first delay.
    pub initial: Duration,
    /// Largest delay.
    pub max: Duration,
    /// Growth of the cap per attempt.
    pub multiplier: f64,
    /// Attempts in a row before giving up; `None` retries forever (devices on flaky
    /// networks keep trying).
    pub max_attempts: Option<u32>,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(10),
            multiplier: 2.0,
            max_attempts: None,
        }
    }
}

impl Backoff {
    /// The exponential cap for `attempt` (0-based), before jitter.
    pub fn cap(&self, attempt: u32) -> Duration {
        let factor = self.multiplier.max(1.0).powi(attempt.min(64) as i32);
        let secs = (self.initial.as_secs_f64() * factor).min(self.max.as_secs_f64());
        Duration::from_secs_f64(secs.max(0.0))
    }

    /// The delay before attempt `attempt` (0-based): uniform in `[cap/2, cap]`, so that
    /// the delay still grows while reconnects spread out.
    pub fn delay(&self, attempt: u32) -> Duration {
        let cap = self.cap(attempt);
        cap.mul_f64(0.5 + fastrand::f64() * 0.5)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_and_is_capped() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
            multiplier: 2.0,
            max_attempts: None,
        };
        assert_eq!(b.cap(0), Duration::from_millis(100));
        assert_eq!(b.cap(1), Duration::from_millis(200));
        assert_eq!(b.cap(3), Duration::from_millis(800));
        assert_eq!(b.cap(4), Duration::from_secs(1));
        assert_eq!(b.cap(1000), Duration::from_secs(1));
        for attempt in 0..10 {
            let d = b.delay(attempt);
            assert!(d <= b.cap(attempt) && d >= b.cap(attempt) / 2, "{d:?}");
        }
    }
}
