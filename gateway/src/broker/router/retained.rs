//! Retained messages: the last message kept on each topic, sent to every
//! new subscription that matches it, and the limits on what clients may
//! leave there (`max_retained` messages, `max_retained_bytes` of topic +
//! payload; the broker's own `$SYS` topics count for nothing). A change to
//! a topic clients can retain on is recorded for the next save.

use std::collections::HashMap;
use std::sync::Arc;

use bytestring::ByteString;
use tracing::warn;

use super::{worth_logging, Router};
use crate::broker::topic;
use crate::message::Message;

/// Retained messages, and how many of them clients made and what those
/// weigh (topic + payload bytes): the broker's own `$SYS` topics are not
/// counted against `max_retained`.
#[derive(Default)]
pub(super) struct Retained {
    map: HashMap<ByteString, Arc<Message>>,
    count: usize,
    bytes: usize,
}

/// What a retained message counts for: (messages, bytes).
fn weight(m: &Message) -> (usize, usize) {
    if m.topic.starts_with("$SYS/") {
        (0, 0)
    } else {
        (1, m.topic.len() + m.payload.len())
    }
}

impl Retained {
    fn insert(&mut self, m: Arc<Message>) {
        let (n, b) = weight(&m);
        self.count += n;
        self.bytes += b;
        if let Some(old) = self.map.insert(m.topic.clone(), m) {
            let (n, b) = weight(&old);
            self.count -= n;
            self.bytes -= b;
        }
    }

    fn remove(&mut self, topic: &str) -> Option<Arc<Message>> {
        let old = self.map.remove(topic)?;
        let (n, b) = weight(&old);
        self.count -= n;
        self.bytes -= b;
        Some(old)
    }
}

impl Router {
    /// Keeps a message published with retain = 1 as its topic's last
    /// (an empty payload deletes what was kept), within the limits.
    pub(super) fn retain(&self, message: &Arc<Message>) {
        let mut retained = self.retained.write().unwrap_or_else(|e| e.into_inner());
        let (old_n, old_b) = retained
            .map
            .get(&message.topic)
            .map_or((0, 0), |m| weight(m));
        let (n, b) = weight(message);
        let over = !message.payload.is_empty() && n > 0 && {
            let count = retained.count - old_n + n;
            let bytes = retained.bytes - old_b + b;
            count > self.limits.max_retained || bytes > self.limits.max_retained_bytes
        };
        if over {
            // Not retained; what was retained on the topic is no longer its
            // last message either, so it goes.
            if worth_logging(&self.metrics.retained_over_limit) {
                warn!(topic = %message.topic, max_retained = self.limits.max_retained,
                    max_retained_bytes = self.limits.max_retained_bytes,
                    "retained message refused: broker.max_retained or max_retained_bytes reached");
            }
        }
        let change = if message.payload.is_empty() || over {
            if retained.remove(&message.topic).is_none() {
                return;
            }
            None
        } else {
            retained.insert(message.clone());
            Some(message.clone())
        };
        drop(retained);
        if !message.topic.starts_with('$') {
            self.dirty_retained
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(message.topic.clone(), change);
        }
    }

    /// Restores retained messages at start-up (not marked dirty).
    pub fn restore_retained(&self, messages: impl IntoIterator<Item = Message>) {
        let mut retained = self.retained.write().unwrap_or_else(|e| e.into_inner());
        for m in messages {
            retained.insert(Arc::new(m));
        }
    }

    pub fn retained_count(&self) -> usize {
        self.retained
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .map
            .len()
    }

    /// Retained messages clients made (not `$SYS`), and their topic +
    /// payload bytes: what `max_retained` and `max_retained_bytes` bound.
    pub fn retained_usage(&self) -> (usize, usize) {
        let r = self.retained.read().unwrap_or_else(|e| e.into_inner());
        (r.count, r.bytes)
    }

    /// Retained messages matching a filter, oldest topic first is not
    /// guaranteed; each is sent with retain = 1.
    pub fn retained_matching(&self, filter: &str) -> Vec<Arc<Message>> {
        let retained = self.retained.read().unwrap_or_else(|e| e.into_inner());
        if !filter.contains(['+', '#']) {
            return retained.map.get(filter).cloned().into_iter().collect();
        }
        retained
            .map
            .values()
            .filter(|m| topic::matches(filter, &m.topic))
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::router::tests::limits;
    use crate::broker::router::{Metrics, QueueLimits};
    use crate::message::{Origin, QoS};

    fn retained(topic: &str, payload: &str) -> Message {
        let origin = Origin::Client("p".into());
        Message::new(
            topic.to_owned(),
            payload.to_owned(),
            QoS::AtLeastOnce,
            true,
            origin,
        )
    }

    /// A router that retains at most `max_retained` messages and
    /// `max_retained_bytes` of topics and payloads.
    fn limited(max_retained: usize, max_retained_bytes: usize) -> Router {
        Router::new(QueueLimits {
            max_retained,
            max_retained_bytes,
            ..limits()
        })
    }

    fn kept(r: &Router, filter: &str) -> Vec<String> {
        let mut v: Vec<String> = r
            .retained_matching(filter)
            .iter()
            .map(|m| format!("{}={}", m.topic, String::from_utf8_lossy(&m.payload)))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn max_retained_refuses_a_new_topic_and_counts_it() {
        let r = limited(2, 1000);
        r.publish(retained("a", "1"));
        r.publish(retained("b", "1"));
        r.publish(retained("c", "1"));
        assert_eq!(kept(&r, "#"), ["a=1", "b=1"]);
        assert_eq!(Metrics::get(&r.metrics.retained_over_limit), 1);
        // Replacing one is not one more; the broker's own do not count.
        r.publish(retained("a", "2"));
        r.publish(retained("$SYS/x", "1"));
        assert_eq!(kept(&r, "a"), ["a=2"]);
        assert_eq!(r.retained_usage(), (2, 4));
        assert_eq!(r.retained_count(), 3);
        assert_eq!(Metrics::get(&r.metrics.retained_over_limit), 1);
        // An empty payload deletes, which makes room.
        r.publish(retained("b", ""));
        r.publish(retained("c", "1"));
        assert_eq!(kept(&r, "+"), ["a=2", "c=1"]);
    }

    #[test]
    fn max_retained_bytes_refuses_and_the_topic_loses_its_old_message() {
        let r = limited(100, 10);
        r.publish(retained("t", "12345"));
        assert_eq!(r.retained_usage(), (1, 6));
        r.publish(retained("t", "1234567890"));
        assert!(
            kept(&r, "#").is_empty(),
            "no longer the topic's last message"
        );
        assert_eq!(r.retained_usage(), (0, 0));
        assert_eq!(Metrics::get(&r.metrics.retained_over_limit), 1);
        // Saved as a deletion.
        let (_, changes) = r.take_dirty();
        assert!(matches!(changes.get("t"), Some(None)));
    }
}
