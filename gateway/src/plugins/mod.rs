//! WebAssembly plugins on the component model (WIT in `wit/`): transforms
//! between the sources/clients and the broker, auth in front of the
//! built-in password file and ACL.
//!
//! - [`config`]: `[[plugins]]` of the configuration and its checks;
//! - [`runtime`]: the engine, the compiled-component cache, store state and
//!   host imports, and [`runtime::Guarded`]: limits, faults, restarts;
//! - [`transform`]: the `transform-plugin` world, chained by [`Plugins`];
//! - [`auth`]: the `auth-plugin` world behind the broker's `Authenticator`;
//! - [`decoder`]: the `decoder-plugin` world the sources call;
//! - [`wit`]: the bindings wasmtime generates from `wit/`, one module per world.
//!
//! [`Plugins`] holds the running set and swaps it whole on reload: each
//! message goes through the old set or the new one, never half of each; a
//! plugin that fails to load keeps its previous version running.

pub mod auth;
pub mod config;
pub mod decoder;
pub mod runtime;
pub mod transform;
pub mod wit;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use std::time::{Duration, SystemTime};

use tracing::{error, info, warn};

use self::auth::AuthPlugin;
pub use self::config::{OnErrorConfig, PluginConfig, PluginKind};
use self::decoder::Decoder;
use self::runtime::{GuardSettings, Limits, PluginError};
use self::transform::{OnError, Output, Transform, TransformSettings};
use crate::broker::auth::{
    AclDecision, Action, AuthChain, Authenticator, ClientInfo, ConnectDecision,
};
use crate::message::Message;

/// Which world a component implements, by its exports.
pub fn world_of(
    component: &wasmtime::component::Component,
    engine: &wasmtime::Engine,
) -> Vec<String> {
    component
        .component_type()
        .exports(engine)
        .map(|(name, _)| name.to_string())
        .collect()
}

/// One loaded plugin, with what it was loaded from (for reloads).
#[derive(Clone)]
enum Loaded {
    Transform(Arc<Transform>),
    Auth(Arc<AuthPlugin>),
    Decoder(Arc<Decoder>),
}

struct Entry {
    config: PluginConfig,
    path: PathBuf,
    modified: Option<SystemTime>,
    plugin: Loaded,
}

/// The running plugin set.
struct Set {
    entries: Vec<Entry>,
    transforms: Vec<Arc<Transform>>,
    auth: Arc<AuthChain>,
}

/// All plugins of the configuration, reloadable. Implements the broker's
/// [`crate::broker::Transform`] (the transform chain) and
/// [`Authenticator`] (auth plugins, then the built-in one).
pub struct Plugins {
    cache_dir: Option<PathBuf>,
    builtin: Arc<dyn Authenticator>,
    builtin_first: bool,
    /// Swapped whole on reload; read on every message without a lock.
    set: ArcSwap<Set>,
    /// Bumped at every reload: cached auth answers are then stale.
    generation: std::sync::atomic::AtomicU64,
}

impl Plugins {
    /// Loads every plugin (in `order`); any failure is an error naming the
    /// plugin: at start a broken plugin stops the gateway with a clear
    /// message instead of running without it.
    pub fn load(
        configs: Vec<PluginConfig>,
        cache_dir: Option<PathBuf>,
        builtin: Arc<dyn Authenticator>,
        builtin_first: bool,
    ) -> Result<Plugins, PluginError> {
        let mut configs = configs;
        configs.sort_by_key(|c| c.order);
        let p = Plugins {
            cache_dir,
            builtin,
            builtin_first,
            set: ArcSwap::from_pointee(Set {
                entries: Vec::new(),
                transforms: Vec::new(),
                auth: Arc::new(AuthChain(Vec::new())),
            }),
            generation: std::sync::atomic::AtomicU64::new(0),
        };
        let mut entries = Vec::new();
        for c in &configs {
            entries.push(p.load_one(c)?);
        }
        let set = p.assemble(entries);
        p.set.store(Arc::new(set));
        Ok(p)
    }

