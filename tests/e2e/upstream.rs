//! The upstream against a real cloud broker: Debian's mosquitto on loopback
//! ports. Local clients publish to our gateway; cloud clients read mosquitto.
//!
//! Longer than 600 lines because it holds fifteen independent scenarios
//! against the same cloud (outages, kills, failover, rates, TLS, memory
//! first), each a page long; what they share is the `upstream()` helper.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use capteurs_gateway::buffer::BufferStats;
use capteurs_tests::*;

/// The `[upstream]` section for servers on these ports, fast reconnects,
/// status topics under `ops/` (out of the way of `capteurs/#`).
fn upstream(ports: &[u16], extra: &str) -> String {
    let servers: Vec<String> = ports
        .iter()
        .map(|p| format!("\"mqtt://127.0.0.1:{p}\""))
        .collect();
    format!(
        "[upstream]\nenabled = true\nservers = [{}]\nreconnect_min_ms = 50\nreconnect_max_ms = 400\nconnect_timeout_ms = 2000\nstats_interval_secs = 1\nstatus_prefix = \"ops\"\n{extra}\n",
        servers.join(", ")
    )
}

/// Publishes `payloads` at QoS 1 on `topic`, each acknowledged.
async fn publish_all(c: &mut RawClient, topic: &str, payloads: impl IntoIterator<Item = String>) {
    for p in payloads {
        c.publish(topic, p.as_bytes(), QoS::AtLeastOnce, false)
            .await;
    }
}

/// Receives on `c` until `want` distinct payloads were seen; returns them
/// in order of first arrival (duplicates, allowed by at-least-once, are
/// counted apart).
async fn collect(c: &mut RawClient, want: usize) -> (Vec<String>, usize) {
    let mut order = Vec::new();
    let mut seen = HashSet::new();
    let mut dups = 0;
    while order.len() < want {
        let m = c.receive().await;
        let p = String::from_utf8(m.payload).unwrap();
        if seen.insert(p.clone()) {
            order.push(p);
        } else {
            dups += 1;
        }
    }
    (order, dups)
}

fn numbered(r: std::ops::Range<usize>) -> Vec<String> {
    r.map(|i| format!("{i:05}")).collect()
}

async fn buffer_empty(g: &TestGateway) {
    let stats = g.buffer().stats().clone();
    eventually("the buffer to drain", || {
        BufferStats::get(&stats.depth) == 0
    })
    .await;
}

#[tokio::test]
async fn steady_state_qos1_arrives_in_order() {
    let cloud = Mosquitto::start().await;
    let mut sub = RawClient::connect(cloud.addr, &ConnectOpts::new("cloud-sub")).await;
    sub.subscribe("capteurs/#", QoS::AtLeastOnce).await;
    let dir = tempfile::tempdir().unwrap();
    let mut g = TestGateway::start(dir.path(), &upstream(&[cloud.addr.port()], "")).await;
    let mut local = RawClient::connect(g.addr, &ConnectOpts::new("sensor")).await;
    publish_all(
        &mut local,
        "capteurs/temperature/fr/clermont/r1",
        numbered(0..500),
    )
    .await;
    let (got, dups) = collect(&mut sub, 500).await;
    assert_eq!(got, numbered(0..500));
    assert_eq!(dups, 0, "no duplicates without an outage");
    buffer_empty(&g).await;
    g.stop().await;
}

#[tokio::test]
async fn outage_backlog_survives_a_restart_and_drains_in_order_at_the_set_rate() {
    let port = ReservedPort::new();
    let dir = tempfile::tempdir().unwrap();
    let cfg = upstream(&[port.port()], "max_rate = 1000");
    // The cloud is down: messages are acknowledged locally and kept.
    let mut g = TestGateway::start(dir.path(), &cfg).await;
    let mut local = RawClient::connect(g.addr, &ConnectOpts::new("sensor")).await;
    publish_all(&mut local, "capteurs/a", numbered(0..300)).await;
    publish_all(&mut local, "capteurs/b", numbered(300..600)).await;
    assert_eq!(BufferStats::get(&g.buffer().stats().depth), 600);
    local.disconnect().await;
    g.stop().await;
    // The cloud comes back; so does the gateway, with its buffer.
    let cloud = Mosquitto::start_on(port.release(), "").await;
    let mut sub = RawClient::connect(cloud.addr, &ConnectOpts::new("cloud-sub")).await;
    sub.subscribe("capteurs/#", QoS::AtLeastOnce).await;
    let started = Instant::now();
    let mut g = TestGateway::start(dir.path(), &cfg).await;
    let mut per_topic: HashMap<String, Vec<String>> = HashMap::new();
    let mut seen = HashSet::new();
    while seen.len() < 600 {
        let m = sub.receive().await;
        let p = String::from_utf8(m.payload).unwrap();
        if seen.insert(p.clone()) {
            per_topic.entry(m.topic).or_default().push(p);
        }
    }
    let took = started.elapsed();
    assert_eq!(per_topic["capteurs/a"], numbered(0..300));
    assert_eq!(per_topic["capteurs/b"], numbered(300..600));
    // 600 messages at 1,000 msg/s take at least about 0.6 s.
    assert!(took >= Duration::from_millis(500), "drained in {took:?}");
    buffer_empty(&g).await;
    g.stop().await;
}

