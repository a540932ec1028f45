//! The embedded MQTT 3.1/3.1.1 broker.
//!
//! # Layout
//! - [`config`]: `[broker]` of the configuration, checked into [`BrokerSettings`].
//! - [`codec`]: framing and packet checks on top of `rmqtt-codec`.
//! - [`topic`], [`trie`]: topic names, filters, and the subscription tree.
//! - [`session`]: per-client state that outlives a connection.
//! - [`router`]: sessions, subscriptions, retained messages; routes every message.
//! - `connection`: one task per client connection.
//! - [`auth`]: password file, ACL, and the trait auth plugins implement.
//! - [`store`]: SQLite persistence of sessions and retained messages.
//! - `sys`: the `$SYS/broker/...` topics.
//!
//! [`Broker::start`] binds, restores what was saved, and returns a
//! [`BrokerHandle`] with the bound address; [`BrokerHandle::shutdown`] stops
//! accepting, closes connections, and saves sessions before returning.

pub mod auth;
pub mod codec;
pub mod config;
mod connection;
pub mod router;
pub mod session;
pub mod store;
mod sys;
pub mod topic;
pub mod trie;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use thiserror::Error;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::message::{Durability, Message, Seq};
use auth::Authenticator;
pub use config::BrokerConfig;
use router::{Metrics, QueueLimits, Router};
use store::{Batch, Store};

#[derive(Debug, Error)]
pub enum BrokerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Auth(#[from] auth::AuthError),
}

/// Runtime settings of the broker, built from [`BrokerConfig`].
#[derive(Debug, Clone)]
pub struct BrokerSettings {
    pub listen: SocketAddr,
    pub max_packet_size: u32,
    pub max_connections: usize,
    pub max_inflight: u16,
    pub max_queued: usize,
    pub queue_qos0_offline: bool,
    /// How long publishers wait for a slow online subscriber (see
    /// `broker.slow_subscriber_timeout_ms`).
    pub slow_subscriber_timeout: Duration,
    pub connect_timeout: Duration,
    /// A socket write that makes no progress for this long closes the
    /// connection (a client that stopped reading).
    pub write_timeout: Duration,
    /// Topic names and filters with more levels are refused.
    pub max_topic_levels: usize,
    /// Subscriptions one session may hold; SUBACK 0x80 beyond.
    pub max_subscriptions_per_client: usize,
    /// Retained messages kept, by count and by topic + payload bytes; a new
    /// retained topic beyond either is routed but not retained (counted).
    pub max_retained: usize,
    pub max_retained_bytes: usize,
    /// Sessions kept (online, and persistent ones offline); a CONNECT that
    /// would create one more gets CONNACK 3 "server unavailable".
    pub max_sessions: usize,
    /// An offline persistent session is discarded after this long (zero:
    /// never), like mosquitto's `persistent_client_expiration`.
    pub session_expiry: Duration,
    /// Failed logins from one address before its CONNECTs wait, and the
    /// longest wait (doubled per failure from 200 ms; zero: no waiting).
    pub login_free_failures: u32,
    pub login_backoff_max: Duration,
    pub sys_interval: Duration,
    pub persist_interval: Duration,
    /// None: sessions and retained messages live in memory only.
    pub data_dir: Option<PathBuf>,
}

/// State shared by every connection task.
pub(crate) struct Shared {
    pub router: Router,
    pub auth: Arc<dyn Authenticator>,
    pub settings: BrokerSettings,
    pub shutdown: CancellationToken,
    pub started: Instant,
    /// Beaten by the housekeeping loop through the router's locks.
    pub heartbeat: Arc<crate::health::Heartbeat>,
    /// Failed logins by address: repeated ones are slowed down.
    pub login_backoff: auth::backoff::LoginBackoff,
    /// Logins checked at once (PBKDF2 and auth plugins are CPU work): half
    /// the cores, at least one, so a stream of CONNECTs with valid
    /// passwords cannot take every core from the clients being served.
    pub login_slots: tokio::sync::Semaphore,
}

