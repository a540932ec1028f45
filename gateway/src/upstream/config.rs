//! `[upstream]`: the cloud broker the gateway forwards to (and takes
//! commands from), checked while building [`UpstreamSettings`] — the server
//! addresses are parsed and the TLS files read once, here.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{ServerUrl, UpstreamSettings};
use crate::message::QoS;
use crate::problems::Problems;

#[derive(Debug, Clone, PartialEq, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamRule {
    pub pattern: String,
    pub direction: Direction,
    pub qos: QoS,
    pub local_prefix: String,
    pub remote_prefix: String,
}

impl Default for UpstreamRule {
    fn default() -> Self {
        UpstreamRule {
            pattern: "capteurs/#".into(),
            direction: Direction::Out,
            qos: QoS::AtLeastOnce,
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

impl UpstreamConfig {
    /// Every problem of `[upstream]`, checked even while it is disabled (a
    /// file fixed today is one that works the day it is switched on).
    pub fn validate(&self, gateway_id: &str, problems: &mut Problems) {
        problems.take(self.settings(gateway_id));
    }

    /// The runtime settings, with the TLS files read.
    pub fn settings(&self, gateway_id: &str) -> Result<UpstreamSettings, Problems> {
        let mut p = Problems::new();
        if self.enabled && self.servers.is_empty() {
            p.add("upstream.servers", "needs at least one server");
        }
        let servers: Vec<ServerUrl> = self
            .servers
            .iter()
            .filter_map(|s| p.check("upstream.servers", ServerUrl::parse(s)))
            .collect();
        if self.client_id.contains(['+', '#', '\0']) {
            p.add("upstream.client_id", "must not contain '+', '#' or NUL");
        }
        if self.password.is_some() && self.username.is_none() {
            p.add("upstream.password", "needs upstream.username");
        }
        if self.client_cert.is_some() != self.client_key.is_some() {
            p.add(
                "upstream.client_cert",
                "client_cert and client_key go together",
            );
        }
        // rumqttc takes a client certificate only with an explicit CA: with
        // the system's roots it would connect without it, and the cloud
        // would refuse us for no visible reason.
        if self.client_cert.is_some() && self.ca_file.is_none() {
            p.add(
                "upstream.client_cert",
                "mutual TLS needs upstream.ca_file too (the cloud's CA, e.g. AWS IoT's AmazonRootCA1.pem)",
            );
        }
        let mut read = |key: &str, file: &Option<PathBuf>| {
            let f = file.as_ref()?;
            p.check(
                &format!("upstream.{key}"),
                std::fs::read(f).map_err(|e| format!("{}: {e}", f.display())),
            )
        };
        let ca = read("ca_file", &self.ca_file);
        let client_auth =
            read("client_cert", &self.client_cert).zip(read("client_key", &self.client_key));
        if self.reconnect_min_ms == 0 || self.reconnect_max_ms < self.reconnect_min_ms {
            p.add(
                "upstream.reconnect_max_ms",
                "reconnect_min_ms must be >= 1 and reconnect_max_ms >= reconnect_min_ms",
            );
        }
        for (key, zero) in [
            ("max_inflight", self.max_inflight == 0),
            ("stats_interval_secs", self.stats_interval_secs == 0),
            ("connect_timeout_ms", self.connect_timeout_ms == 0),
        ] {
            if zero {
                p.add(format!("upstream.{key}"), "must be at least 1");
            }
        }
        if self.status_prefix.is_empty() || self.status_prefix.contains(['+', '#', '\0']) {
            p.add(
                "upstream.status_prefix",
                "must be a topic prefix without wildcards",
            );
        }
        for (i, r) in self.rules.iter().enumerate() {
            r.check(&format!("upstream.rules[{i}]"), self.clean_session, &mut p);
        }
        p.or(|| UpstreamSettings {
            gateway_id: gateway_id.to_owned(),
            servers,
            client_id: if self.client_id.is_empty() {
                gateway_id.to_owned()
            } else {
                self.client_id.clone()
            },
            username: self.username.clone(),
            password: self.password.clone(),
            ca,
            client_auth,
            keep_alive: Duration::from_secs(self.keep_alive_secs.max(1)),
            clean_session: self.clean_session,
            connect_timeout: Duration::from_millis(self.connect_timeout_ms),
            status_prefix: self.status_prefix.clone(),
            stats_interval: Duration::from_secs(self.stats_interval_secs),
            reconnect_min: Duration::from_millis(self.reconnect_min_ms),
            reconnect_max: Duration::from_millis(self.reconnect_max_ms),
            max_inflight: self.max_inflight,
            max_rate: self.max_rate,
            envelope: self.envelope,
        })
    }
}

impl UpstreamRule {
    fn check(&self, at: &str, clean_session: bool, p: &mut Problems) {
        if let Err(e) = crate::broker::topic::validate_filter(&self.pattern) {
            p.add(
                format!("{at}.pattern"),
                format!("{:?} is not a topic filter ({e})", self.pattern),
            );
        }
        if self.qos == QoS::ExactlyOnce && !clean_session && self.direction != Direction::In {
            p.add(
                format!("{at}.qos"),
                "QoS 2 out rules need upstream.clean_session = true (a resumed session's packet ids would collide with the resent messages)",
            );
        }
        for (key, prefix) in [
            ("local_prefix", &self.local_prefix),
            ("remote_prefix", &self.remote_prefix),
        ] {
            if prefix.contains(['+', '#', '\0']) {
                p.add(
                    format!("{at}.{key}"),
                    format!("{prefix:?} must not contain wildcards"),
                );
            }
        }
    }
}