#[tokio::test]
async fn failover_to_the_next_server_loses_nothing() {
    let mut a = Mosquitto::start().await;
    let b = Mosquitto::start().await;
    let mut sub_b = RawClient::connect(b.addr, &ConnectOpts::new("cloud-b")).await;
    sub_b.subscribe("capteurs/#", QoS::AtLeastOnce).await;
    let mut sub_a = RawClient::connect(a.addr, &ConnectOpts::new("cloud-a")).await;
    sub_a.subscribe("capteurs/#", QoS::AtLeastOnce).await;
    let dir = tempfile::tempdir().unwrap();
    let mut g =
        TestGateway::start(dir.path(), &upstream(&[a.addr.port(), b.addr.port()], "")).await;
    let mut local = RawClient::connect(g.addr, &ConnectOpts::new("sensor")).await;
    publish_all(&mut local, "capteurs/x", numbered(0..100)).await;
    let (got, _) = collect(&mut sub_a, 100).await;
    assert_eq!(got, numbered(0..100));
    buffer_empty(&g).await;
    a.kill();
    publish_all(&mut local, "capteurs/x", numbered(100..400)).await;
    let (got, _) = collect(&mut sub_b, 300).await;
    assert_eq!(got, numbered(100..400));
    buffer_empty(&g).await;
    assert!(
        g.upstream()
            .connects
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 2
    );
    g.stop().await;
}

#[tokio::test]
async fn qos2_rule_forwards_in_order_through_an_outage() {
    let mut cloud = Mosquitto::start_with("persistence false").await;
    let port = cloud.addr.port();
    let dir = tempfile::tempdir().unwrap();
    // Default window (20): mosquitto drops QoS 2 messages beyond its own
    // max_inflight_messages (20) after acknowledging them.
    let cfg = upstream(&[port], "")
        + "[[upstream.rules]]\npattern = \"capteurs/#\"\ndirection = \"out\"\nqos = 2\n";
    let mut g = TestGateway::start(dir.path(), &cfg).await;
    let mut sub = RawClient::connect(cloud.addr, &ConnectOpts::new("cloud-sub")).await;
    sub.subscribe("capteurs/#", QoS::AtLeastOnce).await;
    let mut local = RawClient::connect(g.addr, &ConnectOpts::new("sensor")).await;
    publish_all(&mut local, "capteurs/q2", numbered(0..200)).await;
    let (got, dups) = collect(&mut sub, 200).await;
    assert_eq!(got, numbered(0..200));
    assert_eq!(dups, 0);
    // Rows go only on PUBCOMP: none left once the cloud completed them.
    buffer_empty(&g).await;
    assert_eq!(BufferStats::get(&g.buffer().stats().forwarded), 200);
    cloud.kill();
    publish_all(&mut local, "capteurs/q2", numbered(200..400)).await;
    local.disconnect().await;
    g.stop().await;
    cloud.restart().await;
    let mut sub = RawClient::connect(cloud.addr, &ConnectOpts::new("cloud-sub")).await;
    sub.subscribe("capteurs/#", QoS::AtLeastOnce).await;
    let mut g = TestGateway::start(dir.path(), &cfg).await;
    let (got, _) = collect(&mut sub, 200).await;
    assert_eq!(got, numbered(200..400));
    buffer_empty(&g).await;
    g.stop().await;
}

