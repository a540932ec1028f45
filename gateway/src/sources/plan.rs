//! The sensor side of the configuration, checked by building what runs:
//! the registry and every input's settings. Each fact (a sensor's topic
//! levels, its key, a port's default sensor) is worked out once, here, and
//! the gateway runs what was checked.

use std::collections::HashSet;
use std::time::Duration;

use super::config::{BleConfig, SensorConfig, SerialConfig, SourcesConfig};
use super::registry::{Registry, SourceKey};
use super::serial::lines::LineFormat;
use super::serial::PortSettings;
use super::{ble, SourcesSettings};
use crate::problems::Problems;

/// The sensor side of the file, borrowed whole: its tables refer to each
/// other (a sensor to its port, a port to its default sensor, both to the
/// decoder plugins).
#[derive(Debug, Clone, Copy)]
pub struct SourcesInput<'a> {
    pub sources: &'a SourcesConfig,
    pub sensors: &'a [SensorConfig],
    pub serial: &'a [SerialConfig],
    pub ble: &'a BleConfig,
    /// The names of the `[[plugins]]` of kind `decoder`.
    pub decoders: &'a [String],
}

/// What the sources stage runs: the registry and the inputs.
pub struct SourcesPlan {
    pub registry: Registry,
    pub settings: SourcesSettings,
    pub log_interval: Duration,
    pub ble_decoder: Option<String>,
}

