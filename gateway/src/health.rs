//! Liveness of the long-running stages, for the systemd watchdog: the
//! broker's housekeeping loop (through the router's locks), the buffer's
//! writer thread and the upstream task each beat at least every
//! [`BEAT_EVERY`] while they can make progress. The watchdog is fed only
//! while every beat is fresh, so a stuck stage (a deadlocked lock, a hung
//! SQLite call, a task that never yields) makes systemd restart the service.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// How often a healthy stage beats (at the latest).
pub const BEAT_EVERY: Duration = Duration::from_secs(1);

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64
}

/// One stage's last sign of life.
#[derive(Debug)]
pub struct Heartbeat {
    pub name: &'static str,
    last_ms: AtomicU64,
}

impl Heartbeat {
    /// A heartbeat that has just beaten.
    pub fn new(name: &'static str) -> Arc<Heartbeat> {
        Arc::new(Heartbeat {
            name,
            last_ms: AtomicU64::new(now_ms()),
        })
    }

    pub fn beat(&self) {
        self.last_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// Time since the last beat.
    pub fn age(&self) -> Duration {
        Duration::from_millis(now_ms().saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// The stages the watchdog watches.
#[derive(Debug, Clone, Default)]
pub struct Health {
    beats: Vec<Arc<Heartbeat>>,
}

impl Health {
    pub fn watch(&mut self, beat: Arc<Heartbeat>) {
        self.beats.push(beat);
    }

    /// The stages whose last beat is older than `stale`, with its age.
    pub fn stuck(&self, stale: Duration) -> Vec<(&'static str, Duration)> {
        self.beats
            .iter()
            .map(|b| (b.name, b.age()))
            .filter(|(_, age)| *age > stale)
            .collect()
    }

    /// Every stage and the age of its last beat.
    pub fn ages(&self) -> Vec<(&'static str, Duration)> {
        self.beats.iter().map(|b| (b.name, b.age())).collect()
    }
}

/// How old a beat may be before its stage counts as stuck, for a watchdog
/// of `interval` (systemd's `WatchdogSec=`): a few beats late is tolerated,
/// and a stuck stage is noticed well before systemd's deadline.
pub fn stale_after(interval: Duration) -> Duration {
    (interval / 2).max(BEAT_EVERY * 3)
}

/// Feeds systemd's watchdog (`WATCHDOG=1`, at half its `interval`) while
/// every stage of `health` is alive. When one is stuck the pings stop, so
/// systemd restarts the service once `WatchdogSec=` has passed; the reason
/// goes to the log and to systemd's status line (`systemctl status`).
pub async fn feed_watchdog(health: Health, interval: Duration) {
    let stale = stale_after(interval);
    let mut tick = tokio::time::interval(interval / 2);
    let mut was_stuck = false;
    loop {
        tick.tick().await;
        let stuck = health.stuck(stale);
        if stuck.is_empty() {
            let _ = crate::systemd::notify("WATCHDOG=1");
            if was_stuck {
                tracing::info!("every stage alive again: feeding the watchdog");
                let _ = crate::systemd::notify("STATUS=running");
                was_stuck = false;
            }
        } else if !was_stuck {
            let what: Vec<String> = stuck
                .iter()
                .map(|(n, age)| format!("{n} silent for {:.1} s", age.as_secs_f64()))
                .collect();
            let what = what.join(", ");
            tracing::error!(stuck = %what, "a stage is stuck: not feeding the watchdog (systemd will restart the service)");
            let _ = crate::systemd::notify(&format!("STATUS=stuck: {what}"));
            was_stuck = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stage_that_stops_beating_is_stuck() {
        let a = Heartbeat::new("a");
        let b = Heartbeat::new("b");
        let mut h = Health::default();
        h.watch(a.clone());
        h.watch(b.clone());
        std::thread::sleep(Duration::from_millis(30));
        a.beat();
        let stuck = h.stuck(Duration::from_millis(20));
        assert_eq!(stuck.len(), 1);
        assert_eq!(stuck[0].0, "b");
        assert!(h.stuck(Duration::from_secs(5)).is_empty());
        assert_eq!(
            stale_after(Duration::from_secs(30)),
            Duration::from_secs(15)
        );
        assert_eq!(stale_after(Duration::from_secs(2)), Duration::from_secs(3));
    }
}
