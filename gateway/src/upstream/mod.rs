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
//!
//! - [`config`]: `[upstream]`, checked into [`UpstreamSettings`]; `url`: server addresses;
//! - `outlet`: the broker's side: which messages go out, into the buffer;
//! - `forwarder`: the connection loop: buffer → cloud, cloud → `in` rules;
//! - `acks`: which packet id carries which buffered row;
//! - `pacing`: the send rate limit and the reconnect back-off;
//! - `rules`: topic rules between the local broker and the cloud.

mod acks;
pub mod config;
mod forwarder;
mod outlet;
mod pacing;
mod rules;
mod url;

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use config::{Direction, UpstreamConfig, UpstreamRule};
pub use outlet::Outlet;
pub use rules::Rules;
pub use url::{ServerUrl, UrlError};

use crate::broker::Publisher;
use crate::buffer::Buffer;
use crate::health::Heartbeat;
use forwarder::Forwarder;

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
