//! `[sources]`, `[[sensors]]`, `[[serial]]` and `[ble]`: the sensor side of
//! the configuration, as the file writes it. [`super::plan`] checks it by
//! building the registry and the inputs' settings from it.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use super::serial::lines::{Checksum, LineFormat};
use super::serial::{LineEnding, Parity};

/// How sensor readings become topics and payloads, for every source.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SourcesConfig {
    /// `{grandeur}`, `{pays}`, `{ville}`, `{rue}`, `{id}` are replaced.
    pub topic_template: String,
    /// `<status_prefix>/<sensor id>`: `online` / `silent`.
    pub status_prefix: String,
    /// `<discovery_prefix>/<serial|ble>/<id>`: unknown devices, once each.
    pub discovery_prefix: String,
    /// Physical bounds per quantity, over the built-in ones.
    pub bounds: BTreeMap<String, [f64; 2]>,
    /// One log line per port and cause at most this often (the others are
    /// counted).
    pub log_interval_secs: u64,
    /// `$SYS/capteurs/sources` (counters as JSON) is refreshed this often.
    pub stats_interval_secs: u64,
}

impl Default for SourcesConfig {
    fn default() -> Self {
        SourcesConfig {
            topic_template: "capteurs/{grandeur}/{pays}/{ville}/{rue}".into(),
            status_prefix: "capteurs/status".into(),
            discovery_prefix: "capteurs/discovery".into(),
            bounds: BTreeMap::new(),
            log_interval_secs: 10,
            stats_interval_secs: 10,
        }
    }
}

/// One sensor of the registry (`[[sensors]]`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SensorConfig {
    pub id: String,
    /// `serial:<port path>` or `ble:<MAC>`.
    pub source: String,
    pub pays: String,
    pub ville: String,
    pub rue: String,
    #[serde(default = "default_grandeurs")]
    pub grandeurs: Vec<String>,
    #[serde(default)]
    pub payload: SensorPayload,
    #[serde(default)]
    pub qos: u8,
    #[serde(default = "yes")]
    pub retain: bool,
    #[serde(default)]
    pub min_interval_ms: u64,
    #[serde(default)]
    pub change_threshold: f64,
    #[serde(default)]
    pub silence_timeout_secs: u64,
    /// BTHome bindkey (32 hex digits) for encrypted adverts.
    pub key: Option<String>,
}

fn default_grandeurs() -> Vec<String> {
    vec!["temperature".into()]
}

fn yes() -> bool {
    true
}

/// A sensor's payloads: the bare value (the course's) or JSON.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SensorPayload {
    #[default]
    Plain,
    Json,
}

/// One serial port (`[[serial]]`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialConfig {
    pub port: PathBuf,
    #[serde(default = "default_baud")]
    pub baud: u32,
    #[serde(default = "default_data_bits")]
    pub data_bits: u8,
    #[serde(default)]
    pub parity: Parity,
    #[serde(default = "default_stop_bits")]
    pub stop_bits: u8,
    #[serde(default)]
    pub line_ending: LineEnding,
    #[serde(default = "default_format")]
    pub format: LineFormat,
    #[serde(default = "default_checksum")]
    pub checksum: Checksum,
    /// For lines without an id (`plain`): whose readings they are.
    pub sensor: Option<String>,
    /// For `plain` lines: which quantity (default: the sensor's first).
    pub grandeur: Option<String>,
    /// A decoder plugin (`[[plugins]]` kind = "decoder") that reads the
    /// lines instead of `format`.
    pub decoder: Option<String>,
    #[serde(default = "default_max_line")]
    pub max_line_bytes: usize,
    #[serde(default = "default_reopen_min")]
    pub reopen_min_ms: u64,
    #[serde(default = "default_reopen_max")]
    pub reopen_max_ms: u64,
}

fn default_baud() -> u32 {
    115_200
}
fn default_data_bits() -> u8 {
    8
}
fn default_stop_bits() -> u8 {
    1
}
fn default_format() -> LineFormat {
    LineFormat::Plain
}
fn default_checksum() -> Checksum {
    Checksum::None
}
fn default_max_line() -> usize {
    1024
}
fn default_reopen_min() -> u64 {
    500
}
fn default_reopen_max() -> u64 {
    30_000
}

/// BLE sensors (`[ble]`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BleConfig {
    /// Passive scanning through BlueZ (a build with the `ble` feature).
    pub scan: bool,
    /// BlueZ adapter name; unset: the default one.
    pub adapter: Option<String>,
    /// Recorded adverts, one per line (a file, FIFO or pty), read as if
    /// they came from the radio.
    pub replay: Option<PathBuf>,
    /// A decoder plugin for the adverts no built-in format claims.
    pub decoder: Option<String>,
}
