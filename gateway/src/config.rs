//! The gateway's configuration: one TOML file, every key documented in
//! `configs/gateway.toml`, which is also the embedded default.
//!
//! Loading happens in two passes, like Vector's: serde refuses unknown keys
//! and wrong types (the `toml` error names the line), then [`GatewayConfig::validate`]
//! collects every semantic problem at once, each with its key and line.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

/// The default configuration, compiled into the binary.
pub const DEFAULT_CONFIG: &str = include_str!("../../configs/gateway.toml");

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("{origin}: invalid configuration:\n{}", problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid {
        origin: String,
        problems: Vec<String>,
    },
}

/// The whole configuration tree.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    pub gateway: GatewaySection,
    pub broker: BrokerConfig,
    pub upstream: UpstreamConfig,
    pub buffer: BufferConfig,
    pub sources: SourcesConfig,
    pub sensors: Vec<SensorConfig>,
    pub serial: Vec<SerialConfig>,
    pub ble: BleConfig,
    pub plugins: Vec<PluginConfig>,
    pub http: HttpConfig,
    pub homeassistant: HomeAssistantConfig,
    pub log: LogConfig,
    /// Directory the file was read from: relative paths inside it are
    /// resolved against it. Not a key.
    #[serde(skip)]
    pub base_dir: PathBuf,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            gateway: GatewaySection::default(),
            broker: BrokerConfig::default(),
            upstream: UpstreamConfig::default(),
            buffer: BufferConfig::default(),
            sources: SourcesConfig::default(),
            sensors: Vec::new(),
            serial: Vec::new(),
            ble: BleConfig::default(),
            plugins: Vec::new(),
            http: HttpConfig::default(),
            homeassistant: HomeAssistantConfig::default(),
            log: LogConfig::default(),
            base_dir: PathBuf::from("."),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewaySection {
    /// Identifies this gateway upstream and in `$SYS`.
    pub id: String,
    /// Where sessions, retained messages and the buffer live.
    pub data_dir: PathBuf,
}

impl Default for GatewaySection {
    fn default() -> Self {
        GatewaySection {
            id: "capteurs".into(),
            data_dir: PathBuf::from("./capteurs-data"),
        }
    }
}

/// The embedded MQTT broker.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    pub listen: String,
    pub allow_anonymous: bool,
    pub password_file: Option<PathBuf>,
    pub acl_file: Option<PathBuf>,
    pub max_packet_size: u32,
    pub max_connections: usize,
    pub max_inflight: u16,
    pub max_queued: usize,
    pub queue_qos0_offline: bool,
    pub slow_subscriber_timeout_ms: u64,
    pub connect_timeout_ms: u64,
    pub write_timeout_ms: u64,
    pub max_topic_levels: usize,
    pub max_subscriptions_per_client: usize,
    pub max_retained: usize,
    pub max_retained_bytes: usize,
    pub max_sessions: usize,
    pub session_expiry_secs: u64,
    pub login_free_failures: u32,
    pub login_backoff_max_ms: u64,
    pub sys_interval_secs: u64,
    pub persist_interval_ms: u64,
    pub persistence: bool,
    /// Ask the built-in password file and ACL before the auth plugins.
    pub builtin_auth_first: bool,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            listen: "127.0.0.1:1883".into(),
            allow_anonymous: true,
            password_file: None,
            acl_file: None,
            max_packet_size: 1024 * 1024,
            max_connections: 10_000,
            max_inflight: 32,
            max_queued: 1000,
            queue_qos0_offline: false,
            slow_subscriber_timeout_ms: 5000,
            connect_timeout_ms: 10_000,
            write_timeout_ms: 10_000,
            max_topic_levels: 200,
            max_subscriptions_per_client: 1000,
            max_retained: 100_000,
            max_retained_bytes: 64 * 1024 * 1024,
            max_sessions: 20_000,
            session_expiry_secs: 7 * 86400,
            login_free_failures: 3,
            login_backoff_max_ms: 10_000,
            sys_interval_secs: 10,
            persist_interval_ms: 1000,
            persistence: true,
            builtin_auth_first: false,
        }
    }
}

