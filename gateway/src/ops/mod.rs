//! Operating the gateway: what an operator looks at to see that it works.
//! One HTTP listener (`[http] listen`) serves Prometheus metrics
//! ([`metrics`]), a status page ([`page`]), the same summary as JSON (which
//! `capteurs-gateway status` prints) and a health check; [`discovery`]
//! announces the sensors to Home Assistant; [`config`] holds `[http]` and
//! `[homeassistant]`. Everything here only reads the
//! stages' own counters and state: nothing on a message's path waits for it.

pub mod config;
pub mod discovery;
pub mod http;
pub mod metrics;
pub mod page;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::broker::router::Metrics;
use crate::broker::BrokerView;
use crate::buffer::{Buffer, BufferStats};
use crate::health::Health;
use crate::plugins::PluginKind;
use crate::plugins::Plugins;
use crate::sources::{registry, SourceStats, Sources};
use crate::upstream::UpstreamStats;

/// The stages, as the operations side sees them.
pub struct Ops {
    pub gateway_id: String,
    pub broker: BrokerView,
    pub buffer: Option<Buffer>,
    pub buffer_max_bytes: u64,
    pub upstream: Option<Arc<UpstreamStats>>,
    pub sources: Option<Arc<Sources>>,
    pub plugins: Option<Arc<Plugins>>,
    pub health: Health,
    pub stale_after: Duration,
    /// Messages/s the cloud acknowledged over the last few seconds (f64 bits).
    drain_rate: AtomicU64,
}

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The summary of the status page, `/status.json` and `capteurs-gateway status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub gateway: String,
    pub version: String,
    pub uptime_secs: u64,
    pub healthy: bool,
    /// Stages whose heartbeat is late, and by how much (s).
    pub stuck: Vec<(String, f64)>,
    pub broker: BrokerStatus,
    pub upstream: Option<UpstreamStatus>,
    pub buffer: Option<BufferStatus>,
    pub sensors: Vec<SensorStatus>,
    /// Sensor input dropped, by `source/reason` (serial/garbage, ble/undecodable, …).
    pub dropped_input: BTreeMap<String, u64>,
    pub plugins: Vec<PluginStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BrokerStatus {
    pub listen: String,
    pub clients: Vec<String>,
    pub sessions: u64,
    pub subscriptions: u64,
    pub retained: u64,
    pub messages_received: u64,
    pub messages_sent: u64,
    pub dropped: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UpstreamStatus {
    pub connected: bool,
    pub connects: u64,
    pub connect_failures: u64,
    pub inflight: u64,
    pub acknowledged: u64,
    pub received: u64,
    pub drain_rate: f64,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BufferStatus {
    pub messages: u64,
    pub bytes: u64,
    pub max_bytes: u64,
    pub oldest_age_secs: Option<f64>,
    pub in_memory: u64,
    pub dropped: BTreeMap<String, u64>,
    pub write_errors: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SensorStatus {
    pub id: String,
    pub source: String,
    /// pays, ville, rue as configured.
    pub place: [String; 3],
    pub silent: bool,
    pub rssi: Option<i16>,
    pub battery: Option<f64>,
    pub readings: Vec<ReadingStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReadingStatus {
    pub grandeur: String,
    pub unit: String,
    pub topic: String,
    pub value: Option<f64>,
    pub age_secs: Option<f64>,
    /// The last hour: (seconds ago, value), oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<(f64, f64)>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PluginStatus {
    pub name: String,
    pub kind: String,
    pub calls: u64,
    pub faults: u64,
    pub restarts: u64,
    pub disabled: bool,
    pub messages_out: u64,
    pub busy_secs: f64,
    /// Why it last faulted.
    #[serde(default)]
    pub last_fault: Option<String>,
}

pub fn kind_name(k: PluginKind) -> &'static str {
    match k {
        PluginKind::Transform => "transform",
        PluginKind::Auth => "auth",
        PluginKind::Decoder => "decoder",
    }
}

/// Serial and BLE input counters by `source/reason`, for drops only.
pub fn dropped_input(s: &SourceStats) -> BTreeMap<String, u64> {
    let get = SourceStats::get;
    [
        ("serial", "garbage", get(&s.garbage)),
        ("serial", "overlong", get(&s.overlong)),
        ("serial", "unparsable", get(&s.unparsable)),
        ("serial", "bad_checksum", get(&s.bad_checksum)),
        ("sensor", "out_of_range", get(&s.out_of_range)),
        ("sensor", "unknown_sensor", get(&s.unknown_sensor)),
        ("sensor", "unexpected_quantity", get(&s.unexpected_quantity)),
        ("ble", "undecodable", get(&s.undecodable)),
        ("ble", "decrypt_failed", get(&s.decrypt_failed)),
        ("ble", "unauthenticated", get(&s.unauthenticated)),
        ("ble", "replayed", get(&s.replayed)),
        ("plugin", "decoder_failed", get(&s.decoder_failed)),
    ]
    .into_iter()
    .map(|(source, reason, n)| (format!("{source}/{reason}"), n))
    .collect()
}

/// The buffer's drops by cause.
pub fn buffer_dropped(b: &BufferStats) -> BTreeMap<String, u64> {
    let get = BufferStats::get;
    [
        ("oldest", get(&b.dropped_oldest)),
        ("newest", get(&b.dropped_newest)),
        ("blocked_qos0", get(&b.dropped_blocked_qos0)),
        ("expired", get(&b.expired)),
        ("unwritable", get(&b.dropped_unwritable)),
    ]
    .into_iter()
    .map(|(k, n)| (k.to_owned(), n))
    .collect()
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Ops {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        gateway_id: String,
        broker: BrokerView,
        buffer: Option<Buffer>,
        buffer_max_bytes: u64,
        upstream: Option<Arc<UpstreamStats>>,
        sources: Option<Arc<Sources>>,
        plugins: Option<Arc<Plugins>>,
        health: Health,
        stale_after: Duration,
    ) -> Ops {
        Ops {
            gateway_id,
            broker,
            buffer,
            buffer_max_bytes,
            upstream,
            sources,
            plugins,
            health,
            stale_after,
            drain_rate: AtomicU64::new(0f64.to_bits()),
        }
    }

    pub fn drain_rate(&self) -> f64 {
        f64::from_bits(self.drain_rate.load(Ordering::Relaxed))
    }

    /// Samples the cloud's acknowledgements every second; the drain rate is
    /// their rate over the last 10 s.
    pub async fn sample_drain_rate(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        let Some(up) = self.upstream.clone() else {
            return;
        };
        let mut samples: std::collections::VecDeque<(Instant, u64)> = Default::default();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let now = Instant::now();
            samples.push_back((now, up.acknowledged.load(Ordering::Relaxed)));
            while samples.len() > 11 {
                samples.pop_front();
            }
            let (t0, n0) = samples[0];
            let secs = now.duration_since(t0).as_secs_f64();
            let rate = if secs > 0.0 {
                (samples.back().map_or(n0, |s| s.1) - n0) as f64 / secs
            } else {
                0.0
            };
            self.drain_rate.store(rate.to_bits(), Ordering::Relaxed);
        }
    }

    /// Receive time of the oldest buffered message, as an age.
    pub async fn oldest_age(&self) -> Option<Duration> {
        let b = self.buffer.as_ref()?;
        // The writer thread answers; a stuck one must not hang a scrape.
        let t = tokio::time::timeout(Duration::from_millis(500), b.oldest())
            .await
            .ok()
            .flatten()?;
        Some(Duration::from_millis((now_ms() - t).max(0) as u64))
    }

    /// Everything the status page shows; `history`: with the last hour of
    /// each reading.
    pub async fn status(&self, history: bool) -> Status {
        let router = self.broker.router();
        let m = &router.metrics;
        let stuck: Vec<(String, f64)> = self
            .health
            .stuck(self.stale_after)
            .into_iter()
            .map(|(n, age)| (n.to_owned(), age.as_secs_f64()))
            .collect();
        let broker = BrokerStatus {
            listen: self.broker.local_addr().to_string(),
            clients: router
                .connected_clients()
                .iter()
                .map(|c| c.to_string())
                .collect(),
            sessions: router.session_count() as u64,
            subscriptions: router.subscription_count() as u64,
            retained: router.retained_count() as u64,
            messages_received: Metrics::get(&m.messages_received),
            messages_sent: Metrics::get(&m.messages_sent),
            dropped: Metrics::get(&m.dropped_queue_full),
        };
        let upstream = self.upstream.as_ref().map(|u| UpstreamStatus {
            connected: u.connected.load(Ordering::Relaxed),
            connects: u.connects.load(Ordering::Relaxed),
            connect_failures: u.connect_failures.load(Ordering::Relaxed),
            inflight: u.inflight.load(Ordering::Relaxed),
            acknowledged: u.acknowledged.load(Ordering::Relaxed),
            received: u.received.load(Ordering::Relaxed),
            drain_rate: self.drain_rate(),
            last_error: u
                .last_error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        });
        let buffer = match &self.buffer {
            Some(b) => {
                let s = b.stats();
                Some(BufferStatus {
                    messages: BufferStats::get(&s.depth),
                    bytes: BufferStats::get(&s.bytes),
                    max_bytes: self.buffer_max_bytes,
                    oldest_age_secs: self.oldest_age().await.map(|d| d.as_secs_f64()),
                    in_memory: BufferStats::get(&s.in_memory),
                    dropped: buffer_dropped(s),
                    write_errors: BufferStats::get(&s.write_errors),
                })
            }
            None => None,
        };
        let plugins = self
            .plugins
            .as_ref()
            .map(|p| {
                p.summary()
                    .into_iter()
                    .map(|(name, kind, s)| PluginStatus {
                        name,
                        kind: kind_name(kind).to_owned(),
                        calls: s.calls.load(Ordering::Relaxed),
                        faults: s.faults.load(Ordering::Relaxed),
                        restarts: s.restarts.load(Ordering::Relaxed),
                        disabled: s.disabled.load(Ordering::Relaxed),
                        messages_out: s.messages_out.load(Ordering::Relaxed),
                        busy_secs: s.busy_ns.load(Ordering::Relaxed) as f64 / 1e9,
                        last_fault: s
                            .last_fault
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .clone(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        Status {
            gateway: self.gateway_id.clone(),
            version: VERSION.to_owned(),
            uptime_secs: self.broker.started().elapsed().as_secs(),
            healthy: stuck.is_empty(),
            stuck,
            broker,
            upstream,
            buffer,
            sensors: self.sensors(history),
            dropped_input: self
                .sources
                .as_ref()
                .map(|s| dropped_input(&s.stats))
                .unwrap_or_default(),
            plugins,
        }
    }

    fn sensors(&self, history: bool) -> Vec<SensorStatus> {
        let Some(sources) = &self.sources else {
            return Vec::new();
        };
        let now = Instant::now();
        sources
            .registry
            .sensors
            .iter()
            .map(|s| {
                let st = s.state.lock().unwrap_or_else(|e| e.into_inner());
                let readings = s
                    .quantities
                    .iter()
                    .map(|q| {
                        let last = st.last.get(&q.grandeur);
                        ReadingStatus {
                            grandeur: q.grandeur.clone(),
                            unit: registry::unit(&q.grandeur).to_owned(),
                            topic: q.topic.clone(),
                            value: last.map(|(v, _)| *v),
                            age_secs: last.map(|(_, at)| now.duration_since(*at).as_secs_f64()),
                            history: if history {
                                st.history
                                    .get(&q.grandeur)
                                    .map(|h| {
                                        h.iter()
                                            .map(|(at, v)| {
                                                (now.duration_since(*at).as_secs_f64(), *v)
                                            })
                                            .collect()
                                    })
                                    .unwrap_or_default()
                            } else {
                                Vec::new()
                            },
                        }
                    })
                    .collect();
                SensorStatus {
                    id: s.id.clone(),
                    source: s.source.to_string(),
                    place: s.place.clone(),
                    silent: st.silent,
                    rssi: st.rssi,
                    battery: st.battery,
                    readings,
                }
            })
            .collect()
    }
}
