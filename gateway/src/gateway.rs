//! Wires the stages from a [`GatewayConfig`] and runs them until shutdown:
//! the buffer opens first, the broker starts with it as its outbox, then the
//! upstream forwarder drains it. Sources and plugins plug in here as they
//! arrive. Shutdown runs the other way: upstream (clean DISCONNECT), broker
//! (sessions saved), buffer (last group commit).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;

use crate::broker::auth::Authenticator;
use crate::broker::auth::{AuthError, FileAuth};
use crate::broker::Publisher;
use crate::broker::{Broker, BrokerError, BrokerHandle, BrokerSettings};
use crate::buffer::{Buffer, BufferError, BufferSettings};
use crate::config::{GatewayConfig, PluginKind};
use crate::health::{self, Health};
use crate::ops::discovery;
use crate::ops::http::HttpHandle;
use crate::ops::Ops;
use crate::plugins::runtime::PluginError;
use crate::plugins::Plugins;
use crate::sources::{self, Registry, Sources, SourcesHandle, SourcesSettings};
use crate::systemd;
use crate::upstream::{self, Outlet, Rules, ServerUrl, UpstreamHandle, UpstreamSettings};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Error)]
pub enum Error {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("invalid {0} address {1:?}")]
    Listen(&'static str, String),
    #[error(transparent)]
    Buffer(#[from] BufferError),
    #[error("upstream: {0}")]
    Upstream(String),
    #[error("sensors: {0}")]
    Sources(String),
    #[error(transparent)]
    Plugin(#[from] PluginError),
    #[error("installing the SIGHUP handler: {0}")]
    Signal(std::io::Error),
    #[error(transparent)]
    Http(#[from] crate::ops::http::HttpError),
}

/// Broker settings from the configuration.
pub fn broker_settings(cfg: &GatewayConfig) -> Result<BrokerSettings, Error> {
    let b = &cfg.broker;
    let listen: SocketAddr = b
        .listen
        .parse()
        .map_err(|_| Error::Listen("broker.listen", b.listen.clone()))?;
    Ok(BrokerSettings {
        listen,
        max_packet_size: b.max_packet_size,
        max_connections: b.max_connections,
        max_inflight: b.max_inflight,
        max_queued: b.max_queued,
        queue_qos0_offline: b.queue_qos0_offline,
        slow_subscriber_timeout: Duration::from_millis(b.slow_subscriber_timeout_ms),
        connect_timeout: Duration::from_millis(b.connect_timeout_ms),
        write_timeout: Duration::from_millis(b.write_timeout_ms),
        max_topic_levels: b.max_topic_levels,
        max_subscriptions_per_client: b.max_subscriptions_per_client,
        max_retained: b.max_retained,
        max_retained_bytes: b.max_retained_bytes,
        max_sessions: b.max_sessions,
        session_expiry: Duration::from_secs(b.session_expiry_secs),
        login_free_failures: b.login_free_failures,
        login_backoff_max: Duration::from_millis(b.login_backoff_max_ms),
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

/// The upstream's settings from the configuration (reads the TLS files).
pub fn upstream_settings(cfg: &GatewayConfig) -> Result<UpstreamSettings, Error> {
    let u = &cfg.upstream;
    let read = |key: &str, p: &std::path::PathBuf| {
        std::fs::read(cfg.resolve(p))
            .map_err(|e| Error::Upstream(format!("upstream.{key}: {}: {e}", p.display())))
    };
    let servers = u
        .servers
        .iter()
        .map(|s| ServerUrl::parse(s).map_err(Error::Upstream))
        .collect::<Result<Vec<_>, _>>()?;
    let client_auth = match (&u.client_cert, &u.client_key) {
        (Some(c), Some(k)) => Some((read("client_cert", c)?, read("client_key", k)?)),
        _ => None,
    };
    Ok(UpstreamSettings {
        gateway_id: cfg.gateway.id.clone(),
        servers,
        client_id: if u.client_id.is_empty() {
            cfg.gateway.id.clone()
        } else {
            u.client_id.clone()
        },
        username: u.username.clone(),
        password: u.password.clone(),
        ca: u.ca_file.as_ref().map(|p| read("ca_file", p)).transpose()?,
        client_auth,
        keep_alive: Duration::from_secs(u.keep_alive_secs.max(1)),
        clean_session: u.clean_session,
        connect_timeout: Duration::from_millis(u.connect_timeout_ms),
        status_prefix: u.status_prefix.clone(),
        stats_interval: Duration::from_secs(u.stats_interval_secs),
        reconnect_min: Duration::from_millis(u.reconnect_min_ms),
        reconnect_max: Duration::from_millis(u.reconnect_max_ms),
        max_inflight: u.max_inflight,
        max_rate: u.max_rate,
        envelope: u.envelope,
    })
}

/// The buffer's settings from the configuration.
pub fn buffer_settings(cfg: &GatewayConfig) -> BufferSettings {
    let b = &cfg.buffer;
    BufferSettings {
        path: cfg.resolve(&cfg.gateway.data_dir).join("buffer.sqlite"),
        max_bytes: b.max_bytes,
        max_age: (b.max_age_secs > 0).then(|| Duration::from_secs(b.max_age_secs)),
        when_full: b.when_full,
        sync: b.sync,
        memory_first: b.memory_first.then_some(b.memory_max_messages),
    }
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
    let settings = broker_settings(cfg)?;
    let mut builtin = authenticator(cfg)?;
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
        let up = upstream_settings(cfg)?;
        let rules = Arc::new(Rules::new(cfg.upstream.rules.clone()));
        let bs = buffer_settings(cfg);
        let buffer = tokio::task::spawn_blocking(move || Buffer::open(bs))
            .await
            .map_err(|e| Error::Upstream(e.to_string()))??;
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
    let local_status = cfg.homeassistant.discovery.then(|| {
        discovery::status(&broker.publisher(), &status_topic, "online");
        if let Some(s) = &sources {
            discovery::announce(
                &broker.publisher(),
                &s.sources.registry,
                &cfg.homeassistant.prefix,
                &cfg.gateway.id,
                &status_topic,
            );
        }
        status_topic.clone()
    });
    let http = if cfg.http.listen.is_empty() {
        None
    } else {
        let addr: SocketAddr = cfg
            .http
            .listen
            .parse()
            .map_err(|_| Error::Listen("http.listen", cfg.http.listen.clone()))?;
        let ops = Ops::new(
            cfg.gateway.id.clone(),
            broker.view(),
            buffer.clone(),
            cfg.buffer.max_bytes,
            upstream.as_ref().map(|u| u.stats().clone()),
            sources.as_ref().map(|s| s.sources.clone()),
            plugins.clone(),
            health.clone(),
            health::stale_after(systemd::watchdog_interval().unwrap_or(Duration::from_secs(30))),
        );
        Some(crate::ops::http::start(addr, Arc::new(ops)).await?)
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
    let base = cfg.base_dir.clone();
    let cache = cfg.resolve(&cfg.gateway.data_dir).join("plugins-cache");
    let builtin_first = cfg.broker.builtin_auth_first;
    let p = tokio::task::spawn_blocking(move || {
        Plugins::load(configs, &base, Some(cache), builtin, builtin_first)
    })
    .await
    .map_err(|e| Error::Plugin(PluginError::Engine(format!("plugin loader: {e}"))))??;
    Ok(Some(Arc::new(p)))
}

/// The serial ports and BLE inputs of the configuration, publishing through
/// `publisher`; `None` when no sensor source is configured.
pub fn start_sources(
    cfg: &GatewayConfig,
    publisher: Publisher,
    plugins: Option<Arc<Plugins>>,
) -> Result<Option<SourcesHandle>, Error> {
    if cfg.sensors.is_empty() && cfg.serial.is_empty() && cfg.ble.replay.is_none() && !cfg.ble.scan
    {
        return Ok(None);
    }
    let registry = Registry::new(&cfg.sources, &cfg.sensors).map_err(Error::Sources)?;
    let mut ports = Vec::new();
    for p in &cfg.serial {
        let here = registry.on_port(&p.port);
        let default_sensor = match &p.sensor {
            Some(id) => registry.serial(&p.port, id),
            None if here.len() == 1 => Some(here[0]),
            None => None,
        };
        let default_grandeur = p.grandeur.clone().or_else(|| {
            default_sensor.and_then(|i| {
                registry.sensors[i]
                    .quantities
                    .first()
                    .map(|q| q.grandeur.clone())
            })
        });
        ports.push(sources::serial::PortSettings {
            port: p.port.clone(),
            path: cfg.resolve(&p.port),
            baud: p.baud,
            data_bits: p.data_bits,
            parity: p.parity,
            stop_bits: p.stop_bits,
            line_ending: p.line_ending,
            format: p.format,
            checksum: p.checksum,
            default_sensor,
            default_grandeur,
            decoder: p.decoder.clone(),
            max_line_bytes: p.max_line_bytes,
            reopen_min: Duration::from_millis(p.reopen_min_ms),
            reopen_max: Duration::from_millis(p.reopen_max_ms),
        });
    }
    let settings = SourcesSettings {
        serial: ports,
        ble_replay: cfg.ble.replay.as_ref().map(|p| cfg.resolve(p)),
        ble_scan: cfg.ble.scan.then(|| sources::ble::ScanSettings {
            adapter: cfg.ble.adapter.clone(),
        }),
        stats_interval: Duration::from_secs(cfg.sources.stats_interval_secs),
    };
    let s = Sources::new(
        registry,
        publisher,
        Duration::from_secs(cfg.sources.log_interval_secs),
    )
    .with_plugins(plugins, cfg.ble.decoder.clone());
    Ok(Some(sources::start(settings, s)))
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