/// The cloud broker the gateway forwards to (and takes commands from).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    pub enabled: bool,
    /// `mqtt://host:port` or `mqtts://host:port`, tried in order (failover).
    pub servers: Vec<String>,
    /// Empty: the gateway id.
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<String>,
    /// PEM CA certificates for `mqtts://`; unset: the system's roots.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate and key (mutual TLS).
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    pub keep_alive_secs: u64,
    pub clean_session: bool,
    pub connect_timeout_ms: u64,
    /// Status topics: `<status_prefix>/gateways/<id>/status|stats`.
    pub status_prefix: String,
    pub stats_interval_secs: u64,
    pub reconnect_min_ms: u64,
    pub reconnect_max_ms: u64,
    /// Unacknowledged messages in flight to the cloud.
    pub max_inflight: u16,
    /// Messages per second to the cloud at most (0: no limit).
    pub max_rate: u32,
    /// Wrap payloads in a JSON envelope with the gateway id and sequence
    /// number (for deduplication downstream).
    pub envelope: bool,
    pub rules: Vec<UpstreamRule>,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            enabled: false,
            servers: vec!["mqtt://127.0.0.1:1884".into()],
            client_id: String::new(),
            username: None,
            password: None,
            ca_file: None,
            client_cert: None,
            client_key: None,
            keep_alive_secs: 30,
            clean_session: true,
            connect_timeout_ms: 10_000,
            status_prefix: "capteurs".into(),
            stats_interval_secs: 60,
            reconnect_min_ms: 500,
            reconnect_max_ms: 60_000,
            max_inflight: 20,
            max_rate: 0,
            envelope: false,
            rules: vec![UpstreamRule::default()],
        }
    }
}

/// Mosquitto's `topic pattern direction qos local-prefix remote-prefix`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamRule {
    pub pattern: String,
    pub direction: Direction,
    pub qos: u8,
    pub local_prefix: String,
    pub remote_prefix: String,
}

impl Default for UpstreamRule {
    fn default() -> Self {
        UpstreamRule {
            pattern: "capteurs/#".into(),
            direction: Direction::Out,
            qos: 1,
            local_prefix: String::new(),
            remote_prefix: String::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Out,
    In,
    Both,
}

/// The store-and-forward buffer in front of the upstream.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BufferConfig {
    /// Payload + topic bytes kept at most.
    pub max_bytes: u64,
    /// Messages older than this are dropped (0: no limit).
    pub max_age_secs: u64,
    pub when_full: WhenFull,
    /// `full`: fsync each group commit (survives power cuts); `normal`:
    /// survives a crash of the gateway, not of the machine.
    pub sync: SyncMode,
    /// Keep messages in memory while the cloud is reachable (SD card wear).
    pub memory_first: bool,
    /// Memory-first: beyond this many unacknowledged messages, write to disk.
    pub memory_max_messages: usize,
}

impl Default for BufferConfig {
    fn default() -> Self {
        BufferConfig {
            max_bytes: 256 * 1024 * 1024,
            max_age_secs: 0,
            when_full: WhenFull::DropOldest,
            sync: SyncMode::Full,
            memory_first: false,
            memory_max_messages: 10_000,
        }
    }
}

/// How sensor readings become topics and payloads, for every source.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SourcesConfig {
    /// `{grandeur}`, `{pays}`, `{ville}`, `{rue}`, `{id}` are replaced.
    pub topic_template: String,
    /// `<status_prefix>/<sensor id>`: `online` / `silent`.
    pub status_prefix: String,
    /// `<discovery_prefix>/<serial|ble>/<id>`: unknown devices, once each.
    pub discovery_prefix: String,
    /// Physical bounds per quantity, over the built-in ones.
    pub bounds: std::collections::BTreeMap<String, [f64; 2]>,
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
            bounds: Default::default(),
            log_interval_secs: 10,
            stats_interval_secs: 10,
        }
    }
}

/// One sensor of the registry (`[[sensors]]`).
#[derive(Debug, Clone, Deserialize)]
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

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SensorPayload {
    #[default]
    Plain,
    Json,
}

/// One serial port (`[[serial]]`).
#[derive(Debug, Clone, Deserialize)]
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
    pub format: crate::sources::serial::lines::LineFormat,
    #[serde(default = "default_checksum")]
    pub checksum: crate::sources::serial::lines::Checksum,
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
fn default_format() -> crate::sources::serial::lines::LineFormat {
    crate::sources::serial::lines::LineFormat::Plain
}
fn default_checksum() -> crate::sources::serial::lines::Checksum {
    crate::sources::serial::lines::Checksum::None
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

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Parity {
    #[default]
    None,
    Even,
    Odd,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LineEnding {
    #[default]
    Lf,
    Crlf,
    Cr,
}

/// One WebAssembly plugin (`[[plugins]]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    pub name: String,
    pub kind: PluginKind,
    /// The component (`.wasm`, built for wasm32-wasip2).
    pub path: PathBuf,
    /// Transforms: the topic filters whose messages it gets.
    #[serde(default = "all_topics")]
    pub topics: Vec<String>,
    /// Position in its chain (lower first).
    #[serde(default)]
    pub order: i64,
    #[serde(default)]
    pub on_error: OnErrorConfig,
    pub dead_letter_topic: Option<String>,
    #[serde(default = "default_memory_mb")]
    pub memory_mb: u64,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default)]
    pub fuel: u64,
    #[serde(default = "default_max_faults")]
    pub max_faults: u32,
    /// Transforms: instances run side by side (one per core lets every core
    /// call the plugin at once); each message goes to the instance its
    /// topic hashes to, so per-topic state and order hold.
    pub instances: Option<u32>,
    /// Auth: remember authorize answers (the plugin's answer must depend
    /// only on client, user, action and topic).
    #[serde(default = "yes")]
    pub cache_decisions: bool,
    #[serde(default)]
    pub params: toml::Table,
    /// The plugin's environment (WASI `environment`), granted explicitly:
    /// these variables and no others (by default none).
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
}

