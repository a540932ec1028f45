//! The sensor registry (`[[sensors]]`): which device is which sensor, where
//! it is (its topic), what it measures, and how its messages look.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use thiserror::Error;

use super::ble::{format_mac, parse_hex, parse_mac};
pub use super::config::SensorPayload as Payload;
use super::config::{SensorConfig, SourcesConfig};
use super::place::topic_level;
use crate::message::QoS;
use crate::problems::Problems;

/// Where a sensor's readings come from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SourceKey {
    Serial(PathBuf),
    Ble([u8; 6]),
}

/// Why a sensor's `source` was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SourceKeyError {
    #[error("serial: needs a port path")]
    NoPort,
    #[error("{0:?} is not a MAC address (AA:BB:CC:DD:EE:FF)")]
    Mac(String),
    #[error("{0:?}: expected serial:<port> or ble:<MAC>")]
    Kind(String),
}

impl SourceKey {
    /// `serial:/dev/ttyUSB0` or `ble:A4:C1:38:02:83:F4`.
    pub fn parse(s: &str) -> Result<SourceKey, SourceKeyError> {
        if let Some(port) = s.strip_prefix("serial:") {
            if port.is_empty() {
                return Err(SourceKeyError::NoPort);
            }
            return Ok(SourceKey::Serial(PathBuf::from(port)));
        }
        if let Some(mac) = s.strip_prefix("ble:") {
            return parse_mac(&mac.to_ascii_uppercase())
                .map(SourceKey::Ble)
                .ok_or_else(|| SourceKeyError::Mac(mac.to_owned()));
        }
        Err(SourceKeyError::Kind(s.to_owned()))
    }
}

impl fmt::Display for SourceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SourceKey::Serial(p) => write!(f, "serial:{}", p.display()),
            SourceKey::Ble(mac) => write!(f, "ble:{}", format_mac(mac)),
        }
    }
}

/// One quantity of a sensor and the topic it is published on.
#[derive(Debug)]
pub struct Quantity {
    pub grandeur: String,
    pub topic: String,
}

#[derive(Debug)]
pub struct Sensor {
    pub id: String,
    pub source: SourceKey,
    /// Where it is, as the configuration writes it (`pays`, `ville`, `rue`).
    pub place: [String; 3],
    pub quantities: Vec<Quantity>,
    pub payload: Payload,
    pub qos: QoS,
    pub retain: bool,
    pub min_interval: Duration,
    pub change_threshold: f64,
    pub silence_timeout: Option<Duration>,
    pub key: Option<[u8; 16]>,
    pub state: Mutex<SensorState>,
}

#[derive(Debug)]
pub struct SensorState {
    /// Last published value and when, per grandeur.
    pub last: HashMap<String, (f64, Instant)>,
    pub last_frame: Option<(super::Frame, Instant)>,
    pub last_seen: Instant,
    pub silent: bool,
    /// Published values of the last hour per grandeur, one point per
    /// [`HISTORY_STEP`] at most (the status page draws them).
    pub history: HashMap<String, VecDeque<(Instant, f64)>>,
    /// The radio's last word on the device, where it says (BLE).
    pub rssi: Option<i16>,
    pub battery: Option<f64>,
}

/// How far back [`SensorState::history`] goes, and its resolution.
pub const HISTORY_SPAN: Duration = Duration::from_secs(3600);
pub const HISTORY_STEP: Duration = Duration::from_secs(10);

impl SensorState {
    /// Records a published value: a new point once per [`HISTORY_STEP`],
    /// otherwise the latest point takes the newer value.
    pub fn record(&mut self, grandeur: &str, value: f64, at: Instant) {
        let h = self.history.entry(grandeur.to_owned()).or_default();
        match h.back_mut() {
            Some((t, v)) if at.duration_since(*t) < HISTORY_STEP => *v = value,
            _ => h.push_back((at, value)),
        }
        while h
            .front()
            .is_some_and(|(t, _)| at.duration_since(*t) > HISTORY_SPAN)
        {
            h.pop_front();
        }
    }
}

