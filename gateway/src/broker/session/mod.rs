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
