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
    pub sys_interval_secs: u64,
    pub persist_interval_ms: u64,
    pub persistence: bool,
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
            sys_interval_secs: 10,
            persist_interval_ms: 1000,
            persistence: true,
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
        if b.sys_interval_secs == 0 {
            bad("broker", "sys_interval_secs", "must be at least 1".into());
        }
        if b.persist_interval_ms == 0 {
            bad("broker", "persist_interval_ms", "must be at least 1".into());
        }
        for (key, file) in [
            ("password_file", &b.password_file),
            ("acl_file", &b.acl_file),
        ] {
            if let Some(f) = file {
                let p = self.resolve(f);
                if !p.is_file() {
                    bad(
                        "broker",
                        key,
                        format!("{} does not exist or is not a file", p.display()),
                    );
                }
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
        problems
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
}
