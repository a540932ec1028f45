//! `[broker]`: the embedded MQTT broker's part of the configuration, its
//! defaults (the same as `configs/gateway.toml`'s), and the one place its
//! values are checked — building the runtime [`BrokerSettings`] and the
//! built-in authenticator *is* the check.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::auth::{Acl, FileAuth, PasswordFile};
use super::BrokerSettings;
use crate::problems::Problems;

#[derive(Debug, Clone, PartialEq, Deserialize)]
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

impl BrokerConfig {
    /// Every problem of `[broker]`, the password and ACL files included
    /// (read and parsed as the gateway will read them at start).
    pub fn validate(&self, problems: &mut Problems) {
        problems.take(self.settings(Path::new(".")));
        problems.take(self.authenticator());
    }

    /// The runtime settings; sessions and retained messages are kept under
    /// `data_dir` when `persistence` is on.
    pub fn settings(&self, data_dir: &Path) -> Result<BrokerSettings, Problems> {
        let mut p = Problems::new();
        let listen = p.check(
            "broker.listen",
            self.listen
                .parse::<SocketAddr>()
                .map_err(|e| format!("{:?} is not an address:port ({e})", self.listen)),
        );
        if !(64..=268_435_455).contains(&self.max_packet_size) {
            p.add(
                "broker.max_packet_size",
                "must be between 64 and 268435455 bytes",
            );
        }
        for (key, value) in [
            ("max_connections", self.max_connections),
            ("max_inflight", self.max_inflight.into()),
            ("max_queued", self.max_queued),
            ("connect_timeout_ms", self.connect_timeout_ms as usize),
            ("write_timeout_ms", self.write_timeout_ms as usize),
            ("max_topic_levels", self.max_topic_levels),
            (
                "max_subscriptions_per_client",
                self.max_subscriptions_per_client,
            ),
            ("max_retained", self.max_retained),
            ("max_retained_bytes", self.max_retained_bytes),
            ("max_sessions", self.max_sessions),
            ("sys_interval_secs", self.sys_interval_secs as usize),
            ("persist_interval_ms", self.persist_interval_ms as usize),
        ] {
            if value == 0 {
                p.add(format!("broker.{key}"), "must be at least 1");
            }
        }
        let Some(listen) = listen else {
            return Err(p);
        };
        p.or(|| BrokerSettings {
            listen,
            max_packet_size: self.max_packet_size,
            max_connections: self.max_connections,
            max_inflight: self.max_inflight,
            max_queued: self.max_queued,
            queue_qos0_offline: self.queue_qos0_offline,
            slow_subscriber_timeout: Duration::from_millis(self.slow_subscriber_timeout_ms),
            connect_timeout: Duration::from_millis(self.connect_timeout_ms),
            write_timeout: Duration::from_millis(self.write_timeout_ms),
            max_topic_levels: self.max_topic_levels,
            max_subscriptions_per_client: self.max_subscriptions_per_client,
            max_retained: self.max_retained,
            max_retained_bytes: self.max_retained_bytes,
            max_sessions: self.max_sessions,
            session_expiry: Duration::from_secs(self.session_expiry_secs),
            login_free_failures: self.login_free_failures,
            login_backoff_max: Duration::from_millis(self.login_backoff_max_ms),
            sys_interval: Duration::from_secs(self.sys_interval_secs),
            persist_interval: Duration::from_millis(self.persist_interval_ms),
            data_dir: self.persistence.then(|| data_dir.to_owned()),
        })
    }

    /// The built-in authenticator: `allow_anonymous`, the password file and
    /// the ACL file, read now.
    pub fn authenticator(&self) -> Result<FileAuth, Problems> {
        let passwords = self.password_file.as_deref().map(PasswordFile::load);
        let acl = self.acl_file.as_deref().map(Acl::load);
        match (passwords.transpose(), acl.transpose()) {
            (Ok(passwords), Ok(acl)) => {
                Ok(FileAuth::from_parts(self.allow_anonymous, passwords, acl))
            }
            (passwords, acl) => {
                let mut p = Problems::new();
                if let Err(e) = passwords {
                    p.add("broker.password_file", e);
                }
                if let Err(e) = acl {
                    p.add("broker.acl_file", e);
                }
                Err(p)
            }
        }
    }
}

impl BrokerSettings {
    /// Settings for tests and quick trials: the defaults on loopback port 0,
    /// in memory.
    pub fn ephemeral() -> Self {
        let cfg = BrokerConfig {
            listen: "127.0.0.1:0".into(),
            persistence: false,
            ..BrokerConfig::default()
        };
        cfg.settings(Path::new("."))
            .expect("the default broker settings are valid")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_zero_limit_is_named() {
        let cfg = BrokerConfig {
            listen: "nowhere".into(),
            max_inflight: 0,
            max_sessions: 0,
            ..BrokerConfig::default()
        };
        let keys: Vec<String> = cfg
            .settings(Path::new("."))
            .unwrap_err()
            .into_iter()
            .map(|p| p.key)
            .collect();
        assert_eq!(
            keys,
            [
                "broker.listen",
                "broker.max_inflight",
                "broker.max_sessions"
            ]
        );
    }

    #[test]
    fn persistence_off_keeps_nothing_on_disk() {
        let s = BrokerSettings::ephemeral();
        assert!(s.data_dir.is_none());
        assert_eq!(s.listen.port(), 0);
        let on = BrokerConfig::default()
            .settings(Path::new("/var/lib/x"))
            .unwrap();
        assert_eq!(on.data_dir.as_deref(), Some(Path::new("/var/lib/x")));
    }
}