    fn load_one(&self, c: &PluginConfig) -> Result<Entry, PluginError> {
        let engine = runtime::engine(c.fuel > 0)?;
        let path = c.path.clone();
        let modified = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
        let component = runtime::load(&engine, &c.name, &path, self.cache_dir.as_deref())?;
        let guard = GuardSettings {
            name: c.name.clone(),
            limits: Limits::new(c.memory_mb, Duration::from_millis(c.timeout_ms), c.fuel),
            params: c.params(),
            env: c.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            max_faults: c.max_faults,
        };
        let plugin = match c.kind {
            PluginKind::Transform => Loaded::Transform(Arc::new(Transform::new(
                &engine,
                &component,
                TransformSettings {
                    topics: c.topics.clone(),
                    on_error: match c.on_error {
                        OnErrorConfig::Pass => OnError::Pass,
                        OnErrorConfig::Drop => OnError::Drop,
                        OnErrorConfig::DeadLetter => OnError::DeadLetter(
                            c.dead_letter_topic
                                .clone()
                                .unwrap_or_else(|| format!("capteurs/dead-letter/{}", c.name)),
                        ),
                    },
                    guard,
                    instances: c.instances.unwrap_or(1) as usize,
                },
            )?)),
            PluginKind::Auth => Loaded::Auth(Arc::new(AuthPlugin::new(
                &engine,
                &component,
                guard,
                c.on_error == OnErrorConfig::Pass,
                c.cache_decisions,
            )?)),
            PluginKind::Decoder => {
                Loaded::Decoder(Arc::new(Decoder::new(&engine, &component, guard)?))
            }
        };
        info!(plugin = %c.name, kind = ?c.kind, path = %path.display(), "plugin loaded");
        Ok(Entry {
            config: c.clone(),
            path,
            modified,
            plugin,
        })
    }

    fn assemble(&self, entries: Vec<Entry>) -> Set {
        let mut transforms = Vec::new();
        let mut auths: Vec<Arc<dyn Authenticator>> = Vec::new();
        if self.builtin_first {
            auths.push(self.builtin.clone());
        }
        for e in &entries {
            match &e.plugin {
                Loaded::Transform(t) => transforms.push(t.clone()),
                Loaded::Auth(a) => auths.push(a.clone()),
                Loaded::Decoder(_) => {}
            }
        }
        if !self.builtin_first {
            auths.push(self.builtin.clone());
        }
        Set {
            entries,
            transforms,
            auth: Arc::new(AuthChain(auths)),
        }
    }

    /// Reloads every plugin (SIGHUP). One that fails to load keeps its
    /// previous version, and the error says why. Returns how many failed.
    pub fn reload(&self) -> usize {
        self.reload_where(|_| true)
    }

    /// Reloads the plugins whose `.wasm` changed on disk since they were
    /// loaded (the file watch).
    pub fn reload_changed(&self) -> usize {
        self.reload_where(|e| {
            std::fs::metadata(&e.path).and_then(|m| m.modified()).ok() != e.modified
        })
    }

    fn reload_where(&self, wanted: impl Fn(&Entry) -> bool) -> usize {
        let current = self.set.load_full();
        if !current.entries.iter().any(&wanted) {
            return 0;
        }
        let mut failed = 0;
        let mut entries = Vec::new();
        for old in &current.entries {
            if !wanted(old) {
                entries.push(Entry {
                    config: old.config.clone(),
                    path: old.path.clone(),
                    modified: old.modified,
                    plugin: old.plugin.clone(),
                });
                continue;
            }
            // The file's time as it was before this attempt: a file still
            // being written when read is retried once its writer is done.
            let seen = std::fs::metadata(&old.path).and_then(|m| m.modified()).ok();
            match self.load_one(&old.config) {
                Ok(e) => entries.push(e),
                Err(e) => {
                    failed += 1;
                    error!(error = %e, "plugin reload failed: the previous version keeps running");
                    entries.push(Entry {
                        config: old.config.clone(),
                        path: old.path.clone(),
                        // Not retried until the file changes again.
                        modified: seen,
                        plugin: old.plugin.clone(),
                    });
                }
            }
        }
        let set = self.assemble(entries);
        self.set.store(Arc::new(set));
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        info!(failed, "plugins reloaded");
        failed
    }