impl SourcesInput<'_> {
    /// Whether any sensor input is configured at all.
    pub fn any(&self) -> bool {
        !(self.sensors.is_empty()
            && self.serial.is_empty()
            && self.ble.replay.is_none()
            && !self.ble.scan)
    }

    pub fn validate(&self, problems: &mut Problems) {
        problems.take(self.plan());
    }

    /// The registry and the settings of every input, checked.
    pub fn plan(&self) -> Result<SourcesPlan, Problems> {
        let mut p = Problems::new();
        let src = self.sources;
        if src.log_interval_secs == 0 {
            p.add("sources.log_interval_secs", "must be at least 1");
        }
        if src.stats_interval_secs == 0 {
            p.add("sources.stats_interval_secs", "must be at least 1");
        }
        let registry = p.take(Registry::new(src, self.sensors));
        self.check_ble(&mut p);
        self.check_sensor_inputs(&mut p);
        let mut ports = Vec::new();
        let mut seen = HashSet::new();
        for (i, port) in self.serial.iter().enumerate() {
            if !seen.insert(&port.port) {
                p.add(format!("serial[{i}].port"), "this port is listed twice");
            }
            if let Some(s) = self.port(i, port, registry.as_ref(), &mut p) {
                ports.push(s);
            }
        }
        let Some(registry) = registry else {
            return Err(p);
        };
        p.or(|| SourcesPlan {
            registry,
            settings: SourcesSettings {
                serial: ports,
                ble_replay: self.ble.replay.clone(),
                ble_scan: self.ble.scan.then(|| ble::ScanSettings {
                    adapter: self.ble.adapter.clone(),
                }),
                stats_interval: Duration::from_secs(src.stats_interval_secs),
            },
            log_interval: Duration::from_secs(src.log_interval_secs),
            ble_decoder: self.ble.decoder.clone(),
        })
    }

    fn check_decoder(&self, key: String, name: &Option<String>, p: &mut Problems) {
        if let Some(d) = name {
            if !self.decoders.contains(d) {
                p.add(
                    key,
                    format!("no [[plugins]] entry {d:?} with kind = \"decoder\""),
                );
            }
        }
    }

    fn check_ble(&self, p: &mut Problems) {
        self.check_decoder("ble.decoder".into(), &self.ble.decoder, p);
        if self.ble.scan && !cfg!(feature = "ble") {
            p.add(
                "ble.scan",
                "this build has no BLE support (cargo feature `ble`); use [ble] replay or a package built with it",
            );
        }
    }

    /// Every sensor's input is configured: its `[[serial]]` port, or a BLE
    /// input for a BLE sensor.
    fn check_sensor_inputs(&self, p: &mut Problems) {
        for (i, s) in self.sensors.iter().enumerate() {
            match SourceKey::parse(&s.source) {
                Ok(SourceKey::Serial(port)) if !self.serial.iter().any(|x| x.port == port) => p
                    .add(
                        format!("sensors[{i}].source"),
                        format!(
                            "no [[serial]] entry has port = {:?}",
                            port.display().to_string()
                        ),
                    ),
                Ok(SourceKey::Ble(_)) if !self.ble.scan && self.ble.replay.is_none() => p.add(
                    format!("sensors[{i}].source"),
                    "a BLE sensor, but [ble] has neither scan = true nor replay",
                ),
                // A source that does not parse is the registry's to report.
                _ => {}
            }
        }
    }

    /// One port's settings: its own limits, and the sensor and quantity
    /// its id-less lines belong to.
    fn port(
        &self,
        i: usize,
        c: &SerialConfig,
        registry: Option<&Registry>,
        p: &mut Problems,
    ) -> Option<PortSettings> {
        let key = |k: &str| format!("serial[{i}].{k}");
        let before = p.len();
        if c.baud == 0 {
            p.add(key("baud"), "must be above 0");
        }
        if !(5..=8).contains(&c.data_bits) {
            p.add(key("data_bits"), "must be 5, 6, 7 or 8");
        }
        if !(1..=2).contains(&c.stop_bits) {
            p.add(key("stop_bits"), "must be 1 or 2");
        }
        if !(16..=65536).contains(&c.max_line_bytes) {
            p.add(key("max_line_bytes"), "must be between 16 and 65536");
        }
        if c.reopen_min_ms < 10 || c.reopen_max_ms < c.reopen_min_ms {
            p.add(
                key("reopen_min_ms"),
                "needs 10 <= reopen_min_ms <= reopen_max_ms",
            );
        }
        self.check_decoder(key("decoder"), &c.decoder, p);
        // Whose readings id-less lines are: the named sensor, or the only
        // one on the port.
        let registry = registry?;
        let here = registry.on_port(&c.port);
        let default_sensor = match &c.sensor {
            Some(id) => {
                let found = registry.serial(&c.port, id);
                if found.is_none() {
                    p.add(
                        key("sensor"),
                        format!(
                            "no [[sensors]] entry {id:?} with source = \"serial:{}\"",
                            c.port.display()
                        ),
                    );
                }
                found
            }
            None if here.len() == 1 => Some(here[0]),
            None => None,
        };
        if c.decoder.is_none()
            && c.format == LineFormat::Plain
            && default_sensor.is_none()
            && c.sensor.is_none()
        {
            p.add(
                key("sensor"),
                format!(
                    "plain lines carry no id: say whose readings they are ({} sensors on this port)",
                    here.len()
                ),
            );
        }
        let sensor = default_sensor.map(|s| &registry.sensors[s]);
        let default_grandeur = match (&c.grandeur, sensor) {
            (Some(g), Some(s)) => {
                let level = super::place::topic_level(g).ok();
                let found = s
                    .quantities
                    .iter()
                    .find(|q| Some(&q.grandeur) == level.as_ref());
                if found.is_none() {
                    p.add(
                        key("grandeur"),
                        format!("sensor {:?} does not list {g:?}", s.id),
                    );
                }
                found.map(|q| q.grandeur.clone())
            }
            (Some(g), None) => Some(g.clone()),
            (None, s) => s
                .and_then(|s| s.quantities.first())
                .map(|q| q.grandeur.clone()),
        };
        (p.len() == before).then(|| PortSettings {
            port: c.port.clone(),
            baud: c.baud,
            data_bits: c.data_bits,
            parity: c.parity,
            stop_bits: c.stop_bits,
            line_ending: c.line_ending,
            format: c.format,
            checksum: c.checksum,
            default_sensor,
            default_grandeur,
            decoder: c.decoder.clone(),
            max_line_bytes: c.max_line_bytes,
            reopen_min: Duration::from_millis(c.reopen_min_ms),
            reopen_max: Duration::from_millis(c.reopen_max_ms),
        })
    }
}
