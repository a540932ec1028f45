//! `$SYS/broker/...`: the broker describes itself, as mosquitto does. Every
//! topic is published retained, so a new subscriber (the course's publisher
//! subscribes to `$SYS/broker/version`) gets the value at once.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::router::Metrics;
use super::Shared;
use crate::message::{Message, Origin, QoS};

pub const VERSION: &str = concat!("capteurs-gateway ", env!("CARGO_PKG_VERSION"));

fn put(shared: &Shared, topic: &str, value: String) {
    shared.router.publish(Message::new(
        topic.to_owned(),
        value,
        QoS::AtMostOnce,
        true,
        Origin::Broker,
    ));
}

/// Publishes the `$SYS` tree now and every `sys_interval`.
pub(crate) async fn run(shared: Arc<Shared>) {
    put(&shared, "$SYS/broker/version", VERSION.to_owned());
    let mut tick = tokio::time::interval(shared.settings.sys_interval);
    let mut beat = tokio::time::interval(crate::health::BEAT_EVERY);
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = tick.tick() => publish_all(&shared),
            // Through the sessions lock: a deadlocked router stops the beat.
            _ = beat.tick() => {
                let _ = shared.router.session_count();
                shared.heartbeat.beat();
            }
        }
    }
}

fn publish_all(shared: &Shared) {
    let m = &shared.router.metrics;
    let uptime = shared.started.elapsed().as_secs();
    put(shared, "$SYS/broker/uptime", format!("{uptime} seconds"));
    put(
        shared,
        "$SYS/broker/clients/connected",
        m.clients_connected.load(Ordering::Relaxed).to_string(),
    );
    put(
        shared,
        "$SYS/broker/clients/total",
        shared.router.session_count().to_string(),
    );
    put(
        shared,
        "$SYS/broker/messages/received",
        Metrics::get(&m.messages_received).to_string(),
    );
    put(
        shared,
        "$SYS/broker/messages/sent",
        Metrics::get(&m.messages_sent).to_string(),
    );
    put(
        shared,
        "$SYS/broker/messages/dropped",
        Metrics::get(&m.dropped_queue_full).to_string(),
    );
    put(
        shared,
        "$SYS/broker/publish/throttled",
        Metrics::get(&m.publishers_throttled).to_string(),
    );
    put(
        shared,
        "$SYS/broker/clients/slow",
        Metrics::get(&m.slow_subscribers).to_string(),
    );
    put(
        shared,
        "$SYS/broker/publish/denied",
        Metrics::get(&m.publish_denied).to_string(),
    );
    for (topic, counter) in [
        ("$SYS/broker/limits/topic_levels", &m.topics_too_deep),
        (
            "$SYS/broker/limits/subscriptions",
            &m.subscriptions_over_limit,
        ),
        ("$SYS/broker/limits/retained", &m.retained_over_limit),
        ("$SYS/broker/limits/sessions", &m.sessions_over_limit),
        ("$SYS/broker/clients/expired", &m.sessions_expired),
        ("$SYS/broker/clients/write_timeouts", &m.write_timeouts),
        ("$SYS/broker/clients/id_taken", &m.client_id_taken),
        ("$SYS/broker/messages/receive_denied", &m.receive_denied),
        ("$SYS/broker/clients/logins_delayed", &m.logins_delayed),
        (
            "$SYS/broker/publish/invalid_local_topics",
            &m.invalid_local_topics,
        ),
        ("$SYS/broker/store/recovered", &m.store_recovered),
        ("$SYS/broker/subscribe/invalid", &m.invalid_filters),
    ] {
        put(shared, topic, Metrics::get(counter).to_string());
    }
    put(
        shared,
        "$SYS/broker/bytes/received",
        Metrics::get(&m.bytes_received).to_string(),
    );
    put(
        shared,
        "$SYS/broker/bytes/sent",
        Metrics::get(&m.bytes_sent).to_string(),
    );
    put(
        shared,
        "$SYS/broker/subscriptions/count",
        shared.router.subscription_count().to_string(),
    );
    // Counted after the other $SYS topics were stored, so it includes them, as mosquitto's does.
    put(
        shared,
        "$SYS/broker/retained messages/count",
        (shared.router.retained_count() + 1).to_string(),
    );
}
