//! Putting one delivery in one session's queue, the last step of routing:
//! the read check at delivery (the ACL asked, its answers cached per
//! session), what an offline session keeps (nothing when clean, QoS 0 only
//! with `queue_qos0_offline`), `max_queued` (the oldest message goes), and
//! backpressure: an online subscriber whose queue is full holds its
//! publishers back until it drains, or until it is marked slow.

use std::sync::Arc;

use tracing::{info, warn};

use super::{worth_logging, Metrics, Router};
use crate::broker::auth::{AclDecision, Action};
use crate::broker::session::{Delivery, Session, SessionState};
use crate::message::QoS;

/// Cached receive decisions per session are dropped past this many topics.
const READ_CACHE_MAX: usize = 1024;

impl Router {
    /// Queues one delivery for one session and wakes its connection.
    /// Returns true when an online subscriber's queue is now at or over
    /// `max_queued` and publishers should hold back. An offline or slow
    /// session drops its oldest message instead; an online one only past
    /// twice the limit (a publisher ignoring flow control).
    pub fn deliver(&self, session: &Arc<Session>, delivery: Delivery) -> bool {
        self.deliver_checked(session, delivery, false)
    }

    /// [`Router::deliver`]; `readable`: the subscription it comes through
    /// already proves the session may read the topic (no check to make).
    pub(super) fn deliver_checked(
        &self,
        session: &Arc<Session>,
        mut delivery: Delivery,
        readable: bool,
    ) -> bool {
        let max = self.limits.max_queued;
        let mut st = session.lock();
        if let Some(auth) = self.read_auth.as_ref().filter(|_| !readable) {
            let generation = auth.generation();
            if st.read_cache_generation != generation {
                st.read_cache.clear();
                st.read_cache_generation = generation;
            }
            let topic = &delivery.message.topic;
            let allowed = match st.read_cache.get(topic) {
                Some(&d) => d,
                None => {
                    // Asked without the session lock: a plugin may take
                    // its time.
                    let reader = st.reader.clone();
                    drop(st);
                    let d = auth.authorize(&reader, Action::Receive, topic) == AclDecision::Allow;
                    st = session.lock();
                    if st.read_cache.len() >= READ_CACHE_MAX {
                        st.read_cache.clear();
                    }
                    st.read_cache.insert(topic.clone(), d);
                    d
                }
            };
            if !allowed {
                drop(st);
                if worth_logging(&self.metrics.receive_denied) {
                    info!(client_id = %session.client_id, topic = %topic,
                        "message not delivered: the subscriber may not read this topic");
                }
                return false;
            }
        }
        let online = st.attached.is_some();
        if !online
            && (st.clean || (delivery.qos == QoS::AtMostOnce && !self.limits.queue_qos0_offline))
        {
            return false;
        }
        let throttle = online && self.limits.backpressure && !st.slow;
        let cap = if throttle { max.saturating_mul(2) } else { max };
        while st.queue.len() >= cap {
            st.queue.pop_front();
            Metrics::inc(&self.metrics.dropped_queue_full);
        }
        let persist = !st.clean && delivery.qos > QoS::AtMostOnce;
        delivery.id = st.next_delivery_id;
        st.next_delivery_id += 1;
        st.queue.push_back(delivery);
        let full = throttle && st.queue.len() >= max;
        drop(st);
        if persist {
            self.session_changed(session);
        }
        session.notify.notify_one();
        full
    }

    /// True while an online, not-slow subscriber's queue is at or over
    /// `max_queued`: publishers it held back keep waiting.
    pub fn still_congested(&self, session: &Session) -> bool {
        let st = session.lock();
        st.attached.is_some() && !st.slow && st.queue.len() >= self.limits.max_queued
    }

    /// A subscriber kept publishers waiting too long: from now on its oldest
    /// messages are dropped when its queue is full, until it has caught up.
    pub fn mark_slow(&self, session: &Session) {
        let mut st = session.lock();
        if !st.slow && st.attached.is_some() {
            st.slow = true;
            drop(st);
            Metrics::inc(&self.metrics.slow_subscribers);
            warn!(client_id = %session.client_id, max_queued = self.limits.max_queued,
                "subscriber too slow: its oldest messages are dropped while its queue is full");
        }
    }