impl Sensor {
    /// The `index`-th `[[sensors]]` entry, checked; `None` with its
    /// problems recorded.
    fn new(
        index: usize,
        s: &SensorConfig,
        template: &str,
        now: Instant,
        p: &mut Problems,
    ) -> Option<Sensor> {
        let key = |k: &str| format!("sensors[{index}].{k}");
        let before = p.len();
        let source = p.check(&key("source"), SourceKey::parse(&s.source));
        let mut level =
            |k: &str, v: &str| p.check(&key(k), topic_level(v).map_err(|e| format!("{v:?} {e}")));
        let id = level("id", &s.id);
        let pays = level("pays", &s.pays);
        let ville = level("ville", &s.ville);
        let rue = level("rue", &s.rue);
        let grandeurs: Vec<Option<String>> =
            s.grandeurs.iter().map(|g| level("grandeurs", g)).collect();
        if s.grandeurs.is_empty() {
            p.add(key("grandeurs"), "must list at least one quantity");
        }
        let qos = QoS::from_u8(s.qos);
        if qos.is_none() {
            p.add(key("qos"), "must be 0, 1 or 2");
        }
        if s.change_threshold.is_nan() || s.change_threshold < 0.0 {
            p.add(key("change_threshold"), "must be 0 or more");
        }
        let bindkey = match &s.key {
            None => None,
            Some(k) => {
                let parsed = parse_hex(k).and_then(|b| <[u8; 16]>::try_from(b).ok());
                if parsed.is_none() {
                    p.add(
                        key("key"),
                        "must be 32 hex digits (a 16-byte BTHome bindkey)",
                    );
                }
                parsed
            }
        };
        let (Some(source), Some(id), Some(pays), Some(ville), Some(rue), Some(qos)) =
            (source, id, pays, ville, rue, qos)
        else {
            return None;
        };
        if p.len() > before {
            return None;
        }
        let quantities = grandeurs
            .into_iter()
            .flatten()
            .map(|g| Quantity {
                topic: render(template, &g, &pays, &ville, &rue, &id),
                grandeur: g,
            })
            .collect();
        Some(Sensor {
            id: s.id.clone(),
            source,
            place: [s.pays.clone(), s.ville.clone(), s.rue.clone()],
            quantities,
            payload: s.payload,
            qos,
            retain: s.retain,
            min_interval: Duration::from_millis(s.min_interval_ms),
            change_threshold: s.change_threshold,
            silence_timeout: (s.silence_timeout_secs > 0)
                .then(|| Duration::from_secs(s.silence_timeout_secs)),
            key: bindkey,
            state: Mutex::new(SensorState {
                last: HashMap::new(),
                last_frame: None,
                last_seen: now,
                silent: false,
                history: HashMap::new(),
                rssi: None,
                battery: None,
            }),
        })
    }

    pub fn quantity(&self, grandeur: &str) -> Option<&Quantity> {
        self.quantities.iter().find(|q| q.grandeur == grandeur)
    }
}

pub struct Registry {
    pub sensors: Vec<Sensor>,
    pub status_prefix: String,
    pub discovery_prefix: String,
    bounds: HashMap<String, (f64, f64)>,
    by_source: HashMap<(SourceKey, String), usize>,
    by_mac: HashMap<[u8; 6], usize>,
}

/// Physical bounds of the built-in quantities (°C, %, hPa, %, V).
const BOUNDS: &[(&str, f64, f64)] = &[
    ("temperature", -80.0, 150.0),
    ("humidite", 0.0, 100.0),
    ("pression", 300.0, 1100.0),
    ("batterie", 0.0, 100.0),
    ("tension", 0.0, 60.0),
];

/// The unit of a quantity, for JSON payloads.
pub fn unit(grandeur: &str) -> &'static str {
    match grandeur {
        "temperature" | "point_de_rosee" => "°C",
        "humidite" | "batterie" | "humidite_sol" => "%",
        "pression" => "hPa",
        "tension" => "V",
        "co2" => "ppm",
        "luminosite" => "lx",
        "pm25" | "pm10" => "µg/m³",
        _ => "",
    }
}

