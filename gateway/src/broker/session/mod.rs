//! A client's session: its subscriptions, the messages waiting for it, the
//! QoS 1/2 exchanges in flight both ways. It outlives the TCP connection
//! when the client asked for a persistent session (clean session = 0).
//!
//! The router pushes deliveries into [`SessionState::queue`] and wakes the
//! connection task through [`Session::notify`]; the connection task moves
//! them to [`SessionState::outgoing`] as it sends them and removes them on
//! PUBACK/PUBCOMP (the rules of that window are the connection's, see
//! [`Inflight`]). Because the queue and the in-flight window live here
//! rather than in the connection task, a disconnect loses nothing and a
//! resume redelivers the in-flight messages with the same packet ids.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{oneshot, Notify};

mod flow;

use crate::message::{Message, QoS};
pub use flow::Inflight;

/// One message on its way to one client.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Its number in its session, given when it is queued (increasing; 0
    /// before): the key of its row in `broker.sqlite`, so a save writes
    /// only the messages that came or went, not the whole queue again.
    pub id: u64,
    pub message: Arc<Message>,
    /// min(publish QoS, granted QoS).
    pub qos: QoS,
    /// Set only for retained messages sent because of a new subscription.
    pub retain: bool,
}

/// Where an outgoing QoS 1/2 message stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutState {
    /// QoS 1 PUBLISH sent, waiting for PUBACK.
    AwaitPuback,
    /// QoS 2 PUBLISH sent, waiting for PUBREC.
    AwaitPubrec,
    /// PUBREL sent, waiting for PUBCOMP.
    AwaitPubcomp,
}

#[derive(Debug, Clone)]
pub struct Outgoing {
    pub packet_id: u16,
    pub delivery: Delivery,
    pub state: OutState,
}

/// Sent to a connection to make it close.
#[derive(Debug, Clone, Copy)]
pub struct Kick {
    /// Publish the will of the kicked connection (take-over by a clean session).
    pub publish_will: bool,
}

/// The connection currently attached to a session.
pub struct Attached {
    pub conn_id: u64,
    pub kick: oneshot::Sender<Kick>,
    /// Resolves (with an error) when the connection task has detached.
    pub gone: oneshot::Receiver<()>,
}

pub struct SessionState {
    pub clean: bool,
    pub attached: Option<Attached>,
    pub subscriptions: HashMap<String, QoS>,
    pub queue: VecDeque<Delivery>,
    /// The QoS 1/2 messages sent and not yet acknowledged.
    pub outgoing: Inflight,
    /// QoS 2 packet ids received and PUBREC'd, waiting for PUBREL.
    pub incoming_qos2: HashSet<u16>,
    /// Marked by the router when this online client kept publishers waiting
    /// longer than `slow_subscriber_timeout`; cleared once it catches up.
    pub slow: bool,
    /// Who reads through this session, as the read ACL sees it: the owner's
    /// user name and client id, and the peer of the connection attached last.
    pub reader: super::auth::ClientInfo,
    /// Receive decisions by topic (see `Router::deliver`), valid for
    /// `read_cache_generation` of the authenticator's answers.
    pub read_cache: HashMap<bytestring::ByteString, bool>,
    pub read_cache_generation: u64,
    /// When the last connection detached (persistent sessions expire
    /// `broker.session_expiry_secs` after it); None while attached.
    pub detached_at: Option<std::time::SystemTime>,
    /// The user name that created the session: only it may resume or take
    /// over this client id (None: anonymous). `owner_unclaimed`: restored
    /// from a database written before sessions had owners; the first login
    /// to resume it becomes its owner.
    pub owner: Option<Arc<str>>,
    pub owner_unclaimed: bool,
    /// The next [`Delivery::id`] of this session.
    pub next_delivery_id: u64,
}

impl SessionState {
    /// May a client logged in as `username` resume or take over this session?
    pub fn usable_by(&self, username: Option<&str>) -> bool {
        self.owner_unclaimed || self.owner.as_deref() == username
    }

    /// Makes `username` the owner of an unclaimed session.
    pub fn claim(&mut self, username: Option<&str>) {
        if self.owner_unclaimed {
            self.owner_unclaimed = false;
            self.owner = username.map(Arc::from);
            self.reader.username = username.map(str::to_owned);
            self.read_cache.clear();
        }
    }
}

