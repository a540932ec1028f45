//! Sensor sources: devices that cannot speak MQTT, turned into messages on
//! `capteurs/<grandeur>/<pays>/<ville>/<rue>` on the gateway's own broker
//! (and from there, through the upstream rules, to the cloud).
//!
//! - [`serial`]: serial ports (USB/UART boards), one task per port, lines
//!   in the formats of [`serial::lines`];
//! - [`ble`]: BLE advertisements (BlueZ, or recorded frames), decoded;
//! - [`registry`]: the `[[sensors]]` table: which device is which sensor,
//!   where it is, what it measures, and how its messages look;
//! - [`place`]: place names to topic levels;
//! - [`config`]: `[sources]`, `[[sensors]]`, `[[serial]]`, `[ble]` as written;
//! - [`plan`]: those tables checked into the registry and the inputs' settings.
//!
//! Every source hands its readings to [`Sources`], which checks them
//! (registry, quantity, physical bounds, duplicates), counts what it drops
//! and why, and publishes the rest as [`Message`]s.

pub mod ble;
pub mod config;
pub mod place;
pub mod plan;
pub mod registry;
pub mod serial;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytestring::ByteString;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::broker::Publisher;
use crate::message::{Message, Origin, QoS};
pub use plan::{SourcesInput, SourcesPlan};
pub use registry::{Registry, SourceKey};

/// One measurement from a device, before the registry turns it into a
/// message.
#[derive(Debug, Clone)]
pub struct Reading {
    pub grandeur: String,
    pub value: f64,
    pub rssi: Option<i16>,
    pub battery: Option<f64>,
    pub at: SystemTime,
}

/// Counters of everything the sources saw, published and dropped (by cause).
#[derive(Debug, Default)]
pub struct SourceStats {
    pub lines: AtomicU64,
    pub adverts: AtomicU64,
    pub published: AtomicU64,
    /// Non-UTF-8 bytes where a line was expected.
    pub garbage: AtomicU64,
    /// Lines longer than the port's max_line_bytes.
    pub overlong: AtomicU64,
    /// Lines that are not readings (not a number, bad JSON, missing key...).
    pub unparsable: AtomicU64,
    pub bad_checksum: AtomicU64,
    /// Values outside the physical bounds of their quantity.
    pub out_of_range: AtomicU64,
    /// From a device or id the registry does not list.
    pub unknown_sensor: AtomicU64,
    /// A quantity the sensor's `grandeurs` do not list.
    pub unexpected_quantity: AtomicU64,
    /// Repeated adverts and readings within min_interval/change_threshold.
    pub collapsed: AtomicU64,
    /// Adverts of a known format that do not decode.
    pub undecodable: AtomicU64,
    /// Encrypted adverts without a key, or that the key does not open.
    pub decrypt_failed: AtomicU64,
    /// Adverts for a sensor with a key that are not encrypted BTHome from
    /// its own address (plaintext, another format, another advertiser
    /// naming it), and encrypted ones whose counter did not increase.
    pub unauthenticated: AtomicU64,
    pub replayed: AtomicU64,
    /// Lines or adverts a decoder plugin failed on (or is missing).
    pub decoder_failed: AtomicU64,
    /// Times a serial port (or replay input) was opened.
    pub port_opens: AtomicU64,
    pub port_errors: AtomicU64,
}

impl SourceStats {
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    fn add(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters by name, for the `$SYS` JSON and logs.
    pub fn to_json(&self) -> serde_json::Value {
        let g = Self::get;
        serde_json::json!({
            "lines": g(&self.lines),
            "adverts": g(&self.adverts),
            "published": g(&self.published),
            "dropped": {
                "garbage": g(&self.garbage),
                "overlong": g(&self.overlong),
                "unparsable": g(&self.unparsable),
                "bad_checksum": g(&self.bad_checksum),
                "out_of_range": g(&self.out_of_range),
                "unknown_sensor": g(&self.unknown_sensor),
                "unexpected_quantity": g(&self.unexpected_quantity),
                "collapsed": g(&self.collapsed),
                "undecodable": g(&self.undecodable),
                "decrypt_failed": g(&self.decrypt_failed),
                "unauthenticated": g(&self.unauthenticated),
                "replayed": g(&self.replayed),
                "decoder_failed": g(&self.decoder_failed),
            },
            "port_opens": g(&self.port_opens),
            "port_errors": g(&self.port_errors),
        })
    }
}

/// A log line per (place, cause) at most once per interval; the others are
/// counted and the count given with the next line.
pub struct RateLimitedLog {
    interval: Duration,
    last: Mutex<HashMap<String, (Instant, u64)>>,
}

impl RateLimitedLog {
    pub fn new(interval: Duration) -> Self {
        RateLimitedLog {
            interval,
            last: Mutex::new(HashMap::new()),
        }
    }

