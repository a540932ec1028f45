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