impl PluginConfig {
    /// Parameters as text, as the plugin receives them.
    pub fn params(&self) -> Vec<(String, String)> {
        self.params
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    toml::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                (k.clone(), v)
            })
            .collect()
    }
}

fn all_topics() -> Vec<String> {
    vec!["#".into()]
}
fn default_memory_mb() -> u64 {
    16
}
fn default_timeout_ms() -> u64 {
    20
}
fn default_max_faults() -> u32 {
    5
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PluginKind {
    Transform,
    Auth,
    Decoder,
}

/// What happens to a message a transform failed on; for auth plugins,
/// `pass` abstains (the next authenticator decides) and the others refuse.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnErrorConfig {
    #[default]
    Pass,
    Drop,
    DeadLetter,
}

/// BLE sensors (`[ble]`).
#[derive(Debug, Clone, Default, Deserialize)]
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    DropOldest,
    DropNewest,
    Block,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncMode {
    Full,
    Normal,
}

/// `[http]`: Prometheus metrics, the status page and its JSON.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// `address:port` to listen on; empty: no HTTP listener.
    pub listen: String,
}

/// `[homeassistant]`: MQTT discovery of the registered sensors.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HomeAssistantConfig {
    pub discovery: bool,
    /// Home Assistant's discovery prefix.
    pub prefix: String,
}

impl Default for HomeAssistantConfig {
    fn default() -> Self {
        HomeAssistantConfig {
            discovery: false,
            prefix: "homeassistant".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A `tracing` filter: `info`, `debug`, `capteurs_gateway::broker=debug`…
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
        }
    }
}

impl GatewayConfig {
    /// The embedded default (`configs/gateway.toml`).
    pub fn embedded_default() -> Result<Self, ConfigError> {
        Self::parse(
            DEFAULT_CONFIG,
            "embedded default configuration",
            Path::new("."),
        )
    }