    /// Calls `log(suppressed)` unless this key logged less than an
    /// interval ago.
    pub fn log(&self, key: &str, log: impl FnOnce(u64)) {
        let mut m = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        match m.get_mut(key) {
            Some((at, n)) if now.duration_since(*at) < self.interval => *n += 1,
            Some((at, n)) => {
                let suppressed = std::mem::take(n);
                *at = now;
                log(suppressed);
            }
            None => {
                m.insert(key.to_owned(), (now, 0));
                log(0);
            }
        }
    }
}

/// A frame counter against the last one accepted, as serial numbers.
pub fn freshness(last: Option<u32>, counter: u32) -> Freshness {
    match last.map(|l| counter.wrapping_sub(l)) {
        None => Freshness::New,
        Some(0) => Freshness::Repeat,
        Some(d) if d < 1 << 31 => Freshness::New,
        Some(_) => Freshness::Replayed,
    }
}

#[cfg(test)]
#[test]
fn counters_are_serial_numbers() {
    use Freshness::*;
    assert_eq!(freshness(None, 0), New);
    assert_eq!(freshness(Some(5), 6), New);
    assert_eq!(freshness(Some(5), 5), Repeat);
    assert_eq!(freshness(Some(5), 4), Replayed);
    assert_eq!(freshness(Some(u32::MAX), 0), New, "wrap");
    assert_eq!(freshness(Some(u32::MAX - 1), 3), New, "wrap");
    assert_eq!(
        freshness(Some(3), u32::MAX),
        Replayed,
        "from before the wrap"
    );
    assert_eq!(
        freshness(Some(0), 1 << 31),
        Replayed,
        "half the circle away"
    );
}

/// What [`Sources::fresh_counter`] makes of an encrypted frame's counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    New,
    Repeat,
    Replayed,
}

/// What identifies an advert among its repeats.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// The device's frame or packet counter.
    Counter(u32),
    /// The advert's data, for formats without a counter.
    Bytes(Vec<u8>),
}

/// Identical counter-less adverts within this window are one frame.
pub const REPEAT_WINDOW: Duration = Duration::from_secs(10);

/// Where readings go: the registry's checks, the counters, the broker.
pub struct Sources {
    pub registry: Registry,
    pub stats: Arc<SourceStats>,
    pub log: RateLimitedLog,
    publisher: Publisher,
    /// Unknown devices already reported (once each).
    reported: Mutex<HashSet<String>>,
    /// Where decoder plugins are found (by name, current version).
    plugins: Option<Arc<crate::plugins::Plugins>>,
    /// `[ble] decoder`: the plugin for adverts no built-in format claims.
    pub ble_decoder: Option<String>,
}

impl Sources {
    pub fn new(registry: Registry, publisher: Publisher, log_interval: Duration) -> Self {
        Sources {
            registry,
            stats: Arc::new(SourceStats::default()),
            log: RateLimitedLog::new(log_interval),
            publisher,
            reported: Mutex::new(HashSet::new()),
            plugins: None,
            ble_decoder: None,
        }
    }

    /// Decoder plugins come from here; `ble_decoder` reads unknown adverts.
    pub fn with_plugins(
        mut self,
        plugins: Option<Arc<crate::plugins::Plugins>>,
        ble_decoder: Option<String>,
    ) -> Self {
        self.plugins = plugins;
        self.ble_decoder = ble_decoder;
        self
    }

    /// Runs the decoder plugin `name` on `data`.
    pub fn decode(
        &self,
        name: &str,
        source: &str,
        data: &[u8],
    ) -> Result<Vec<crate::plugins::decoder::Decoded>, String> {
        let decoder = self
            .plugins
            .as_ref()
            .and_then(|p| p.decoder(name))
            .ok_or_else(|| format!("no decoder plugin {name:?} loaded"))?;
        decoder.decode(source, data)
    }

