//! The broker's shared state: sessions by client id, the subscription tree,
//! retained messages, counters. [`Router::publish`] is the one path every
//! message takes to its subscribers, whether it came from a client, a will
//! or `$SYS`.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use bytestring::ByteString;
use tokio::sync::Notify;
use tracing::{info, warn};

use super::session::{Delivery, Session};
use super::topic;
use super::trie::SubscriptionTree;
use crate::message::{Durability, Message, QoS, Seq};

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

/// Cached receive decisions per session are dropped past this many topics.
const READ_CACHE_MAX: usize = 1024;

/// Retained messages, and how many of them clients made and what those
/// weigh (topic + payload bytes): the broker's own `$SYS` topics are not
/// counted against `max_retained`.
#[derive(Default)]
struct Retained {
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
    fn deliver_checked(
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
                    let d = auth.authorize(&reader, super::auth::Action::Receive, topic)
                        == super::auth::AclDecision::Allow;
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
            tracing::warn!(client_id = %session.client_id, max_queued = self.limits.max_queued,
                "subscriber too slow: its oldest messages are dropped while its queue is full");
        }
    }

    /// Called by a connection after it took messages from its queue.
    pub fn queue_drained(&self, st: &mut super::session::SessionState, len_before: usize) {
        let max = self.limits.max_queued;
        let len = st.queue.len();
        if st.slow && len <= max / 2 {
            st.slow = false;
        }
        if len_before >= max && len < max {
            self.space.notify_waiters();
        }
    }

    /// Records that a persistent session changed (cheap when already dirty).
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

    fn retain(&self, message: &Arc<Message>) {
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