    /// Reads and checks a file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        Self::parse(&text, &path.display().to_string(), base)
    }

    /// Parses and checks TOML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str, base_dir: &Path) -> Result<Self, ConfigError> {
        let mut cfg: GatewayConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            origin: origin.to_owned(),
            message: e.to_string(),
        })?;
        cfg.base_dir = base_dir.to_owned();
        let problems = cfg.validate(text);
        if !problems.is_empty() {
            return Err(ConfigError::Invalid {
                origin: origin.to_owned(),
                problems,
            });
        }
        Ok(cfg)
    }

    /// `[[plugins]]`: unique names, valid topics, limits in range.
    fn validate_plugins(&self, text: &str, problems: &mut Vec<String>) {
        let mut names = std::collections::HashSet::new();
        for (i, p) in self.plugins.iter().enumerate() {
            let mut bad = |key: &str, what: String| {
                let at = array_key_line(text, "plugins", i, key)
                    .map_or(String::new(), |l| format!("line {l}: "));
                problems.push(format!("{at}plugins[{i}].{key}: {what}"));
            };
            if p.name.is_empty()
                || p.name.contains(['/', '+', '#'])
                || !names.insert(p.name.clone())
            {
                bad(
                    "name",
                    format!("{:?}: names must be unique, without '/', '+', '#'", p.name),
                );
            }
            for f in &p.topics {
                if let Err(e) = crate::broker::topic::validate_filter(f) {
                    bad("topics", format!("{f:?}: {e}"));
                }
            }
            if let Some(t) = &p.dead_letter_topic {
                if crate::broker::topic::validate_name(t).is_err() {
                    bad("dead_letter_topic", format!("{t:?} is not a topic name"));
                }
            }
            if !(1..=4096).contains(&p.memory_mb) {
                bad("memory_mb", "must be between 1 and 4096".into());
            }
            if !(2..=60_000).contains(&p.timeout_ms) {
                bad("timeout_ms", "must be between 2 and 60000".into());
            }
            if p.max_faults == 0 {
                bad("max_faults", "must be at least 1".into());
            }
            match p.instances {
                Some(n) if p.kind != PluginKind::Transform => bad(
                    "instances",
                    format!("{n}: only transform plugins run several instances"),
                ),
                Some(n) if !(1..=64).contains(&n) => {
                    bad("instances", format!("{n}: must be between 1 and 64"))
                }
                _ => {}
            }
        }
    }

    /// Every semantic problem, each naming its key and (when the key is in
    /// the file) its line.
    pub fn validate(&self, text: &str) -> Vec<String> {
        let mut problems = Vec::new();
        let mut bad = |table: &str, key: &str, what: String| {
            let at = match key_line(text, table, key) {
                Some(line) => format!("line {line}: "),
                None => String::new(),
            };
            problems.push(format!("{at}{table}.{key}: {what}"));
        };
        let h = &self.http;
        if !h.listen.is_empty() {
            if let Err(e) = h.listen.parse::<SocketAddr>() {
                bad(
                    "http",
                    "listen",
                    format!("{:?} is not an address:port ({e})", h.listen),
                );
            }
        }
        let ha = &self.homeassistant;
        if ha.prefix.is_empty() || crate::broker::topic::validate_name(&ha.prefix).is_err() {
            bad(
                "homeassistant",
                "prefix",
                format!("{:?} is not a topic name", ha.prefix),
            );
        }
        let b = &self.broker;
        if let Err(e) = b.listen.parse::<SocketAddr>() {
            bad(
                "broker",
                "listen",
                format!("{:?} is not an address:port ({e})", b.listen),
            );
        }
        if b.max_packet_size < 64 || b.max_packet_size > 268_435_455 {
            bad(
                "broker",
                "max_packet_size",
                "must be between 64 and 268435455 bytes".into(),
            );
        }
        if b.max_connections == 0 {
            bad("broker", "max_connections", "must be at least 1".into());
        }
        if b.max_inflight == 0 {
            bad("broker", "max_inflight", "must be at least 1".into());
        }
        if b.max_queued == 0 {
            bad("broker", "max_queued", "must be at least 1".into());
        }
        if b.connect_timeout_ms == 0 {
            bad("broker", "connect_timeout_ms", "must be at least 1".into());
        }
        for (key, value) in [
            ("write_timeout_ms", b.write_timeout_ms as usize),
            ("max_topic_levels", b.max_topic_levels),
            (
                "max_subscriptions_per_client",
                b.max_subscriptions_per_client,
            ),
            ("max_retained", b.max_retained),
            ("max_retained_bytes", b.max_retained_bytes),
            ("max_sessions", b.max_sessions),
        ] {
            if value == 0 {
                bad("broker", key, "must be at least 1".into());
            }
        }
        if b.sys_interval_secs == 0 {
            bad("broker", "sys_interval_secs", "must be at least 1".into());
        }
        if b.persist_interval_ms == 0 {
            bad("broker", "persist_interval_ms", "must be at least 1".into());
        }
        // Read and parsed as the gateway will at start: a syntax error in
        // the password or ACL file is reported here, with its own line.
        if let Some(f) = &b.password_file {
            let p = self.resolve(f);
            if let Err(e) = crate::broker::auth::PasswordFile::load(&p) {
                bad("broker", "password_file", e.to_string());
            }
        }
        if let Some(f) = &b.acl_file {
            let p = self.resolve(f);
            if let Err(e) = crate::broker::auth::Acl::load(&p) {
                bad("broker", "acl_file", e.to_string());
            }
        }
        if self.gateway.id.is_empty() || self.gateway.id.contains(['/', '+', '#', '\0']) {
            bad(
                "gateway",
                "id",
                "must be non-empty and contain no '/', '+', '#' or NUL".into(),
            );
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            bad(
                "log",
                "level",
                format!("{:?} is not a log filter ({e})", self.log.level),
            );
        }
        self.validate_upstream(text, &mut problems);
        self.validate_sources(text, &mut problems);
        self.validate_plugins(text, &mut problems);
        problems
    }

    fn validate_sources(&self, text: &str, problems: &mut Vec<String>) {
        use crate::sources::place::topic_level;
        use crate::sources::registry::{render, SourceKey};
        let at_line = |line: Option<usize>| line.map_or(String::new(), |l| format!("line {l}: "));
        let mut bad = |table: &str, key: &str, what: String| {
            problems.push(format!(
                "{}{table}.{key}: {what}",
                at_line(key_line(text, table, key))
            ));
        };
        let src = &self.sources;
        let topic_ok =
            |t: &str| !t.is_empty() && !t.contains(['+', '#', '\0']) && !t.starts_with('$');
        if !src.topic_template.contains("{grandeur}") {
            bad(
                "sources",
                "topic_template",
                "must contain {grandeur}".into(),
            );
        } else if !topic_ok(&render(&src.topic_template, "g", "p", "v", "r", "i"))
            || src.topic_template.contains("//")
        {
            bad(
                "sources",
                "topic_template",
                format!(
                    "{:?} is not a valid topic once filled in",
                    src.topic_template
                ),
            );
        }
        for (key, v) in [
            ("status_prefix", &src.status_prefix),
            ("discovery_prefix", &src.discovery_prefix),
        ] {
            if !topic_ok(v) || v.ends_with('/') {
                bad("sources", key, format!("{v:?} is not a topic prefix"));
            }
        }
        for (g, [lo, hi]) in &src.bounds {
            if topic_level(g).as_deref() != Ok(g.as_str()) {
                bad(
                    "sources.bounds",
                    g,
                    "is not a quantity name (lower case, no accents)".into(),
                );
            } else if lo.partial_cmp(hi) != Some(std::cmp::Ordering::Less) {
                bad(
                    "sources.bounds",
                    g,
                    format!("[{lo}, {hi}]: the low bound must be below the high one"),
                );
            }
        }
        if src.log_interval_secs == 0 || src.stats_interval_secs == 0 {
            let key = if src.log_interval_secs == 0 {
                "log_interval_secs"
            } else {
                "stats_interval_secs"
            };
            bad("sources", key, "must be at least 1".into());
        }
        if let Some(d) = &self.ble.decoder {
            if !self
                .plugins
                .iter()
                .any(|x| &x.name == d && x.kind == PluginKind::Decoder)
            {
                bad(
                    "ble",
                    "decoder",
                    format!("no [[plugins]] entry {d:?} with kind = \"decoder\""),
                );
            }
        }
        if self.ble.scan && !cfg!(feature = "ble") {
            bad(
                "ble",
                "scan",
                "this build has no BLE support (cargo feature `ble`); use [ble] replay or a package built with it".into(),
            );
        }
        let mut seen = std::collections::HashSet::new();
        let mut macs = std::collections::HashSet::new();
        for (i, s) in self.sensors.iter().enumerate() {
            let mut bad = |key: &str, what: String| {
                problems.push(format!(
                    "{}sensors[{i}].{key}: {what}",
                    at_line(array_key_line(text, "sensors", i, key))
                ));
            };
            for (key, v) in [
                ("id", &s.id),
                ("pays", &s.pays),
                ("ville", &s.ville),
                ("rue", &s.rue),
            ] {
                if let Err(e) = topic_level(v) {
                    bad(key, format!("{v:?} {e}"));
                }
            }
            if s.grandeurs.is_empty() {
                bad("grandeurs", "must list at least one quantity".into());
            }
            for g in &s.grandeurs {
                if let Err(e) = topic_level(g) {
                    bad("grandeurs", format!("{g:?} {e}"));
                }
            }
            if s.qos > 2 {
                bad("qos", "must be 0, 1 or 2".into());
            }
            if s.change_threshold.is_nan() || s.change_threshold < 0.0 {
                bad("change_threshold", "must be 0 or more".into());
            }
            if let Some(k) = &s.key {
                let ok = crate::sources::ble::parse_hex(k).is_some_and(|b| b.len() == 16);
                if !ok {
                    bad(
                        "key",
                        "must be 32 hex digits (a 16-byte BTHome bindkey)".into(),
                    );
                }
            }
            match SourceKey::parse(&s.source) {
                Err(e) => bad("source", e),
                Ok(SourceKey::Serial(port)) => {
                    if !self.serial.iter().any(|p| p.port == port) {
                        bad(
                            "source",
                            format!(
                                "no [[serial]] entry has port = {:?}",
                                port.display().to_string()
                            ),
                        );
                    }
                    if !seen.insert((port, s.id.clone())) {
                        bad("id", format!("{:?} is listed twice on this port", s.id));
                    }
                }
                Ok(SourceKey::Ble(mac)) => {
                    if !macs.insert(mac) {
                        bad("source", "this BLE address is listed twice".into());
                    }
                    if !self.ble.scan && self.ble.replay.is_none() {
                        bad(
                            "source",
                            "a BLE sensor, but [ble] has neither scan = true nor replay".into(),
                        );
                    }
                }
            }
        }
        let mut ports = std::collections::HashSet::new();
        for (i, p) in self.serial.iter().enumerate() {
            let mut bad = |key: &str, what: String| {
                problems.push(format!(
                    "{}serial[{i}].{key}: {what}",
                    at_line(array_key_line(text, "serial", i, key))
                ));
            };
            if !ports.insert(p.port.clone()) {
                bad("port", "this port is listed twice".into());
            }
            if p.baud == 0 {
                bad("baud", "must be above 0".into());
            }
            if !(5..=8).contains(&p.data_bits) {
                bad("data_bits", "must be 5, 6, 7 or 8".into());
            }
            if !(1..=2).contains(&p.stop_bits) {
                bad("stop_bits", "must be 1 or 2".into());
            }
            if !(16..=65536).contains(&p.max_line_bytes) {
                bad("max_line_bytes", "must be between 16 and 65536".into());
            }
            if p.reopen_min_ms < 10 || p.reopen_max_ms < p.reopen_min_ms {
                bad(
                    "reopen_min_ms",
                    "needs 10 <= reopen_min_ms <= reopen_max_ms".into(),
                );
            }
            let here: Vec<&SensorConfig> = self
                .sensors
                .iter()
                .filter(|s| {
                    SourceKey::parse(&s.source).ok() == Some(SourceKey::Serial(p.port.clone()))
                })
                .collect();
            let default = match &p.sensor {
                Some(id) => {
                    let found = here.iter().find(|s| &s.id == id).copied();
                    if found.is_none() {
                        bad(
                            "sensor",
                            format!(
                                "no [[sensors]] entry {id:?} with source = \"serial:{}\"",
                                p.port.display()
                            ),
                        );
                    }
                    found
                }
                None if here.len() == 1 => Some(here[0]),
                None => None,
            };
            if let Some(d) = &p.decoder {
                if !self
                    .plugins
                    .iter()
                    .any(|x| &x.name == d && x.kind == PluginKind::Decoder)
                {
                    bad(
                        "decoder",
                        format!("no [[plugins]] entry {d:?} with kind = \"decoder\""),
                    );
                }
            }
            if p.decoder.is_none()
                && p.format == crate::sources::serial::lines::LineFormat::Plain
                && default.is_none()
                && p.sensor.is_none()
            {
                bad(
                    "sensor",
                    format!("plain lines carry no id: say whose readings they are ({} sensors on this port)", here.len()),
                );
            }
            if let (Some(g), Some(s)) = (&p.grandeur, default) {
                if !s
                    .grandeurs
                    .iter()
                    .any(|x| topic_level(x).ok() == topic_level(g).ok())
                {
                    bad("grandeur", format!("sensor {:?} does not list {g:?}", s.id));
                }
            }
        }
    }

    fn validate_upstream(&self, text: &str, problems: &mut Vec<String>) {
        let mut bad = |table: &str, key: &str, what: String| {
            let at = match key_line(text, table, key) {
                Some(line) => format!("line {line}: "),
                None => String::new(),
            };
            problems.push(format!("{at}{table}.{key}: {what}"));
        };
        let u = &self.upstream;
        if u.enabled && u.servers.is_empty() {
            bad("upstream", "servers", "needs at least one server".into());
        }
        for s in &u.servers {
            if let Err(e) = crate::upstream::ServerUrl::parse(s) {
                bad("upstream", "servers", e);
            }
        }
        if u.client_id.contains(['+', '#', '\0']) {
            bad(
                "upstream",
                "client_id",
                "must not contain '+', '#' or NUL".into(),
            );
        }
        if u.password.is_some() && u.username.is_none() {
            bad("upstream", "password", "needs upstream.username".into());
        }
        if u.client_cert.is_some() != u.client_key.is_some() {
            bad(
                "upstream",
                "client_cert",
                "client_cert and client_key go together".into(),
            );
        }
        // rumqttc takes a client certificate only with an explicit CA: with
        // the system's roots it would connect without it, and the cloud
        // would refuse us for no visible reason.
        if u.client_cert.is_some() && u.ca_file.is_none() {
            bad(
                "upstream",
                "client_cert",
                "mutual TLS needs upstream.ca_file too (the cloud's CA, e.g. AWS IoT's AmazonRootCA1.pem)".into(),
            );
        }
        for (key, file) in [
            ("ca_file", &u.ca_file),
            ("client_cert", &u.client_cert),
            ("client_key", &u.client_key),
        ] {
            if let Some(f) = file {
                let p = self.resolve(f);
                if !p.is_file() {
                    bad(
                        "upstream",
                        key,
                        format!("{} does not exist or is not a file", p.display()),
                    );
                }
            }
        }
        if u.reconnect_min_ms == 0 || u.reconnect_max_ms < u.reconnect_min_ms {
            bad(
                "upstream",
                "reconnect_max_ms",
                "reconnect_min_ms must be >= 1 and reconnect_max_ms >= reconnect_min_ms".into(),
            );
        }
        if u.max_inflight == 0 {
            bad("upstream", "max_inflight", "must be at least 1".into());
        }
        if u.stats_interval_secs == 0 {
            bad(
                "upstream",
                "stats_interval_secs",
                "must be at least 1".into(),
            );
        }
        if u.connect_timeout_ms == 0 {
            bad(
                "upstream",
                "connect_timeout_ms",
                "must be at least 1".into(),
            );
        }
        if u.status_prefix.is_empty() || u.status_prefix.contains(['+', '#', '\0']) {
            bad(
                "upstream",
                "status_prefix",
                "must be a topic prefix without wildcards".into(),
            );
        }
        let b = &self.buffer;
        if b.max_bytes < 1024 {
            bad("buffer", "max_bytes", "must be at least 1024".into());
        }
        if b.memory_max_messages == 0 || b.memory_max_messages > 10_000_000 {
            bad(
                "buffer",
                "memory_max_messages",
                "must be between 1 and 10000000".into(),
            );
        }
        for (i, r) in u.rules.iter().enumerate() {
            let table = format!("upstream.rules[{i}]");
            let mut rule_bad = |key: &str, what: String| {
                let at = match array_key_line(text, "upstream.rules", i, key) {
                    Some(line) => format!("line {line}: "),
                    None => String::new(),
                };
                problems.push(format!("{at}{table}.{key}: {what}"));
            };
            if let Err(e) = crate::broker::topic::validate_filter(&r.pattern) {
                rule_bad(
                    "pattern",
                    format!("{:?} is not a topic filter ({e})", r.pattern),
                );
            }
            if r.qos > 2 {
                rule_bad("qos", format!("must be 0, 1 or 2, not {}", r.qos));
            }
            if r.qos == 2 && !u.clean_session && r.direction != Direction::In {
                rule_bad(
                    "qos",
                    "QoS 2 out rules need upstream.clean_session = true (a resumed session's packet ids would collide with the resent messages)".into(),
                );
            }
            for (key, prefix) in [
                ("local_prefix", &r.local_prefix),
                ("remote_prefix", &r.remote_prefix),
            ] {
                if prefix.contains(['+', '#', '\0']) {
                    rule_bad(key, format!("{prefix:?} must not contain wildcards"));
                }
            }
        }
    }

    /// A path from the file, relative to the file's own directory.
    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_owned()
        } else {
            self.base_dir.join(p)
        }
    }
}