/// A sensor id as one topic level (ids are checked at config time; this
/// never fails on a checked id).
pub fn id_level(id: &str) -> String {
    topic_level(id).unwrap_or_else(|_| {
        id.chars()
            .map(|c| {
                if matches!(c, '/' | '+' | '#') || c.is_control() {
                    '_'
                } else {
                    c
                }
            })
            .collect()
    })
}

/// Renders the topic template; every part must already be a topic level.
pub fn render(
    template: &str,
    grandeur: &str,
    pays: &str,
    ville: &str,
    rue: &str,
    id: &str,
) -> String {
    template
        .replace("{grandeur}", grandeur)
        .replace("{pays}", pays)
        .replace("{ville}", ville)
        .replace("{rue}", rue)
        .replace("{id}", id)
}

/// `[sources]`: the topic template gives a valid topic once filled in, the
/// prefixes are topic prefixes.
fn check_topics(cfg: &SourcesConfig, p: &mut Problems) {
    let topic_ok = |t: &str| !t.is_empty() && !t.contains(['+', '#', '\0']) && !t.starts_with('$');
    let t = &cfg.topic_template;
    if !t.contains("{grandeur}") {
        p.add("sources.topic_template", "must contain {grandeur}");
    } else if !topic_ok(&render(t, "g", "p", "v", "r", "i")) || t.contains("//") {
        p.add(
            "sources.topic_template",
            format!("{t:?} is not a valid topic once filled in"),
        );
    }
    for (key, v) in [
        ("status_prefix", &cfg.status_prefix),
        ("discovery_prefix", &cfg.discovery_prefix),
    ] {
        if !topic_ok(v) || v.ends_with('/') {
            p.add(
                format!("sources.{key}"),
                format!("{v:?} is not a topic prefix"),
            );
        }
    }
}

impl Registry {
    /// Builds the registry from `[sources]` and `[[sensors]]`; every
    /// problem is named by its key (`sensors[3].ville`).
    pub fn new(cfg: &SourcesConfig, sensors: &[SensorConfig]) -> Result<Registry, Problems> {
        let mut p = Problems::new();
        check_topics(cfg, &mut p);
        let mut bounds: HashMap<String, (f64, f64)> = BOUNDS
            .iter()
            .map(|(g, lo, hi)| (g.to_string(), (*lo, *hi)))
            .collect();
        for (g, [lo, hi]) in &cfg.bounds {
            if topic_level(g).as_deref() != Ok(g.as_str()) {
                p.add(
                    format!("sources.bounds.{g}"),
                    "is not a quantity name (lower case, no accents)",
                );
            } else if lo.partial_cmp(hi) != Some(std::cmp::Ordering::Less) {
                p.add(
                    format!("sources.bounds.{g}"),
                    format!("[{lo}, {hi}]: the low bound must be below the high one"),
                );
            }
            bounds.insert(g.clone(), (*lo, *hi));
        }
        let mut reg = Registry {
            sensors: Vec::new(),
            status_prefix: cfg.status_prefix.clone(),
            discovery_prefix: cfg.discovery_prefix.clone(),
            bounds,
            by_source: HashMap::new(),
            by_mac: HashMap::new(),
        };
        let now = Instant::now();
        for (i, s) in sensors.iter().enumerate() {
            let Some(sensor) = Sensor::new(i, s, &cfg.topic_template, now, &mut p) else {
                continue;
            };
            let index = reg.sensors.len();
            let source = &sensor.source;
            if reg
                .by_source
                .insert((source.clone(), s.id.clone()), index)
                .is_some()
            {
                p.add(
                    format!("sensors[{i}].id"),
                    format!("{:?} is listed twice on {source}", s.id),
                );
            }
            if let SourceKey::Ble(mac) = source {
                if reg.by_mac.insert(*mac, index).is_some() {
                    p.add(
                        format!("sensors[{i}].source"),
                        format!("{source} is listed twice"),
                    );
                }
            }
            reg.sensors.push(sensor);
        }
        p.or(|| reg)
    }