    /// Called by a connection after it took messages from its queue.
    pub fn queue_drained(&self, st: &mut SessionState, len_before: usize) {
        let max = self.limits.max_queued;
        let len = st.queue.len();
        if st.slow && len <= max / 2 {
            st.slow = false;
        }
        if len_before >= max && len < max {
            self.space.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

    use super::*;
    use crate::broker::auth::{Authenticator, ClientInfo, ConnectDecision};
    use crate::broker::router::tests::{limits, message, offline, online, queued};
    use crate::broker::router::QueueLimits;

    /// Refuses reading `secret/...` to everyone; counts the questions.
    #[derive(Default)]
    struct NoSecrets {
        asked: AtomicUsize,
        generation: AtomicU64,
    }

    impl Authenticator for NoSecrets {
        fn authenticate(&self, _: &ClientInfo, _: Option<&[u8]>) -> ConnectDecision {
            ConnectDecision::Accept
        }
        fn authorize(&self, _: &ClientInfo, action: Action, topic: &str) -> AclDecision {
            assert_eq!(action, Action::Receive);
            self.asked.fetch_add(1, Ordering::Relaxed);
            if topic.starts_with("secret/") {
                AclDecision::Deny
            } else {
                AclDecision::Allow
            }
        }
        fn generation(&self) -> u64 {
            self.generation.load(Ordering::Relaxed)
        }
    }

    fn topics(s: &Session) -> Vec<String> {
        queued(s).into_iter().map(|(t, _)| t).collect()
    }

    #[test]
    fn a_topic_the_subscriber_may_not_read_is_withheld_and_counted() {
        let auth = Arc::new(NoSecrets::default());
        let mut r = Router::new(limits());
        r.read_auth = Some(auth.clone());
        let s = online("s");
        r.subscribe("#", &s, QoS::AtLeastOnce);
        for t in ["open/1", "secret/1", "secret/1", "open/2"] {
            r.publish(message(t, QoS::AtLeastOnce));
        }
        assert_eq!(topics(&s), ["open/1", "open/2"]);
        assert_eq!(Metrics::get(&r.metrics.receive_denied), 2);
        // Each topic asked once, then answered from the session's cache,
        // until the authenticator's answers may have changed.
        assert_eq!(auth.asked.load(Ordering::Relaxed), 3);
        auth.generation.store(1, Ordering::Relaxed);
        r.publish(message("secret/1", QoS::AtLeastOnce));
        assert_eq!(auth.asked.load(Ordering::Relaxed), 4);
        assert_eq!(Metrics::get(&r.metrics.receive_denied), 3);
    }

    #[test]
    fn an_offline_session_keeps_qos0_only_when_configured() {
        for keep in [false, true] {
            let r = Router::new(QueueLimits {
                queue_qos0_offline: keep,
                ..limits()
            });
            let (s, clean) = (offline("s"), online("clean"));
            clean.lock().attached = None;
            r.subscribe("t/#", &s, QoS::AtLeastOnce);
            r.subscribe("t/#", &clean, QoS::AtLeastOnce);
            r.publish(message("t/0", QoS::AtMostOnce));
            assert!(r.take_dirty().0.is_empty(), "QoS 0 is never saved");
            r.publish(message("t/1", QoS::AtLeastOnce));
            assert_eq!(r.take_dirty().0, [Arc::<str>::from("s")]);
            let expected: &[&str] = if keep { &["t/0", "t/1"] } else { &["t/1"] };
            assert_eq!(topics(&s), expected, "queue_qos0_offline = {keep}");
            assert!(topics(&clean).is_empty(), "a clean session keeps nothing");
        }
    }

    #[test]
    fn a_full_queue_drops_its_oldest_and_counts_each() {
        let r = Router::new(QueueLimits {
            max_queued: 3,
            ..limits()
        });
        let s = offline("s");
        r.subscribe("t/#", &s, QoS::AtLeastOnce);
        for i in 1..=5 {
            r.publish(message(&format!("t/{i}"), QoS::AtLeastOnce));
        }
        assert_eq!(topics(&s), ["t/3", "t/4", "t/5"]);
        assert_eq!(Metrics::get(&r.metrics.dropped_queue_full), 2);
        let ids: Vec<u64> = s.lock().queue.iter().map(|d| d.id).collect();
        assert_eq!(ids, [3, 4, 5], "numbered in their session as queued");
    }

    /// With backpressure an online subscriber holds publishers back at
    /// `max_queued` and loses messages only past twice that; once marked
    /// slow it drops at `max_queued`, until it has drained half of it.
    #[test]
    fn backpressure_holds_back_then_a_slow_subscriber_drops() {
        let r = Router::new(QueueLimits {
            max_queued: 2,
            backpressure: true,
            ..limits()
        });
        let s = online("s");
        let d = |t: &str| Delivery {
            id: 0,
            message: Arc::new(message(t, QoS::AtLeastOnce)),
            qos: QoS::AtLeastOnce,
            retain: false,
        };
        assert!(!r.deliver(&s, d("t/1")));
        assert!(r.deliver(&s, d("t/2")), "full: publishers wait");
        assert!(r.deliver(&s, d("t/3")));
        assert!(r.deliver(&s, d("t/4")));
        assert_eq!(Metrics::get(&r.metrics.dropped_queue_full), 0);
        assert!(r.deliver(&s, d("t/5")));
        assert_eq!(topics(&s), ["t/2", "t/3", "t/4", "t/5"]);
        assert_eq!(Metrics::get(&r.metrics.dropped_queue_full), 1);

        r.mark_slow(&s);
        assert!(
            !r.still_congested(&s),
            "a slow subscriber holds nobody back"
        );
        assert!(!r.deliver(&s, d("t/6")));
        assert_eq!(topics(&s), ["t/5", "t/6"]);
        assert_eq!(Metrics::get(&r.metrics.slow_subscribers), 1);

        let mut st = s.lock();
        st.queue.pop_front();
        r.queue_drained(&mut st, 2);
        assert!(!st.slow, "caught up");
    }
}
