//! Transform plugins: one message in, zero, one or many out. A fault (trap,
//! deadline, memory, an error returned, garbage out; see
//! [`Guarded`]) costs that message its `on_error` treatment.
//!
//! A plugin exporting `transform-batch` also gets several messages of one
//! client in one call ([`Transform::process_many`]): one entry into the
//! guest instead of one per message and per string handed over. A batch
//! that traps or runs past its deadline is replayed message by message on a
//! fresh instance, so the culprit alone gets `on_error`; batching then
//! pauses for a while.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use bytes::Bytes;
use bytestring::ByteString;
use wasmtime::component::Component;
use wasmtime::{Engine, Store};

use super::runtime::{GuardSettings, Guarded, HostState, PluginError, PluginStats};
use super::wit::batch_bindings::exports::capteurs::plugins::transform_batch as batch;
use super::wit::batch_bindings::{BatchTransformPlugin, BatchTransformPluginPre};
use super::wit::bindings::capteurs::plugins::types::{self, Verdict};
use super::wit::bindings::{TransformPlugin, TransformPluginPre};
use crate::broker::topic;
use crate::message::{Message, Origin, QoS};

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

/// One instance of a transform: `process` only, or `process-batch` too.
pub enum Instance {
    One(TransformPlugin),
    Batch(BatchTransformPlugin),
}

impl Instance {
    fn process(
        &self,
        store: &mut Store<HostState>,
        msg: types::MessageParam<'_>,
    ) -> wasmtime::Result<Result<Verdict, String>> {
        match self {
            Instance::One(p) => p.capteurs_plugins_transform().call_process(store, msg),
            Instance::Batch(p) => p.capteurs_plugins_transform().call_process(store, msg),
        }
    }
}

/// After a batch ran past its deadline (or out of fuel), or after a second
/// batch trapped within this long, lone messages only for this long: a
/// slow plugin must not pay the deadline and the replay on every batch, nor
/// a broken `process-batch` a rebuild.
const BATCH_PAUSE: Duration = Duration::from_secs(10);

pub struct Transform {
    pub name: Arc<str>,
    topics: Vec<String>,
    pub on_error: OnError,
    /// One instance or more, sharing their counters; a topic always goes to
    /// the same one ([`Transform::shard`]).
    shards: Vec<Guarded<Instance>>,
    /// Whether the component exports `transform-batch`.
    batches: bool,
    created: Instant,
    /// ms after `created` before which no batch is sent (0: none).
    batch_paused_until: AtomicU64,
    /// ms after `created` of the last batch that trapped, plus one (0: none).
    last_batch_trap: AtomicU64,
}