    /// Every plugin in load order: name, kind and counters (metrics and
    /// the status page).
    pub fn summary(&self) -> Vec<(String, PluginKind, Arc<runtime::PluginStats>)> {
        let set = self.set.load_full();
        set.entries
            .iter()
            .map(|e| {
                let s = match &e.plugin {
                    Loaded::Transform(t) => t.stats().clone(),
                    Loaded::Auth(a) => a.stats().clone(),
                    Loaded::Decoder(d) => d.stats().clone(),
                };
                (e.config.name.clone(), e.config.kind, s)
            })
            .collect()
    }

    /// Every plugin's counters by name, for `$SYS` and tests.
    pub fn stats(&self) -> HashMap<String, Arc<runtime::PluginStats>> {
        self.summary()
            .into_iter()
            .map(|(name, _, s)| (name, s))
            .collect()
    }

    pub fn decoder(&self, name: &str) -> Option<Arc<Decoder>> {
        let set = self.set.load_full();
        set.entries.iter().find_map(|e| match &e.plugin {
            Loaded::Decoder(d) if e.config.name == name => Some(d.clone()),
            _ => None,
        })
    }
}

impl crate::broker::Transform for Plugins {
    fn apply(&self, message: Message) -> Vec<Message> {
        self.apply_batch(vec![message])
    }

    /// Each transform in turn takes the messages its topics match, all at
    /// once (one call for a plugin that takes batches); the others go by.
    /// Order is kept: outputs take their input's place.
    fn apply_batch(&self, messages: Vec<Message>) -> Vec<Message> {
        let set = self.set.load();
        let mut current = messages;
        for t in &set.transforms {
            if t.disabled() {
                continue;
            }
            let hits: Vec<usize> = (0..current.len())
                .filter(|&i| t.matches(&current[i].topic))
                .collect();
            if hits.is_empty() {
                continue;
            }
            let outputs = {
                let refs: Vec<&Message> = hits.iter().map(|&i| &current[i]).collect();
                t.process_many(&refs)
            };
            let mut next = Vec::with_capacity(current.len());
            let mut outputs = hits.into_iter().zip(outputs).peekable();
            for (i, m) in current.into_iter().enumerate() {
                match outputs.next_if(|(hit, _)| *hit == i) {
                    Some((_, Ok(Output::Keep))) => next.push(m),
                    Some((_, Ok(Output::Replace(out)))) => next.extend(out),
                    Some((_, Err(_))) => match &t.on_error {
                        OnError::Pass => next.push(m),
                        OnError::Drop => {}
                        OnError::DeadLetter(topic) => {
                            let mut dead = m;
                            dead.topic = topic.as_str().into();
                            next.push(dead);
                        }
                    },
                    None => next.push(m),
                }
            }
            current = next;
            if current.is_empty() {
                break;
            }
        }
        current
    }
}

impl Authenticator for Plugins {
    fn authenticate(&self, client: &ClientInfo, password: Option<&[u8]>) -> ConnectDecision {
        self.set.load().auth.authenticate(client, password)
    }

    fn authorize(&self, client: &ClientInfo, action: Action, topic: &str) -> AclDecision {
        self.set.load().auth.authorize(client, action, topic)
    }

    // covers_reads stays false: a reload would make the broker's marks on
    // subscriptions stale, so every delivery is asked (and cached).

    fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// Watches the plugins' files and reloads those that change (every 2 s),
/// and publishes every plugin's counters on `$SYS/capteurs/plugins`
/// (retained JSON, every 10 s), until `shutdown`.
pub async fn watch(
    plugins: Arc<Plugins>,
    publisher: crate::broker::Publisher,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    let mut n = 0u64;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {
                let p = plugins.clone();
                if let Err(e) = tokio::task::spawn_blocking(move || p.reload_changed()).await {
                    warn!(error = %e, "plugin watch failed");
                }
                if n.is_multiple_of(5) {
                    let stats: serde_json::Map<String, serde_json::Value> = plugins
                        .stats()
                        .into_iter()
                        .map(|(name, s)| (name, s.to_json()))
                        .collect();
                    // Topics made from the checked config; a refusal is counted by the broker.
                    let _ = publisher.publish(Message::new(
                        "$SYS/capteurs/plugins",
                        serde_json::Value::Object(stats).to_string(),
                        crate::message::QoS::AtMostOnce,
                        true,
                        crate::message::Origin::Broker,
                    ));
                }
                n += 1;
            }
        }
    }
}