#[tokio::test]
async fn session_present_0_after_the_cloud_lost_our_session_loses_nothing() {
    // Without persistence, a restarted mosquitto has forgotten the
    // gateway's persistent session: CONNACK session-present = 0.
    let mut cloud = Mosquitto::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = upstream(&[cloud.addr.port()], "clean_session = false");
    let mut g = TestGateway::start(dir.path(), &cfg).await;
    let mut local = RawClient::connect(g.addr, &ConnectOpts::new("sensor")).await;
    // One retained message per topic: a late subscriber sees what arrived.
    for i in 0..50 {
        local
            .publish(
                &format!("capteurs/s/{i}"),
                b"before",
                QoS::AtLeastOnce,
                true,
            )
            .await;
    }
    buffer_empty(&g).await;
    cloud.kill();
    for i in 50..250 {
        local
            .publish(
                &format!("capteurs/s/{i}"),
                b"during",
                QoS::AtLeastOnce,
                true,
            )
            .await;
    }
    cloud.restart().await;
    buffer_empty(&g).await;
    let mut sub = RawClient::connect(cloud.addr, &ConnectOpts::new("late")).await;
    sub.subscribe("capteurs/s/#", QoS::AtMostOnce).await;
    let mut topics = HashSet::new();
    while let Ok(Some(Packet::Publish(p))) = sub.recv_within(QUIET).await {
        assert!(p.retain);
        assert_eq!(&p.payload[..], b"during", "{}", p.topic);
        topics.insert(p.topic.to_string());
    }
    let want: HashSet<String> = (50..250).map(|i| format!("capteurs/s/{i}")).collect();
    assert_eq!(topics, want);
    g.stop().await;
}

#[tokio::test]
async fn full_buffer_drops_by_policy_and_counts_exactly() {
    let port = ReservedPort::new();
    let dir = tempfile::tempdir().unwrap();
    // "capteurs/f/NNN" (14 bytes) + 10-byte payload = 24 bytes; 1,200 bytes
    // hold 50 of them.
    let cfg = format!(
        "{}[buffer]\nmax_bytes = 1200\nwhen_full = \"drop_oldest\"\n",
        upstream(&[port.port()], "")
    );
    let mut g = TestGateway::start(dir.path(), &cfg).await;
    let mut local = RawClient::connect(g.addr, &ConnectOpts::new("sensor")).await;
    for i in 0..80 {
        local
            .publish(
                &format!("capteurs/f/{i:03}"),
                b"0123456789",
                QoS::AtLeastOnce,
                true,
            )
            .await;
    }
    let stats = g.buffer().stats().clone();
    assert_eq!(BufferStats::get(&stats.dropped_oldest), 30);
    assert_eq!(BufferStats::get(&stats.depth), 50);
    // The cloud comes up: the 50 newest arrive, the 30 oldest never do.
    let cloud = Mosquitto::start_on(port.release(), "").await;
    buffer_empty(&g).await;
    let mut sub = RawClient::connect(cloud.addr, &ConnectOpts::new("late")).await;
    sub.subscribe("capteurs/f/#", QoS::AtMostOnce).await;
    let mut topics = HashSet::new();
    while let Ok(Some(Packet::Publish(p))) = sub.recv_within(QUIET).await {
        topics.insert(p.topic.to_string());
    }
    let want: HashSet<String> = (30..80).map(|i| format!("capteurs/f/{i:03}")).collect();
    assert_eq!(topics, want);
    g.stop().await;
}