    /// A device the registry does not list: logged and published on the
    /// discovery topic once, never under a made-up place.
    pub fn unknown(&self, kind: &str, id: &str, detail: serde_json::Value) {
        SourceStats::add(&self.stats.unknown_sensor);
        let key = format!("{kind}/{id}");
        let first = self
            .reported
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.clone());
        if !first {
            return;
        }
        warn!(kind, id, %detail, "unknown sensor: not in [[sensors]], its readings are dropped");
        let topic = format!(
            "{}/{kind}/{}",
            self.registry.discovery_prefix,
            registry::id_level(id)
        );
        let body = serde_json::json!({ "kind": kind, "id": id, "seen": detail });
        // Topics made from the checked config; a refusal is counted by the broker.
        let _ = self.publisher.publish(Message::new(
            topic,
            body.to_string(),
            QoS::AtMostOnce,
            false,
            Origin::Sensor(ByteString::from(format!("{kind}:{id}"))),
        ));
    }

    /// Counts a dropped line or advert under `cause` and logs it (rate
    /// limited per source and cause).
    pub fn dropped(&self, counter: &AtomicU64, source: &str, cause: &str, detail: &str) {
        SourceStats::add(counter);
        self.log.log(&format!("{source}/{cause}"), |suppressed| {
            warn!(source, cause, detail, suppressed, "sensor input dropped");
        });
    }

    /// One reading of the sensor at `index` in the registry: checked,
    /// deduplicated and published. `frame`: the device's frame counter.
    pub fn reading(&self, index: usize, r: Reading) {
        let sensor = &self.registry.sensors[index];
        let source = sensor.source.to_string();
        let Some(q) = sensor.quantity(&r.grandeur) else {
            self.dropped(
                &self.stats.unexpected_quantity,
                &source,
                "unexpected_quantity",
                &format!("sensor {} does not list {:?}", sensor.id, r.grandeur),
            );
            return;
        };
        if let Some((lo, hi)) = self.registry.bounds(&r.grandeur) {
            if !(lo..=hi).contains(&r.value) {
                self.dropped(
                    &self.stats.out_of_range,
                    &source,
                    "out_of_range",
                    &format!(
                        "{} {} = {} outside [{lo}, {hi}]",
                        sensor.id, r.grandeur, r.value
                    ),
                );
                return;
            }
        }
        let now = Instant::now();
        let back_online = {
            let mut st = sensor.state.lock().unwrap_or_else(|e| e.into_inner());
            st.last_seen = now;
            let last = st.last.get(&r.grandeur).copied();
            let due = match last {
                None => true,
                Some((value, at)) => {
                    now.duration_since(at) >= sensor.min_interval
                        || (sensor.change_threshold > 0.0
                            && (r.value - value).abs() >= sensor.change_threshold)
                }
            };
            if !due {
                drop(st);
                SourceStats::add(&self.stats.collapsed);
                return;
            }
            st.last.insert(r.grandeur.clone(), (r.value, now));
            st.record(&r.grandeur, r.value, now);
            if r.rssi.is_some() {
                st.rssi = r.rssi;
            }
            if r.battery.is_some() {
                st.battery = r.battery;
            }
            std::mem::take(&mut st.silent)
        };
        if back_online {
            info!(sensor = %sensor.id, "sensor heard again");
            self.status(index, "online");
        }
        let payload = match sensor.payload {
            registry::Payload::Plain => number(r.value),
            registry::Payload::Json => {
                let mut j = serde_json::json!({
                    "value": r.value,
                    "unit": registry::unit(&r.grandeur),
                    "sensor": sensor.id,
                    "grandeur": r.grandeur,
                    "ts": r.at.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0),
                });
                if let Some(rssi) = r.rssi {
                    j["rssi"] = rssi.into();
                }
                if let Some(b) = r.battery {
                    j["battery"] = b.into();
                }
                j.to_string()
            }
        };
        let mut m = Message::new(
            q.topic.clone(),
            payload,
            sensor.qos,
            sensor.retain,
            Origin::Sensor(ByteString::from(sensor.id.as_str())),
        );
        m.received_at = r.at;
        SourceStats::add(&self.stats.published);
        // Topics made from the checked config; a refusal is counted by the broker.
        let _ = self.publisher.publish(m);
    }

    /// Whether this advert is new for the sensor: adverts are repeated
    /// many times by the radio. A frame with a counter is a repeat when its
    /// counter is the last one; a frame without (Govee) when its bytes are
    /// the last ones and came less than [`REPEAT_WINDOW`] ago.
    /// For a sensor with a key: is this encrypted frame's counter newer
    /// than the last one accepted? Counters are compared as serial numbers
    /// (RFC 1982: a step of 1 to 2^31 - 1 forward is newer, so a wrap from
    /// u32::MAX to 0 is too). Equal: a repeat, collapsed. Older: a replay.
    pub fn fresh_counter(&self, index: usize, counter: u32) -> Freshness {
        let sensor = &self.registry.sensors[index];
        let mut st = sensor.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let last = match &st.last_frame {
            Some((Frame::Counter(last), _)) => Some(*last),
            _ => None,
        };
        let verdict = freshness(last, counter);
        match verdict {
            Freshness::New => {
                st.last_seen = now;
                st.last_frame = Some((Frame::Counter(counter), now));
            }
            Freshness::Repeat => {
                st.last_seen = now;
                drop(st);
                SourceStats::add(&self.stats.collapsed);
            }
            Freshness::Replayed => {}
        }
        verdict
    }

    pub fn new_frame(&self, index: usize, frame: Frame) -> bool {
        let sensor = &self.registry.sensors[index];
        let mut st = sensor.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        st.last_seen = now;
        let repeat = match (&st.last_frame, &frame) {
            (Some((Frame::Counter(a), _)), Frame::Counter(b)) => a == b,
            (Some((Frame::Bytes(a), at)), Frame::Bytes(b)) => {
                a == b && now.duration_since(*at) < REPEAT_WINDOW
            }
            _ => false,
        };
        if repeat {
            drop(st);
            SourceStats::add(&self.stats.collapsed);
            return false;
        }
        st.last_frame = Some((frame, now));
        true
    }

    /// `<status_prefix>/<sensor id>`: `online` or `silent` (retained).
    fn status(&self, index: usize, what: &str) {
        let sensor = &self.registry.sensors[index];
        // Topics made from the checked config; a refusal is counted by the broker.
        let _ = self.publisher.publish(Message::new(
            format!(
                "{}/{}",
                self.registry.status_prefix,
                registry::id_level(&sensor.id)
            ),
            what.to_owned(),
            QoS::AtLeastOnce,
            true,
            Origin::Sensor(ByteString::from(sensor.id.as_str())),
        ));
    }

    /// Marks sensors silent for longer than their timeout (once each).
    fn check_silence(&self) {
        let now = Instant::now();
        for (i, s) in self.registry.sensors.iter().enumerate() {
            let Some(timeout) = s.silence_timeout else {
                continue;
            };
            let newly_silent = {
                let mut st = s.state.lock().unwrap_or_else(|e| e.into_inner());
                let silent = !st.silent && now.duration_since(st.last_seen) >= timeout;
                if silent {
                    st.silent = true;
                }
                silent
            };
            if newly_silent {
                warn!(sensor = %s.id, timeout_secs = timeout.as_secs(), "sensor silent");
                self.status(i, "silent");
            }
        }
    }

    /// `$SYS/capteurs/sources`: the counters as JSON (retained).
    fn publish_stats(&self) {
        // Topics made from the checked config; a refusal is counted by the broker.
        let _ = self.publisher.publish(Message::new(
            "$SYS/capteurs/sources",
            self.stats.to_json().to_string(),
            QoS::AtMostOnce,
            true,
            Origin::Broker,
        ));
    }
}