    /// The sensor `id` on serial `port`.
    pub fn serial(&self, port: &std::path::Path, id: &str) -> Option<usize> {
        self.by_source
            .get(&(SourceKey::Serial(port.to_owned()), id.to_owned()))
            .copied()
    }

    /// The sensors on serial `port`.
    pub fn on_port(&self, port: &std::path::Path) -> Vec<usize> {
        let key = SourceKey::Serial(port.to_owned());
        (0..self.sensors.len())
            .filter(|&i| self.sensors[i].source == key)
            .collect()
    }

    pub fn ble(&self, mac: &[u8; 6]) -> Option<usize> {
        self.by_mac.get(mac).copied()
    }

    pub fn bounds(&self, grandeur: &str) -> Option<(f64, f64)> {
        self.bounds.get(grandeur).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sensor(id: &str, source: &str) -> SensorConfig {
        SensorConfig {
            id: id.into(),
            source: source.into(),
            pays: "FR".into(),
            ville: "Aubière".into(),
            rue: "Rue de la Chebarde".into(),
            grandeurs: vec!["temperature".into(), "humidité".into()],
            payload: Payload::Plain,
            qos: 0,
            retain: true,
            min_interval_ms: 0,
            change_threshold: 0.0,
            silence_timeout_secs: 0,
            key: None,
        }
    }

    #[test]
    fn topics_follow_the_course_tree() {
        let r = Registry::new(
            &SourcesConfig::default(),
            &[
                sensor("cuisine", "serial:/dev/ttyUSB0"),
                sensor("balcon", "ble:a4:c1:38:02:83:f4"),
            ],
        )
        .unwrap();
        let s = &r.sensors[0];
        assert_eq!(
            s.quantities[0].topic,
            "capteurs/temperature/fr/aubiere/rue_de_la_chebarde"
        );
        assert_eq!(
            s.quantities[1].topic,
            "capteurs/humidite/fr/aubiere/rue_de_la_chebarde"
        );
        assert_eq!(
            r.serial(std::path::Path::new("/dev/ttyUSB0"), "cuisine"),
            Some(0)
        );
        assert_eq!(
            r.serial(std::path::Path::new("/dev/ttyUSB1"), "cuisine"),
            None
        );
        assert_eq!(r.ble(&[0xA4, 0xC1, 0x38, 0x02, 0x83, 0xF4]), Some(1));
        assert_eq!(r.sensors[1].source.to_string(), "ble:A4:C1:38:02:83:F4");
        let cfg = SourcesConfig {
            topic_template: "maison/{rue}/{id}/{grandeur}".into(),
            ..SourcesConfig::default()
        };
        let r = Registry::new(&cfg, &[sensor("Cuisine", "serial:/dev/ttyUSB0")]).unwrap();
        assert_eq!(
            r.sensors[0].quantities[0].topic,
            "maison/rue_de_la_chebarde/cuisine/temperature"
        );
    }

    #[test]
    fn bad_entries_name_the_sensor_and_key() {
        let mut s = sensor("x", "serial:/dev/ttyUSB0");
        s.ville = "Aubière/Nord".into();
        let e = Registry::new(&SourcesConfig::default(), &[s])
            .err()
            .unwrap()
            .to_string();
        assert!(e.starts_with("sensors[0].ville:"), "{e}");
        let e = Registry::new(&SourcesConfig::default(), &[sensor("x", "usb:0")])
            .err()
            .unwrap()
            .to_string();
        assert!(e.starts_with("sensors[0].source:"), "{e}");
        let mut s = sensor("x", "ble:A4:C1:38:02:83:F4");
        s.key = Some("abcd".into());
        let e = Registry::new(&SourcesConfig::default(), &[s])
            .err()
            .unwrap()
            .to_string();
        assert!(e.starts_with("sensors[0].key:"), "{e}");
        let e = Registry::new(
            &SourcesConfig::default(),
            &[sensor("x", "serial:/a"), sensor("x", "serial:/a")],
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.starts_with("sensors[1].id:"), "{e}");
    }
}
