//! The broker's shared state: sessions by client id, the subscription tree,
//! retained messages, counters. [`Router::publish`] is the one path every
//! message takes to its subscribers, whether it came from a client, a will
//! or `$SYS`.
//!
//! This file holds the [`Router`] itself, routing (find the matching
//! subscriptions, one delivery per subscriber), subscriptions, the session
//! map and what must be saved next. The rest is in:
//! - [`deliver`]: putting one delivery in one session's queue (the read
//!   check at delivery, offline and queue limits, backpressure);
//! - [`retained`]: the retained messages and their limits;
//! - [`metrics`]: the counters.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};

use bytestring::ByteString;
use tokio::sync::Notify;

use super::session::{Delivery, Session};
use super::trie::SubscriptionTree;
use crate::message::{Durability, Message, QoS, Seq};

mod deliver;
mod metrics;
mod retained;

pub use metrics::{worth_logging, Metrics};
use retained::Retained;

/// Retained topics changed since the last save: the new message, or None
/// when it was deleted.
pub type RetainedChanges = HashMap<ByteString, Option<Arc<Message>>>;

/// Limits the router applies when queueing and retaining.
#[derive(Debug, Clone, Copy)]
pub struct QueueLimits {
    pub max_queued: usize,
    pub queue_qos0_offline: bool,
    /// Hold publishers back instead of dropping for online subscribers.
    pub backpressure: bool,
    pub max_retained: usize,
    pub max_retained_bytes: usize,
}

pub struct Router {
    pub sessions: Mutex<HashMap<Arc<str>, Arc<Session>>>,
    subscriptions: RwLock<SubscriptionTree<Session>>,
    retained: RwLock<Retained>,
    pub metrics: Metrics,
    limits: QueueLimits,
    /// Client ids whose persisted form must be rewritten or deleted.
    dirty_sessions: Mutex<HashSet<Arc<str>>>,
    /// Retained topics changed since the last save (None = deleted).
    dirty_retained: Mutex<RetainedChanges>,
    /// Woken when a congested queue drains below `max_queued` (publishers
    /// held back by it re-check).
    pub space: Notify,
    /// Gets a copy of every routed message (the upstream buffer).
    pub outbox: Option<Arc<dyn super::Outbox>>,
    /// Runs before routing: may drop, change or split a message (WASM
    /// transform plugins).
    pub transform: Option<Arc<dyn super::Transform>>,
    /// Asked at delivery whether a subscriber may read a topic (None when
    /// the authenticator's SUBSCRIBE answer already implies it: no ACL).
    pub read_auth: Option<Arc<dyn super::auth::Authenticator>>,
}

impl Router {
    pub fn new(limits: QueueLimits) -> Self {
        Router {
            sessions: Mutex::new(HashMap::new()),
            subscriptions: RwLock::new(SubscriptionTree::default()),
            retained: RwLock::new(Retained::default()),
            metrics: Metrics::default(),
            limits,
            dirty_sessions: Mutex::new(HashSet::new()),
            dirty_retained: Mutex::new(HashMap::new()),
            space: Notify::new(),
            outbox: None,
            transform: None,
            read_auth: None,
        }
    }

    /// Routes one message to every matching subscription, once per
    /// subscriber at the highest granted QoS, and updates the retained store.
    pub fn publish(&self, message: Message) {
        self.publish_from(message, None, &mut Vec::new(), Durability::BestEffort);
    }

    /// [`Router::publish`] for a message from a client's session: online
    /// subscribers whose queue this message filled (other than the
    /// publisher itself) are added to `congested`, and the publisher's
    /// connection holds back until they drain (flow control, not loss).
    /// Returns the outbox sequence number the publisher's acknowledgement
    /// must wait for, when the message goes upstream.
    pub fn publish_from(
        &self,
        message: Message,
        publisher: Option<&Arc<Session>>,
        congested: &mut Vec<Arc<Session>>,
        durability: Durability,
    ) -> Option<Seq> {
        let t = match &self.transform {
            Some(t) if message.origin.policy().transform => t,
            _ => return self.route(message, publisher, congested, durability),
        };
        // What the transforms make of it: zero, one or many messages; the
        // publisher waits for the last one to be settled upstream.
        let mut wait = None;
        for m in t.apply(message) {
            wait = wait.max(self.route(m, publisher, congested, durability));
        }
        wait
    }

