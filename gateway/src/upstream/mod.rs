//! The upstream: forwards what the buffer holds to the cloud broker
//! (rumqttc), brings commands back through `in` rules, and announces the
//! gateway's status.
//!
//! Delivery is at-least-once. A buffered row is deleted only when the cloud
//! acknowledged that very message (PUBACK for QoS 1, PUBCOMP for QoS 2, the
//! write for QoS 0). rumqttc's `publish()` returns no packet id, so the
//! mapping is kept here: every request handed to rumqttc is queued, and its
//! `Outgoing::Publish(pkid)` event — emitted in request order — names its
//! packet id. Each connection gets a fresh rumqttc event loop (rumqttc's own
//! reconnection silently drops its pending requests on a session-present=0
//! CONNACK); after every connect, everything still in the buffer is sent
//! again from the oldest, so a lost acknowledgement or a forgotten session
//! costs a duplicate, never a message.

pub mod config;
mod rules;
mod url;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use rand::Rng;
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, Incoming, LastWill, MqttOptions,
    NetworkOptions, Outgoing, QoS, TlsConfiguration, Transport,
};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use config::{Direction, UpstreamConfig, UpstreamRule};
pub use rules::Rules;
pub use url::{ServerUrl, UrlError};

use crate::broker::{Outbox, Publisher};
use crate::buffer::{Buffer, BufferStats, Row};
use crate::health::{Heartbeat, BEAT_EVERY};
use crate::message::{Message, Origin};

/// The upstream's settings, built from [`UpstreamConfig`].
#[derive(Debug, Clone)]
pub struct UpstreamSettings {
    pub gateway_id: String,
    pub servers: Vec<ServerUrl>,
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<String>,
    /// PEM bytes; None: the system's roots (for `mqtts://`).
    pub ca: Option<Vec<u8>>,
    /// PEM certificate and key for mutual TLS.
    pub client_auth: Option<(Vec<u8>, Vec<u8>)>,
    pub keep_alive: Duration,
    pub clean_session: bool,
    pub connect_timeout: Duration,
    pub status_prefix: String,
    pub stats_interval: Duration,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    pub max_inflight: u16,
    /// Messages per second; 0: no limit.
    pub max_rate: u32,
    pub envelope: bool,
}

/// `<prefix>/gateways/<id>/status`: the gateway's `online` / `offline`.
pub fn status_topic(prefix: &str, gateway_id: &str) -> String {
    format!("{prefix}/gateways/{gateway_id}/status")
}

impl UpstreamSettings {
    pub fn status_topic(&self) -> String {
        status_topic(&self.status_prefix, &self.gateway_id)
    }
    pub fn stats_topic(&self) -> String {
        format!("{}/gateways/{}/stats", self.status_prefix, self.gateway_id)
    }
}

/// The broker's side of the upstream: decides which messages go out and
/// appends them to the buffer.
pub struct Outlet {
    rules: Arc<Rules>,
    buffer: Buffer,
    /// The gateway's status topic: the forwarder publishes it upstream
    /// itself (birth, will); the local copy must not follow it out late.
    status_topic: String,
}

impl Outlet {
    pub fn new(rules: Arc<Rules>, buffer: Buffer, status_topic: String) -> Outlet {
        Outlet {
            rules,
            buffer,
            status_topic,
        }
    }
}

impl Outbox for Outlet {
    fn offer(&self, m: &Arc<Message>, publisher_waits: bool) -> Option<u64> {
        if m.origin == Origin::Upstream {
            return None; // came from the cloud: never sent back (no loops)
        }
        if m.origin == Origin::Broker && m.topic == self.status_topic {
            return None;
        }
        let (remote, qos) = self.rules.outbound(&m.topic)?;
        Some(self.buffer.append(
            remote,
            m.payload.clone(),
            qos,
            m.retain,
            m.received_at,
            publisher_waits,
        ))
    }

    fn settled(&self) -> watch::Receiver<u64> {
        self.buffer.settled()
    }
}

