//! `[http]` and `[homeassistant]`: the operator's side of the
//! configuration, checked while building [`OpsSettings`].

use std::net::SocketAddr;

use serde::Deserialize;

use crate::problems::Problems;

/// `[http]`: Prometheus metrics, the status page and its JSON.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// `address:port` to listen on; empty: no HTTP listener.
    pub listen: String,
}

/// `[homeassistant]`: MQTT discovery of the registered sensors.
#[derive(Debug, Clone, PartialEq, Deserialize)]
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

/// What the operations side runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpsSettings {
    /// The HTTP listener's address; `None`: off.
    pub http: Option<SocketAddr>,
    /// Home Assistant's discovery prefix, when discovery is on.
    pub discovery: Option<String>,
}

/// Checks both tables and builds the settings.
pub fn settings(http: &HttpConfig, ha: &HomeAssistantConfig) -> Result<OpsSettings, Problems> {
    let mut p = Problems::new();
    let listen = if http.listen.is_empty() {
        None
    } else {
        p.check(
            "http.listen",
            http.listen
                .parse::<SocketAddr>()
                .map_err(|e| format!("{:?} is not an address:port ({e})", http.listen)),
        )
    };
    if ha.prefix.is_empty() || crate::broker::topic::validate_name(&ha.prefix).is_err() {
        p.add(
            "homeassistant.prefix",
            format!("{:?} is not a topic name", ha.prefix),
        );
    }
    p.or(|| OpsSettings {
        http: listen,
        discovery: ha.discovery.then(|| ha.prefix.clone()),
    })
}