#[tokio::test]
async fn in_rules_bring_commands_down_and_nothing_loops() {
    let cloud = Mosquitto::start().await;
    let dir = tempfile::tempdir().unwrap();
    let rules = "[[upstream.rules]]\npattern = \"capteurs/#\"\ndirection = \"out\"\nqos = 1\n\
                 [[upstream.rules]]\npattern = \"cmd/#\"\ndirection = \"both\"\nqos = 1\n\
                 local_prefix = \"local/\"\nremote_prefix = \"site/\"\n";
    let cfg = format!("{}{rules}", upstream(&[cloud.addr.port()], ""));
    let mut g = TestGateway::start(dir.path(), &cfg).await;
    let mut local_sub = RawClient::connect(g.addr, &ConnectOpts::new("actuator")).await;
    local_sub.subscribe("local/cmd/#", QoS::AtLeastOnce).await;
    let mut cloud_sub = RawClient::connect(cloud.addr, &ConnectOpts::new("cloud-sub")).await;
    cloud_sub.subscribe("site/cmd/#", QoS::AtLeastOnce).await;
    // The gateway subscribes on connect: wait until it is connected.
    let up = g.upstream();
    eventually("the upstream connection", || {
        up.connected.load(std::sync::atomic::Ordering::Relaxed)
    })
    .await;
    let mut cloud_pub = RawClient::connect(cloud.addr, &ConnectOpts::new("cloud-app")).await;
    // The gateway's SUBSCRIBE may still be on its way: resend until it lands.
    let mut got = None;
    for _ in 0..20 {
        cloud_pub
            .publish("site/cmd/reboot", b"now", QoS::AtLeastOnce, false)
            .await;
        assert_eq!(cloud_sub.receive().await.topic, "site/cmd/reboot");
        if let Ok(Some(Packet::Publish(p))) = local_sub.recv_within(QUIET).await {
            got = Some(p);
            break;
        }
    }
    let p = got.expect("the command reached the local subscriber");
    assert_eq!(
        (&*p.topic, &p.payload[..]),
        ("local/cmd/reboot", &b"now"[..])
    );
    // Not sent back out: the cloud subscriber saw only the cloud's publish.
    cloud_sub.expect_nothing().await;
    assert_eq!(BufferStats::get(&g.buffer().stats().appended), 0);
    // A local command goes out through the same `both` rule.
    let mut local_pub = RawClient::connect(g.addr, &ConnectOpts::new("console")).await;
    local_pub
        .publish("local/cmd/led", b"on", QoS::AtLeastOnce, false)
        .await;
    let m = cloud_sub.receive().await;
    assert_eq!(
        (m.topic.as_str(), &m.payload[..]),
        ("site/cmd/led", &b"on"[..])
    );
    g.stop().await;
}

/// Topics from the cloud were published locally unchecked: an `in` rule's
/// prefix could make them longer than 65,535 bytes (which the encoder then
/// truncated to a u16 length) or deeper than `max_topic_levels`. They are
/// refused and counted; valid ones keep coming.
#[tokio::test]
async fn in_rule_topics_that_are_invalid_here_are_refused_and_counted() {
    let cloud = Mosquitto::start().await;
    let dir = tempfile::tempdir().unwrap();
    // 150 levels of local prefix: a cloud topic with 60 more is too deep.
    let deep_prefix = "l/".repeat(150);
    let rules = format!(
        "[[upstream.rules]]\npattern = \"cmd/#\"\ndirection = \"in\"\nqos = 1\n\
         local_prefix = \"{deep_prefix}\"\nremote_prefix = \"site/\"\n"
    );
    let cfg = format!("{}{rules}", upstream(&[cloud.addr.port()], ""));
    let mut g = TestGateway::start(dir.path(), &cfg).await;
    let mut local_sub = RawClient::connect(g.addr, &ConnectOpts::new("local")).await;
    local_sub.subscribe("l/#", QoS::AtLeastOnce).await;
    let up = g.upstream();
    eventually("the upstream connection", || {
        up.connected.load(std::sync::atomic::Ordering::Relaxed)
    })
    .await;
    let mut cloud_pub = RawClient::connect(cloud.addr, &ConnectOpts::new("cloud-app")).await;
    // The gateway's SUBSCRIBE may still be on its way: resend until it lands.
    let valid = format!("{deep_prefix}cmd/ok");
    let mut landed = false;
    for _ in 0..40 {
        cloud_pub
            .publish("site/cmd/ok", b"1", QoS::AtLeastOnce, false)
            .await;
        if let Ok(Some(Packet::Publish(p))) = local_sub.recv_within(QUIET).await {
            assert_eq!(&*p.topic, valid.as_str());
            landed = true;
            break;
        }
    }
    assert!(landed, "the cloud's valid command never arrived");
    let too_deep = format!("site/cmd/{}x", "d/".repeat(60));
    // 65,409 bytes on the cloud; 300 + 4 + 65,400 = 65,704 here.
    let too_long = format!("site/cmd/{}", "x".repeat(65_400));
    for t in [&too_deep, &too_long] {
        cloud_pub.publish(t, b"bad", QoS::AtLeastOnce, false).await;
    }
    cloud_pub
        .publish("site/cmd/after", b"2", QoS::AtLeastOnce, false)
        .await;
    let p = local_sub.receive().await;
    assert!(
        p.topic == format!("{deep_prefix}cmd/after"),
        "only the valid one; got a topic of {} bytes",
        p.topic.len()
    );
    assert_eq!(
        up.invalid_topics.load(std::sync::atomic::Ordering::Relaxed),
        2
    );
    let m = g.gateway.as_ref().unwrap().broker.metrics();
    assert_eq!(
        capteurs_gateway::broker::router::Metrics::get(&m.invalid_local_topics),
        2
    );
    local_sub.expect_nothing().await;
    g.stop().await;
}