/// Counters of the forwarder.
#[derive(Debug, Default)]
pub struct UpstreamStats {
    pub connected: AtomicBool,
    pub connects: AtomicU64,
    pub connect_failures: AtomicU64,
    /// PUBLISH packets written to the cloud (resends included).
    pub sent: AtomicU64,
    /// Messages the cloud acknowledged (rows deleted).
    pub acknowledged: AtomicU64,
    /// Messages from the cloud published locally (`in` rules).
    pub received: AtomicU64,
    /// Messages from the cloud whose local topic (after the `in` rule) is
    /// not a valid topic name here: too long, too deep, or wildcards.
    pub invalid_topics: AtomicU64,
    /// Buffered messages handed to the cloud and not yet acknowledged.
    pub inflight: AtomicU64,
    /// Why the last connection failed or ended (for operators and tests).
    pub last_error: std::sync::Mutex<Option<String>>,
}

/// A running forwarder.
pub struct UpstreamHandle {
    task: JoinHandle<()>,
    shutdown: CancellationToken,
    stats: Arc<UpstreamStats>,
    heartbeat: Arc<Heartbeat>,
}

impl UpstreamHandle {
    pub fn stats(&self) -> &Arc<UpstreamStats> {
        &self.stats
    }

    /// The forwarder task's liveness, for the watchdog.
    pub fn heartbeat(&self) -> &Arc<Heartbeat> {
        &self.heartbeat
    }

    /// Publishes `offline`, disconnects cleanly (no will) and returns.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }
}

/// Starts the forwarder.
pub fn start(
    settings: UpstreamSettings,
    rules: Arc<Rules>,
    buffer: Buffer,
    local: Publisher,
) -> UpstreamHandle {
    let shutdown = CancellationToken::new();
    let stats = Arc::new(UpstreamStats::default());
    let heartbeat = Heartbeat::new("upstream");
    let f = Forwarder {
        settings,
        rules,
        buffer,
        local,
        shutdown: shutdown.clone(),
        stats: stats.clone(),
        heartbeat: heartbeat.clone(),
    };
    UpstreamHandle {
        task: tokio::spawn(f.run()),
        shutdown,
        stats,
        heartbeat,
    }
}

struct Forwarder {
    settings: UpstreamSettings,
    rules: Arc<Rules>,
    buffer: Buffer,
    local: Publisher,
    shutdown: CancellationToken,
    stats: Arc<UpstreamStats>,
    /// Beaten by every wait of the task, at least every second.
    heartbeat: Arc<Heartbeat>,
}

/// How a connection ended.
enum End {
    Shutdown,
    /// Lost, or never established (`connected` false).
    Lost {
        error: String,
        connected: bool,
    },
}