pub struct Broker;

/// Publishes into a running broker (see [`BrokerHandle::publisher`]).
#[derive(Clone)]
pub struct Publisher {
    shared: Arc<Shared>,
}

impl Publisher {
    /// Routes a message made inside the gateway (sources, the cloud's `in`
    /// rules, discovery). Its topic gets the checks a client's PUBLISH gets
    /// (a name, at most 65,535 bytes, at most `max_topic_levels` levels);
    /// an invalid one is refused, counted, and not routed.
    pub fn publish(&self, message: Message) -> Result<(), topic::TopicError> {
        if let Err(e) =
            topic::validate_name_within(&message.topic, self.shared.settings.max_topic_levels)
        {
            let m = &self.shared.router.metrics;
            if router::worth_logging(&m.invalid_local_topics) {
                warn!(origin = ?message.origin, error = %e, topic_bytes = message.topic.len(),
                    "message refused: invalid topic");
            }
            return Err(e);
        }
        self.shared.router.publish(message);
        Ok(())
    }
}

/// Takes messages out of the broker durably: the upstream's store-and-forward
/// buffer. The broker offers it every routed message; a client's QoS 1/2
/// PUBLISH is acknowledged only once its copy is settled.
pub trait Outbox: Send + Sync {
    /// Offers a message. `Some(seq)`: taken; the publisher's acknowledgement
    /// waits until [`Outbox::settled`] reaches `seq`. `None`: not bound
    /// upstream.
    fn offer(&self, message: &Arc<Message>, durability: Durability) -> Option<Seq>;
    /// Every offered message up to this sequence number is settled: stored
    /// durably, or dropped by the configured policy (and counted).
    fn settled(&self) -> tokio::sync::watch::Receiver<Seq>;
}

/// Transforms messages before they are routed (the WASM transform chain):
/// zero, one or many messages out for one in.
pub trait Transform: Send + Sync {
    fn apply(&self, message: Message) -> Vec<Message>;

    /// Messages of one publisher, in order (what the broker read from one
    /// client at once): their outputs, in order.
    fn apply_batch(&self, messages: Vec<Message>) -> Vec<Message> {
        messages.into_iter().flat_map(|m| self.apply(m)).collect()
    }
}

/// What the operations side reads from a running broker; clones share it.
#[derive(Clone)]
pub struct BrokerView {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
}

impl BrokerView {
    /// Sessions, subscriptions, retained messages and the counters.
    pub fn router(&self) -> &Router {
        &self.shared.router
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn started(&self) -> Instant {
        self.shared.started
    }

    /// The broker's liveness, for the watchdog.
    pub fn heartbeat(&self) -> &Arc<crate::health::Heartbeat> {
        &self.shared.heartbeat
    }
}

/// A running broker.
pub struct BrokerHandle {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    tracker: TaskTracker,
    store: Option<Arc<Mutex<Store>>>,
}

impl Broker {
    /// Binds the listener, restores saved state and starts serving.
    pub async fn start(
        settings: BrokerSettings,
        auth: Arc<dyn Authenticator>,
    ) -> Result<BrokerHandle, BrokerError> {
        Self::start_with_outbox(settings, auth, None).await
    }

    /// [`Broker::start`] with an outbox (the upstream buffer) that gets a
    /// copy of every routed message.
    pub async fn start_with_outbox(
        settings: BrokerSettings,
        auth: Arc<dyn Authenticator>,
        outbox: Option<Arc<dyn Outbox>>,
    ) -> Result<BrokerHandle, BrokerError> {
        Self::start_with(settings, auth, outbox, None).await
    }

