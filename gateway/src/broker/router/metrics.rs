//! The broker's counters ([`Metrics`]), read by `$SYS`, the logs, the ops
//! endpoint and the tests, and [`worth_logging`], which counts an event and
//! says whether it deserves a log line (at most one a second per counter).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Counters, readable at any time (`$SYS`, logs, tests).
#[derive(Default, Debug)]
pub struct Metrics {
    pub messages_received: AtomicU64,
    pub messages_sent: AtomicU64,
    /// The same two, by the QoS of the PUBLISH (received as published,
    /// sent as delivered).
    pub received_by_qos: [AtomicU64; 3],
    pub sent_by_qos: [AtomicU64; 3],
    pub bytes_received: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub publish_denied: AtomicU64,
    pub subscribe_denied: AtomicU64,
    pub dropped_queue_full: AtomicU64,
    pub dropped_no_subscriber: AtomicU64,
    /// Times a publisher was held back because a subscriber's queue was full.
    pub publishers_throttled: AtomicU64,
    /// Times an online subscriber was too slow for too long and was marked slow.
    pub slow_subscribers: AtomicU64,
    /// Saves to SQLite that failed (retried at the next interval).
    pub persist_failures: AtomicU64,
    pub connections_accepted: AtomicU64,
    pub connections_refused: AtomicU64,
    pub connections_over_limit: AtomicU64,
    pub protocol_errors: AtomicU64,
    pub connect_timeouts: AtomicU64,
    pub keepalive_timeouts: AtomicU64,
    pub wills_published: AtomicU64,
    pub clients_connected: AtomicUsize,
    /// Hostile-client limits: what each refused or closed.
    pub topics_too_deep: AtomicU64,
    pub subscriptions_over_limit: AtomicU64,
    pub retained_over_limit: AtomicU64,
    pub sessions_over_limit: AtomicU64,
    pub sessions_expired: AtomicU64,
    pub write_timeouts: AtomicU64,
    /// A CONNECT with a client id whose session belongs to another user.
    pub client_id_taken: AtomicU64,
    /// Deliveries withheld because the subscriber may not read the topic
    /// (now; its subscription was granted earlier or is wider).
    pub receive_denied: AtomicU64,
    /// CONNECTs held back because their address failed to log in repeatedly.
    pub logins_delayed: AtomicU64,
    /// Messages made inside the gateway (sources, the cloud's `in` rules)
    /// refused for an invalid topic.
    pub invalid_local_topics: AtomicU64,
    /// broker.sqlite was found corrupt at start, moved aside and salvaged.
    pub store_recovered: AtomicU64,
    /// SUBSCRIBE filters that are not valid filters.
    pub invalid_filters: AtomicU64,
}

/// Counts one occurrence in `count`; true when it should be logged: the
/// first time, then at most once a second per counter. A limit a hostile
/// client hits in a loop is logged, never once per packet (writing a log
/// line per refused filter was what cost the broker most under attack),
/// and an operator still sees a line a second while it goes on.
pub fn worth_logging(count: &AtomicU64) -> bool {
    static LAST: Mutex<Option<HashMap<usize, std::time::Instant>>> = Mutex::new(None);
    count.fetch_add(1, Ordering::Relaxed);
    let now = std::time::Instant::now();
    let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
    let last = last.get_or_insert_with(HashMap::new);
    let key = count as *const AtomicU64 as usize;
    match last.get(&key) {
        Some(t) if now.duration_since(*t) < std::time::Duration::from_secs(1) => false,
        _ => {
            last.insert(key, now);
            true
        }
    }
}

impl Metrics {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
