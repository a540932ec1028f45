//! The forwarder: one task that keeps a connection to the cloud (failing
//! over between servers, backing off), drains the buffer into it within
//! the in-flight window and the rate limit, deletes each row when the cloud
//! acknowledged it, and publishes what `in` rules bring back locally.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, Incoming, LastWill, MqttOptions,
    NetworkOptions, Outgoing, QoS as MqttQoS, TlsConfiguration, Transport,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::acks::{Acks, Sent};
use super::pacing::{backoff, Pace};
use super::{Rules, ServerUrl, UpstreamSettings, UpstreamStats};
use crate::broker::Publisher;
use crate::buffer::{Buffer, BufferStats, Row};
use crate::health::{Heartbeat, BEAT_EVERY};
use crate::message::{Message, Origin, QoS, Seq};

pub(super) struct Forwarder {
    pub(super) settings: UpstreamSettings,
    pub(super) rules: Arc<Rules>,
    pub(super) buffer: Buffer,
    pub(super) local: Publisher,
    pub(super) shutdown: CancellationToken,
    pub(super) stats: Arc<UpstreamStats>,
    /// Beaten by every wait of the task, at least every second.
    pub(super) heartbeat: Arc<Heartbeat>,
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

fn qos(q: QoS) -> MqttQoS {
    match q {
        QoS::AtMostOnce => MqttQoS::AtMostOnce,
        QoS::AtLeastOnce => MqttQoS::AtLeastOnce,
        QoS::ExactlyOnce => MqttQoS::ExactlyOnce,
    }
}

fn ours(q: MqttQoS) -> QoS {
    match q {
        MqttQoS::AtMostOnce => QoS::AtMostOnce,
        MqttQoS::AtLeastOnce => QoS::AtLeastOnce,
        MqttQoS::ExactlyOnce => QoS::ExactlyOnce,
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Forwarder {
    pub(super) async fn run(self) {
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
                MqttQoS::AtLeastOnce,
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

        let mut acks = Acks::default();
        let status = s.status_topic();
        if client
            .try_publish(&status, MqttQoS::AtLeastOnce, true, "online")
            .is_ok()
        {
            acks.handed_own();
        }
        for (filter, q) in self.rules.subscriptions() {
            if let Err(e) = client.try_subscribe(&filter, qos(q)) {
                warn!(filter = %filter, error = %e, "cannot subscribe upstream");
            }
        }
        // Everything still buffered goes (again), oldest first.
        let mut cursor = Seq(0);
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
                .store(acks.len() as u64, Ordering::Relaxed);
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
            while acks.len() < window && pace.available() > 0 {
                let Some(row) = ready.pop_front() else { break };
                let payload = self.payload(&row);
                if let Err(e) =
                    client.try_publish(row.topic.to_string(), qos(row.qos), row.retain, payload)
                {
                    return End::Lost {
                        error: format!("rumqttc request queue: {e}"),
                        connected: true,
                    };
                }
                acks.handed_row(row.seq, row.qos);
                pace.take(1);
            }
            let paced = pace.limited() && !ready.is_empty() && acks.len() < window;
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => {
                    self.goodbye(&client, &mut events).await;
                    return End::Shutdown;
                }
                ev = events.poll() => match ev {
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                        self.stats.sent.fetch_add(1, Ordering::Relaxed);
                        match acks.sent(pkid) {
                            Sent::Settled(seq) => self.acknowledged(seq),
                            Sent::InFlight | Sent::Own => {}
                            Sent::Unasked => warn!(pkid, "rumqttc sent a PUBLISH nobody asked for"),
                        }
                    }
                    Ok(Event::Incoming(Incoming::PubAck(a))) => {
                        if let Some(seq) = acks.acked(a.pkid) {
                            self.acknowledged(seq);
                        }
                    }
                    Ok(Event::Incoming(Incoming::PubComp(a))) => {
                        if let Some(seq) = acks.acked(a.pkid) {
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
                    if client.try_publish(s.stats_topic(), MqttQoS::AtMostOnce, true, body).is_ok() {
                        acks.handed_own();
                    }
                }
            }
        }
    }

    fn acknowledged(&self, seq: Seq) {
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
                    ours(p.qos),
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
            "seq": row.seq.0,
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
            MqttQoS::AtLeastOnce,
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