fn qos(n: u8) -> QoS {
    match n {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Paces sends to `rate` messages per second (token bucket, bursts of a
/// tenth of a second).
struct Pace {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl Pace {
    fn new(rate: u32) -> Pace {
        Pace {
            rate: f64::from(rate),
            tokens: 1.0,
            last: Instant::now(),
        }
    }
    fn limited(&self) -> bool {
        self.rate > 0.0
    }
    fn burst(&self) -> f64 {
        (self.rate / 10.0).max(1.0)
    }
    /// Whole messages that may be sent now.
    fn available(&mut self) -> usize {
        if !self.limited() {
            return usize::MAX;
        }
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate)
            .min(self.burst());
        self.last = now;
        self.tokens.floor() as usize
    }
    fn take(&mut self, n: usize) {
        if self.limited() {
            self.tokens -= n as f64;
        }
    }
    /// When the next message may go.
    fn next(&self) -> Instant {
        let missing = (1.0 - self.tokens).max(0.0);
        self.last + Duration::from_secs_f64(missing / self.rate.max(1e-9))
    }
}

impl Forwarder {
    async fn run(self) {
        let s = &self.settings;
        let mut index = 0usize;
        let mut failures = 0u32;
        loop {
            let server = s.servers[index].clone();
            match self.connection(&server).await {
                End::Shutdown => return,
                End::Lost { error, connected } => {
                    self.stats.connected.store(false, Ordering::Relaxed);
                    self.buffer.set_online(false);
                    *self
                        .stats
                        .last_error
                        .lock()
                        .unwrap_or_else(|e| e.into_inner()) = Some(error.clone());
                    if connected {
                        warn!(server = %server, error = %error, "upstream connection lost");
                        failures = 0;
                    } else {
                        self.stats.connect_failures.fetch_add(1, Ordering::Relaxed);
                        warn!(server = %server, error = %error, "cannot connect upstream");
                        failures = failures.saturating_add(1);
                        // Failover: the next server in the list.
                        index = (index + 1) % s.servers.len();
                    }
                }
            }
            let delay = backoff(s.reconnect_min, s.reconnect_max, failures);
            debug!(delay_ms = delay.as_millis() as u64, "upstream reconnect in");
            let until = tokio::time::Instant::now() + delay;
            let mut beat = tokio::time::interval(BEAT_EVERY);
            loop {
                self.heartbeat.beat();
                tokio::select! {
                    _ = self.shutdown.cancelled() => return,
                    _ = tokio::time::sleep_until(until) => break,
                    _ = beat.tick() => {}
                }
            }
        }
    }

    fn options(&self, server: &ServerUrl) -> MqttOptions {
        let s = &self.settings;
        let mut o = MqttOptions::new(&s.client_id, &server.host, server.port);
        o.set_keep_alive(s.keep_alive)
            .set_clean_session(s.clean_session)
            .set_inflight(s.max_inflight)
            .set_max_packet_size(256 * 1024 * 1024, 256 * 1024 * 1024)
            .set_last_will(LastWill::new(
                s.status_topic(),
                "offline",
                QoS::AtLeastOnce,
                true,
            ));
        if let Some(u) = &s.username {
            o.set_credentials(u, s.password.clone().unwrap_or_default());
        }
        if server.tls {
            let tls = match &s.ca {
                Some(ca) => TlsConfiguration::Simple {
                    ca: ca.clone(),
                    alpn: None,
                    client_auth: s.client_auth.clone(),
                },
                None => TlsConfiguration::default(),
            };
            o.set_transport(Transport::tls_with_config(tls));
        }
        o
    }

    /// One connection, from CONNECT to its end.
    async fn connection(&self, server: &ServerUrl) -> End {
        let s = &self.settings;
        let (client, mut events) =
            AsyncClient::new(self.options(server), usize::from(s.max_inflight) + 64);
        // Without TCP_NODELAY small PUBLISHes wait on the peer's delayed
        // ACK (40 ms a window): the drain crawls at a few thousand msg/s.
        let mut net = NetworkOptions::new();
        net.set_tcp_nodelay(true);
        net.set_connection_timeout(s.connect_timeout.as_secs().max(1));
        events.set_network_options(net);
        let connack = {
            let wait = tokio::time::timeout(s.connect_timeout, first_connack(&mut events));
            tokio::pin!(wait);
            let mut beat = tokio::time::interval(BEAT_EVERY);
            loop {
                self.heartbeat.beat();
                tokio::select! {
                    _ = self.shutdown.cancelled() => return End::Shutdown,
                    r = &mut wait => break r,
                    _ = beat.tick() => {}
                }
            }
        };
        let session_present = match connack {
            Err(_) => {
                return End::Lost {
                    error: format!("no CONNACK within {:?}", s.connect_timeout),
                    connected: false,
                }
            }
            Ok(Err(error)) => {
                return End::Lost {
                    error,
                    connected: false,
                }
            }
            Ok(Ok(present)) => present,
        };
        self.stats.connected.store(true, Ordering::Relaxed);
        self.buffer.set_online(true);
        self.stats.connects.fetch_add(1, Ordering::Relaxed);
        info!(server = %server, session_present, client_id = %s.client_id, "connected upstream");

        // Requests handed to rumqttc, in order: Some((seq, qos)) for buffered
        // rows, None for our own status messages.
        let mut handed: VecDeque<Option<(u64, u8)>> = VecDeque::new();
        // Packet id -> sequence number, for QoS 1/2 rows sent and not acknowledged.
        let mut inflight: HashMap<u16, u64> = HashMap::new();
        let status = s.status_topic();
        if client
            .try_publish(&status, QoS::AtLeastOnce, true, "online")
            .is_ok()
        {
            handed.push_back(None);
        }
        for (filter, q) in self.rules.subscriptions() {
            if let Err(e) = client.try_subscribe(&filter, qos(q)) {
                warn!(filter = %filter, error = %e, "cannot subscribe upstream");
            }
        }
        // Everything still buffered goes (again), oldest first.
        let mut cursor = 0u64;
        let mut exhausted = false;
        let mut ready: VecDeque<Row> = VecDeque::new();
        let mut settled = self.buffer.settled();
        let mut pace = Pace::new(s.max_rate);
        let mut stats_tick = tokio::time::interval(s.stats_interval);
        let mut beat = tokio::time::interval(BEAT_EVERY);
        let window = usize::from(s.max_inflight);
        loop {
            self.heartbeat.beat();
            self.stats
                .inflight
                .store((handed.len() + inflight.len()) as u64, Ordering::Relaxed);
            // Read ahead from the buffer in batches (one round trip to the
            // writer thread per half window, not per acknowledgement) ...
            if !exhausted && ready.len() < window.div_ceil(2) {
                match self.buffer.fetch(cursor, window).await {
                    Ok(rows) => {
                        exhausted = rows.len() < window;
                        if let Some(last) = rows.last() {
                            cursor = last.seq;
                        }
                        ready.extend(rows);
                    }
                    Err(e) => warn!(error = %e, "cannot read the buffer"),
                }
            }
            // ... and hand rows over one by one as the window opens, so a
            // PUBLISH follows each PUBACK at once: a broker that delays its
            // small PUBACKs (Nagle) gets our ACK piggy-backed straight away.
            while handed.len() + inflight.len() < window && pace.available() > 0 {
                let Some(row) = ready.pop_front() else { break };
                let payload = self.payload(&row);
                if let Err(e) = client.try_publish(&row.topic, qos(row.qos), row.retain, payload) {
                    return End::Lost {
                        error: format!("rumqttc request queue: {e}"),
                        connected: true,
                    };
                }
                handed.push_back(Some((row.seq, row.qos)));
                pace.take(1);
            }
            let paced =
                pace.limited() && !ready.is_empty() && handed.len() + inflight.len() < window;
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => {
                    self.goodbye(&client, &mut events).await;
                    return End::Shutdown;
                }
                ev = events.poll() => match ev {
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                        self.stats.sent.fetch_add(1, Ordering::Relaxed);
                        match handed.pop_front() {
                            Some(Some((seq, 0))) => self.acknowledged(seq),
                            Some(Some((seq, _))) => {
                                inflight.insert(pkid, seq);
                            }
                            Some(None) => {}
                            None => warn!(pkid, "rumqttc sent a PUBLISH nobody asked for"),
                        }
                    }
                    Ok(Event::Incoming(Incoming::PubAck(a))) => {
                        if let Some(seq) = inflight.remove(&a.pkid) {
                            self.acknowledged(seq);
                        }
                    }
                    Ok(Event::Incoming(Incoming::PubComp(a))) => {
                        if let Some(seq) = inflight.remove(&a.pkid) {
                            self.acknowledged(seq);
                        }
                    }
                    Ok(Event::Incoming(Incoming::Publish(p))) => self.inbound(p),
                    Ok(Event::Incoming(Incoming::SubAck(a))) => {
                        if a.return_codes.iter().any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure)) {
                            warn!(pkid = a.pkid, "the cloud broker refused an `in` rule's subscription");
                        }
                    }
                    Ok(_) => {}
                    Err(e) => return End::Lost { error: e.to_string(), connected: true },
                },
                _ = settled.changed(), if exhausted => exhausted = false,
                _ = tokio::time::sleep_until(pace.next()), if paced => {}
                _ = beat.tick() => {}
                _ = stats_tick.tick() => {
                    let body = self.stats_json().await;
                    if client.try_publish(s.stats_topic(), QoS::AtMostOnce, true, body).is_ok() {
                        handed.push_back(None);
                    }
                }
            }
        }
    }

    fn acknowledged(&self, seq: u64) {
        self.buffer.ack(seq);
        self.stats.acknowledged.fetch_add(1, Ordering::Relaxed);
    }

    /// A message from the cloud, through an `in` rule, published locally
    /// (marked so it is never sent back out).
    fn inbound(&self, p: rumqttc::Publish) {
        match self.rules.inbound(&p.topic) {
            Some((local, _)) => {
                let published = self.local.publish(Message::new(
                    local,
                    p.payload,
                    p.qos as u8,
                    p.retain,
                    Origin::Upstream,
                ));
                match published {
                    Ok(()) => self.stats.received.fetch_add(1, Ordering::Relaxed),
                    // Logged by the broker (rate-limited); counted here.
                    Err(_) => self.stats.invalid_topics.fetch_add(1, Ordering::Relaxed),
                };
            }
            None => debug!(topic = %p.topic, "message from the cloud matches no `in` rule"),
        }
    }

    /// The row's payload, or its JSON envelope (gateway id and sequence
    /// number for deduplication, receive time, payload as text or base64).
    fn payload(&self, row: &Row) -> Bytes {
        if !self.settings.envelope {
            return row.payload.clone();
        }
        let mut env = serde_json::json!({
            "gateway": self.settings.gateway_id,
            "seq": row.seq,
            "ts": row.ts_ms,
        });
        match std::str::from_utf8(&row.payload) {
            Ok(text) => env["payload"] = text.into(),
            Err(_) => {
                use base64::Engine;
                env["payload_base64"] = base64::engine::general_purpose::STANDARD
                    .encode(&row.payload)
                    .into();
            }
        }
        Bytes::from(env.to_string())
    }

    async fn stats_json(&self) -> String {
        let b = self.buffer.stats();
        let oldest = self.buffer.oldest().await;
        let get = BufferStats::get;
        serde_json::json!({
            "gateway": self.settings.gateway_id,
            "ts": now_ms(),
            "buffer": {
                "messages": get(&b.depth),
                "bytes": get(&b.bytes),
                "oldest_age_ms": oldest.map(|t| (now_ms() - t).max(0)),
                "in_memory": get(&b.in_memory),
                "disk_writes": get(&b.disk_writes),
            },
            "dropped": {
                "oldest": get(&b.dropped_oldest),
                "newest": get(&b.dropped_newest),
                "qos0_blocked": get(&b.dropped_blocked_qos0),
                "expired": get(&b.expired),
                "unwritable": get(&b.dropped_unwritable),
            },
            "forwarded": get(&b.forwarded),
            "write_errors": get(&b.write_errors),
            "received": self.stats.received.load(Ordering::Relaxed),
            "connects": self.stats.connects.load(Ordering::Relaxed),
        })
        .to_string()
    }

    /// Clean stop: `offline` (retained) then DISCONNECT, so no will.
    async fn goodbye(&self, client: &AsyncClient, events: &mut EventLoop) {
        let _ = client.try_publish(
            self.settings.status_topic(),
            QoS::AtLeastOnce,
            true,
            "offline",
        );
        let _ = client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            loop {
                match events.poll().await {
                    Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        info!("upstream disconnected");
    }
}

/// Polls until the CONNACK; Ok(session present) or the reason it failed.
async fn first_connack(events: &mut EventLoop) -> Result<bool, String> {
    loop {
        match events.poll().await {
            Ok(Event::Incoming(Incoming::ConnAck(ack))) => return Ok(ack.session_present),
            Ok(_) => {}
            Err(ConnectionError::ConnectionRefused(code)) => {
                return Err(format!("the cloud broker refused the connection: {code:?}"))
            }
            Err(e) => return Err(describe(&e)),
        }
    }
}

/// Connection errors in words a user can act on.
fn describe(e: &ConnectionError) -> String {
    match e {
        ConnectionError::Tls(t) => {
            format!("TLS: {t} (check upstream.ca_file and the server's certificate)")
        }
        other => other.to_string(),
    }
}

/// Exponential backoff with jitter: half the step fixed, half random, the
/// step doubling from `min` up to `max`.
fn backoff(min: Duration, max: Duration, failures: u32) -> Duration {
    let step = min
        .saturating_mul(1u32.checked_shl(failures.min(20)).unwrap_or(u32::MAX))
        .min(max);
    let half = step / 2;
    half + rand::rng().random_range(Duration::ZERO..=half)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_with_jitter() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(2));
        for f in 0..30 {
            let d = backoff(min, max, f);
            let step = (min * 2u32.pow(f.min(5))).min(max);
            assert!(d >= step / 2 && d <= step, "{f}: {d:?}");
        }
    }

    #[test]
    fn pace_spaces_messages() {
        let mut p = Pace::new(100);
        assert_eq!(p.available(), 1);
        p.take(1);
        assert_eq!(p.available(), 0);
        assert!(p.next() > Instant::now());
        assert!(!Pace::new(0).limited());
    }
}
