//! Wires the stages from a [`GatewayConfig`] and runs them until shutdown.
//! Today the broker is the only stage; sources, plugins, the buffer and the
//! upstream forwarder plug in here as they arrive.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;

use crate::broker::auth::{AuthError, FileAuth};
use crate::broker::{Broker, BrokerError, BrokerHandle, BrokerSettings};
use crate::config::GatewayConfig;

#[derive(Debug, Error)]
pub enum Error {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("invalid broker.listen address {0:?}")]
    Listen(String),
}

/// Broker settings from the configuration.
pub fn broker_settings(cfg: &GatewayConfig) -> Result<BrokerSettings, Error> {
    let b = &cfg.broker;
    let listen: SocketAddr = b
        .listen
        .parse()
        .map_err(|_| Error::Listen(b.listen.clone()))?;
    Ok(BrokerSettings {
        listen,
        max_packet_size: b.max_packet_size,
        max_connections: b.max_connections,
        max_inflight: b.max_inflight,
        max_queued: b.max_queued,
        queue_qos0_offline: b.queue_qos0_offline,
        slow_subscriber_timeout: Duration::from_millis(b.slow_subscriber_timeout_ms),
        connect_timeout: Duration::from_millis(b.connect_timeout_ms),
        sys_interval: Duration::from_secs(b.sys_interval_secs),
        persist_interval: Duration::from_millis(b.persist_interval_ms),
        data_dir: b.persistence.then(|| cfg.resolve(&cfg.gateway.data_dir)),
    })
}

/// The built-in authenticator from the configuration.
pub fn authenticator(cfg: &GatewayConfig) -> Result<FileAuth, Error> {
    let b = &cfg.broker;
    let passwd = b.password_file.as_ref().map(|p| cfg.resolve(p));
    let acl = b.acl_file.as_ref().map(|p| cfg.resolve(p));
    Ok(FileAuth::new(
        b.allow_anonymous,
        passwd.as_deref(),
        acl.as_deref(),
    )?)
}

/// Starts every stage.
pub async fn start(cfg: &GatewayConfig) -> Result<BrokerHandle, Error> {
    let settings = broker_settings(cfg)?;
    let auth = authenticator(cfg)?;
    Ok(Broker::start(settings, Arc::new(auth)).await?)
}

/// Runs the gateway until `shutdown` resolves, then stops cleanly.
pub async fn run(cfg: GatewayConfig, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    let broker = start(&cfg).await?;
    shutdown.await;
    tracing::info!("shutting down");
    broker.shutdown().await;
    Ok(())
}
