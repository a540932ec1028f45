//! Wires the stages from a [`GatewayConfig`] and runs them until shutdown:
//! the buffer opens first, the broker starts with it as its outbox, then the
//! upstream forwarder drains it. Sources and plugins plug in here as they
//! arrive. Shutdown runs the other way: upstream (clean DISCONNECT), broker
//! (sessions saved), buffer (last group commit).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;

use crate::broker::auth::Authenticator;
use crate::broker::Publisher;
use crate::broker::{Broker, BrokerError, BrokerHandle};
use crate::buffer::{Buffer, BufferError};
use crate::config::GatewayConfig;
use crate::health::{self, Health};
use crate::ops::discovery;
use crate::ops::http::HttpHandle;
use crate::ops::Ops;
use crate::plugins::runtime::PluginError;
use crate::plugins::{PluginKind, Plugins};
use crate::problems::Problems;
use crate::sources::{self, Sources, SourcesHandle};
use crate::systemd;
use crate::upstream::{self, Outlet, Rules, UpstreamHandle};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Error)]
pub enum Error {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// A setting refused when its stage started (the file is checked at
    /// load; this is what changed since, or what the command line set).
    #[error("configuration: {0}")]
    Config(#[from] Problems),
    #[error(transparent)]
    Buffer(#[from] BufferError),
    #[error("{0} task: {1}")]
    Task(&'static str, tokio::task::JoinError),
    #[error(transparent)]
    Plugin(#[from] PluginError),
    #[error("installing the SIGHUP handler: {0}")]
    Signal(std::io::Error),
    #[error(transparent)]
    Http(#[from] crate::ops::http::HttpError),
}

/// Every stage, running.
pub struct Gateway {
    pub broker: BrokerHandle,
    pub buffer: Option<Buffer>,
    pub upstream: Option<UpstreamHandle>,
    pub sources: Option<SourcesHandle>,
    pub plugins: Option<Arc<Plugins>>,
    /// The stages the watchdog watches.
    pub health: Health,
    /// The operations listener (`[http] listen`), when on.
    pub http: Option<HttpHandle>,
    /// `<status_prefix>/gateways/<id>/status`, kept retained locally while
    /// Home Assistant discovery is on (its availability topic).
    pub local_status: Option<String>,
    plugin_watch: Option<CancellationToken>,
}

impl Gateway {
    /// Stops the stages in order: operations, sources, upstream, broker,
    /// buffer.
    pub async fn shutdown(self) {
        if let Some(h) = self.http {
            h.shutdown().await;
        }
        if let Some(w) = self.plugin_watch {
            w.cancel();
        }
        if let Some(s) = self.sources {
            s.shutdown().await;
        }
        if let Some(u) = self.upstream {
            u.shutdown().await;
        }
        if let Some(topic) = &self.local_status {
            discovery::status(&self.broker.publisher(), topic, "offline");
        }
        self.broker.shutdown().await;
        if let Some(b) = self.buffer {
            tokio::task::spawn_blocking(move || b.close()).await.ok();
        }
    }
}

/// Starts every stage.
pub async fn start(cfg: &GatewayConfig) -> Result<Gateway, Error> {
    let data_dir = &cfg.gateway.data_dir;
    let ops = crate::ops::config::settings(&cfg.http, &cfg.homeassistant)?;
    let settings = cfg.broker.settings(data_dir)?;
    let mut builtin = cfg.broker.authenticator()?;
    let auth_plugins = cfg.plugins.iter().any(|p| p.kind == PluginKind::Auth);
    if cfg.broker.builtin_auth_first && auth_plugins {
        builtin = builtin.deferring();
    }
    let builtin: Arc<dyn Authenticator> = Arc::new(builtin);
    let plugins = load_plugins(cfg, builtin.clone()).await?;
    let auth: Arc<dyn Authenticator> = match &plugins {
        Some(p) => p.clone(),
        None => builtin,
    };
    let transform = plugins
        .clone()
        .map(|p| p as Arc<dyn crate::broker::Transform>);
    let status_topic = upstream::status_topic(&cfg.upstream.status_prefix, &cfg.gateway.id);
    let (broker, buffer, upstream) = if cfg.upstream.enabled {
        let up = cfg.upstream.settings(&cfg.gateway.id)?;
        let rules = Arc::new(Rules::new(cfg.upstream.rules.clone()));
        let bs = cfg.buffer.settings(data_dir)?;
        let buffer = tokio::task::spawn_blocking(move || Buffer::open(bs))
            .await
            .map_err(|e| Error::Task("buffer", e))??;
        let outlet = Arc::new(Outlet::new(
            rules.clone(),
            buffer.clone(),
            status_topic.clone(),
        ));
        let broker = Broker::start_with(settings, auth, Some(outlet), transform).await?;
        let upstream = upstream::start(up, rules, buffer.clone(), broker.publisher());
        (broker, Some(buffer), Some(upstream))
    } else {
        let broker = Broker::start_with(settings, auth, None, transform).await?;
        (broker, None, None)
    };
    let plugin_watch = plugins.as_ref().map(|p| {
        let token = CancellationToken::new();
        tokio::spawn(crate::plugins::watch(
            p.clone(),
            broker.publisher(),
            token.clone(),
        ));
        token
    });
    let sources = start_sources(cfg, broker.publisher(), plugins.clone())?;

    let mut health = Health::default();
    health.watch(broker.view().heartbeat().clone());
    if let Some(b) = &buffer {
        health.watch(b.heartbeat().clone());
    }
    if let Some(u) = &upstream {
        health.watch(u.heartbeat().clone());
    }
    // Home Assistant's availability topic: the same as the upstream's, kept
    // on the local broker too (not otherwise: `capteurs/#` subscribers of
    // the course would get it among their readings).
    let local_status = ops.discovery.as_ref().map(|prefix| {
        discovery::status(&broker.publisher(), &status_topic, "online");
        if let Some(s) = &sources {
            discovery::announce(
                &broker.publisher(),
                &s.sources.registry,
                prefix,
                &cfg.gateway.id,
                &status_topic,
            );
        }
        status_topic.clone()
    });
    let http = match ops.http {
        None => None,
        Some(addr) => {
            let ops = Ops::new(
                cfg.gateway.id.clone(),
                broker.view(),
                buffer.clone(),
                cfg.buffer.max_bytes,
                upstream.as_ref().map(|u| u.stats().clone()),
                sources.as_ref().map(|s| s.sources.clone()),
                plugins.clone(),
                health.clone(),
                health::stale_after(
                    systemd::watchdog_interval().unwrap_or(Duration::from_secs(30)),
                ),
            );
            Some(crate::ops::http::start(addr, Arc::new(ops)).await?)
        }
    };
    Ok(Gateway {
        broker,
        buffer,
        upstream,
        sources,
        plugins,
        health,
        http,
        local_status,
        plugin_watch,
    })
}

/// The `[[plugins]]` of the configuration, loaded (compiled components
/// cached in `data_dir/plugins-cache`); `None` when there are none.
pub async fn load_plugins(
    cfg: &GatewayConfig,
    builtin: Arc<dyn Authenticator>,
) -> Result<Option<Arc<Plugins>>, Error> {
    if cfg.plugins.is_empty() {
        return Ok(None);
    }
    let configs = cfg.plugins.clone();
    let cache = cfg.gateway.data_dir.join("plugins-cache");
    let builtin_first = cfg.broker.builtin_auth_first;
    let p = tokio::task::spawn_blocking(move || {
        Plugins::load(configs, Some(cache), builtin, builtin_first)
    })
    .await
    .map_err(|e| Error::Task("plugin loader", e))??;
    Ok(Some(Arc::new(p)))
}

/// The serial ports and BLE inputs of the configuration, publishing through
/// `publisher`; `None` when no sensor source is configured.
pub fn start_sources(
    cfg: &GatewayConfig,
    publisher: Publisher,
    plugins: Option<Arc<Plugins>>,
) -> Result<Option<SourcesHandle>, Error> {
    let decoders = crate::plugins::config::decoders(&cfg.plugins);
    let input = cfg.sources_input(&decoders);
    if !input.any() {
        return Ok(None);
    }
    let plan = input.plan()?;
    let s = Sources::new(plan.registry, publisher, plan.log_interval)
        .with_plugins(plugins, plan.ble_decoder);
    Ok(Some(sources::start(plan.settings, s)))
}

/// Runs the gateway until `shutdown` resolves, then stops cleanly.
pub async fn run(cfg: GatewayConfig, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    // SIGHUP (`systemctl reload`) reloads the plugins; a plugin that fails
    // to load keeps its previous version running. Installed before start so
    // an early SIGHUP cannot kill the process (its default action).
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(Error::Signal)?;
    let gateway = start(&cfg).await?;
    let plugins = gateway.plugins.clone();
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            let _ = systemd::reloading();
            match &plugins {
                Some(p) => {
                    tracing::info!(
                        "SIGHUP: reloading plugins (other settings take effect on restart)"
                    );
                    let p = p.clone();
                    let _ = tokio::task::spawn_blocking(move || p.reload()).await;
                }
                None => tracing::info!(
                    "SIGHUP: no plugins to reload (other settings take effect on restart)"
                ),
            }
            let _ = systemd::notify("READY=1");
        }
    });
    // Ready: the broker listens, the buffer is open, upstream and sources
    // run. Under systemd (Type=notify) this ends `systemctl start`.
    if let Err(e) = systemd::notify(&format!(
        "READY=1\nSTATUS=listening on {}",
        gateway.broker.local_addr()
    )) {
        tracing::warn!(error = %e, "cannot notify systemd of readiness");
    }
    if let Some(every) = systemd::watchdog_interval() {
        tracing::info!(
            interval_ms = every.as_millis() as u64,
            "systemd watchdog on"
        );
        tokio::spawn(health::feed_watchdog(gateway.health.clone(), every));
    }
    shutdown.await;
    let _ = systemd::notify("STOPPING=1");
    tracing::info!("shutting down");
    gateway.shutdown().await;
    Ok(())
}
