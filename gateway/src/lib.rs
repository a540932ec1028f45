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
//! - [`config`]: the TOML configuration tree, its defaults and checks.
//! - [`message`]: the message type.
//! - [`plugins`]: WebAssembly transform and auth plugins (wasmtime, component model, WIT in `wit/`).
//! - [`sources`]: serial and BLE sensors, turned into messages on `capteurs/<grandeur>/<pays>/<ville>/<rue>`.
//! - [`broker`]: the embedded MQTT 3.1.1 broker (sessions, retained, auth, `$SYS`, persistence).
//! - [`buffer`]: the SQLite store-and-forward buffer in front of the upstream.
//! - [`upstream`]: the forwarder to the cloud broker (rules, TLS, status, backoff).
//! - [`files`]: the data directory and databases, private to the gateway.
//! - [`gateway`]: wires the stages from a configuration and runs them until shutdown.

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