impl SessionState {
    pub fn last_packet_id(&self) -> u16 {
        self.outgoing.last_packet_id()
    }
}

pub struct Session {
    pub client_id: Arc<str>,
    state: Mutex<SessionState>,
    /// Wakes the attached connection when something was queued.
    pub notify: Notify,
    /// Set when the persistent part changed since the last save.
    dirty: AtomicBool,
}

impl Session {
    pub fn new(client_id: Arc<str>, clean: bool, owner: Option<Arc<str>>) -> Self {
        let reader = super::auth::ClientInfo {
            client_id: client_id.to_string(),
            username: owner.as_deref().map(str::to_owned),
            peer: std::net::SocketAddr::from(([0, 0, 0, 0], 0)),
        };
        Session {
            client_id,
            state: Mutex::new(SessionState {
                clean,
                attached: None,
                subscriptions: HashMap::new(),
                queue: VecDeque::new(),
                outgoing: Inflight::default(),
                incoming_qos2: HashSet::new(),
                slow: false,
                reader,
                read_cache: HashMap::new(),
                read_cache_generation: 0,
                detached_at: None,
                owner,
                owner_unclaimed: false,
                next_delivery_id: 1,
            }),
            notify: Notify::new(),
            dirty: AtomicBool::new(false),
        }
    }

    /// Rebuilds a persisted session (offline, clean = false).
    #[allow(clippy::too_many_arguments)]
    pub fn restore(
        client_id: Arc<str>,
        owner: Option<Option<Arc<str>>>,
        detached_at: std::time::SystemTime,
        subscriptions: HashMap<String, QoS>,
        queue: VecDeque<Delivery>,
        outgoing: VecDeque<Outgoing>,
        incoming_qos2: HashSet<u16>,
        last_packet_id: u16,
    ) -> Self {
        let unclaimed = owner.is_none();
        let s = Session::new(client_id, false, owner.flatten());
        {
            let mut st = s.lock();
            st.owner_unclaimed = unclaimed;
            st.detached_at = Some(detached_at);
            st.subscriptions = subscriptions;
            st.next_delivery_id = outgoing
                .iter()
                .map(|o| o.delivery.id)
                .chain(queue.iter().map(|d| d.id))
                .max()
                .unwrap_or(0)
                + 1;
            st.queue = queue;
            st.outgoing = Inflight::restore(outgoing, last_packet_id);
            st.incoming_qos2 = incoming_qos2;
        }
        s
    }

    pub fn lock(&self) -> MutexGuard<'_, SessionState> {
        // A panic while holding a session lock is a bug; the state itself
        // is still consistent enough to keep serving others.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks the session for the next save. Returns true the first time
    /// since the last [`Session::take_dirty`], so the caller can enlist it.
    pub fn mark_dirty(&self) -> bool {
        !self.dirty.swap(true, Ordering::AcqRel)
    }