/// A number the way the course's subscribers expect it: `21.37`.
pub fn number(v: f64) -> String {
    format!("{v}")
}

/// The running sources: one task per serial port, the BLE inputs, the
/// silence watch.
pub struct SourcesHandle {
    pub sources: Arc<Sources>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl SourcesHandle {
    pub fn stats(&self) -> &Arc<SourceStats> {
        &self.sources.stats
    }

    pub async fn shutdown(self) {
        self.shutdown.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

/// What [`start`] runs.
pub struct SourcesSettings {
    pub serial: Vec<serial::PortSettings>,
    pub ble_replay: Option<std::path::PathBuf>,
    pub ble_scan: Option<ble::ScanSettings>,
    pub stats_interval: Duration,
}

/// Starts every source.
pub fn start(settings: SourcesSettings, sources: Sources) -> SourcesHandle {
    let sources = Arc::new(sources);
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    for port in settings.serial {
        tracker.spawn(serial::run(port, sources.clone(), shutdown.clone()));
    }
    if let Some(path) = settings.ble_replay {
        tracker.spawn(ble::replay(path, sources.clone(), shutdown.clone()));
    }
    if let Some(scan) = settings.ble_scan {
        tracker.spawn(ble::scan(scan, sources.clone(), shutdown.clone()));
    }
    {
        let sources = sources.clone();
        let shutdown = shutdown.clone();
        let interval = settings.stats_interval;
        tracker.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let mut last_stats = Instant::now();
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {
                        sources.check_silence();
                        if last_stats.elapsed() >= interval {
                            sources.publish_stats();
                            last_stats = Instant::now();
                        }
                    }
                }
            }
        });
    }
    SourcesHandle {
        sources,
        shutdown,
        tracker,
    }
}