#[tokio::test]
async fn status_online_stats_and_offline_on_a_clean_stop() {
    let cloud = Mosquitto::start().await;
    let mut sub = RawClient::connect(cloud.addr, &ConnectOpts::new("ops")).await;
    sub.subscribe("ops/gateways/#", QoS::AtLeastOnce).await;
    let dir = tempfile::tempdir().unwrap();
    let mut g = TestGateway::start(dir.path(), &upstream(&[cloud.addr.port()], "")).await;
    let m = sub.receive().await;
    assert_eq!(
        (m.topic.as_str(), &m.payload[..], m.retain),
        ("ops/gateways/capteurs/status", &b"online"[..], false)
    );
    let m = sub.receive().await;
    assert_eq!(m.topic, "ops/gateways/capteurs/stats");
    let stats: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
    assert_eq!(stats["buffer"]["messages"], 0);
    assert_eq!(stats["dropped"]["oldest"], 0);
    g.stop().await;
    loop {
        let m = sub.receive().await;
        if m.topic == "ops/gateways/capteurs/status" {
            assert_eq!(&m.payload[..], b"offline");
            break;
        }
    }
}

/// Killed (no clean stop), the gateway's Last Will says `offline` on the
/// cloud, retained; before that its stats message counts what it forwarded.
#[tokio::test]
async fn a_killed_gateway_is_offline_by_its_will_and_stats_count_what_went() {
    let cloud = Mosquitto::start().await;
    let mut sub = RawClient::connect(cloud.addr, &ConnectOpts::new("ops")).await;
    sub.subscribe("ops/gateways/#", QoS::AtLeastOnce).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[gateway]\ndata_dir = \"data\"\n[broker]\nlisten = \"127.0.0.1:0\"\n{}\
             [[upstream.rules]]\npattern = \"capteurs/#\"\ndirection = \"out\"\nqos = 1\n",
            upstream(&[cloud.addr.port()], "keep_alive_secs = 5")
        ),
    )
    .unwrap();
    let mut gw = GatewayProcess::start(&config);
    let m = sub.receive().await;
    assert_eq!(
        (m.topic.as_str(), &m.payload[..]),
        ("ops/gateways/capteurs/status", &b"online"[..])
    );
    let mut c = RawClient::connect(gw.addr, &ConnectOpts::new("sensor")).await;
    publish_all(
        &mut c,
        "capteurs/temperature/fr/aubiere/rue",
        numbered(0..3),
    )
    .await;
    // The stats message (every second) comes to count the three.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "stats never counted 3 forwarded"
        );
        let m = sub.receive().await;
        if m.topic == "ops/gateways/capteurs/stats" {
            let stats: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
            if stats["forwarded"] == 3 {
                assert_eq!(stats["buffer"]["messages"], 0, "{stats}");
                assert_eq!(stats["connects"], 1, "{stats}");
                break;
            }
        }
    }
    gw.kill();
    loop {
        let m = sub.receive().await;
        if m.topic == "ops/gateways/capteurs/status" {
            assert_eq!(&m.payload[..], b"offline", "the will");
            break;
        }
    }
    // Retained, for whoever looks later.
    let mut late = RawClient::connect(cloud.addr, &ConnectOpts::new("late")).await;
    late.subscribe("ops/gateways/capteurs/status", QoS::AtLeastOnce)
        .await;
    let m = late.receive().await;
    assert_eq!((&m.payload[..], m.retain), (&b"offline"[..], true));
}

#[tokio::test]
async fn envelope_carries_gateway_and_sequence_for_deduplication() {
    let cloud = Mosquitto::start().await;
    let mut sub = RawClient::connect(cloud.addr, &ConnectOpts::new("cloud-sub")).await;
    sub.subscribe("capteurs/#", QoS::AtLeastOnce).await;
    let dir = tempfile::tempdir().unwrap();
    let mut g = TestGateway::start(
        dir.path(),
        &upstream(&[cloud.addr.port()], "envelope = true"),
    )
    .await;
    let mut local = RawClient::connect(g.addr, &ConnectOpts::new("sensor")).await;
    local
        .publish("capteurs/t", b"21.5", QoS::AtLeastOnce, false)
        .await;
    local
        .publish("capteurs/t", &[0xff, 0x00], QoS::AtLeastOnce, false)
        .await;
    let a: serde_json::Value = serde_json::from_slice(&sub.receive().await.payload).unwrap();
    let b: serde_json::Value = serde_json::from_slice(&sub.receive().await.payload).unwrap();
    assert_eq!(a["gateway"], "capteurs");
    assert_eq!(a["payload"], "21.5");
    assert_eq!(b["payload_base64"], "/wA=");
    assert_eq!(b["seq"].as_u64().unwrap(), a["seq"].as_u64().unwrap() + 1);
    g.stop().await;
}