    /// [`Broker::start_with_outbox`] with a transform chain run on every
    /// message before it is routed.
    pub async fn start_with(
        settings: BrokerSettings,
        auth: Arc<dyn Authenticator>,
        outbox: Option<Arc<dyn Outbox>>,
        transform: Option<Arc<dyn Transform>>,
    ) -> Result<BrokerHandle, BrokerError> {
        let listener =
            TcpListener::bind(settings.listen)
                .await
                .map_err(|source| BrokerError::Bind {
                    addr: settings.listen,
                    source,
                })?;
        let local_addr = listener.local_addr().map_err(|source| BrokerError::Bind {
            addr: settings.listen,
            source,
        })?;
        let mut router = Router::new(QueueLimits {
            max_queued: settings.max_queued,
            queue_qos0_offline: settings.queue_qos0_offline,
            backpressure: !settings.slow_subscriber_timeout.is_zero(),
            max_retained: settings.max_retained,
            max_retained_bytes: settings.max_retained_bytes,
        });
        router.read_auth = auth.checks_receive().then(|| auth.clone());
        router.outbox = outbox;
        router.transform = transform;
        let store = match &settings.data_dir {
            Some(dir) => {
                let (store, retained, sessions, recovered) = Store::open_or_recover(dir)?;
                if recovered {
                    Metrics::inc(&router.metrics.store_recovered);
                }
                info!(retained = retained.len(), sessions = sessions.len(), path = %dir.display(), "restored broker state");
                router.restore_retained(retained);
                let mut map = router.sessions.lock().unwrap_or_else(|e| e.into_inner());
                for s in sessions {
                    let s = Arc::new(s);
                    if expired(&s, settings.session_expiry, std::time::SystemTime::now()) {
                        Metrics::inc(&router.metrics.sessions_expired);
                        info!(client_id = %s.client_id, "persistent session expired while the broker was stopped (broker.session_expiry_secs)");
                        router.mark_session_id(&s.client_id);
                        continue;
                    }
                    let subs: Vec<(String, crate::message::QoS)> = s
                        .lock()
                        .subscriptions
                        .iter()
                        .map(|(f, q)| (f.clone(), *q))
                        .collect();
                    for (f, q) in subs {
                        router.subscribe(&f, &s, q);
                    }
                    map.insert(s.client_id.clone(), s);
                }
                drop(map);
                Some(Arc::new(Mutex::new(store)))
            }
            None => None,
        };
        let login_backoff = auth::backoff::LoginBackoff::new(
            settings.login_free_failures,
            settings.login_backoff_max,
        );
        let shared = Arc::new(Shared {
            router,
            auth,
            settings,
            shutdown: CancellationToken::new(),
            started: Instant::now(),
            heartbeat: crate::health::Heartbeat::new("broker"),
            login_backoff,
            login_slots: tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1)),
            ),
        });
        let tracker = TaskTracker::new();
        tracker.spawn(accept_loop(listener, shared.clone(), tracker.clone()));
        tracker.spawn(sys::run(shared.clone()));
        tracker.spawn(expiry_loop(shared.clone()));
        if let Some(store) = &store {
            tracker.spawn(save_loop(shared.clone(), store.clone()));
        }
        info!(addr = %local_addr, "MQTT broker listening");
        Ok(BrokerHandle {
            shared,
            local_addr,
            tracker,
            store,
        })
    }
}

impl BrokerHandle {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn metrics(&self) -> &Metrics {
        &self.shared.router.metrics
    }

    /// A read-only view for the operations side (metrics, status page).
    pub fn view(&self) -> BrokerView {
        BrokerView {
            shared: self.shared.clone(),
            local_addr: self.local_addr,
        }
    }

    /// Publishes a message as the broker (sources and tests use this).
    pub fn publish(&self, message: Message) {
        self.shared.router.publish(message);
    }

    /// A cheap handle other stages (sources, the upstream) publish with.
    pub fn publisher(&self) -> Publisher {
        Publisher {
            shared: self.shared.clone(),
        }
    }

