//! Capteurs gateway: an edge IoT gateway with an embedded MQTT broker.
//!
//! # Data flow
//! ```text
//! sources (serial, BLE)  ──┐
//!                          ├─> plugins (WASM) ─> broker ─> buffer (SQLite) ─> upstream (cloud)
//! MQTT clients ────────────┘                      │
//!                                                 └─> local subscribers
//! ```
//! One type, [`message::Message`], flows through every stage.
//!
//! # Layout
//! In the order messages flow, then what serves every stage:
//! - [`sources`]: serial and BLE sensors, turned into messages on
//!   `capteurs/<grandeur>/<pays>/<ville>/<rue>` (`config`: their tables;
//!   `plan`: checked into the registry and the inputs' settings).
//! - [`plugins`]: WebAssembly transform, auth and decoder plugins (wasmtime,
//!   component model, WIT in `wit/`).
//! - [`broker`]: the embedded MQTT 3.1.1 broker: `connection/` (handshake,
//!   inbound handlers, outbound pump), `session/` (queue and in-flight
//!   window), `router`, `trie`, `topic`, `auth/`, `store` (SQLite), `sys`.
//! - [`buffer`]: the SQLite store-and-forward buffer in front of the
//!   upstream (`writer`, `policy`, `memory`, `sqlite`, `recovery`, `stats`).
//! - [`upstream`]: the forwarder to the cloud broker (`outlet`, `forwarder`,
//!   `acks`, `pacing`, `rules`, `url`).
//! - [`message`]: the one message type, its QoS, Seq, Durability and the
//!   routing policy over its origin.
//! - [`ops`]: metrics, status page, `/status.json`, Home Assistant discovery.
//! - [`config`]: composes the stages' own `config` modules into the file,
//!   resolves paths, finds each problem's line; [`problems`]: the collector
//!   every stage records its configuration problems in.
//! - [`gateway`]: wires the stages from a configuration and runs them until
//!   shutdown.
//! - [`files`]: the data directory and databases, private to the gateway.
//! - [`health`], [`systemd`], [`logging`]: heartbeats and the watchdog, the
//!   service protocol, journald or stderr.

pub mod broker;
pub mod buffer;
pub mod config;
pub mod files;
pub mod gateway;
pub mod health;
pub mod logging;
pub mod message;
pub mod ops;
pub mod plugins;
pub mod problems;
pub mod sources;
pub mod systemd;
pub mod upstream;

pub use config::GatewayConfig;
