//! How fast the forwarder may go: the send rate limit (`max_rate`) and the
//! reconnect back-off.

use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;

/// Paces sends to `rate` messages per second (token bucket, bursts of a
/// tenth of a second).
pub(super) struct Pace {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl Pace {
    pub(super) fn new(rate: u32) -> Pace {
        Pace {
            rate: f64::from(rate),
            tokens: 1.0,
            last: Instant::now(),
        }
    }
    pub(super) fn limited(&self) -> bool {
        self.rate > 0.0
    }
    pub(super) fn burst(&self) -> f64 {
        (self.rate / 10.0).max(1.0)
    }
    /// Whole messages that may be sent now.
    pub(super) fn available(&mut self) -> usize {
        if !self.limited() {
            return usize::MAX;
        }
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate)
            .min(self.burst());
        self.last = now;
        self.tokens.floor() as usize
    }
    pub(super) fn take(&mut self, n: usize) {
        if self.limited() {
            self.tokens -= n as f64;
        }
    }
    /// When the next message may go.
    pub(super) fn next(&self) -> Instant {
        let missing = (1.0 - self.tokens).max(0.0);
        self.last + Duration::from_secs_f64(missing / self.rate.max(1e-9))
    }
}

/// Exponential backoff with jitter: half the step fixed, half random, the
/// step doubling from `min` up to `max`.
pub(super) fn backoff(min: Duration, max: Duration, failures: u32) -> Duration {
    let step = min
        .saturating_mul(1u32.checked_shl(failures.min(20)).unwrap_or(u32::MAX))
        .min(max);
    let half = step / 2;
    half + rand::rng().random_range(Duration::ZERO..=half)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_with_jitter() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(2));
        for f in 0..30 {
            let d = backoff(min, max, f);
            let step = (min * 2u32.pow(f.min(5))).min(max);
            assert!(d >= step / 2 && d <= step, "{f}: {d:?}");
        }
    }

    #[test]
    fn pace_spaces_messages() {
        let mut p = Pace::new(100);
        assert_eq!(p.available(), 1);
        p.take(1);
        assert_eq!(p.available(), 0);
        assert!(p.next() > Instant::now());
        assert!(!Pace::new(0).limited());
    }
}