/// Whether the component exports `transform-batch`.
pub fn exports_batch(engine: &Engine, component: &Component) -> bool {
    component
        .component_type()
        .exports(engine)
        .any(|(name, _)| name.starts_with("capteurs:plugins/transform-batch@"))
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
        let batches = exports_batch(engine, component);
        let mut shards: Vec<Guarded<Instance>> = Vec::new();
        for _ in 0..s.instances.max(1) {
            let mut g = if batches {
                super::runtime::guarded_world!(
                    engine,
                    component,
                    s.guard.clone(),
                    BatchTransformPlugin,
                    BatchTransformPluginPre<HostState>,
                    capteurs_plugins_transform,
                    Instance::Batch
                )?
            } else {
                super::runtime::guarded_world!(
                    engine,
                    component,
                    s.guard.clone(),
                    TransformPlugin,
                    TransformPluginPre<HostState>,
                    capteurs_plugins_transform,
                    Instance::One
                )?
            };
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
            batches,
            created: Instant::now(),
            batch_paused_until: AtomicU64::new(0),
            last_batch_trap: AtomicU64::new(0),
        })
    }

    /// Whether it takes batches (it exports `transform-batch`).
    pub fn batches(&self) -> bool {
        self.batches
    }

    /// The instance a topic's messages go to (FNV-1a of the topic): the
    /// same one every time, so a plugin's per-topic state and the order of
    /// a topic's messages hold with several instances.
    fn shard(&self, topic: &str) -> &Guarded<Instance> {
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
        let out = guarded.call(|plugin, store| plugin.process(store, input))?;
        judge(
            guarded,
            out.map_err(|e| format!("process returned an error: {e}")),
            m,
        )
    }

    /// Runs the plugin on messages, in order: one output per message. A
    /// plugin that takes batches gets each run of messages with one origin,
    /// QoS and retain flag in one call per instance; otherwise, or for a
    /// lone message, one call each.
    pub fn process_many(&self, ms: &[&Message]) -> Vec<Result<Output, String>> {
        let paused = self.batch_paused_until.load(Ordering::Relaxed);
        let batching = self.batches
            && ms.len() > 1
            && (paused == 0 || self.created.elapsed().as_millis() as u64 >= paused);
        if !batching {
            return ms.iter().map(|m| self.process(m)).collect();
        }
        let mut out = Vec::with_capacity(ms.len());
        let mut rest = ms;
        while let Some(first) = rest.first() {
            let n = rest
                .iter()
                .take_while(|m| {
                    m.qos == first.qos && m.retain == first.retain && m.origin == first.origin
                })
                .count();
            let (run, after) = rest.split_at(n);
            out.extend(self.process_run(run));
            rest = after;
        }
        out
    }

    /// [`Transform::process_many`] for one run: each instance gets its own
    /// topics' messages, in order.
    fn process_run(&self, ms: &[&Message]) -> Vec<Result<Output, String>> {
        if ms.len() == 1 {
            return vec![self.process(ms[0])];
        }
        if self.shards.len() == 1 {
            return self.process_batch(&self.shards[0], ms);
        }
        let mut out: Vec<Option<Result<Output, String>>> = (0..ms.len()).map(|_| None).collect();
        let of: Vec<usize> = ms
            .iter()
            .map(|m| shard_index(&m.topic, self.shards.len()))
            .collect();
        for (s, guarded) in self.shards.iter().enumerate() {
            let mine: Vec<usize> = (0..ms.len()).filter(|&i| of[i] == s).collect();
            if mine.is_empty() {
                continue;
            }
            let group: Vec<&Message> = mine.iter().map(|&i| ms[i]).collect();
            for (i, o) in mine.into_iter().zip(self.process_batch(guarded, &group)) {
                out[i] = Some(o);
            }
        }
        out.into_iter()
            .map(|o| o.expect("every message has a shard"))
            .collect()
    }

    /// One `process-batch` call on one instance (messages of one origin,
    /// QoS and retain flag); on a trap or deadline, the messages again one
    /// by one (the trapped instance's state died with it, so nothing is
    /// counted twice).
    fn process_batch(
        &self,
        guarded: &Guarded<Instance>,
        ms: &[&Message],
    ) -> Vec<Result<Output, String>> {
        let size: usize = ms.iter().map(|m| m.topic.len() + m.payload.len()).sum();
        if size > u32::MAX as usize {
            return ms.iter().map(|m| self.process(m)).collect();
        }
        let mut data = Vec::with_capacity(size);
        let mut lengths = Vec::with_capacity(2 * ms.len());
        for m in ms {
            data.extend_from_slice(m.topic.as_bytes());
            data.extend_from_slice(&m.payload);
            lengths.push(m.topic.len() as u32);
            lengths.push(m.payload.len() as u32);
        }
        let input = batch::Batch {
            origin: origin(&ms[0].origin),
            qos: ms[0].qos.into(),
            retain: ms[0].retain,
            received_ms: received_ms(ms[0]),
            data: &data,
            lengths: &lengths,
        };
        let answered = guarded.call_batch(ms.len() as u64, |plugin, store| match plugin {
            Instance::Batch(p) => p
                .capteurs_plugins_transform_batch()
                .call_process_batch(store, input),
            Instance::One(_) => Err(wasmtime::Error::msg("not a batch plugin")),
        });
        let verdicts = match answered {
            Ok(v) if v.len() == ms.len() => v,
            Ok(v) => {
                let why = guarded.failed(format!(
                    "process-batch answered {} verdicts for {} messages",
                    v.len(),
                    ms.len()
                ));
                return ms.iter().map(|_| Err(why.clone())).collect();
            }
            Err(fault) => {
                let now = self.created.elapsed().as_millis() as u64;
                let pause_ms = BATCH_PAUSE.as_millis() as u64;
                let again = fault.trapped() && {
                    let last = self.last_batch_trap.swap(now + 1, Ordering::Relaxed);
                    last > 0 && now + 1 - last < pause_ms
                };
                let pause = fault.overran() || again;
                if pause {
                    self.batch_paused_until
                        .store(now + pause_ms, Ordering::Relaxed);
                }
                tracing::debug!(plugin = %self.name, messages = ms.len(), error = %fault, pause,
                    "batch faulted: its messages again one by one");
                return ms.iter().map(|m| self.process(m)).collect();
            }
        };
        // Counted once for the batch (the counters are shared by every
        // thread publishing through this plugin), faults one by one.
        let (mut out, mut succeeded) = (0, false);
        let mut outputs: Vec<Result<Output, String>> = verdicts
            .into_iter()
            .zip(ms)
            .map(|(v, m)| {
                let o = v
                    .map_err(|e| format!("process-batch returned an error: {e}"))
                    .and_then(|v| output(v, m))?;
                out += o.messages();
                succeeded = true;
                Ok(o)
            })
            .collect();
        if succeeded {
            guarded.succeeded(out);
        }
        for o in &mut outputs {
            if let Err(e) = o {
                *e = guarded.failed(std::mem::take(e));
            }
        }
        outputs
    }
}