/// QoS 1 PUBLISH; true once acknowledged, false if the gateway died first.
async fn try_publish_qos1(c: &mut RawClient, topic: &str, payload: &str) -> bool {
    let id = c.next_packet_id();
    let p = publish_packet(
        topic,
        payload.as_bytes(),
        QoS::AtLeastOnce,
        false,
        Some(id),
        false,
    );
    if !c.try_send(p).await {
        return false;
    }
    matches!(
        c.recv_within(WAIT).await,
        Ok(Some(Packet::PublishAck { packet_id })) if packet_id == id
    )
}

#[tokio::test]
async fn sigkill_at_many_points_loses_no_acknowledged_message() {
    let port = ReservedPort::new();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[gateway]\ndata_dir = \"data\"\n[broker]\nlisten = \"127.0.0.1:0\"\n{}",
            upstream(&[port.port()], "")
        ),
    )
    .unwrap();
    let mut acked: Vec<String> = Vec::new();
    // The cloud is down; the gateway is killed mid-stream, again and again.
    for round in 0..8u64 {
        let mut gw = GatewayProcess::start(&config);
        let mut c = RawClient::connect(gw.addr, &ConnectOpts::new("sensor")).await;
        let pid = gw.pid();
        // The first message must be acknowledged (a loaded machine may take
        // longer than the kill delay to start); the kill clock starts then.
        let first = format!("r{round}-{:06}", 0);
        assert!(
            try_publish_qos1(&mut c, "capteurs/crash", &first).await,
            "round {round}: the first message was not acknowledged"
        );
        acked.push(first);
        let kill_after = Duration::from_millis(30 + (round * 37) % 170);
        let killer = tokio::spawn(async move {
            tokio::time::sleep(kill_after).await;
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        });
        let mut i = 1;
        loop {
            let payload = format!("r{round}-{i:06}");
            if !try_publish_qos1(&mut c, "capteurs/crash", &payload).await {
                break;
            }
            acked.push(payload);
            i += 1;
        }
        killer.await.unwrap();
        gw.kill();
    }
    // The cloud comes back, then the gateway: everything acknowledged arrives.
    let cloud = Mosquitto::start_on(port.release(), "").await;
    let mut sub = RawClient::connect(cloud.addr, &ConnectOpts::new("cloud-sub")).await;
    sub.subscribe("capteurs/#", QoS::AtLeastOnce).await;
    let _gw = GatewayProcess::start(&config);
    let want: HashSet<String> = acked.iter().cloned().collect();
    let mut got = HashSet::new();
    let mut order = Vec::new();
    while !want.is_subset(&got) {
        match sub.recv_within(Duration::from_secs(10)).await {
            Ok(Some(Packet::Publish(p))) => {
                let s = String::from_utf8(p.payload.to_vec()).unwrap();
                if got.insert(s.clone()) {
                    order.push(s);
                }
                if let Some(id) = p.packet_id {
                    sub.send(Packet::PublishAck { packet_id: id }).await;
                }
            }
            other => panic!(
                "{} of {} acknowledged messages missing ({other:?}); e.g. {:?}",
                want.difference(&got).count(),
                want.len(),
                want.difference(&got).take(5).collect::<Vec<_>>()
            ),
        }
    }
    // In the order they were acknowledged (each round's messages in sequence).
    let acked_order: Vec<&String> = order.iter().filter(|p| want.contains(*p)).collect();
    let expected: Vec<&String> = acked.iter().collect();
    assert_eq!(acked_order, expected);
}

