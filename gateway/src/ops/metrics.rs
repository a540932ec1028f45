//! `/metrics`: the stages' counters in Prometheus' text exposition format
//! (version 0.0.4). Names follow Prometheus' conventions: `capteurs_`
//! prefix, `_total` for counters, base units (seconds, bytes).

use std::fmt::Write;
use std::sync::atomic::Ordering;

use super::{buffer_dropped, dropped_input, kind_name, Ops};
use crate::broker::router::Metrics;
use crate::buffer::BufferStats;
use crate::sources::SourceStats;

/// Writes one metric family: its HELP and TYPE lines, then each sample.
struct Family<'a> {
    out: &'a mut String,
}

impl Family<'_> {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {}", number(value));
    }

    /// A family with one unlabelled sample.
    fn one(&mut self, name: &str, kind: &str, help: &str, value: f64) {
        self.head(name, kind, help);
        self.sample(name, &[], value);
    }
}

/// Label values escape `\`, `"` and newlines.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

const QOS: [&str; 3] = ["0", "1", "2"];

/// The whole exposition.
pub async fn render(ops: &Ops) -> String {
    let mut out = String::with_capacity(8192);
    let mut f = Family { out: &mut out };
    let c = |n: &std::sync::atomic::AtomicU64| Metrics::get(n) as f64;

    f.head(
        "capteurs_build_info",
        "gauge",
        "Version of the running gateway (always 1).",
    );
    f.sample(
        "capteurs_build_info",
        &[("version", super::VERSION), ("gateway", &ops.gateway_id)],
        1.0,
    );
    f.one(
        "capteurs_uptime_seconds",
        "gauge",
        "Seconds since the gateway started.",
        ops.broker.started().elapsed().as_secs_f64(),
    );
    let stale = ops.stale_after;
    f.head(
        "capteurs_stage_heartbeat_age_seconds",
        "gauge",
        "Seconds since each stage last showed it is alive (the watchdog is fed only while all are fresh).",
    );
    for (name, age) in ops.health.ages() {
        f.sample(
            "capteurs_stage_heartbeat_age_seconds",
            &[("stage", name)],
            age.as_secs_f64(),
        );
    }
    f.one(
        "capteurs_healthy",
        "gauge",
        "1 while every stage is alive, 0 while one is stuck.",
        if ops.health.stuck(stale).is_empty() {
            1.0
        } else {
            0.0
        },
    );

    // Broker.
    let router = ops.broker.router();
    let m = &router.metrics;
    f.one(
        "capteurs_broker_connections",
        "gauge",
        "MQTT clients connected now.",
        m.clients_connected.load(Ordering::Relaxed) as f64,
    );
    f.one(
        "capteurs_broker_sessions",
        "gauge",
        "Sessions held (connected and persistent offline ones).",
        router.session_count() as f64,
    );
    f.one(
        "capteurs_broker_subscriptions",
        "gauge",
        "Subscriptions held.",
        router.subscription_count() as f64,
    );
    f.one(
        "capteurs_broker_retained_messages",
        "gauge",
        "Retained messages stored.",
        router.retained_count() as f64,
    );
    f.head(
        "capteurs_broker_messages_received_total",
        "counter",
        "PUBLISH packets received from MQTT clients, by QoS.",
    );
    for (q, n) in QOS.iter().zip(&m.received_by_qos) {
        f.sample(
            "capteurs_broker_messages_received_total",
            &[("qos", q)],
            c(n),
        );
    }
    f.head(
        "capteurs_broker_messages_sent_total",
        "counter",
        "PUBLISH packets sent to MQTT clients, by delivered QoS.",
    );
    for (q, n) in QOS.iter().zip(&m.sent_by_qos) {
        f.sample("capteurs_broker_messages_sent_total", &[("qos", q)], c(n));
    }
    f.head(
        "capteurs_broker_messages_dropped_total",
        "counter",
        "Messages the broker did not deliver, by reason.",
    );
    for (reason, n) in [
        ("queue_full", &m.dropped_queue_full),
        ("publish_denied", &m.publish_denied),
    ] {
        f.sample(
            "capteurs_broker_messages_dropped_total",
            &[("reason", reason)],
            c(n),
        );
    }
    f.one(
        "capteurs_broker_subscribe_denied_total",
        "counter",
        "Subscriptions refused by the ACL or an auth plugin (SUBACK 0x80).",
        c(&m.subscribe_denied),
    );
    f.head(
        "capteurs_broker_bytes_total",
        "counter",
        "Bytes read from and written to MQTT clients.",
    );
    f.sample(
        "capteurs_broker_bytes_total",
        &[("direction", "received")],
        c(&m.bytes_received),
    );
    f.sample(
        "capteurs_broker_bytes_total",
        &[("direction", "sent")],
        c(&m.bytes_sent),
    );
    f.head(
        "capteurs_broker_connections_closed_total",
        "counter",
        "Connections refused or closed by the broker, by reason.",
    );
    for (reason, n) in [
        ("refused", &m.connections_refused),
        ("over_limit", &m.connections_over_limit),
        ("protocol_error", &m.protocol_errors),
        ("connect_timeout", &m.connect_timeouts),
        ("keepalive_timeout", &m.keepalive_timeouts),
        ("write_timeout", &m.write_timeouts),
        ("client_id_taken", &m.client_id_taken),
        ("max_sessions", &m.sessions_over_limit),
    ] {
        f.sample(
            "capteurs_broker_connections_closed_total",
            &[("reason", reason)],
            c(n),
        );
    }
    f.head(
        "capteurs_broker_limited_total",
        "counter",
        "What the hostile-client limits refused, by limit.",
    );
    for (limit, n) in [
        ("max_topic_levels", &m.topics_too_deep),
        ("max_subscriptions_per_client", &m.subscriptions_over_limit),
        ("max_retained", &m.retained_over_limit),
        ("max_sessions", &m.sessions_over_limit),
    ] {
        f.sample("capteurs_broker_limited_total", &[("limit", limit)], c(n));
    }
    f.one(
        "capteurs_broker_sessions_expired_total",
        "counter",
        "Offline persistent sessions discarded after broker.session_expiry_secs.",
        c(&m.sessions_expired),
    );
    f.one(
        "capteurs_broker_store_recovered_total",
        "counter",
        "Times broker.sqlite was found corrupt at start, moved aside and salvaged.",
        c(&m.store_recovered),
    );
    f.one(
        "capteurs_broker_invalid_local_topics_total",
        "counter",
        "Messages from sources or the cloud's in rules refused for an invalid topic.",
        c(&m.invalid_local_topics),
    );
    f.one(
        "capteurs_broker_logins_delayed_total",
        "counter",
        "CONNECTs held back because their address failed to log in repeatedly.",
        c(&m.logins_delayed),
    );
    f.one(
        "capteurs_broker_receive_denied_total",
        "counter",
        "Deliveries withheld because the subscriber may not read the topic (read ACL at delivery).",
        c(&m.receive_denied),
    );
    f.one(
        "capteurs_broker_connections_accepted_total",
        "counter",
        "TCP connections accepted.",
        c(&m.connections_accepted),
    );
    f.one(
        "capteurs_broker_wills_published_total",
        "counter",
        "Last Will messages published.",
        c(&m.wills_published),
    );
    f.one(
        "capteurs_broker_publishers_throttled_total",
        "counter",
        "Times a publisher was held back by a full subscriber queue.",
        c(&m.publishers_throttled),
    );

    // Sources.
    if let Some(s) = &ops.sources {
        let st = &s.stats;
        let g = |n: &std::sync::atomic::AtomicU64| SourceStats::get(n) as f64;
        f.head(
            "capteurs_source_input_total",
            "counter",
            "Serial lines and BLE adverts read.",
        );
        f.sample(
            "capteurs_source_input_total",
            &[("source", "serial")],
            g(&st.lines),
        );
        f.sample(
            "capteurs_source_input_total",
            &[("source", "ble")],
            g(&st.adverts),
        );
        f.one(
            "capteurs_source_readings_published_total",
            "counter",
            "Sensor readings published on the broker.",
            g(&st.published),
        );
        f.one(
            "capteurs_source_readings_collapsed_total",
            "counter",
            "Repeated adverts and readings within min_interval_ms/change_threshold, not published.",
            g(&st.collapsed),
        );
        f.head(
            "capteurs_source_decode_errors_total",
            "counter",
            "Sensor input dropped, by source and reason.",
        );
        for (key, n) in dropped_input(st) {
            let (source, reason) = key.split_once('/').unwrap_or(("", &key));
            f.sample(
                "capteurs_source_decode_errors_total",
                &[("source", source), ("reason", reason)],
                n as f64,
            );
        }
        f.head(
            "capteurs_source_port_events_total",
            "counter",
            "Serial port opens and errors (unplugged devices).",
        );
        f.sample(
            "capteurs_source_port_events_total",
            &[("event", "open")],
            g(&st.port_opens),
        );
        f.sample(
            "capteurs_source_port_events_total",
            &[("event", "error")],
            g(&st.port_errors),
        );
        f.head(
            "capteurs_sensor_last_reading_age_seconds",
            "gauge",
            "Seconds since each sensor's last published reading, by quantity.",
        );
        let mut values = Vec::new();
        let now = std::time::Instant::now();
        for sensor in &s.registry.sensors {
            let st = sensor.state.lock().unwrap_or_else(|e| e.into_inner());
            for q in &sensor.quantities {
                if let Some((v, at)) = st.last.get(&q.grandeur) {
                    f.sample(
                        "capteurs_sensor_last_reading_age_seconds",
                        &[("sensor", &sensor.id), ("grandeur", &q.grandeur)],
                        now.duration_since(*at).as_secs_f64(),
                    );
                    values.push((sensor.id.clone(), q.grandeur.clone(), *v));
                }
            }
        }
        f.head(
            "capteurs_sensor_value",
            "gauge",
            "Each sensor's last published value, by quantity (unit as published).",
        );
        for (id, g, v) in values {
            f.sample(
                "capteurs_sensor_value",
                &[("sensor", &id), ("grandeur", &g)],
                v,
            );
        }
    }

    // Plugins.
    if let Some(p) = &ops.plugins {
        let summary = p.summary();
        let each = |f: &mut Family,
                    name: &str,
                    kind: &str,
                    help: &str,
                    get: &dyn Fn(&crate::plugins::runtime::PluginStats) -> f64| {
            f.head(name, kind, help);
            for (plugin, k, s) in &summary {
                f.sample(name, &[("plugin", plugin), ("kind", kind_name(*k))], get(s));
            }
        };
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed) as f64;
        each(
            &mut f,
            "capteurs_plugin_calls_total",
            "counter",
            "Messages and checks handed to each plugin (a batch counts each message).",
            &|s| load(&s.calls),
        );
        each(
            &mut f,
            "capteurs_plugin_batches_total",
            "counter",
            "process-batch calls: several messages of one client in one entry.",
            &|s| load(&s.batches),
        );
        each(
            &mut f,
            "capteurs_plugin_batch_replays_total",
            "counter",
            "Batches that trapped or overran, replayed message by message.",
            &|s| load(&s.batch_replays),
        );
        each(
            &mut f,
            "capteurs_plugin_faults_total",
            "counter",
            "Traps, deadlines, memory exhaustion, errors and garbage answers.",
            &|s| load(&s.faults),
        );
        each(
            &mut f,
            "capteurs_plugin_restarts_total",
            "counter",
            "Instances rebuilt after a fault.",
            &|s| load(&s.restarts),
        );
        each(
            &mut f,
            "capteurs_plugin_messages_out_total",
            "counter",
            "Messages a plugin emitted (transforms) or readings it decoded.",
            &|s| load(&s.messages_out),
        );
        each(
            &mut f,
            "capteurs_plugin_call_seconds_total",
            "counter",
            "Time spent inside each plugin (divide by calls for the mean latency).",
            &|s| s.busy_ns.load(Ordering::Relaxed) as f64 / 1e9,
        );
        each(
            &mut f,
            "capteurs_plugin_disabled",
            "gauge",
            "1 while a plugin is disabled after repeated faults.",
            &|s| {
                if s.disabled.load(Ordering::Relaxed) {
                    1.0
                } else {
                    0.0
                }
            },
        );
    }

    // Buffer.
    if let Some(b) = &ops.buffer {
        let s = b.stats();
        let g = |n: &std::sync::atomic::AtomicU64| BufferStats::get(n) as f64;
        f.one(
            "capteurs_buffer_messages",
            "gauge",
            "Messages stored for the cloud.",
            g(&s.depth),
        );
        f.one(
            "capteurs_buffer_bytes",
            "gauge",
            "Bytes of the stored messages.",
            g(&s.bytes),
        );
        f.one(
            "capteurs_buffer_max_bytes",
            "gauge",
            "buffer.max_bytes.",
            ops.buffer_max_bytes as f64,
        );
        f.one(
            "capteurs_buffer_in_memory_messages",
            "gauge",
            "Messages held in memory only (memory-first mode).",
            g(&s.in_memory),
        );
        f.one(
            "capteurs_buffer_oldest_age_seconds",
            "gauge",
            "Age of the oldest stored message (0 when empty).",
            ops.oldest_age().await.map_or(0.0, |d| d.as_secs_f64()),
        );
        f.one(
            "capteurs_buffer_appended_total",
            "counter",
            "Messages appended.",
            g(&s.appended),
        );
        f.one(
            "capteurs_buffer_forwarded_total",
            "counter",
            "Messages deleted after the cloud acknowledged them.",
            g(&s.forwarded),
        );
        f.head(
            "capteurs_buffer_dropped_total",
            "counter",
            "Messages dropped by the buffer, by reason.",
        );
        for (reason, n) in buffer_dropped(s) {
            f.sample(
                "capteurs_buffer_dropped_total",
                &[("reason", &reason)],
                n as f64,
            );
        }
        f.one(
            "capteurs_buffer_write_errors_total",
            "counter",
            "Group commits that failed (retried).",
            g(&s.write_errors),
        );
        f.one(
            "capteurs_buffer_disk_writes_total",
            "counter",
            "Messages written to the database file.",
            g(&s.disk_writes),
        );
    }

    // Upstream.
    if let Some(u) = &ops.upstream {
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed) as f64;
        f.one(
            "capteurs_upstream_connected",
            "gauge",
            "1 while connected to the cloud broker.",
            if u.connected.load(Ordering::Relaxed) {
                1.0
            } else {
                0.0
            },
        );
        f.one(
            "capteurs_upstream_connects_total",
            "counter",
            "Connections established to the cloud broker.",
            load(&u.connects),
        );
        f.one(
            "capteurs_upstream_connect_failures_total",
            "counter",
            "Connection attempts that failed.",
            load(&u.connect_failures),
        );
        f.one(
            "capteurs_upstream_inflight_messages",
            "gauge",
            "Messages sent and not yet acknowledged by the cloud.",
            load(&u.inflight),
        );
        f.one(
            "capteurs_upstream_sent_total",
            "counter",
            "PUBLISH packets written to the cloud (resends included).",
            load(&u.sent),
        );
        f.one(
            "capteurs_upstream_acknowledged_total",
            "counter",
            "Messages the cloud acknowledged.",
            load(&u.acknowledged),
        );
        f.one(
            "capteurs_upstream_received_total",
            "counter",
            "Messages from the cloud published locally (in rules).",
            load(&u.received),
        );
        f.one(
            "capteurs_upstream_drain_rate_messages_per_second",
            "gauge",
            "Messages acknowledged by the cloud per second, over the last 10 s.",
            ops.drain_rate(),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_well_formed() {
        let mut out = String::new();
        let mut f = Family { out: &mut out };
        f.head("capteurs_x_total", "counter", "An x.");
        f.sample(
            "capteurs_x_total",
            &[("sensor", "a\"b\\c\nd"), ("qos", "1")],
            3.0,
        );
        f.sample("capteurs_x_total", &[], 0.25);
        assert_eq!(
            out,
            "# HELP capteurs_x_total An x.\n# TYPE capteurs_x_total counter\n\
             capteurs_x_total{sensor=\"a\\\"b\\\\c\\nd\",qos=\"1\"} 3\ncapteurs_x_total 0.25\n"
        );
    }
}
