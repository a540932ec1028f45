//! The readings of a fleet, in virtual time: each sensor has its own random
//! stream (the scenario's seed, stream = sensor index), its first reading
//! at a seeded offset within its period, then one reading per period. The
//! next reading is always the earliest due (ties: lowest sensor index), so
//! a seed fixes every value and their order, whatever the wall clock does.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::f64::consts::TAU;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::scenario::{Format, Model, Scenario, SensorSpec};

/// One reading of one sensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub sensor: usize,
    /// Per-sensor sequence number, from 0.
    pub seq: u64,
    /// Virtual time since the start, in ms.
    pub at_ms: u64,
    pub value: f64,
}

struct SensorState {
    spec: SensorSpec,
    rng: ChaCha8Rng,
    model: Model,
    period_ms: u64,
    walk: f64,
    phase: f64,
    seq: u64,
}

pub struct Generator {
    sensors: Vec<SensorState>,
    due: BinaryHeap<Reverse<(u64, usize)>>,
}

impl Generator {
    pub fn new(scenario: &Scenario, seed: u64) -> Generator {
        let mut sensors = Vec::new();
        let mut due = BinaryHeap::new();
        for (i, spec) in scenario.sensors().into_iter().enumerate() {
            let group = &scenario.groups[spec.group];
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            rng.set_stream(i as u64);
            let first = rng.random_range(0..group.period_ms);
            let (walk, phase) = match group.model {
                Model::RandomWalk { start, .. } => (start, 0.0),
                Model::Sine { phase_spread, .. } if phase_spread > 0.0 => {
                    (0.0, rng.random_range(0.0..phase_spread))
                }
                _ => (0.0, 0.0),
            };
            due.push(Reverse((first, i)));
            sensors.push(SensorState {
                spec,
                rng,
                model: group.model.clone(),
                period_ms: group.period_ms,
                walk,
                phase,
                seq: 0,
            });
        }
        Generator { sensors, due }
    }

    pub fn sensor_count(&self) -> usize {
        self.sensors.len()
    }

    pub fn spec(&self, sensor: usize) -> &SensorSpec {
        &self.sensors[sensor].spec
    }

    /// When the next reading is due (virtual ms), without taking it.
    pub fn peek_due(&self) -> Option<u64> {
        self.due.peek().map(|Reverse((t, _))| *t)
    }

    /// The next reading in real time, for writers that pace themselves
    /// (serial lines, BLE adverts): sleeps until it is due after `start`;
    /// `None` once the fleet has no more or `duration` is over.
    pub fn next_due(
        &mut self,
        start: std::time::Instant,
        duration: Option<std::time::Duration>,
    ) -> Option<Reading> {
        let r = self.next_reading()?;
        let due = std::time::Duration::from_millis(r.at_ms);
        if duration.is_some_and(|d| due >= d) {
            return None;
        }
        if let Some(wait) = due.checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
        Some(r)
    }

    /// The next reading in time order.
    pub fn next_reading(&mut self) -> Option<Reading> {
        let Reverse((at_ms, i)) = self.due.pop()?;
        let reading = self.read(i, at_ms);
        self.due
            .push(Reverse((at_ms + self.sensors[i].period_ms, i)));
        Some(reading)
    }

    /// An extra reading of one sensor now (bursts), outside its schedule.
    pub fn read(&mut self, i: usize, at_ms: u64) -> Reading {
        let s = &mut self.sensors[i];
        let value = match s.model {
            Model::Uniform { center, spread } => center + s.rng.random_range(-spread..=spread),
            Model::RandomWalk { step, min, max, .. } => {
                s.walk = (s.walk + s.rng.random_range(-step..=step)).clamp(min, max);
                s.walk
            }
            Model::Sine {
                mean,
                amplitude,
                period_secs,
                noise,
                ..
            } => {
                let t = at_ms as f64 / 1000.0;
                let n = if noise > 0.0 {
                    s.rng.random_range(-noise..=noise)
                } else {
                    0.0
                };
                mean + amplitude * (TAU * t / period_secs + s.phase).sin() + n
            }
        };
        let seq = s.seq;
        s.seq += 1;
        Reading {
            sensor: i,
            seq,
            at_ms,
            value: (value * 100.0).round() / 100.0,
        }
    }
}

/// A reading as an MQTT payload. `ts_ms`: wall-clock time for JSON.
pub fn payload(format: Format, spec: &SensorSpec, unit: &str, r: &Reading, ts_ms: u64) -> String {
    match format {
        Format::Plain => crate::mqtt::python_float(r.value),
        Format::Json => serde_json::json!({
            "sensor": spec.id,
            "value": r.value,
            "unit": unit,
            "ts": ts_ms,
            "seq": r.seq,
        })
        .to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scenario() -> Scenario {
        Scenario::parse(
            "[[sensors]]\ncount = 3\nperiod_ms = 100\n\
             [[sensors]]\ngrandeur = \"humidite\"\nperiod_ms = 250\n\
             model = { kind = \"random_walk\", start = 50.0, step = 1.0, min = 0.0, max = 100.0 }\n\
             [[sensors]]\nperiod_ms = 1000\n\
             model = { kind = \"sine\", mean = 18.0, amplitude = 5.0, period_secs = 10.0, noise = 0.2, phase_spread = 1.0 }\n",
        )
        .unwrap()
    }

    fn take(seed: u64, n: usize) -> Vec<Reading> {
        let mut g = Generator::new(&scenario(), seed);
        (0..n).map(|_| g.next_reading().unwrap()).collect()
    }

    #[test]
    fn same_seed_same_readings_in_the_same_order() {
        assert_eq!(take(42, 200), take(42, 200));
        assert_ne!(take(42, 200), take(43, 200));
    }

    #[test]
    fn readings_come_in_time_order_each_sensor_at_its_period() {
        let rs = take(1, 300);
        assert!(rs.windows(2).all(|w| w[0].at_ms <= w[1].at_ms));
        let s0: Vec<_> = rs.iter().filter(|r| r.sensor == 0).collect();
        assert!(s0.windows(2).all(|w| w[1].at_ms - w[0].at_ms == 100));
        assert!(s0.iter().enumerate().all(|(k, r)| r.seq == k as u64));
    }

    #[test]
    fn models_stay_in_their_range() {
        for r in take(7, 1000) {
            match r.sensor {
                0..=2 => assert!((5.0..=25.0).contains(&r.value), "{r:?}"),
                3 => assert!((0.0..=100.0).contains(&r.value), "{r:?}"),
                _ => assert!((12.8..=23.2).contains(&r.value), "{r:?}"),
            }
        }
    }
}