    /// [`Router::publish_from`] for QoS 0 messages a client sent one after
    /// the other (one socket read): the transforms take them together.
    pub fn publish_batch_from(
        &self,
        messages: Vec<Message>,
        publisher: Option<&Arc<Session>>,
        congested: &mut Vec<Arc<Session>>,
    ) {
        match &self.transform {
            Some(t) if messages.iter().all(|m| m.origin.policy().transform) => {
                for m in t.apply_batch(messages) {
                    self.route(m, publisher, congested, Durability::BestEffort);
                }
            }
            _ => {
                for m in messages {
                    self.publish_from(m, publisher, congested, Durability::BestEffort);
                }
            }
        }
    }

    fn route(
        &self,
        message: Message,
        publisher: Option<&Arc<Session>>,
        congested: &mut Vec<Arc<Session>>,
        durability: Durability,
    ) -> Option<Seq> {
        let message = Arc::new(message);
        let upstream = match &self.outbox {
            Some(o) if message.origin.policy().upstream => o.offer(&message, durability),
            _ => None,
        };
        if message.retain {
            self.retain(&message);
        }
        let mut targets: Vec<Target> = Vec::new();
        {
            let tree = self.subscriptions.read().unwrap_or_else(|e| e.into_inner());
            tree.for_each_match(&message.topic, |s, g| {
                let (qos, readable) = ungrant(g);
                targets.push(Target {
                    session: s.clone(),
                    qos,
                    readable,
                });
            });
        }
        dedup_targets(&mut targets);
        if targets.is_empty() {
            Metrics::inc(&self.metrics.dropped_no_subscriber);
        }
        for Target {
            session,
            qos: granted,
            readable,
        } in targets
        {
            let qos = message.qos.min(granted);
            let full = self.deliver_checked(
                &session,
                Delivery {
                    id: 0,
                    message: message.clone(),
                    qos,
                    retain: false,
                },
                readable,
            );
            if full
                && !publisher.is_some_and(|p| Arc::ptr_eq(p, &session))
                && !congested.iter().any(|c| Arc::ptr_eq(c, &session))
            {
                congested.push(session);
            }
        }
        upstream
    }

    pub fn session_changed(&self, session: &Session) {
        if session.mark_dirty() {
            self.mark_session_id(&session.client_id);
        }
    }

    /// Enlists a client id for the next save, whatever its session is now.
    pub fn mark_session_id(&self, client_id: &Arc<str>) {
        self.dirty_sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(client_id.clone());
    }

    pub fn subscribe(&self, filter: &str, session: &Arc<Session>, qos: QoS) {
        // Whether every name this filter matches is readable by the
        // session's owner: then its deliveries skip the receive check. A
        // session still unclaimed (restored from an older database) gets
        // its owner at the first login: checked one by one.
        let readable = match &self.read_auth {
            None => true,
            Some(auth) => {
                let st = session.lock();
                !st.owner_unclaimed && auth.covers_reads(&st.reader, filter)
            }
        };
        self.subscriptions
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(filter, session, grant(qos, readable));
    }

    pub fn unsubscribe(&self, filter: &str, session: &Arc<Session>) -> bool {
        self.subscriptions
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(filter, session)
    }