/// Line (1-based) of `key = …` in the `index`-th `[[table]]`, if set there.
fn array_key_line(text: &str, table: &str, index: usize, key: &str) -> Option<usize> {
    let header = format!("[[{table}]]");
    let mut seen: Option<usize> = None;
    let mut inside = false;
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.starts_with('[') {
            inside = line == header && {
                seen = Some(seen.map_or(0, |n| n + 1));
                seen == Some(index)
            };
            continue;
        }
        if inside {
            if let Some((k, _)) = line.split_once('=') {
                if k.trim() == key {
                    return Some(i + 1);
                }
            }
        }
    }
    None
}

/// Line (1-based) of `key = …` inside `[table]`, if the file sets it.
fn key_line(text: &str, table: &str, key: &str) -> Option<usize> {
    let mut current = String::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if let Some(rest) = line.strip_prefix('[') {
            current = rest.trim_end_matches(']').trim().to_owned();
            continue;
        }
        if current == table {
            if let Some((k, _)) = line.split_once('=') {
                if k.trim() == key {
                    return Some(i + 1);
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_is_valid() {
        let cfg = GatewayConfig::embedded_default().unwrap();
        assert_eq!(cfg.broker.listen, "127.0.0.1:1883");
        assert!(cfg.broker.allow_anonymous);
        assert_eq!(cfg.gateway.data_dir, PathBuf::from("./capteurs-data"));
    }

    #[test]
    fn every_shipped_config_is_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
        let mut seen = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            // fleet-*.toml are simulator scenarios (checked by capteurs-sim's tests).
            let scenario = path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("fleet-"));
            if path.extension().is_some_and(|e| e == "toml") && !scenario {
                GatewayConfig::load(&path).unwrap_or_else(|e| panic!("{e}"));
                seen += 1;
            }
        }
        assert!(seen >= 2);
    }

    #[test]
    fn unknown_key_names_line() {
        let err = GatewayConfig::parse(
            "[broker]\nlisten = \"127.0.0.1:1\"\nlisten_port = 3\n",
            "t.toml",
            Path::new("."),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("line 3"), "{err}");
        assert!(err.contains("listen_port"), "{err}");
    }

    #[test]
    fn semantic_errors_are_all_reported_with_lines() {
        let text = "[broker]\nlisten = \"nowhere\"\n\nmax_inflight = 0\n";
        let err = GatewayConfig::parse(text, "t.toml", Path::new(".")).unwrap_err();
        let ConfigError::Invalid { problems, .. } = err else {
            panic!("{err}")
        };
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems[0].starts_with("line 2: broker.listen"),
            "{problems:?}"
        );
        assert!(
            problems[1].starts_with("line 4: broker.max_inflight"),
            "{problems:?}"
        );
    }

    /// check-config reads the password and ACL files the gateway will
    /// read: their own errors come out with the key's line and theirs.
    #[test]
    fn password_and_acl_files_are_read_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("passwd"), "# users\nG1 no colon\n").unwrap();
        std::fs::write(
            dir.path().join("acl"),
            "topic read a/#\ntopic sometimes b\n",
        )
        .unwrap();
        let text = "[broker]\npassword_file = \"passwd\"\nacl_file = \"acl\"\n";
        let err = GatewayConfig::parse(text, "t.toml", dir.path()).unwrap_err();
        let ConfigError::Invalid { problems, .. } = err else {
            panic!("{err}")
        };
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems[0].starts_with("line 2: broker.password_file"),
            "{problems:?}"
        );
        assert!(
            problems[0].contains("line 2: expected user:hash"),
            "{problems:?}"
        );
        assert!(
            problems[1].starts_with("line 3: broker.acl_file"),
            "{problems:?}"
        );
        assert!(problems[1].contains("line 2"), "{problems:?}");
        let text = "[broker]\npassword_file = \"missing\"\n";
        let err = GatewayConfig::parse(text, "t.toml", dir.path()).unwrap_err();
        assert!(err.to_string().contains("cannot read"), "{err}");
    }

    #[test]
    fn ops_and_tls_errors_name_key_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("gw.crt");
        std::fs::write(&cert, "x").unwrap();
        let text = format!(
            "[http]\nlisten = \"localhost\"\n[homeassistant]\nprefix = \"ha/#\"\n\
             [upstream]\nclient_cert = {:?}\nclient_key = {:?}\n",
            cert.display().to_string(),
            cert.display().to_string()
        );
        let err = GatewayConfig::parse(&text, "t.toml", dir.path()).unwrap_err();
        let ConfigError::Invalid { problems, .. } = err else {
            panic!("{err}")
        };
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(
            problems[0].starts_with("line 2: http.listen"),
            "{problems:?}"
        );
        assert!(
            problems[1].starts_with("line 4: homeassistant.prefix"),
            "{problems:?}"
        );
        assert!(
            problems[2]
                .starts_with("line 6: upstream.client_cert: mutual TLS needs upstream.ca_file"),
            "{problems:?}"
        );
    }

    #[test]
    fn sensor_and_serial_errors_name_key_and_line() {
        let text = "\
[[serial]]
port = \"/dev/ttyUSB0\"
stop_bits = 3

[[sensors]]
id = \"cuisine\"
source = \"serial:/dev/ttyUSB0\"
pays = \"FR\"
ville = \"Aubière/Nord\"
rue = \"Rue de la Chebarde\"

[[sensors]]
id = \"balcon\"
source = \"ble:A4:C1:38:02:83\"
pays = \"FR\"
ville = \"Aubière\"
rue = \"Rue #2\"
qos = 3
";
        let err = GatewayConfig::parse(text, "t.toml", Path::new("."))
            .unwrap_err()
            .to_string();
        for want in [
            "line 3: serial[0].stop_bits",
            "line 9: sensors[0].ville: \"Aubière/Nord\" contains '/'",
            "line 14: sensors[1].source",
            "line 17: sensors[1].rue",
            "line 18: sensors[1].qos",
        ] {
            assert!(err.contains(want), "{want:?} not in\n{err}");
        }
        // A BLE sensor needs a BLE input; plain lines need to know whose.
        let text = "[[serial]]\nport = \"/dev/ttyS0\"\n[[sensors]]\nid = \"b\"\nsource = \"ble:A4:C1:38:02:83:F4\"\npays = \"fr\"\nville = \"v\"\nrue = \"r\"\n";
        let err = GatewayConfig::parse(text, "t.toml", Path::new("."))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("line 5: sensors[0].source: a BLE sensor, but [ble]"),
            "{err}"
        );
        assert!(
            err.contains("serial[0].sensor: plain lines carry no id"),
            "{err}"
        );
    }
    #[test]
    fn plugin_errors_name_key_and_line() {
        let text = "\
[[plugins]]
name = \"acl\"
kind = \"auth\"
path = \"acl.wasm\"
instances = 2

[[plugins]]
name = \"deadband\"
kind = \"transform\"
path = \"deadband.wasm\"
topics = [\"a/#/b\"]
instances = 0
memory_mb = 0
";
        let err = GatewayConfig::parse(text, "t.toml", Path::new("."))
            .unwrap_err()
            .to_string();
        for want in [
            "line 5: plugins[0].instances: 2: only transform plugins",
            "line 11: plugins[1].topics",
            "line 12: plugins[1].instances: 0: must be between 1 and 64",
            "line 13: plugins[1].memory_mb",
        ] {
            assert!(err.contains(want), "{want:?} not in\n{err}");
        }
    }
}
