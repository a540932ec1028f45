//! Slows down password guessing: after a few failed logins from one
//! address, each further CONNECT from it waits before it is checked, twice
//! as long after every new failure (up to a ceiling). Parallel connections
//! from that address wait for the same deadline, so opening many sockets
//! does not multiply the guessing rate. A success clears the address.
//!
//! The table is bounded: entries are forgotten some time after their last
//! failure, and a full table tracks no new addresses (an attacker would
//! need more addresses than it holds, each with its own few free tries).
//! IPv6 addresses are grouped by /64, what one host usually gets.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Failures from one address before any delay (the default of
/// `broker.login_free_failures`).
pub const FREE_FAILURES: u32 = 3;
/// The first delay, doubled with every further failure.
const BASE_DELAY: Duration = Duration::from_millis(200);
/// The longest delay (the default of `broker.login_backoff_max_ms`).
pub const MAX_DELAY: Duration = Duration::from_secs(10);
/// An address is forgotten this long after its last failure.
const FORGET_AFTER: Duration = Duration::from_secs(600);
/// Addresses tracked at once.
const MAX_PEERS: usize = 10_000;

struct Entry {
    failures: u32,
    /// No login from this address is checked before this.
    not_before: Instant,
    last_failure: Instant,
}

pub struct LoginBackoff {
    peers: Mutex<HashMap<IpAddr, Entry>>,
    free_failures: u32,
    max_delay: Duration,
}

impl Default for LoginBackoff {
    fn default() -> Self {
        LoginBackoff::new(FREE_FAILURES, MAX_DELAY)
    }
}

/// The key an address is tracked under: IPv6 by its /64.
fn key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

impl LoginBackoff {
    /// `free_failures` failures before any delay; delays up to `max_delay`
    /// (zero: never any).
    pub fn new(free_failures: u32, max_delay: Duration) -> Self {
        LoginBackoff {
            peers: Mutex::new(HashMap::new()),
            free_failures,
            max_delay,
        }
    }

    /// The delay after `failures` failed logins.
    fn delay_after(&self, failures: u32) -> Duration {
        if failures < self.free_failures {
            return Duration::ZERO;
        }
        let doublings = (failures - self.free_failures).min(16);
        (BASE_DELAY * 2u32.pow(doublings)).min(self.max_delay)
    }

    /// How long a login from `ip` must wait before it is checked (zero: now).
    pub fn wait(&self, ip: IpAddr, now: Instant) -> Duration {
        let peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        peers.get(&key(ip)).map_or(Duration::ZERO, |e| {
            e.not_before.saturating_duration_since(now)
        })
    }

    /// Records a failed login from `ip`.
    pub fn failed(&self, ip: IpAddr, now: Instant) {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let k = key(ip);
        if !peers.contains_key(&k) && peers.len() >= MAX_PEERS {
            peers.retain(|_, e| now.saturating_duration_since(e.last_failure) < FORGET_AFTER);
            if peers.len() >= MAX_PEERS {
                return;
            }
        }
        let e = peers.entry(k).or_insert(Entry {
            failures: 0,
            not_before: now,
            last_failure: now,
        });
        if now.saturating_duration_since(e.last_failure) >= FORGET_AFTER {
            e.failures = 0;
        }
        e.failures = e.failures.saturating_add(1);
        e.last_failure = now;
        e.not_before = now + self.delay_after(e.failures);
    }

    /// A successful login from `ip` clears its failures.
    pub fn succeeded(&self, ip: IpAddr) {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        if !peers.is_empty() {
            peers.remove(&key(ip));
        }
    }

    /// Addresses tracked now.
    pub fn len(&self) -> usize {
        self.peers.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_after_the_free_failures_and_success_clears() {
        let b = LoginBackoff::default();
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let other: IpAddr = "192.0.2.8".parse().unwrap();
        let t = Instant::now();
        for _ in 0..FREE_FAILURES - 1 {
            b.failed(ip, t);
            assert_eq!(b.wait(ip, t), Duration::ZERO);
        }
        b.failed(ip, t);
        assert_eq!(b.wait(ip, t), BASE_DELAY);
        b.failed(ip, t);
        assert_eq!(b.wait(ip, t), BASE_DELAY * 2);
        assert_eq!(b.wait(ip, t + BASE_DELAY * 2), Duration::ZERO);
        assert_eq!(
            b.wait(other, t),
            Duration::ZERO,
            "other addresses are not slowed"
        );
        for _ in 0..100 {
            b.failed(ip, t);
        }
        assert_eq!(b.wait(ip, t), MAX_DELAY);
        b.succeeded(ip);
        assert_eq!(b.wait(ip, t), Duration::ZERO);
        assert!(b.is_empty());
    }

    #[test]
    fn old_failures_are_forgotten_and_ipv6_is_grouped_by_64() {
        let b = LoginBackoff::default();
        let a: IpAddr = "2001:db8:1:2::10".parse().unwrap();
        let same_64: IpAddr = "2001:db8:1:2:ffff::1".parse().unwrap();
        let t = Instant::now();
        for _ in 0..FREE_FAILURES {
            b.failed(a, t);
        }
        assert_eq!(b.wait(same_64, t), BASE_DELAY);
        let later = t + FORGET_AFTER;
        b.failed(a, later);
        assert_eq!(b.wait(a, later), Duration::ZERO, "counted afresh");
    }

    #[test]
    fn the_table_is_bounded() {
        let b = LoginBackoff::default();
        let t = Instant::now();
        for i in 0..(MAX_PEERS as u32 + 50) {
            b.failed(IpAddr::V4(i.into()), t);
        }
        assert_eq!(b.len(), MAX_PEERS);
        // Once the old entries expire, new addresses are tracked again.
        b.failed(IpAddr::V4(u32::MAX.into()), t + FORGET_AFTER);
        assert_eq!(b.len(), 1);
    }
}
