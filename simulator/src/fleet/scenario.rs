//! A fleet scenario: where the sensors are, what they measure, how their
//! values move, how they publish, and which faults to inject. Read from
//! TOML (`configs/fleet-*.toml` are documented examples) or built from
//! command-line flags.

use std::path::Path;

use anyhow::{bail, Context};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Seed of every random choice; the same seed gives the same readings.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Seconds to run; 0 = until Ctrl-C.
    #[serde(default)]
    pub duration_secs: f64,
    #[serde(default)]
    pub mqtt: MqttSection,
    /// Groups of sensors.
    #[serde(rename = "sensors")]
    pub groups: Vec<SensorGroup>,
    #[serde(default)]
    pub faults: Vec<Fault>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttSection {
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<String>,
    /// MQTT connections the sensors are spread over (round robin).
    pub connections: usize,
    /// Client ids are `<client_id_prefix><n>`.
    pub client_id_prefix: String,
    /// Persistent sessions (clean session = 0) for every connection.
    pub persistent: bool,
    /// Each connection's Last Will: `<will_topic_prefix><client id>` =
    /// "offline" (QoS 1, retained); "online" is published there on connect.
    pub will_topic_prefix: String,
    pub keep_alive_secs: u64,
}

impl Default for MqttSection {
    fn default() -> Self {
        MqttSection {
            host: "127.0.0.1".into(),
            port: 1883,
            username: None,
            password: None,
            connections: 1,
            client_id_prefix: "capteurs-sim-".into(),
            persistent: false,
            will_topic_prefix: "capteurs/status/".into(),
            keep_alive_secs: 30,
        }
    }
}

/// `count` sensors of one kind in one place.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SensorGroup {
    /// What is measured: the `<grandeur>` level of the topic.
    #[serde(default = "default_grandeur")]
    pub grandeur: String,
    #[serde(default = "default_unit")]
    pub unit: String,
    #[serde(default = "default_pays")]
    pub pays: String,
    #[serde(default = "default_ville")]
    pub ville: String,
    /// Streets, one sensor each; when empty, `count` streets `rue_1` … are
    /// generated.
    #[serde(default)]
    pub rues: Vec<String>,
    #[serde(default = "one")]
    pub count: usize,
    /// Full topics, one sensor each, instead of the
    /// `capteurs/<grandeur>/<pays>/<ville>/<rue>` ones.
    #[serde(default)]
    pub topics: Vec<String>,
    #[serde(default = "default_period")]
    pub period_ms: u64,
    #[serde(default)]
    pub model: Model,
    #[serde(default)]
    pub qos: u8,
    #[serde(default)]
    pub retain: bool,
    #[serde(default)]
    pub format: Format,
}

fn default_grandeur() -> String {
    "temperature".into()
}
fn default_unit() -> String {
    "°C".into()
}
fn default_pays() -> String {
    "france".into()
}
fn default_ville() -> String {
    "clermont".into()
}
fn one() -> usize {
    1
}
fn default_period() -> u64 {
    3000
}

/// How a sensor's value moves.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, tag = "kind", rename_all = "snake_case")]
pub enum Model {
    /// `center + uniform(-spread, spread)`: the course's publisher (15 ± 10).
    Uniform { center: f64, spread: f64 },
    /// Starts at `start`, moves by `uniform(-step, step)`, stays in
    /// `[min, max]`.
    RandomWalk {
        start: f64,
        step: f64,
        min: f64,
        max: f64,
    },
    /// A day cycle: `mean + amplitude * sin(2π t / period_secs + phase)`
    /// plus `uniform(-noise, noise)`; each sensor gets a random phase
    /// within `phase_spread` radians.
    Sine {
        mean: f64,
        amplitude: f64,
        period_secs: f64,
        noise: f64,
        #[serde(default)]
        phase_spread: f64,
    },
}

impl Default for Model {
    fn default() -> Self {
        Model::Uniform {
            center: 15.0,
            spread: 10.0,
        }
    }
}

/// What a reading looks like on the wire.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// The number alone, as the course's publisher sends it (`17.3`).
    #[default]
    Plain,
    /// `{"sensor":…,"value":…,"unit":…,"ts":…}` (ts in ms since the epoch).
    Json,
}

/// A fault injected at `at_secs` (and then every `every_secs` if set).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    pub kind: FaultKind,
    pub at_secs: f64,
    #[serde(default)]
    pub every_secs: Option<f64>,
    /// Connection index (drop, reconnect) or sensor index (burst, silence);
    /// all of them when unset.
    #[serde(default)]
    pub target: Option<usize>,
    /// burst: messages per sensor sent at once.
    #[serde(default = "default_burst")]
    pub count: u32,
    /// drop: seconds before reconnecting (the session is resumed when
    /// `mqtt.persistent`); silence: seconds without publishing.
    #[serde(default = "default_fault_duration")]
    pub duration_secs: f64,
}

fn default_burst() -> u32 {
    100
}
fn default_fault_duration() -> f64 {
    5.0
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// The TCP connection is cut without DISCONNECT (the broker publishes
    /// the will); it reconnects after `duration_secs`.
    Drop,
    /// Burst of `count` readings per sensor at once.
    Burst,
    /// The sensors stop publishing for `duration_secs`.
    Silence,
}