    pub fn take_dirty(&self) -> bool {
        self.dirty.swap(false, Ordering::AcqRel)
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::message::Origin;

    fn delivery(id: u64, qos: QoS) -> Delivery {
        Delivery {
            id,
            message: Arc::new(Message::new("t", &b"x"[..], qos, false, Origin::Broker)),
            qos,
            retain: false,
        }
    }

    fn sent(packet_id: u16, id: u64) -> Outgoing {
        Outgoing {
            packet_id,
            delivery: delivery(id, QoS::AtLeastOnce),
            state: OutState::AwaitPuback,
        }
    }

    /// A session as a save left it: nothing but what the test gives.
    fn restored(
        owner: Option<Option<Arc<str>>>,
        queue: Vec<Delivery>,
        outgoing: Vec<Outgoing>,
    ) -> Session {
        Session::restore(
            Arc::from("box"),
            owner,
            SystemTime::UNIX_EPOCH,
            HashMap::new(),
            queue.into(),
            outgoing.into(),
            HashSet::new(),
            0,
        )
    }

    #[test]
    fn a_new_session_is_empty_numbers_from_1_and_belongs_to_its_creator() {
        let s = Session::new(Arc::from("box"), true, Some(Arc::from("alice")));
        let st = s.lock();
        assert!(st.clean && st.attached.is_none() && st.detached_at.is_none());
        assert!(st.queue.is_empty() && st.outgoing.is_empty() && !st.slow);
        assert_eq!(st.next_delivery_id, 1, "0 means not queued yet");
        assert_eq!(st.reader.username.as_deref(), Some("alice"));
        assert_eq!(st.reader.client_id, "box");
        assert!(st.usable_by(Some("alice")));
        assert!(!st.usable_by(Some("bob")));
        assert!(!st.usable_by(None), "not by an anonymous client either");
    }

    #[test]
    fn restore_keeps_what_was_saved_and_numbers_after_the_highest_id() {
        let subs = HashMap::from([("a/#".to_owned(), QoS::ExactlyOnce)]);
        let detached = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let s = Session::restore(
            Arc::from("box"),
            Some(None),
            detached,
            subs.clone(),
            vec![delivery(5, QoS::AtLeastOnce), delivery(9, QoS::ExactlyOnce)].into(),
            vec![sent(7, 12), sent(8, 3)].into(),
            HashSet::from([4, 6]),
            8,
        );
        let st = s.lock();
        assert!(!st.clean, "only persistent sessions are saved");
        assert!(st.attached.is_none());
        assert_eq!(st.detached_at, Some(detached));
        assert_eq!(st.subscriptions, subs);
        let queue: Vec<u64> = st.queue.iter().map(|d| d.id).collect();
        assert_eq!(queue, [5, 9]);
        let window: Vec<(u16, u64)> = st
            .outgoing
            .iter()
            .map(|o| (o.packet_id, o.delivery.id))
            .collect();
        assert_eq!(window, [(7, 12), (8, 3)]);
        assert_eq!(st.last_packet_id(), 8, "packet ids go on where they were");
        assert_eq!(st.incoming_qos2, HashSet::from([4, 6]));
        assert_eq!(st.next_delivery_id, 13, "after the in-flight 12");
        drop(st);

        // The highest id may be queued, or there may be none.
        let s = restored(
            Some(None),
            vec![delivery(20, QoS::AtLeastOnce)],
            vec![sent(1, 4)],
        );
        assert_eq!(s.lock().next_delivery_id, 21);
        assert_eq!(
            restored(Some(None), vec![], vec![]).lock().next_delivery_id,
            1
        );
    }

    #[test]
    fn an_anonymous_owner_is_kept_and_only_anonymous_clients_resume() {
        let s = restored(Some(None), vec![], vec![]);
        let mut st = s.lock();
        assert!(!st.owner_unclaimed);
        assert!(st.usable_by(None));
        assert!(!st.usable_by(Some("mallory")));
        st.claim(Some("mallory"));
        assert!(
            !st.usable_by(Some("mallory")),
            "a claimed session stays its owner's"
        );
    }

    /// A session saved before sessions had owners: the first login to
    /// resume it becomes its owner, and reads as that user from then on.
    #[test]
    fn an_unclaimed_session_goes_to_its_first_login() {
        let s = restored(None, vec![], vec![]);
        let mut st = s.lock();
        assert!(st.owner_unclaimed);
        assert!(st.usable_by(Some("bob")) && st.usable_by(None));
        st.read_cache.insert("t".into(), false);
        st.claim(Some("bob"));
        assert!(!st.owner_unclaimed);
        assert_eq!(st.owner.as_deref(), Some("bob"));
        assert_eq!(st.reader.username.as_deref(), Some("bob"));
        assert!(st.read_cache.is_empty(), "decided for another reader");
        assert!(st.usable_by(Some("bob")));
        assert!(!st.usable_by(Some("eve")) && !st.usable_by(None));
        st.claim(Some("eve"));
        assert_eq!(st.owner.as_deref(), Some("bob"), "claimed once");
    }

    #[test]
    fn mark_dirty_answers_true_once_until_the_saver_takes_it() {
        let s = Session::new(Arc::from("box"), false, None);
        assert!(!s.take_dirty(), "a new session has nothing to save yet");
        assert!(s.mark_dirty(), "first change: enlist it");
        assert!(!s.mark_dirty(), "already enlisted");
        assert!(s.take_dirty());
        assert!(!s.take_dirty());
        assert!(s.mark_dirty(), "changed again after the save");
    }
}
