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
use super::bindings::exports::capteurs::plugins::transform::Verdict;
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
    /// One instance or more, sharing their counters; a topic always goes to
    /// the same one ([`Transform::shard`]).
    shards: Vec<Guarded<TransformPlugin>>,
}

/// The settings of one transform plugin.
pub struct TransformSettings {
    pub topics: Vec<String>,
    pub on_error: OnError,
    pub guard: GuardSettings,
    /// Instances side by side (at least 1).
    pub instances: usize,
}

impl Transform {
    /// Links and instantiates the component, and calls its `init`: a plugin
    /// that cannot start says why here, before it takes any message.
    pub fn new(
        engine: &Engine,
        component: &Component,
        s: TransformSettings,
    ) -> Result<Transform, PluginError> {
        let mut shards: Vec<Guarded<TransformPlugin>> = Vec::new();
        for _ in 0..s.instances.max(1) {
            let mut g = super::runtime::guarded_world!(
                engine,
                component,
                s.guard.clone(),
                TransformPlugin,
                TransformPluginPre<HostState>,
                capteurs_plugins_transform
            )?;
            if let Some(first) = shards.first() {
                g.stats = first.stats.clone();
            }
            shards.push(g);
        }
        Ok(Transform {
            name: shards[0].name.clone(),
            topics: s.topics,
            on_error: s.on_error,
            shards,
        })
    }

    /// The instance a topic's messages go to (FNV-1a of the topic): the
    /// same one every time, so a plugin's per-topic state and the order of
    /// a topic's messages hold with several instances.
    fn shard(&self, topic: &str) -> &Guarded<TransformPlugin> {
        &self.shards[shard_index(topic, self.shards.len())]
    }

    pub fn matches(&self, topic_name: &str) -> bool {
        self.topics.iter().any(|f| topic::matches(f, topic_name))
    }

    pub fn disabled(&self) -> bool {
        self.shards[0].disabled()
    }

    pub fn stats(&self) -> &Arc<PluginStats> {
        &self.shards[0].stats
    }

    /// Runs the plugin on one message: its verdict, or why not.
    pub fn process(&self, m: &Message) -> Result<Output, String> {
        let input = to_wasm(m);
        let guarded = self.shard(&m.topic);
        let out = guarded.call(|plugin, store| {
            plugin
                .capteurs_plugins_transform()
                .call_process(store, input)
        })?;
        let out = out
            .map_err(|e| format!("process returned an error: {e}"))
            .and_then(|verdict| match verdict {
                Verdict::Keep => Ok(Output::Keep),
                Verdict::Drop => Ok(Output::Replace(Vec::new())),
                Verdict::Replace(out) => from_wasm(out, m).map(Output::Replace),
            });
        match out {
            Ok(out) => {
                guarded.succeeded(match &out {
                    Output::Keep => 1,
                    Output::Replace(v) => v.len(),
                });
                Ok(out)
            }
            Err(e) => Err(guarded.failed(e)),
        }
    }
}

fn shard_index(topic: &str, shards: usize) -> usize {
    if shards <= 1 {
        return 0;
    }
    let h = topic.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    (h % shards as u64) as usize
}

/// What a transform made of a message.
#[derive(Debug)]
pub enum Output {
    /// The message goes on unchanged.
    Keep,
    /// These go on instead (none: it was filtered out).
    Replace(Vec<Message>),
}

/// The message as the guest sees it, borrowed: lowered straight from ours.
fn to_wasm(m: &Message) -> types::MessageParam<'_> {
    types::MessageParam {
        topic: &m.topic,
        payload: &m.payload,
        qos: m.qos,
        retain: m.retain,
        origin: match &m.origin {
            Origin::Client(id) => types::OriginParam::Client(id),
            Origin::Sensor(id) => types::OriginParam::Sensor(id),
            Origin::Upstream => types::OriginParam::Upstream,
            Origin::Will(_) | Origin::Broker => types::OriginParam::Broker,
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
fn from_wasm(out: Vec<types::MessageResult>, input: &Message) -> Result<Vec<Message>, String> {
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

#[cfg(test)]
mod tests {
    use super::shard_index;

    #[test]
    fn a_topic_always_goes_to_one_instance_and_topics_spread() {
        let topics: Vec<String> = (0..200)
            .map(|i| format!("capteurs/temperature/fr/aubiere/rue_{i}"))
            .collect();
        let mut per_shard = [0; 4];
        for t in &topics {
            let i = shard_index(t, 4);
            assert_eq!(i, shard_index(t, 4));
            per_shard[i] += 1;
        }
        assert!(per_shard.iter().all(|&n| n >= 30), "{per_shard:?}");
        assert!(topics.iter().all(|t| shard_index(t, 1) == 0));
    }
}
