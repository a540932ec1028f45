//! The gateway's configuration: one TOML file, every key documented in
//! `configs/gateway.toml`, which is also the embedded default.
//!
//! [`GatewayConfig`] only composes: each stage owns its table's types,
//! defaults and checks (`broker::config`, `buffer::config`,
//! `upstream::config`, `sources::config`, `plugins::config`,
//! `ops::config`, `logging::LogConfig`), and builds its runtime settings from
//! them — building them *is* the check, so a fact is checked in one place.
//!
//! Loading happens in two passes, like Vector's: serde refuses unknown keys
//! and wrong types (the `toml` error names the line), then every stage's
//! problems are collected at once and `locate` finds each key's line.
//! Relative paths are resolved against the file's directory once, at load.

mod locate;

use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

use crate::broker::BrokerConfig;
use crate::buffer::BufferConfig;
use crate::logging::LogConfig;
use crate::ops::config::{HomeAssistantConfig, HttpConfig};
use crate::plugins::PluginConfig;
use crate::problems::Problems;
use crate::sources::config::{BleConfig, SensorConfig, SerialConfig, SourcesConfig};
use crate::sources::SourcesInput;
use crate::upstream::UpstreamConfig;

/// The default configuration, compiled into the binary.
pub const DEFAULT_CONFIG: &str = include_str!("../../../configs/gateway.toml");

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
        /// Each problem with its line when the file sets the key, in the
        /// file's order.
        problems: Vec<String>,
    },
}

/// The whole configuration tree.
#[derive(Debug, Clone, PartialEq, Deserialize)]
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
        }
    }
}

/// `[gateway]`: who this gateway is and where it keeps its state.
#[derive(Debug, Clone, PartialEq, Deserialize)]
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

    /// Parses and checks TOML text; `origin` names it in errors, relative
    /// paths are taken from `base_dir`.
    pub fn parse(text: &str, origin: &str, base_dir: &Path) -> Result<Self, ConfigError> {
        let mut cfg: GatewayConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            origin: origin.to_owned(),
            message: e.to_string(),
        })?;
        cfg.resolve_paths(base_dir);
        let problems = cfg.validate();
        if !problems.is_empty() {
            return Err(ConfigError::Invalid {
                origin: origin.to_owned(),
                problems: with_lines(text, problems),
            });
        }
        Ok(cfg)
    }

    /// Every problem of every stage, each naming its key.
    pub fn validate(&self) -> Problems {
        let mut p = Problems::new();
        let id = &self.gateway.id;
        if id.is_empty() || id.contains(['/', '+', '#', '\0']) {
            p.add(
                "gateway.id",
                "must be non-empty and contain no '/', '+', '#' or NUL",
            );
        }
        p.take(crate::ops::config::settings(
            &self.http,
            &self.homeassistant,
        ));
        self.broker.validate(&mut p);
        self.log.validate(&mut p);
        self.upstream.validate(id, &mut p);
        self.buffer.validate(&mut p);
        self.sources_input(&crate::plugins::config::decoders(&self.plugins))
            .validate(&mut p);
        crate::plugins::config::validate(&self.plugins, &mut p);
        p
    }

    /// The sensor side of the file, for [`crate::sources`]; `decoders` are
    /// the decoder plugins' names.
    pub fn sources_input<'a>(&'a self, decoders: &'a [String]) -> SourcesInput<'a> {
        SourcesInput {
            sources: &self.sources,
            sensors: &self.sensors,
            serial: &self.serial,
            ble: &self.ble,
            decoders,
        }
    }

    /// Makes every relative path of the file relative to the file's own
    /// directory (the stages then open what they are given).
    fn resolve_paths(&mut self, base: &Path) {
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() && base != Path::new(".") {
                *p = base.join(&*p);
            }
        };
        resolve(&mut self.gateway.data_dir);
        let b = &mut self.broker;
        let u = &mut self.upstream;
        for p in [
            &mut b.password_file,
            &mut b.acl_file,
            &mut u.ca_file,
            &mut u.client_cert,
            &mut u.client_key,
            &mut self.ble.replay,
        ]
        .into_iter()
        .flatten()
        {
            resolve(p);
        }
        for p in &mut self.plugins {
            resolve(&mut p.path);
        }
        for s in &mut self.serial {
            resolve(&mut s.port);
        }
        // A sensor names its port as `[[serial]]` does: the same path.
        for s in &mut self.sensors {
            if let Some(port) = s.source.strip_prefix("serial:") {
                let mut port = PathBuf::from(port);
                if !port.as_os_str().is_empty() {
                    resolve(&mut port);
                    s.source = format!("serial:{}", port.display());
                }
            }
        }
    }
}

/// Each problem as `line N: key: what` when the file sets the key, in the
/// file's order (the others after, in the order found).
fn with_lines(text: &str, problems: Problems) -> Vec<String> {
    let mut found: Vec<(Option<usize>, String)> = problems
        .into_iter()
        .map(|p| match locate::line_of(text, &p.key) {
            Some(line) => (Some(line), format!("line {line}: {p}")),
            None => (None, p.to_string()),
        })
        .collect();
    found.sort_by_key(|(line, _)| line.unwrap_or(usize::MAX));
    found.into_iter().map(|(_, p)| p).collect()
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

    /// The defaults are written twice, as `Default` impls and as the
    /// documented file: they must say the same.
    #[test]
    fn defaults_agree_with_the_documented_file() {
        let file: GatewayConfig = toml::from_str(DEFAULT_CONFIG).unwrap();
        let code = GatewayConfig::default();
        assert_eq!(file.gateway, code.gateway);
        assert_eq!(file.broker, code.broker);
        assert_eq!(file.upstream, code.upstream);
        assert_eq!(file.buffer, code.buffer);
        assert_eq!(file.sources, code.sources);
        assert_eq!(file.ble, code.ble);
        assert_eq!(file.http, code.http);
        assert_eq!(file.homeassistant, code.homeassistant);
        assert_eq!(file.log, code.log);
        assert_eq!(file, code);
    }

    #[test]
    fn relative_paths_are_resolved_once_against_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let text = "[gateway]\ndata_dir = \"data\"\n[ble]\nreplay = \"/abs/fifo\"\n\
                    [[serial]]\nport = \"tty\"\nsensor = \"s\"\n\
                    [[sensors]]\nid = \"s\"\nsource = \"serial:tty\"\npays = \"fr\"\nville = \"v\"\nrue = \"r\"\n";
        let cfg = GatewayConfig::parse(text, "t.toml", dir.path()).unwrap();
        assert_eq!(cfg.gateway.data_dir, dir.path().join("data"));
        assert_eq!(cfg.ble.replay.as_deref(), Some(Path::new("/abs/fifo")));
        assert_eq!(cfg.serial[0].port, dir.path().join("tty"));
        assert_eq!(
            cfg.sensors[0].source,
            format!("serial:{}", dir.path().join("tty").display())
        );
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
