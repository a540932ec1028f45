//! What a run measured (`Report`) and its two forms: one JSON object with
//! `--json` (the field names and their order are what tests/bench/*.py
//! parse), otherwise the text table of `table`.

use hdrhistogram::Histogram;
use serde::Serialize;

/// What a run measured: printed as a table, or as JSON with `--json`.
#[derive(Debug, Serialize)]
pub struct Report {
    pub broker: String,
    pub publishers: u32,
    pub subscribers: u32,
    pub qos: u8,
    /// Lowest QoS the broker granted to the subscriptions (`null` without subscribers).
    pub granted_qos: Option<u8>,
    pub payload_size: usize,
    /// Target total rate, msg/s; 0 = flat out.
    pub target_rate: u64,
    pub fan_in: bool,
    pub window: u16,
    pub threads: u16,
    pub warmup_s: f64,
    /// Messages published in all (warm-up included).
    pub sent: u64,
    /// Messages published during the measurement.
    pub sent_measured: u64,
    pub publish_seconds: f64,
    /// Achieved publish rate over the measurement, msg/s, all publishers.
    pub publish_rate: f64,
    /// QoS 1/2 messages still unacknowledged when the publishers gave up waiting.
    pub unacked: u64,
    /// `sent` × `subscribers`.
    pub expected_deliveries: u64,
    /// Distinct messages received, summed over subscribers.
    pub received: u64,
    /// Deliveries from the end of the warm-up to the last one.
    pub delivered_measured: u64,
    pub delivery_seconds: f64,
    /// Deliveries per second, summed over subscribers.
    pub delivery_rate: f64,
    pub lost: u64,
    pub duplicated: u64,
    pub malformed: u64,
    /// Subscribers whose connection the broker closed before the end.
    pub subscribers_dropped: u32,
    /// Seconds from the end of publishing to the end of the drain.
    pub drain_seconds: f64,
    pub latency_us: Latency,
    pub cpu: Cpu,
}

/// Publish→deliver latency over the messages sent after the warm-up, µs.
#[derive(Debug, Serialize)]
pub struct Latency {
    pub samples: u64,
    pub mean: f64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub max: u64,
}

/// CPU used over the measurement (user + system), percent of one core.
#[derive(Debug, Serialize)]
pub struct Cpu {
    pub bench_percent: Option<f64>,
    pub broker_pid: Option<u32>,
    pub broker_percent: Option<f64>,
}

impl Latency {
    /// The summary of a histogram of latencies in µs: all zero when it is
    /// empty, the mean rounded to 0.1 µs.
    pub fn of(h: &Histogram<u64>) -> Self {
        let quantile = |q| {
            if h.is_empty() {
                0
            } else {
                h.value_at_quantile(q)
            }
        };
        Latency {
            samples: h.len(),
            mean: if h.is_empty() {
                0.0
            } else {
                (h.mean() * 10.0).round() / 10.0
            },
            p50: quantile(0.5),
            p90: quantile(0.9),
            p99: quantile(0.99),
            max: h.max(),
        }
    }
}

/// 1234567 → "1,234,567".
pub fn group(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (k, c) in digits.chars().enumerate() {
        if k > 0 && (digits.len() - k).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

pub fn table(r: &Report) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let rate = if r.target_rate == 0 {
        "flat out".to_string()
    } else {
        format!("{} msg/s", group(r.target_rate))
    };
    let topics = if r.fan_in {
        "one topic (fan-in)"
    } else {
        "one topic each"
    };
    let granted = match r.granted_qos {
        Some(g) if g != r.qos => format!(" (granted {g})"),
        _ => String::new(),
    };
    let _ = writeln!(
        s,
        "capteurs-sim bench → {}: {} publisher(s) on {topics} → {} subscriber(s), QoS {}{granted}, {} B payload, {rate}, \
         window {}, {} thread(s)",
        r.broker, r.publishers, r.subscribers, r.qos, r.payload_size, r.window, r.threads
    );
    if r.warmup_s > 0.0 {
        let _ = writeln!(s, "  (after {} s of warm-up, not measured)", r.warmup_s);
    }
    let _ = writeln!(
        s,
        "  published    {:>14} msg in {:>6.2} s  {:>12} msg/s{}",
        group(r.sent_measured),
        r.publish_seconds,
        group(r.publish_rate.round() as u64),
        if r.unacked > 0 {
            format!("   ({} never acknowledged)", group(r.unacked))
        } else {
            String::new()
        }
    );
    let _ = writeln!(
        s,
        "  delivered    {:>14} msg in {:>6.2} s  {:>12} msg/s",
        group(r.delivered_measured),
        r.delivery_seconds,
        group(r.delivery_rate.round() as u64)
    );
    let lost_pct = if r.expected_deliveries > 0 {
        r.lost as f64 * 100.0 / r.expected_deliveries as f64
    } else {
        0.0
    };
    let _ = writeln!(
        s,
        "  totals       sent {}   expected deliveries {}   received {}   lost {} ({lost_pct:.2} %)   duplicated {}{}",
        group(r.sent),
        group(r.expected_deliveries),
        group(r.received),
        group(r.lost),
        group(r.duplicated),
        if r.malformed > 0 { format!("   malformed {}", group(r.malformed)) } else { String::new() }
    );
    if r.subscribers_dropped > 0 {
        let _ = writeln!(
            s,
            "  dropped      {} subscriber connection(s) closed by the broker",
            r.subscribers_dropped
        );
    }
    let l = &r.latency_us;
    let _ = writeln!(
        s,
        "  latency µs   p50 {}   p90 {}   p99 {}   max {}   mean {:.1}   ({} samples)",
        group(l.p50),
        group(l.p90),
        group(l.p99),
        group(l.max),
        l.mean,
        group(l.samples)
    );
    let pct = |p: Option<f64>| p.map_or("n/a".to_string(), |p| format!("{p:.0} %"));
    let _ = write!(
        s,
        "  CPU          capteurs-sim {}",
        pct(r.cpu.bench_percent)
    );
    if let Some(pid) = r.cpu.broker_pid {
        let _ = write!(s, "   broker (pid {pid}) {}", pct(r.cpu.broker_percent));
    }
    let _ = writeln!(s, "   (of one core, during the measurement)");
    let _ = writeln!(
        s,
        "  drain        {:.2} s after publishing stopped",
        r.drain_seconds
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_thousands() {
        assert_eq!(group(0), "0");
        assert_eq!(group(999), "999");
        assert_eq!(group(1000), "1,000");
        assert_eq!(group(1_234_567), "1,234,567");
    }

    #[test]
    fn latency_of_an_empty_histogram_is_all_zero() {
        let l = Latency::of(&Histogram::new(3).unwrap());
        assert_eq!((l.samples, l.mean, l.p50, l.p99, l.max), (0, 0.0, 0, 0, 0));
    }
}