impl Scenario {
    pub fn from_file(path: &Path) -> anyhow::Result<Scenario> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read scenario {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("bad scenario {}", path.display()))
    }

    /// Parses and checks a scenario; errors name the key and line.
    pub fn parse(text: &str) -> anyhow::Result<Scenario> {
        let s: Scenario = toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
        s.validate()?;
        Ok(s)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        if self.groups.is_empty() {
            bail!("no [[sensors]] group: nothing to simulate");
        }
        if self.mqtt.connections == 0 {
            bail!("mqtt.connections must be at least 1");
        }
        if self.duration_secs.is_nan() || self.duration_secs < 0.0 {
            bail!("duration_secs must be >= 0");
        }
        for (i, g) in self.groups.iter().enumerate() {
            let at = |key: &str| format!("sensors[{i}].{key}");
            if g.period_ms == 0 {
                bail!("{} must be at least 1", at("period_ms"));
            }
            if g.qos > 2 {
                bail!("{} must be 0, 1 or 2, not {}", at("qos"), g.qos);
            }
            if g.count == 0 {
                bail!("{} must be at least 1", at("count"));
            }
            if !g.rues.is_empty() && g.rues.len() != g.count && g.count != 1 {
                bail!(
                    "{} has {} streets but count is {}",
                    at("rues"),
                    g.rues.len(),
                    g.count
                );
            }
            for (key, level) in [
                ("grandeur", &g.grandeur),
                ("pays", &g.pays),
                ("ville", &g.ville),
            ] {
                if level.is_empty() || level.contains(['/', '+', '#']) {
                    bail!("{} must be one topic level, not {level:?}", at(key));
                }
            }
            for t in g.rues.iter().chain(&g.topics) {
                if t.is_empty() || t.contains(['+', '#', '\0']) {
                    bail!("{}: {t:?} is not a valid topic (level)", at("rues/topics"));
                }
            }
            if let Model::RandomWalk { min, max, .. } = g.model {
                if min > max {
                    bail!("{}: min {min} > max {max}", at("model"));
                }
            }
            if let Model::Sine { period_secs, .. } = g.model {
                if period_secs.is_nan() || period_secs <= 0.0 {
                    bail!("{} must be > 0", at("model.period_secs"));
                }
            }
        }
        for (i, f) in self.faults.iter().enumerate() {
            let bad = |v: f64| v.is_nan() || v < 0.0;
            if bad(f.at_secs) || f.every_secs.is_some_and(|e| bad(e) || e == 0.0) {
                bail!("faults[{i}]: at_secs must be >= 0 and every_secs > 0");
            }
        }
        Ok(())
    }

    /// Sensors of every group, in order, with their topics.
    pub fn sensors(&self) -> Vec<SensorSpec> {
        let mut out = Vec::new();
        for (gi, g) in self.groups.iter().enumerate() {
            let n = if g.topics.is_empty() {
                g.count.max(g.rues.len())
            } else {
                g.topics.len()
            };
            for k in 0..n {
                let topic = if let Some(t) = g.topics.get(k) {
                    t.clone()
                } else {
                    let rue = g
                        .rues
                        .get(k)
                        .cloned()
                        .unwrap_or_else(|| format!("rue_{}", k + 1));
                    format!("capteurs/{}/{}/{}/{rue}", g.grandeur, g.pays, g.ville)
                };
                out.push(SensorSpec {
                    id: format!("{}-{}-{}", g.grandeur, gi + 1, k + 1),
                    topic,
                    group: gi,
                });
            }
        }
        out
    }
}

/// One sensor of a group.
#[derive(Debug, Clone)]
pub struct SensorSpec {
    pub id: String,
    pub topic: String,
    pub group: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_scenarios_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
        let mut seen = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if name.starts_with("fleet-") && name.ends_with(".toml") {
                let s = Scenario::from_file(&path).unwrap_or_else(|e| panic!("{name}: {e:#}"));
                assert!(!s.sensors().is_empty());
                seen += 1;
            }
        }
        assert!(seen >= 2);
    }

    #[test]
    fn errors_name_the_key_and_line() {
        let e = Scenario::parse("[[sensors]]\ncount = 2\nperiode_ms = 5\n").unwrap_err();
        let msg = format!("{e:#}");
        assert!(
            msg.contains("periode_ms") && msg.contains("line 3"),
            "{msg}"
        );
        let e = Scenario::parse("[[sensors]]\nqos = 3\n").unwrap_err();
        assert!(format!("{e:#}").contains("sensors[0].qos"), "{e:#}");
        let e = Scenario::parse("[mqtt]\nport = \"x\"\n[[sensors]]\n").unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains("port") && msg.contains("line 2"), "{msg}");
    }

    #[test]
    fn topics_are_generated_per_street() {
        let s = Scenario::parse(
            "[[sensors]]\ncount = 2\nville = \"aubiere\"\n[[sensors]]\ngrandeur = \"humidite\"\nrues = [\"chebarde\"]\n",
        )
        .unwrap();
        let topics: Vec<_> = s.sensors().into_iter().map(|s| s.topic).collect();
        assert_eq!(
            topics,
            [
                "capteurs/temperature/france/aubiere/rue_1",
                "capteurs/temperature/france/aubiere/rue_2",
                "capteurs/humidite/france/clermont/chebarde",
            ]
        );
    }
}