/// A verdict as an output, counted: a success ends the fault streak;
/// an error or garbage is a fault.
fn judge(
    guarded: &Guarded<Instance>,
    verdict: Result<Verdict, String>,
    m: &Message,
) -> Result<Output, String> {
    match verdict.and_then(|v| output(v, m)) {
        Ok(out) => {
            guarded.succeeded(out.messages());
            Ok(out)
        }
        Err(e) => Err(guarded.failed(e)),
    }
}

fn output(verdict: Verdict, m: &Message) -> Result<Output, String> {
    match verdict {
        Verdict::Keep => Ok(Output::Keep),
        Verdict::Drop => Ok(Output::Replace(Vec::new())),
        Verdict::Replace(out) => from_wasm(out, m).map(Output::Replace),
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

impl Output {
    /// How many messages go on.
    pub fn messages(&self) -> usize {
        match self {
            Output::Keep => 1,
            Output::Replace(v) => v.len(),
        }
    }
}

/// The message as the guest sees it, borrowed: lowered straight from ours.
fn to_wasm(m: &Message) -> types::MessageParam<'_> {
    types::MessageParam {
        topic: &m.topic,
        payload: &m.payload,
        qos: m.qos.into(),
        retain: m.retain,
        origin: origin(&m.origin),
        received_ms: received_ms(m),
    }
}

fn origin(o: &Origin) -> types::OriginParam<'_> {
    match o {
        Origin::Client(id) => types::OriginParam::Client(id),
        Origin::Sensor(id) => types::OriginParam::Sensor(id),
        Origin::Upstream => types::OriginParam::Upstream,
        Origin::Will(_) | Origin::Broker => types::OriginParam::Broker,
    }
}

fn received_ms(m: &Message) -> u64 {
    m.received_at
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
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
            let qos = QoS::from_u8(o.qos).ok_or_else(|| format!("returned QoS {}", o.qos))?;
            Ok(Message {
                topic: ByteString::from(o.topic),
                payload: Bytes::from(o.payload),
                qos,
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