/// A test CA and a server certificate for localhost/127.0.0.1, made with
/// Debian's openssl.
fn make_ca(dir: &std::path::Path, name: &str) {
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl runs");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let ca_key = format!("{name}-ca.key");
    let ca_crt = format!("{name}-ca.crt");
    let mut a = vec!["req", "-x509"];
    a.extend(ec);
    a.extend([
        "-keyout",
        &ca_key,
        "-out",
        &ca_crt,
        "-days",
        "2",
        "-subj",
        "/CN=Capteurs test CA",
    ]);
    run(&a);
    let key = format!("{name}-server.key");
    let csr = format!("{name}-server.csr");
    let crt = format!("{name}-server.crt");
    let mut a = vec!["req"];
    a.extend(ec);
    a.extend(["-keyout", &key, "-out", &csr, "-subj", "/CN=localhost"]);
    run(&a);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        &csr,
        "-CA",
        &ca_crt,
        "-CAkey",
        &ca_key,
        "-CAcreateserial",
        "-out",
        &crt,
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
}

#[tokio::test]
async fn tls_upstream_with_a_test_ca_and_a_wrong_ca_refused_clearly() {
    let certs = tempfile::tempdir().unwrap();
    make_ca(certs.path(), "good");
    make_ca(certs.path(), "other");
    let p = |f: &str| certs.path().join(f).display().to_string();
    let cloud = Mosquitto::start_with(&format!(
        "cafile {}\ncertfile {}\nkeyfile {}\n",
        p("good-ca.crt"),
        p("good-server.crt"),
        p("good-server.key")
    ))
    .await;
    let tls_upstream = |ca: &str| {
        upstream(&[], &format!("ca_file = {:?}", p(ca))).replace(
            "servers = []",
            &format!("servers = [\"mqtts://localhost:{}\"]", cloud.addr.port()),
        )
    };
    // A wrong CA: refused, with a reason that says TLS, nothing delivered.
    let dir = tempfile::tempdir().unwrap();
    let mut g = TestGateway::start(dir.path(), &tls_upstream("other-ca.crt")).await;
    let mut local = RawClient::connect(g.addr, &ConnectOpts::new("sensor")).await;
    local
        .publish("capteurs/tls", b"kept", QoS::AtLeastOnce, false)
        .await;
    let up = g.upstream();
    eventually("a failed TLS connection", || {
        up.connect_failures
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    })
    .await;
    let error = up.last_error.lock().unwrap().clone().unwrap_or_default();
    assert!(
        error.contains("TLS") && error.contains("ca_file"),
        "{error}"
    );
    assert_eq!(up.connects.load(std::sync::atomic::Ordering::Relaxed), 0);
    assert_eq!(BufferStats::get(&g.buffer().stats().depth), 1);
    g.stop().await;
    // The right CA: the message kept in the buffer goes through TLS (its
    // row is deleted only on mosquitto's PUBACK).
    let mut g = TestGateway::start(dir.path(), &tls_upstream("good-ca.crt")).await;
    buffer_empty(&g).await;
    assert_eq!(BufferStats::get(&g.buffer().stats().forwarded), 1);
    assert!(
        g.upstream()
            .connects
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    g.stop().await;
}

#[tokio::test]
async fn memory_first_writes_nothing_while_the_cloud_is_up_and_everything_when_it_is_down() {
    let mut cloud = Mosquitto::start().await;
    let port = cloud.addr.port();
    let mut sub = RawClient::connect(cloud.addr, &ConnectOpts::new("cloud-sub")).await;
    sub.subscribe("capteurs/#", QoS::AtLeastOnce).await;
    sub.subscribe("ops/gateways/+/status", QoS::AtLeastOnce)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = format!("{}[buffer]\nmemory_first = true\n", upstream(&[port], ""));
    let mut g = TestGateway::start(dir.path(), &cfg).await;
    let m = sub.receive().await;
    assert_eq!(
        (m.topic.as_str(), &m.payload[..]),
        ("ops/gateways/capteurs/status", &b"online"[..])
    );
    let mut local = RawClient::connect(g.addr, &ConnectOpts::new("sensor")).await;
    publish_all(&mut local, "capteurs/m", numbered(0..300)).await;
    let (got, _) = collect(&mut sub, 300).await;
    assert_eq!(got, numbered(0..300));
    buffer_empty(&g).await;
    let stats = g.buffer().stats().clone();
    assert_eq!(
        BufferStats::get(&stats.disk_writes),
        0,
        "the SD card was spared"
    );
    assert_eq!(BufferStats::get(&stats.forwarded), 300);
    // The cloud goes away: every message accepted from now on is on disk.
    sub.disconnect().await;
    cloud.kill();
    eventually("the gateway to see the link down", || {
        !g.upstream()
            .connected
            .load(std::sync::atomic::Ordering::Relaxed)
    })
    .await;
    publish_all(&mut local, "capteurs/m", numbered(300..400)).await;
    eventually("100 messages written to disk", || {
        BufferStats::get(&stats.disk_writes) == 100
    })
    .await;
    assert_eq!(BufferStats::get(&stats.in_memory), 0);
    local.disconnect().await;
    g.stop().await;
    // The cloud returns, then the gateway: the backlog drains, in order.
    let cloud = Mosquitto::start_on(port, "").await;
    let mut sub = RawClient::connect(cloud.addr, &ConnectOpts::new("cloud-sub2")).await;
    sub.subscribe("capteurs/#", QoS::AtLeastOnce).await;
    let mut g = TestGateway::start(dir.path(), &cfg).await;
    let (got, _) = collect(&mut sub, 100).await;
    assert_eq!(got, numbered(300..400));
    g.stop().await;
}

/// A small tmpfs, so the disk really fills up; unmounted on drop.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(at: &std::path::Path, size: &str) -> SmallDisk {
        std::fs::create_dir_all(at).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .expect("mount runs");
        assert!(
            out.status.success(),
            "this test needs root to mount a small tmpfs (tests/run.sh runs as root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        SmallDisk(at.to_owned())
    }

    fn grow(&self, size: &str) {
        let ok = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .expect("mount runs")
            .success();
        assert!(ok, "remount {}", self.0.display());
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test]
async fn disk_full_holds_publishers_and_loses_nothing_once_there_is_room() {
    let dir = tempfile::tempdir().unwrap();
    let disk = SmallDisk::mount(&dir.path().join("disk"), "256k");
    let port = ReservedPort::new();
    // Right after TestGateway's own `[broker]` lines: only the buffer
    // writes to the small disk.
    let cfg = format!("persistence = false\n{}", upstream(&[port.port()], ""));
    let mut g = TestGateway::start(&disk.0, &cfg).await;
    let mut c = RawClient::connect(g.addr, &ConnectOpts::new("sensor")).await;
    let payload = "v".repeat(1000);
    // The cloud is down: publish until a PUBACK does not come (disk full).
    let mut sent = Vec::new();
    let held_id = loop {
        assert!(sent.len() < 5000, "256 KiB never filled up");
        let body = format!("{:05}-{payload}", sent.len());
        let id = c.next_packet_id();
        c.send(publish_packet(
            "capteurs/full",
            body.as_bytes(),
            QoS::AtLeastOnce,
            false,
            Some(id),
            false,
        ))
        .await;
        sent.push(body);
        match c.recv_within(Duration::from_secs(2)).await {
            Ok(Some(Packet::PublishAck { packet_id })) if packet_id == id => {}
            Err(_) => break id,
            other => panic!("unexpected {other:?}"),
        }
    };
    let stats = g.buffer().stats().clone();
    eventually("write errors counted", || {
        BufferStats::get(&stats.write_errors) > 0
    })
    .await;
    // The gateway keeps serving local clients meanwhile.
    let mut other = RawClient::connect(g.addr, &ConnectOpts::new("local")).await;
    other.subscribe("local/#", QoS::AtMostOnce).await;
    other
        .publish("local/x", b"still here", QoS::AtMostOnce, false)
        .await;
    assert_eq!(other.receive().await.payload, b"still here");
    // Room again: the held PUBACK comes, later messages are stored too.
    disk.grow("64m");
    assert!(matches!(
        c.recv_within(WAIT).await,
        Ok(Some(Packet::PublishAck { packet_id })) if packet_id == held_id
    ));
    for i in 0..10 {
        let body = format!("after-{i}");
        c.publish("capteurs/full", body.as_bytes(), QoS::AtLeastOnce, false)
            .await;
        sent.push(body);
    }
    c.disconnect().await;
    g.stop().await;
    // Everything reaches the cloud, in order.
    let cloud = Mosquitto::start_on(port.release(), "").await;
    let mut sub = RawClient::connect(cloud.addr, &ConnectOpts::new("cloud-sub")).await;
    sub.subscribe("capteurs/#", QoS::AtLeastOnce).await;
    let mut g = TestGateway::start(&disk.0, &cfg).await;
    let (got, _) = collect(&mut sub, sent.len()).await;
    assert_eq!(got, sent);
    assert_eq!(g.buffer().stats().dropped(), 0);
    g.stop().await;
}
