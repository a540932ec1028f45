//! Transform plugins: one message in, zero, one or many out. A fault (trap,
//! deadline, memory, an error returned, garbage out; see
//! [`Guarded`]) costs that message its `on_error` treatment.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use bytestring::ByteString;
use wasmtime::component::Component;
use wasmtime::Engine;

use super::bindings::capteurs::plugins::types;
use super::bindings::{TransformPlugin, TransformPluginPre};
use super::runtime::{GuardSettings, Guarded, HostState, PluginError, PluginStats};
use crate::broker::topic;
use crate::message::{Message, Origin};

/// What to do with a message a plugin failed on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OnError {
    /// Route it unchanged.
    Pass,
    /// Drop it (counted).
    Drop,
    /// Publish it unchanged on this topic instead.
    DeadLetter(String),
}

pub struct Transform {
    pub name: Arc<str>,
    topics: Vec<String>,
    pub on_error: OnError,
    guarded: Guarded<TransformPlugin>,
}

/// The settings of one transform plugin.
pub struct TransformSettings {
    pub topics: Vec<String>,
    pub on_error: OnError,
    pub guard: GuardSettings,
}

impl Transform {
    /// Links and instantiates the component, and calls its `init`: a plugin
    /// that cannot start says why here, before it takes any message.
    pub fn new(
        engine: &Engine,
        component: &Component,
        s: TransformSettings,
    ) -> Result<Transform, PluginError> {
        let guarded = super::runtime::guarded_world!(
            engine,
            component,
            s.guard,
            TransformPlugin,
            TransformPluginPre<HostState>,
            capteurs_plugins_transform
        )?;
        Ok(Transform {
            name: guarded.name.clone(),
            topics: s.topics,
            on_error: s.on_error,
            guarded,
        })
    }

    pub fn matches(&self, topic_name: &str) -> bool {
        self.topics.iter().any(|f| topic::matches(f, topic_name))
    }

    pub fn disabled(&self) -> bool {
        self.guarded.disabled()
    }

    pub fn stats(&self) -> &Arc<PluginStats> {
        &self.guarded.stats
    }

    /// Runs the plugin on one message: its output, or why not.
    pub fn process(&self, m: &Message) -> Result<Vec<Message>, String> {
        let input = to_wasm(m);
        let out = self.guarded.call(|plugin, store| {
            plugin
                .capteurs_plugins_transform()
                .call_process(store, &input)
        })?;
        match out
            .map_err(|e| format!("process returned an error: {e}"))
            .and_then(|out| from_wasm(out, m))
        {
            Ok(out) => {
                self.guarded.succeeded(out.len());
                Ok(out)
            }
            Err(e) => Err(self.guarded.failed(e)),
        }
    }
}

fn to_wasm(m: &Message) -> types::Message {
    types::Message {
        topic: m.topic.to_string(),
        payload: m.payload.to_vec(),
        qos: m.qos,
        retain: m.retain,
        origin: match &m.origin {
            Origin::Client(id) => types::Origin::Client(id.to_string()),
            Origin::Sensor(id) => types::Origin::Sensor(id.to_string()),
            Origin::Upstream => types::Origin::Upstream,
            Origin::Will(_) | Origin::Broker => types::Origin::Broker,
        },
        received_ms: m
            .received_at
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
    }
}

/// A plugin's output as messages; anything that could not be published
/// (invalid topic, QoS above 2) makes the whole output garbage. Outputs keep
/// the input's origin (a plugin cannot pretend to be another client).
fn from_wasm(out: Vec<types::Message>, input: &Message) -> Result<Vec<Message>, String> {
    if out.len() > 1024 {
        return Err(format!("returned {} messages (at most 1024)", out.len()));
    }
    out.into_iter()
        .map(|o| {
            topic::validate_name(&o.topic)
                .map_err(|e| format!("returned an invalid topic {:?}: {e}", o.topic))?;
            if o.qos > 2 {
                return Err(format!("returned QoS {}", o.qos));
            }
            Ok(Message {
                topic: ByteString::from(o.topic),
                payload: Bytes::from(o.payload),
                qos: o.qos,
                retain: o.retain,
                origin: input.origin.clone(),
                received_at: if o.received_ms == 0 {
                    input.received_at
                } else {
                    UNIX_EPOCH + Duration::from_millis(o.received_ms)
                },
            })
        })
        .collect()
}