    pub fn subscription_count(&self) -> usize {
        self.subscriptions
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Removes a session and all its subscriptions (clean session ended or
    /// replaced). Only removes the map entry if it is still this session.
    pub fn remove_session(&self, session: &Arc<Session>) {
        let filters: Vec<String> = session.lock().subscriptions.keys().cloned().collect();
        {
            let mut tree = self
                .subscriptions
                .write()
                .unwrap_or_else(|e| e.into_inner());
            for f in &filters {
                tree.remove(f, session);
            }
        }
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        if sessions
            .get(&session.client_id)
            .is_some_and(|s| Arc::ptr_eq(s, session))
        {
            sessions.remove(&session.client_id);
        }
        drop(sessions);
        self.mark_session_id(&session.client_id);
    }

    /// Takes what must be saved: client ids to rewrite or delete, and
    /// retained changes.
    pub fn take_dirty(&self) -> (Vec<Arc<str>>, RetainedChanges) {
        let ids = std::mem::take(
            &mut *self
                .dirty_sessions
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        let retained = std::mem::take(
            &mut *self
                .dirty_retained
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        (ids.into_iter().collect(), retained)
    }

    /// Puts retained changes whose save failed back in the dirty set,
    /// unless the topic changed again since.
    pub fn remark_retained(
        &self,
        changes: impl IntoIterator<Item = (ByteString, Option<Arc<Message>>)>,
    ) {
        let mut dirty = self
            .dirty_retained
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for (topic, change) in changes {
            dirty.entry(topic).or_insert(change);
        }
    }

    pub fn session(&self, client_id: &str) -> Option<Arc<Session>> {
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(client_id)
            .cloned()
    }

    /// Every session, online or not (a copy of the list: no lock held).
    pub fn all_sessions(&self) -> Vec<Arc<Session>> {
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Client ids of the sessions a connection is attached to now.
    pub fn connected_clients(&self) -> Vec<Arc<str>> {
        let mut ids: Vec<Arc<str>> = self
            .all_sessions()
            .into_iter()
            .filter(|s| s.lock().attached.is_some())
            .map(|s| s.client_id.clone())
            .collect();
        ids.sort();
        ids
    }

    pub fn session_count(&self) -> usize {
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }
}

/// A matching subscriber: the QoS its filter granted, and whether that
/// filter proves it may read every name it matches.
struct Target {
    session: Arc<Session>,
    qos: QoS,
    readable: bool,
}

/// What the subscription tree keeps per (subscriber, filter): the granted
/// QoS, and in the high bit whether the filter is readable as a whole.
const READABLE: u8 = 0x80;

fn grant(qos: QoS, readable: bool) -> u8 {
    u8::from(qos) | if readable { READABLE } else { 0 }
}

fn ungrant(g: u8) -> (QoS, bool) {
    (
        QoS::from_u8(g & !READABLE).unwrap_or(QoS::ExactlyOnce),
        g & READABLE != 0,
    )
}

/// One delivery per subscriber, at the highest QoS its matching filters
/// granted (readable if any of them proves it). A short list is
/// de-duplicated in place; a long one (thousands of `#` sessions) through a
/// map, so routing stays linear in subscribers.
fn dedup_targets(targets: &mut Vec<Target>) {
    if targets.len() <= 1 {
        return;
    }
    fn merge(into: &mut Target, t: &Target) {
        into.qos = into.qos.max(t.qos);
        into.readable |= t.readable;
    }
    if targets.len() <= 16 {
        let mut i = 0;
        while i < targets.len() {
            if let Some(j) = (0..i).find(|&j| Arc::ptr_eq(&targets[j].session, &targets[i].session))
            {
                let t = targets.swap_remove(i);
                merge(&mut targets[j], &t);
            } else {
                i += 1;
            }
        }
        return;
    }
    let mut seen: HashMap<*const Session, usize> = HashMap::with_capacity(targets.len());
    let mut out: Vec<Target> = Vec::with_capacity(targets.len());
    for t in targets.drain(..) {
        match seen.entry(Arc::as_ptr(&t.session)) {
            std::collections::hash_map::Entry::Occupied(e) => merge(&mut out[*e.get()], &t),
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(out.len());
                out.push(t);
            }
        }
    }
    *targets = out;
}

/// Routing, and the helpers every router test shares (no sockets: a
/// session is "online" when an `Attached` with dangling channels is set).
#[cfg(test)]
mod tests {
    use tokio::sync::oneshot;

    use super::*;
    use crate::broker::session::Attached;
    use crate::message::Origin;

    /// Roomy limits; each test narrows what it checks.
    pub(super) fn limits() -> QueueLimits {
        QueueLimits {
            max_queued: 100,
            queue_qos0_offline: false,
            backpressure: false,
            max_retained: 100,
            max_retained_bytes: 100_000,
        }
    }

    /// A session with a connection attached.
    pub(super) fn online(client_id: &str) -> Arc<Session> {
        let s = Arc::new(Session::new(Arc::from(client_id), true, None));
        let (kick, _) = oneshot::channel();
        let (_, gone) = oneshot::channel();
        s.lock().attached = Some(Attached {
            conn_id: 1,
            kick,
            gone,
        });
        s
    }

    /// A persistent session with no connection.
    pub(super) fn offline(client_id: &str) -> Arc<Session> {
        Arc::new(Session::new(Arc::from(client_id), false, None))
    }

    pub(super) fn message(topic: &str, qos: QoS) -> Message {
        Message::new(
            topic.to_owned(),
            "x",
            qos,
            false,
            Origin::Client("p".into()),
        )
    }

    /// What waits in a session's queue: (topic, QoS) in order.
    pub(super) fn queued(s: &Session) -> Vec<(String, QoS)> {
        s.lock()
            .queue
            .iter()
            .map(|d| (d.message.topic.to_string(), d.qos))
            .collect()
    }

    fn at(topic: &str, qos: QoS) -> Vec<(String, QoS)> {
        vec![(topic.to_owned(), qos)]
    }

    #[test]
    fn each_matching_subscriber_gets_the_message_once_at_its_highest_grant() {
        let r = Router::new(limits());
        let (a, b, other) = (online("a"), online("b"), online("other"));
        r.subscribe("t/+", &a, QoS::AtMostOnce);
        r.subscribe("t/#", &a, QoS::ExactlyOnce);
        r.subscribe("t/x", &a, QoS::AtLeastOnce);
        r.subscribe("t/x", &b, QoS::AtLeastOnce);
        r.subscribe("u/#", &other, QoS::ExactlyOnce);

        r.publish(message("t/x", QoS::ExactlyOnce));
        assert_eq!(queued(&a), at("t/x", QoS::ExactlyOnce), "once, at 2");
        assert_eq!(queued(&b), at("t/x", QoS::AtLeastOnce), "its grant caps it");
        assert!(queued(&other).is_empty());

        // Never above what was published.
        a.lock().queue.clear();
        r.publish(message("t/x", QoS::AtLeastOnce));
        assert_eq!(queued(&a), at("t/x", QoS::AtLeastOnce));
        assert_eq!(Metrics::get(&r.metrics.dropped_no_subscriber), 0);
        r.publish(message("v", QoS::AtMostOnce));
        assert_eq!(Metrics::get(&r.metrics.dropped_no_subscriber), 1);
    }

    /// Past 16 matches the de-duplication goes through a map: same rule.
    #[test]
    fn many_subscribers_with_overlapping_filters_get_one_delivery_each() {
        let r = Router::new(limits());
        let sessions: Vec<_> = (0..20).map(|i| online(&format!("c{i}"))).collect();
        for s in &sessions {
            r.subscribe("#", s, QoS::AtMostOnce);
            r.subscribe("t/#", s, QoS::ExactlyOnce);
            r.subscribe("t/x", s, QoS::AtLeastOnce);
        }
        r.publish(message("t/x", QoS::ExactlyOnce));
        for s in &sessions {
            assert_eq!(queued(s), at("t/x", QoS::ExactlyOnce), "{}", s.client_id);
        }
    }

    /// A subscriber the message fills up holds its publisher back; the
    /// publisher's own session never holds itself back.
    #[test]
    fn a_full_subscriber_is_reported_congested_once_and_not_the_publisher() {
        let r = Router::new(QueueLimits {
            max_queued: 1,
            backpressure: true,
            ..limits()
        });
        let (publisher, slow) = (online("p"), online("slow"));
        r.subscribe("t", &publisher, QoS::AtLeastOnce);
        r.subscribe("t", &slow, QoS::AtLeastOnce);
        let mut congested = Vec::new();
        for _ in 0..2 {
            let m = message("t", QoS::AtLeastOnce);
            r.publish_from(m, Some(&publisher), &mut congested, Durability::BestEffort);
        }
        assert_eq!(congested.len(), 1);
        assert!(Arc::ptr_eq(&congested[0], &slow));
        assert!(r.still_congested(&slow));
    }
}
