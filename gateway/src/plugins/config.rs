//! `[[plugins]]`: the WebAssembly plugins of the configuration and their
//! checks (names, topics, limits). The components themselves are compiled
//! when the gateway starts, not by the check.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;

use serde::Deserialize;

use crate::problems::Problems;

/// One WebAssembly plugin (`[[plugins]]`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    pub name: String,
    pub kind: PluginKind,
    /// The component (`.wasm`, built for wasm32-wasip2).
    pub path: PathBuf,
    /// Transforms: the topic filters whose messages it gets.
    #[serde(default = "all_topics")]
    pub topics: Vec<String>,
    /// Position in its chain (lower first).
    #[serde(default)]
    pub order: i64,
    #[serde(default)]
    pub on_error: OnErrorConfig,
    pub dead_letter_topic: Option<String>,
    #[serde(default = "default_memory_mb")]
    pub memory_mb: u64,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default)]
    pub fuel: u64,
    #[serde(default = "default_max_faults")]
    pub max_faults: u32,
    /// Transforms: instances run side by side (one per core lets every core
    /// call the plugin at once); each message goes to the instance its
    /// topic hashes to, so per-topic state and order hold.
    pub instances: Option<u32>,
    /// Auth: remember authorize answers (the plugin's answer must depend
    /// only on client, user, action and topic).
    #[serde(default = "yes")]
    pub cache_decisions: bool,
    #[serde(default)]
    pub params: toml::Table,
    /// The plugin's environment (WASI `environment`), granted explicitly:
    /// these variables and no others (by default none).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

fn all_topics() -> Vec<String> {
    vec!["#".into()]
}
fn default_memory_mb() -> u64 {
    16
}
fn default_timeout_ms() -> u64 {
    20
}
fn default_max_faults() -> u32 {
    5
}
fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PluginKind {
    Transform,
    Auth,
    Decoder,
}

/// What happens to a message a transform failed on; for auth plugins,
/// `pass` abstains (the next authenticator decides) and the others refuse.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnErrorConfig {
    #[default]
    Pass,
    Drop,
    DeadLetter,
}

impl PluginConfig {
    /// Parameters as text, as the plugin receives them.
    pub fn params(&self) -> Vec<(String, String)> {
        self.params
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    toml::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                (k.clone(), v)
            })
            .collect()
    }
}

/// Every problem of the `[[plugins]]` list: unique names, valid topics,
/// limits in range.
pub fn validate(plugins: &[PluginConfig], problems: &mut Problems) {
    let mut names = HashSet::new();
    for (i, p) in plugins.iter().enumerate() {
        let mut bad = |key: &str, what: String| problems.add(format!("plugins[{i}].{key}"), what);
        if p.name.is_empty() || p.name.contains(['/', '+', '#']) || !names.insert(p.name.clone()) {
            bad(
                "name",
                format!("{:?}: names must be unique, without '/', '+', '#'", p.name),
            );
        }
        for f in &p.topics {
            if let Err(e) = crate::broker::topic::validate_filter(f) {
                bad("topics", format!("{f:?}: {e}"));
            }
        }
        if let Some(t) = &p.dead_letter_topic {
            if crate::broker::topic::validate_name(t).is_err() {
                bad("dead_letter_topic", format!("{t:?} is not a topic name"));
            }
        }
        if !(1..=4096).contains(&p.memory_mb) {
            bad("memory_mb", "must be between 1 and 4096".into());
        }
        if !(2..=60_000).contains(&p.timeout_ms) {
            bad("timeout_ms", "must be between 2 and 60000".into());
        }
        if p.max_faults == 0 {
            bad("max_faults", "must be at least 1".into());
        }
        match p.instances {
            Some(n) if p.kind != PluginKind::Transform => bad(
                "instances",
                format!("{n}: only transform plugins run several instances"),
            ),
            Some(n) if !(1..=64).contains(&n) => {
                bad("instances", format!("{n}: must be between 1 and 64"))
            }
            _ => {}
        }
    }
}

/// The names of the decoder plugins, which sources may refer to.
pub fn decoders(plugins: &[PluginConfig]) -> Vec<String> {
    plugins
        .iter()
        .filter(|p| p.kind == PluginKind::Decoder)
        .map(|p| p.name.clone())
        .collect()
}