    /// Stops accepting, closes every connection (no wills), saves sessions
    /// and retained messages, and returns when all is done.
    pub async fn shutdown(self) {
        self.shared.shutdown.cancel();
        self.tracker.close();
        self.tracker.wait().await;
        if let Some(store) = self.store {
            if let Some(lost) = save_now(&self.shared, &store).await {
                // Nothing runs after this save: say exactly what the next
                // start will not find.
                error!(
                    sessions = lost.sessions,
                    session_removals = lost.deletions,
                    queued_messages = lost.messages,
                    retained_changes = lost.retained,
                    "final save failed (disk full?): these changes to persistent sessions and retained messages are lost"
                );
            }
        }
        info!("MQTT broker stopped");
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, tracker: TaskTracker) {
    let open = Arc::new(AtomicUsize::new(0));
    loop {
        let accepted = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Typically EMFILE: back off instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if open.load(Ordering::Relaxed) >= shared.settings.max_connections {
            Metrics::inc(&shared.router.metrics.connections_over_limit);
            warn!(%peer, max_connections = shared.settings.max_connections, "connection refused: max_connections reached");
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        open.fetch_add(1, Ordering::Relaxed);
        let shared = shared.clone();
        let open = open.clone();
        tracker.spawn(async move {
            connection::serve(stream, peer, shared).await;
            open.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// Has this offline persistent session outlived `broker.session_expiry_secs`?
fn expired(session: &session::Session, expiry: Duration, now: std::time::SystemTime) -> bool {
    if expiry.is_zero() {
        return false;
    }
    let st = session.lock();
    !st.clean
        && st.attached.is_none()
        && st
            .detached_at
            .is_some_and(|t| now.duration_since(t).unwrap_or_default() >= expiry)
}

/// Discards offline persistent sessions past their expiry, checking at a
/// tenth of the expiry (at least every second, at most every minute).
async fn expiry_loop(shared: Arc<Shared>) {
    let expiry = shared.settings.session_expiry;
    if expiry.is_zero() {
        return;
    }
    let every = (expiry / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let router = &shared.router;
        let now = std::time::SystemTime::now();
        for s in router.all_sessions() {
            if expired(&s, expiry, now) {
                Metrics::inc(&router.metrics.sessions_expired);
                info!(client_id = %s.client_id, expiry_secs = expiry.as_secs(),
                    "persistent session expired: discarded with its subscriptions and queued messages");
                router.remove_session(&s);
            }
        }
    }
}

async fn save_loop(shared: Arc<Shared>, store: Arc<Mutex<Store>>) {
    let mut tick = tokio::time::interval(shared.settings.persist_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = tick.tick() => {
                save_now(&shared, &store).await;
            }
        }
    }
}

/// What a failed save did not write.
struct Unsaved {
    /// Persistent sessions whose changes were not written.
    sessions: usize,
    /// Sessions whose removal was not written (a persistent one comes
    /// back at the next start).
    deletions: usize,
    messages: usize,
    retained: usize,
}

/// Saves what changed; on failure, gives it back for the next save and
/// returns what was not written.
async fn save_now(shared: &Arc<Shared>, store: &Arc<Mutex<Store>>) -> Option<Unsaved> {
    let batch = Batch::collect(&shared.router);
    if batch.is_empty() {
        return None;
    }
    let store = store.clone();
    let result = tokio::task::spawn_blocking(move || {
        let mut s = store.lock().unwrap_or_else(|e| e.into_inner());
        let r = s.save(&batch);
        (batch, r)
    })
    .await;
    match result {
        Ok((_, Ok(()))) => None,
        Ok((batch, Err(e))) => {
            Metrics::inc(&shared.router.metrics.persist_failures);
            error!(error = %e, "saving sessions and retained messages failed; will retry");
            let unsaved = Unsaved {
                sessions: batch.sessions.iter().filter(|(_, s)| s.is_some()).count(),
                deletions: batch.sessions.iter().filter(|(_, s)| s.is_none()).count(),
                messages: batch
                    .sessions
                    .iter()
                    .filter_map(|(_, s)| s.as_ref())
                    .map(|s| s.queue.len() + s.outgoing.len())
                    .sum(),
                retained: batch.retained.len(),
            };
            batch.give_back(&shared.router);
            Some(unsaved)
        }
        Err(e) => {
            error!(error = %e, "session saver task failed");
            None
        }
    }
}
