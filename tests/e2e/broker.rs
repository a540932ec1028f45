//! The broker's MQTT 3.1.1 behaviour, one test per rule, with a raw client
//! over loopback TCP.
//!
//! Longer than 600 lines because it is a table of 29 short tests, one per
//! rule of the protocol, read one at a time.

use capteurs_gateway::broker::router::Metrics;
use capteurs_tests::*;
use std::time::Duration;

fn qos(n: u8) -> QoS {
    match n {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

// ---------------------------------------------------------------- CONNECT

#[tokio::test]
async fn connack_codes() {
    let b = TestBroker::start(classroom_auth(), |_| {}).await;
    let (_, ack) =
        RawClient::connect_with(b.addr, &ConnectOpts::new("a").login("G1", "isimaG1")).await;
    assert_eq!(ack.return_code, ConnectAckReason::ConnectionAccepted);
    let (_, ack) =
        RawClient::connect_with(b.addr, &ConnectOpts::new("b").login("G1", "wrong")).await;
    assert_eq!(ack.return_code, ConnectAckReason::BadUserNameOrPassword);
    let (_, ack) =
        RawClient::connect_with(b.addr, &ConnectOpts::new("c").login("nobody", "x")).await;
    assert_eq!(ack.return_code, ConnectAckReason::BadUserNameOrPassword);
    let (_, ack) = RawClient::connect_with(b.addr, &ConnectOpts::new("d")).await;
    assert_eq!(
        ack.return_code,
        ConnectAckReason::NotAuthorized,
        "anonymous refused in the classroom"
    );
    // Will topic the user may not publish to: not authorised.
    let opts =
        ConnectOpts::new("e")
            .login("G1", "isimaG1")
            .will("isima/G2", "x", QoS::AtMostOnce, false);
    let (_, ack) = RawClient::connect_with(b.addr, &opts).await;
    assert_eq!(ack.return_code, ConnectAckReason::NotAuthorized);
}

#[tokio::test]
async fn connack_protocol_and_identifier() {
    let b = TestBroker::open().await;
    // Protocol level 6 → CONNACK 1, then close.
    let mut c = RawClient::tcp(b.addr).await;
    c.send_raw(b"\x10\x10\x00\x04MQTT\x06\x02\x00\x3c\x00\x04abcd")
        .await;
    match c.recv().await {
        Some(Packet::ConnectAck(ack)) => assert_eq!(
            ack.return_code,
            ConnectAckReason::UnacceptableProtocolVersion
        ),
        other => panic!("expected CONNACK 1, got {other:?}"),
    }
    c.expect_closed().await;
    // Empty client id with clean session 0 → CONNACK 2.
    let mut c = RawClient::tcp(b.addr).await;
    c.send_raw(b"\x10\x0c\x00\x04MQTT\x04\x00\x00\x3c\x00\x00")
        .await;
    match c.recv().await {
        Some(Packet::ConnectAck(ack)) => {
            assert_eq!(ack.return_code, ConnectAckReason::IdentifierRejected)
        }
        other => panic!("expected CONNACK 2, got {other:?}"),
    }
    c.expect_closed().await;
    // Empty client id with clean session 1 → accepted with an assigned id.
    let mut c = RawClient::connect(b.addr, &ConnectOpts::new("")).await;
    c.subscribe("x", QoS::AtMostOnce).await;
    // MQTT 3.1 (MQIsdp) still accepted.
    let mut c = RawClient::tcp(b.addr).await;
    c.send_raw(b"\x10\x12\x00\x06MQIsdp\x03\x02\x00\x3c\x00\x04abcd")
        .await;
    match c.recv().await {
        Some(Packet::ConnectAck(ack)) => {
            assert_eq!(ack.return_code, ConnectAckReason::ConnectionAccepted)
        }
        other => panic!("expected CONNACK 0, got {other:?}"),
    }
    // Unknown protocol name: closed without CONNACK.
    let mut c = RawClient::tcp(b.addr).await;
    c.send_raw(b"\x10\x10\x00\x04MQTX\x04\x02\x00\x3c\x00\x04abcd")
        .await;
    c.expect_closed().await;
}

#[tokio::test]
async fn session_present_flag() {
    let b = TestBroker::open().await;
    let (c, ack) = RawClient::connect_with(b.addr, &ConnectOpts::new("sp").clean(false)).await;
    assert!(!ack.session_present);
    c.disconnect().await;
    let (c, ack) = RawClient::connect_with(b.addr, &ConnectOpts::new("sp").clean(false)).await;
    assert!(ack.session_present);
    c.disconnect().await;
    let (c, ack) = RawClient::connect_with(b.addr, &ConnectOpts::new("sp").clean(true)).await;
    assert!(!ack.session_present, "clean session discards the old one");
    c.disconnect().await;
    let (_, ack) = RawClient::connect_with(b.addr, &ConnectOpts::new("sp").clean(false)).await;
    assert!(!ack.session_present);
}

// ------------------------------------------------------- PUBLISH / SUBSCRIBE

#[tokio::test]
async fn wildcards_and_dollar_topics() {
    let b = TestBroker::open().await;
    let mut sub = RawClient::connect(b.addr, &ConnectOpts::new("sub")).await;
    sub.subscribe("capteurs/+/fr/aubiere/rue_chebarde", QoS::AtMostOnce)
        .await;
    sub.subscribe("isima/#", QoS::AtMostOnce).await;
    let mut all = RawClient::connect(b.addr, &ConnectOpts::new("all")).await;
    all.subscribe("#", QoS::AtMostOnce).await;
    let mut p = RawClient::connect(b.addr, &ConnectOpts::new("pub")).await;
    p.publish(
        "capteurs/temperature/fr/aubiere/rue_chebarde",
        b"21.37",
        QoS::AtMostOnce,
        false,
    )
    .await;
    p.publish(
        "capteurs/temperature/fr/clermont/rue_chebarde",
        b"no",
        QoS::AtMostOnce,
        false,
    )
    .await;
    p.publish("isima", b"parent", QoS::AtMostOnce, false).await;
    let r = sub.receive().await;
    assert_eq!(
        (r.topic.as_str(), &r.payload[..]),
        (
            "capteurs/temperature/fr/aubiere/rue_chebarde",
            &b"21.37"[..]
        )
    );
    let r = sub.receive().await;
    assert_eq!(r.topic, "isima", "isima/# matches isima itself");
    sub.expect_nothing().await;
    for t in [
        "capteurs/temperature/fr/aubiere/rue_chebarde",
        "capteurs/temperature/fr/clermont/rue_chebarde",
        "isima",
    ] {
        assert_eq!(all.receive().await.topic, t);
    }
    // `#` does not match $SYS topics, even though $SYS/broker/version is retained.
    all.expect_nothing().await;
    let mut sys = RawClient::connect(b.addr, &ConnectOpts::new("sys")).await;
    sys.subscribe("$SYS/broker/version", QoS::AtMostOnce).await;
    let r = sys.receive().await;
    assert!(r.retain);
    assert!(String::from_utf8(r.payload)
        .unwrap()
        .starts_with("capteurs-gateway"));
}

#[tokio::test]
async fn invalid_filters_get_failure_and_invalid_topics_close() {
    let b = TestBroker::open().await;
    let mut c = RawClient::connect(b.addr, &ConnectOpts::new("c")).await;
    let codes = c
        .subscribe_many(&[
            ("a/#/b", QoS::AtMostOnce),
            ("ok/+", QoS::AtLeastOnce),
            ("a+", QoS::AtMostOnce),
        ])
        .await;
    assert_eq!(
        codes,
        vec![
            SubscribeReturnCode::Failure,
            SubscribeReturnCode::Success(QoS::AtLeastOnce),
            SubscribeReturnCode::Failure
        ]
    );
    // A wildcard in a PUBLISH topic is a protocol violation: closed.
    c.send(publish_packet(
        "a/+",
        b"x",
        QoS::AtMostOnce,
        false,
        None,
        false,
    ))
    .await;
    c.expect_closed().await;
    let errors = Metrics::get(&b.handle().metrics().protocol_errors);
    assert!(errors >= 1);
}

#[tokio::test]
async fn qos_is_min_of_publish_and_granted() {
    let b = TestBroker::open().await;
    let mut subs = Vec::new();
    for g in 0..3u8 {
        let mut s = RawClient::connect(b.addr, &ConnectOpts::new(&format!("s{g}"))).await;
        assert_eq!(
            s.subscribe("q/t", qos(g)).await,
            SubscribeReturnCode::Success(qos(g))
        );
        subs.push(s);
    }
    let mut p = RawClient::connect(b.addr, &ConnectOpts::new("p")).await;
    for pq in 0..3u8 {
        p.publish("q/t", format!("{pq}").as_bytes(), qos(pq), false)
            .await;
        for (g, s) in subs.iter_mut().enumerate() {
            let r = s.receive().await;
            assert_eq!(r.qos, pq.min(g as u8), "publish QoS {pq}, granted {g}");
            assert_eq!(r.payload, format!("{pq}").as_bytes());
            assert!(!r.retain && !r.dup);
            assert_eq!(r.packet_id.is_some(), r.qos > 0);
        }
    }
}

#[tokio::test]
async fn overlapping_subscriptions_deliver_once_at_highest_qos() {
    let b = TestBroker::open().await;
    let mut s = RawClient::connect(b.addr, &ConnectOpts::new("s")).await;
    s.subscribe("a/+", QoS::AtMostOnce).await;
    s.subscribe("a/#", QoS::ExactlyOnce).await;
    s.subscribe("a/b", QoS::AtLeastOnce).await;
    let mut p = RawClient::connect(b.addr, &ConnectOpts::new("p")).await;
    p.publish("a/b", b"once", QoS::ExactlyOnce, false).await;
    let r = s.receive().await;
    assert_eq!(r.qos, 2);
    s.expect_nothing().await;
}

#[tokio::test]
async fn qos2_inbound_is_delivered_once_despite_duplicates() {
    let b = TestBroker::open().await;
    let mut s = RawClient::connect(b.addr, &ConnectOpts::new("s")).await;
    s.subscribe("t", QoS::AtMostOnce).await;
    let mut p = RawClient::connect(b.addr, &ConnectOpts::new("p")).await;
    let id = std::num::NonZeroU16::new(7).unwrap();
    p.send(publish_packet(
        "t",
        b"x",
        QoS::ExactlyOnce,
        false,
        Some(id),
        false,
    ))
    .await;
    assert!(
        matches!(p.recv().await, Some(Packet::PublishReceived { packet_id }) if packet_id == id)
    );
    // The same packet again (DUP): PUBREC again, but no second delivery.
    p.send(publish_packet(
        "t",
        b"x",
        QoS::ExactlyOnce,
        false,
        Some(id),
        true,
    ))
    .await;
    assert!(
        matches!(p.recv().await, Some(Packet::PublishReceived { packet_id }) if packet_id == id)
    );
    p.send(Packet::PublishRelease { packet_id: id }).await;
    assert!(
        matches!(p.recv().await, Some(Packet::PublishComplete { packet_id }) if packet_id == id)
    );
    assert_eq!(s.receive().await.payload, b"x");
    s.expect_nothing().await;
}

#[tokio::test]
async fn unsubscribe_stops_delivery() {
    let b = TestBroker::open().await;
    let mut s = RawClient::connect(b.addr, &ConnectOpts::new("s")).await;
    s.subscribe("u/#", QoS::AtLeastOnce).await;
    let mut p = RawClient::connect(b.addr, &ConnectOpts::new("p")).await;
    p.publish("u/1", b"1", QoS::AtLeastOnce, false).await;
    assert_eq!(s.receive().await.payload, b"1");
    s.unsubscribe("u/#").await;
    p.publish("u/1", b"2", QoS::AtLeastOnce, false).await;
    s.expect_nothing().await;
}

// ---------------------------------------------------------------- retained

#[tokio::test]
async fn retained_messages() {
    let b = TestBroker::open().await;
    let mut p = RawClient::connect(b.addr, &ConnectOpts::new("p")).await;
    p.publish("isima/G1", b"old", QoS::AtLeastOnce, true).await;
    p.publish("isima/G1", b"new", QoS::AtLeastOnce, true).await;
    p.publish("isima/G2", b"g2", QoS::AtMostOnce, true).await;
    // A new subscriber, exact filter: gets the newest, retain = 1.
    let mut s = RawClient::connect(b.addr, &ConnectOpts::new("s")).await;
    s.subscribe("isima/G1", QoS::AtLeastOnce).await;
    let r = s.receive().await;
    assert_eq!((&r.payload[..], r.retain, r.qos), (&b"new"[..], true, 1));
    s.expect_nothing().await;
    // Live messages on an existing subscription carry retain = 0.
    p.publish("isima/G1", b"live", QoS::AtMostOnce, true).await;
    let r = s.receive().await;
    assert_eq!((&r.payload[..], r.retain), (&b"live"[..], false));
    // Wildcard subscription gets every retained match.
    let mut w = RawClient::connect(b.addr, &ConnectOpts::new("w")).await;
    w.subscribe("isima/+", QoS::AtMostOnce).await;
    let mut got = [w.receive().await, w.receive().await];
    got.sort_by(|a, b| a.topic.cmp(&b.topic));
    assert_eq!(got[0].payload, b"live");
    assert_eq!(got[1].payload, b"g2");
    assert!(got.iter().all(|r| r.retain));
    // A non-retained empty publish does NOT delete it.
    p.publish("isima/G2", b"", QoS::AtMostOnce, false).await;
    let mut s2 = RawClient::connect(b.addr, &ConnectOpts::new("s2")).await;
    s2.subscribe("isima/G2", QoS::AtMostOnce).await;
    assert_eq!(s2.receive().await.payload, b"g2");
    // An empty retained publish does.
    p.publish("isima/G2", b"", QoS::AtMostOnce, true).await;
    let mut s3 = RawClient::connect(b.addr, &ConnectOpts::new("s3")).await;
    s3.subscribe("isima/G2", QoS::AtMostOnce).await;
    s3.expect_nothing().await;
}

// --------------------------------------------------------- sessions

#[tokio::test]
async fn persistent_session_queues_while_offline_in_order() {
    let b = TestBroker::open().await;
    let mut s = RawClient::connect(b.addr, &ConnectOpts::new("persist").clean(false)).await;
    s.subscribe("f/#", QoS::AtLeastOnce).await;
    s.disconnect().await;
    let mut p = RawClient::connect(b.addr, &ConnectOpts::new("p")).await;
    for i in 0..20 {
        p.publish("f/x", format!("{i}").as_bytes(), QoS::AtLeastOnce, false)
            .await;
    }
    p.publish("f/x", b"qos0-not-queued", QoS::AtMostOnce, false)
        .await;
    let (mut s, ack) =
        RawClient::connect_with(b.addr, &ConnectOpts::new("persist").clean(false)).await;
    assert!(ack.session_present);
    for i in 0..20 {
        let r = s.receive().await;
        assert_eq!(r.payload, format!("{i}").as_bytes());
    }
    s.expect_nothing().await;
    // The subscription is still there.
    p.publish("f/y", b"live", QoS::AtLeastOnce, false).await;
    assert_eq!(s.receive().await.payload, b"live");
}

#[tokio::test]
async fn offline_queue_is_bounded_oldest_dropped() {
    let b = TestBroker::start(open_auth(), |s| s.max_queued = 5).await;
    let mut s = RawClient::connect(b.addr, &ConnectOpts::new("small").clean(false)).await;
    s.subscribe("b", QoS::AtLeastOnce).await;
    s.disconnect().await;
    let mut p = RawClient::connect(b.addr, &ConnectOpts::new("p")).await;
    for i in 0..8 {
        p.publish("b", format!("{i}").as_bytes(), QoS::AtLeastOnce, false)
            .await;
    }
    let mut s = RawClient::connect(b.addr, &ConnectOpts::new("small").clean(false)).await;
    for i in 3..8 {
        assert_eq!(s.receive().await.payload, format!("{i}").as_bytes());
    }
    s.expect_nothing().await;
    assert_eq!(Metrics::get(&b.handle().metrics().dropped_queue_full), 3);
}

#[tokio::test]
async fn unacknowledged_messages_are_redelivered_with_dup_and_same_id() {
    let b = TestBroker::open().await;
    let mut s = RawClient::connect(b.addr, &ConnectOpts::new("redeliver").clean(false)).await;
    s.subscribe("r/1", QoS::AtLeastOnce).await;
    s.subscribe("r/2", QoS::ExactlyOnce).await;
    let mut p = RawClient::connect(b.addr, &ConnectOpts::new("p")).await;
    p.publish("r/1", b"one", QoS::AtLeastOnce, false).await;
    p.publish("r/2", b"two", QoS::ExactlyOnce, false).await;
    let first = s.expect_publish().await;
    let second = s.expect_publish().await;
    assert!(!first.dup && !second.dup);
    s.kill(); // no PUBACK, no PUBREC
    let mut s = RawClient::connect(b.addr, &ConnectOpts::new("redeliver").clean(false)).await;
    let again1 = s.expect_publish().await;
    let again2 = s.expect_publish().await;
    assert_eq!(
        (again1.packet_id, again1.dup, &again1.payload[..]),
        (first.packet_id, true, &b"one"[..])
    );
    assert_eq!(
        (again2.packet_id, again2.dup, &again2.payload[..]),
        (second.packet_id, true, &b"two"[..])
    );
    s.ack(&again1).await;
    // QoS 2: acknowledge with PUBREC, then drop before PUBCOMP: PUBREL is resent.
    let id = std::num::NonZeroU16::new(again2.packet_id.unwrap()).unwrap();
    s.send(Packet::PublishReceived { packet_id: id }).await;
    assert!(
        matches!(s.recv().await, Some(Packet::PublishRelease { packet_id }) if packet_id == id)
    );
    s.kill();
    let mut s = RawClient::connect(b.addr, &ConnectOpts::new("redeliver").clean(false)).await;
    assert!(
        matches!(s.recv().await, Some(Packet::PublishRelease { packet_id }) if packet_id == id)
    );
    s.send(Packet::PublishComplete { packet_id: id }).await;
    s.expect_nothing().await;
    // The UNSUBSCRIBE after a resume gets its UNSUBACK.
    s.unsubscribe("r/1").await;
}

#[tokio::test]
async fn inflight_window_holds_the_rest_in_the_queue() {
    let b = TestBroker::start(open_auth(), |s| s.max_inflight = 2).await;
    let mut s = RawClient::connect(b.addr, &ConnectOpts::new("slow")).await;
    s.subscribe("w", QoS::AtLeastOnce).await;
    let mut p = RawClient::connect(b.addr, &ConnectOpts::new("p")).await;
    for i in 0..5 {
        p.publish("w", format!("{i}").as_bytes(), QoS::AtLeastOnce, false)
            .await;
    }
    let a = s.expect_publish().await;
    let b2 = s.expect_publish().await;
    s.expect_nothing().await; // window full
    s.ack(&a).await;
    let c = s.expect_publish().await;
    assert_eq!(c.payload, b"2");
    s.ack(&b2).await;
    s.ack(&c).await;
    assert_eq!(s.receive().await.payload, b"3");
    assert_eq!(s.receive().await.payload, b"4");
}

/// Sends QoS 1 PUBLISHes without waiting; returns their packet ids.
async fn send_qos1(p: &mut RawClient, topic: &str, payloads: &[&str]) -> Vec<u16> {
    let mut ids = Vec::new();
    for payload in payloads {
        let id = p.next_packet_id();
        p.send(publish_packet(
            topic,
            payload.as_bytes(),
            QoS::AtLeastOnce,
            false,
            Some(id),
            false,
        ))
        .await;
        ids.push(id.get());
    }
    ids
}

async fn expect_puback(p: &mut RawClient, id: u16) {
    match p.recv().await {
        Some(Packet::PublishAck { packet_id }) => assert_eq!(packet_id.get(), id),
        other => panic!("expected PUBACK {id}, got {other:?}"),
    }
}

/// Sets up a subscriber with one unacknowledged message in flight (window
/// of 1) and three more queued (max_queued = 3): the PUBACK of the message
/// that filled the queue is held back.
async fn congested(b: &TestBroker) -> (RawClient, RawClient, Received, u16) {
    let mut s = RawClient::connect(b.addr, &ConnectOpts::new("slow")).await;
    s.subscribe("f", QoS::AtLeastOnce).await;
    let mut p = RawClient::connect(b.addr, &ConnectOpts::new("fast")).await;
    p.publish("f", b"1", QoS::AtLeastOnce, false).await;
    let first = s.expect_publish().await; // in flight, not acknowledged
    let ids = send_qos1(&mut p, "f", &["2", "3", "4"]).await;
    expect_puback(&mut p, ids[0]).await;
    expect_puback(&mut p, ids[1]).await;
    (s, p, first, ids[2])
}

#[tokio::test]
async fn slow_subscriber_holds_the_publisher_back_instead_of_dropping() {
    let b = TestBroker::start(open_auth(), |s| {
        s.max_inflight = 1;
        s.max_queued = 3;
    })
    .await;
    let (mut s, mut p, first, held) = congested(&b).await;
    p.expect_nothing().await; // PUBACK of "4" held: the queue is full
    s.ack(&first).await; // the subscriber catches up
    expect_puback(&mut p, held).await;
    for i in 2..=4 {
        assert_eq!(s.receive().await.payload, format!("{i}").as_bytes());
    }
    let m = b.handle().metrics();
    assert_eq!(Metrics::get(&m.dropped_queue_full), 0);
    assert_eq!(Metrics::get(&m.slow_subscribers), 0);
    assert_eq!(Metrics::get(&m.publishers_throttled), 1);
}

#[tokio::test]
async fn qos0_publisher_is_not_read_while_a_subscriber_is_full() {
    let b = TestBroker::start(open_auth(), |s| {
        s.max_inflight = 1;
        s.max_queued = 3;
    })
    .await;
    let (mut s, mut p, first, held) = congested(&b).await;
    // A QoS 0 publish, then a PINGREQ: neither is read while the queue is full.
    p.send(publish_packet(
        "f",
        b"5",
        QoS::AtMostOnce,
        false,
        None,
        false,
    ))
    .await;
    p.send(Packet::PingRequest).await;
    p.expect_nothing().await;
    s.ack(&first).await;
    for i in 2..=5 {
        assert_eq!(s.receive().await.payload, format!("{i}").as_bytes());
    }
    expect_puback(&mut p, held).await;
    assert_eq!(p.recv().await, Some(Packet::PingResponse));
    let m = b.handle().metrics();
    assert_eq!(Metrics::get(&m.dropped_queue_full), 0);
    assert_eq!(Metrics::get(&m.slow_subscribers), 0);
}

/// QoS 0 messages are routed a few at a time (one batch per read): a packet
/// read after a batch that filled a subscriber's queue is not handled until
/// the subscriber drains, as if it had not been read.
#[tokio::test]
async fn a_packet_behind_a_batch_that_filled_a_queue_waits() {
    let b = TestBroker::start(open_auth(), |s| {
        s.max_inflight = 1;
        s.max_queued = 32; // batches of 2
    })
    .await;
    let mut s = RawClient::connect(b.addr, &ConnectOpts::new("slow")).await;
    s.subscribe("f", QoS::AtLeastOnce).await;
    let mut p = RawClient::connect(b.addr, &ConnectOpts::new("fast")).await;
    p.publish("f", b"0", QoS::AtLeastOnce, false).await;
    let first = s.expect_publish().await; // in flight, not acknowledged
    let payloads: Vec<String> = (1..=31).map(|i| i.to_string()).collect();
    let refs: Vec<&str> = payloads.iter().map(String::as_str).collect();
    for id in send_qos1(&mut p, "f", &refs).await {
        expect_puback(&mut p, id).await; // 31 queued: one short of full
    }
    p.send_all(vec![
        publish_packet("f", b"32", QoS::AtMostOnce, false, None, false),
        Packet::PingRequest,
    ])
    .await;
    p.expect_nothing().await; // the PINGREQ waits behind the full queue
    s.ack(&first).await;
    for i in 1..=32 {
        assert_eq!(s.receive().await.payload, i.to_string().as_bytes());
    }
    assert_eq!(p.recv().await, Some(Packet::PingResponse));
    let m = b.handle().metrics();
    assert_eq!(Metrics::get(&m.dropped_queue_full), 0);
    assert_eq!(Metrics::get(&m.publishers_throttled), 1);
}

#[tokio::test]
async fn subscriber_too_slow_for_too_long_loses_its_oldest_messages() {
    let b = TestBroker::start(open_auth(), |s| {
        s.max_inflight = 1;
        s.max_queued = 3;
        s.slow_subscriber_timeout = Duration::from_millis(300);
    })
    .await;
    let (mut s, mut p, first, held) = congested(&b).await;
    // After the timeout the publisher goes on and the subscriber is marked slow.
    expect_puback(&mut p, held).await;
    p.publish("f", b"5", QoS::AtLeastOnce, false).await;
    p.publish("f", b"6", QoS::AtLeastOnce, false).await;
    s.ack(&first).await;
    for i in 4..=6 {
        assert_eq!(s.receive().await.payload, format!("{i}").as_bytes());
    }
    s.expect_nothing().await;
    let m = b.handle().metrics();
    assert_eq!(Metrics::get(&m.slow_subscribers), 1);
    assert_eq!(Metrics::get(&m.dropped_queue_full), 2);
}

// ------------------------------------------------------------------ wills

#[tokio::test]
async fn will_on_abrupt_close_not_after_disconnect() {
    let b = TestBroker::open().await;
    let mut w = RawClient::connect(b.addr, &ConnectOpts::new("watcher")).await;
    w.subscribe("isima/LWT", QoS::AtLeastOnce).await;
    let c = RawClient::connect(
        b.addr,
        &ConnectOpts::new("dies").will("isima/LWT", "Lost Connection", QoS::AtLeastOnce, true),
    )
    .await;
    c.kill();
    let r = w.receive().await;
    assert_eq!((&r.payload[..], r.qos), (&b"Lost Connection"[..], 1));
    // Will retain honoured.
    let mut late = RawClient::connect(b.addr, &ConnectOpts::new("late")).await;
    late.subscribe("isima/LWT", QoS::AtMostOnce).await;
    let r = late.receive().await;
    assert!(r.retain);
    // A clean DISCONNECT: no will.
    let c = RawClient::connect(
        b.addr,
        &ConnectOpts::new("polite").will("isima/LWT", "polite", QoS::AtMostOnce, false),
    )
    .await;
    c.disconnect().await;
    w.expect_nothing().await;
}

#[tokio::test]
async fn will_on_protocol_violation() {
    let b = TestBroker::open().await;
    let mut w = RawClient::connect(b.addr, &ConnectOpts::new("watcher")).await;
    w.subscribe("lwt", QoS::AtMostOnce).await;
    let mut c = RawClient::connect(
        b.addr,
        &ConnectOpts::new("bad").will("lwt", "violated", QoS::AtMostOnce, false),
    )
    .await;
    c.send(ConnectOpts::new("bad").packet()).await; // second CONNECT
    c.expect_closed().await;
    assert_eq!(w.receive().await.payload, b"violated");
}

#[tokio::test]
async fn keep_alive_timeout_fires_will_and_zero_disables_it() {
    let b = TestBroker::open().await;
    let mut w = RawClient::connect(b.addr, &ConnectOpts::new("watcher").keep_alive(0)).await;
    w.subscribe("ka", QoS::AtMostOnce).await;
    let started = std::time::Instant::now();
    let mut silent = RawClient::connect(
        b.addr,
        &ConnectOpts::new("silent")
            .keep_alive(2)
            .will("ka", "timeout", QoS::AtMostOnce, false),
    )
    .await;
    assert_eq!(w.receive().await.payload, b"timeout");
    // 1.5 x 2 s = 3 s: not before, and well before 2 x (4 s).
    let waited = started.elapsed();
    assert!(
        waited >= std::time::Duration::from_millis(2900)
            && waited < std::time::Duration::from_millis(3800),
        "closed after {waited:?}: expected 1.5 x keep-alive (3 s)"
    );
    silent.expect_closed().await;
    assert_eq!(Metrics::get(&b.handle().metrics().keepalive_timeouts), 1);
    // PINGREQ keeps a connection alive past its keep-alive.
    let mut pinger = RawClient::connect(b.addr, &ConnectOpts::new("pinger").keep_alive(1)).await;
    for _ in 0..3 {
        tokio::time::sleep(std::time::Duration::from_millis(700)).await;
        pinger.send(Packet::PingRequest).await;
        assert!(matches!(pinger.recv().await, Some(Packet::PingResponse)));
    }
    // The watcher with keep-alive 0 was never timed out.
    w.send(Packet::PingRequest).await;
    assert!(matches!(w.recv().await, Some(Packet::PingResponse)));
}

#[tokio::test]
async fn take_over_closes_old_connection_will_only_without_resume() {
    let b = TestBroker::open().await;
    let mut w = RawClient::connect(b.addr, &ConnectOpts::new("watcher")).await;
    w.subscribe("to", QoS::AtMostOnce).await;
    let opts = ConnectOpts::new("same")
        .clean(false)
        .will("to", "will-1", QoS::AtMostOnce, false);
    let mut old = RawClient::connect(b.addr, &opts).await;
    old.subscribe("kept", QoS::AtLeastOnce).await;
    // New connection resumes the session: old is closed, no will.
    let (mut new, ack) = RawClient::connect_with(b.addr, &opts).await;
    assert!(ack.session_present);
    old.expect_closed().await;
    w.expect_nothing().await;
    // The subscription moved with the session.
    let mut p = RawClient::connect(b.addr, &ConnectOpts::new("p")).await;
    p.publish("kept", b"k", QoS::AtLeastOnce, false).await;
    assert_eq!(new.receive().await.payload, b"k");
    // A clean-session take-over: the old connection's will fires.
    let (mut newer, ack) =
        RawClient::connect_with(b.addr, &ConnectOpts::new("same").clean(true)).await;
    assert!(!ack.session_present);
    new.expect_closed().await;
    assert_eq!(w.receive().await.payload, b"will-1");
    newer.subscribe("x", QoS::AtMostOnce).await;
}

// -------------------------------------------------------------- $SYS

#[tokio::test]
async fn sys_topics_are_published_and_refreshed() {
    let b = TestBroker::start(open_auth(), |s| {
        s.sys_interval = std::time::Duration::from_millis(200)
    })
    .await;
    let mut s = RawClient::connect(b.addr, &ConnectOpts::new("sys")).await;
    s.subscribe("$SYS/#", QoS::AtMostOnce).await;
    let required = [
        "$SYS/broker/version",
        "$SYS/broker/uptime",
        "$SYS/broker/clients/connected",
        "$SYS/broker/messages/received",
        "$SYS/broker/messages/sent",
        "$SYS/broker/retained messages/count",
    ];
    let mut seen = std::collections::HashMap::new();
    // Each receive is bounded by WAIT: a missing topic fails the test.
    while !required.iter().all(|t| seen.contains_key(*t)) {
        let r = s.receive().await;
        seen.insert(r.topic.clone(), String::from_utf8(r.payload).unwrap());
    }
    assert!(seen["$SYS/broker/uptime"].ends_with(" seconds"));
    // Refreshed: a new client shows up in clients/connected.
    let _other = RawClient::connect(b.addr, &ConnectOpts::new("other")).await;
    loop {
        let r = s.receive().await;
        if r.topic == "$SYS/broker/clients/connected" && r.payload == b"2" {
            break;
        }
    }
}

// ----------------------------------------------------------- ACL

#[tokio::test]
async fn classroom_acl_denies_subscribe_and_publish() {
    let b = TestBroker::start(classroom_auth(), |_| {}).await;
    let mut g2 = RawClient::connect(b.addr, &ConnectOpts::new("g2").login("G2", "isimaG2")).await;
    let codes = g2
        .subscribe_many(&[
            ("isima/#", QoS::AtMostOnce),
            ("#", QoS::AtMostOnce),
            ("my_topic", QoS::AtMostOnce),
        ])
        .await;
    assert_eq!(
        codes,
        vec![
            SubscribeReturnCode::Success(QoS::AtMostOnce),
            SubscribeReturnCode::Failure,
            SubscribeReturnCode::Failure
        ]
    );
    let mut g1 = RawClient::connect(b.addr, &ConnectOpts::new("g1").login("G1", "isimaG1")).await;
    g1.publish("isima/G2", b"intrus", QoS::AtLeastOnce, false)
        .await; // acked, but dropped
    g1.publish("isima", b"intrus", QoS::AtMostOnce, false).await;
    g1.publish("isima/G1", b"mine", QoS::AtMostOnce, false)
        .await;
    g1.publish("isima/G1/sensor1", b"mine too", QoS::AtMostOnce, false)
        .await;
    assert_eq!(g2.receive().await.payload, b"mine");
    assert_eq!(g2.receive().await.payload, b"mine too");
    g2.expect_nothing().await;
    assert_eq!(Metrics::get(&b.handle().metrics().publish_denied), 2);
}

// ------------------------------------------------------- limits, bad input

#[tokio::test]
async fn connect_timeout_closes_silent_sockets() {
    let b = TestBroker::start(open_auth(), |s| {
        s.connect_timeout = std::time::Duration::from_millis(200)
    })
    .await;
    let mut c = RawClient::tcp(b.addr).await;
    c.expect_closed().await;
    assert_eq!(Metrics::get(&b.handle().metrics().connect_timeouts), 1);
}

#[tokio::test]
async fn max_connections_is_enforced() {
    let b = TestBroker::start(open_auth(), |s| s.max_connections = 2).await;
    let _a = RawClient::connect(b.addr, &ConnectOpts::new("a")).await;
    let _b = RawClient::connect(b.addr, &ConnectOpts::new("b")).await;
    let mut c = RawClient::tcp(b.addr).await;
    c.send(ConnectOpts::new("c").packet()).await;
    c.expect_closed().await;
    assert_eq!(
        Metrics::get(&b.handle().metrics().connections_over_limit),
        1
    );
}

#[tokio::test]
async fn max_packet_size_is_enforced() {
    let b = TestBroker::start(open_auth(), |s| s.max_packet_size = 1024).await;
    let mut s = RawClient::connect(b.addr, &ConnectOpts::new("s")).await;
    s.subscribe("big", QoS::AtMostOnce).await;
    let mut c = RawClient::connect(b.addr, &ConnectOpts::new("c")).await;
    c.publish("big", &[b'x'; 900], QoS::AtMostOnce, false).await;
    assert_eq!(s.receive().await.payload.len(), 900);
    c.send(publish_packet(
        "big",
        &[b'x'; 2000],
        QoS::AtMostOnce,
        false,
        None,
        false,
    ))
    .await;
    c.expect_closed().await;
    s.expect_nothing().await;
}

/// Every kind of malformed input closes that connection only; a client
/// connected beside it keeps working.
#[tokio::test]
async fn malformed_packets_close_only_the_offender() {
    let b = TestBroker::open().await;
    let mut good = RawClient::connect(b.addr, &ConnectOpts::new("good")).await;
    good.subscribe("still/#", QoS::AtLeastOnce).await;
    let connect = b"\x10\x0e\x00\x04MQTT\x04\x02\x00\x3c\x00\x02ev".to_vec();
    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        (
            "packet before CONNECT",
            b"\x82\x06\x00\x01\x00\x01a\x00".to_vec(),
            false,
        ),
        ("garbage first byte", b"\x00\x00".to_vec(), false),
        (
            "five-byte remaining length",
            b"\x30\xff\xff\xff\xff\x01".to_vec(),
            true,
        ),
        (
            "wrong remaining length (too short for topic)",
            b"\x30\x02\x00\x05ab".to_vec(),
            true,
        ),
        (
            "invalid UTF-8 topic",
            b"\x30\x05\x00\x02\xff\xfex".to_vec(),
            true,
        ),
        ("NUL in topic", b"\x30\x05\x00\x02a\x00x".to_vec(), true),
        ("second CONNECT", connect.clone(), true),
        ("PINGREQ with body", b"\xc0\x01\x00".to_vec(), true),
        (
            "reserved SUBSCRIBE option bits",
            b"\x82\x06\x00\x01\x00\x01a\x04".to_vec(),
            true,
        ),
        (
            "SUBSCRIBE with wrong fixed-header flags",
            b"\x80\x06\x00\x01\x00\x01a\x00".to_vec(),
            true,
        ),
        ("QoS 3 PUBLISH", b"\x36\x05\x00\x01a\x00\x01".to_vec(), true),
        (
            "PUBLISH QoS 1 with packet id 0",
            b"\x32\x05\x00\x01a\x00\x00".to_vec(),
            true,
        ),
        ("CONNACK from a client", b"\x20\x02\x00\x00".to_vec(), true),
        (
            "password without user name",
            b"\x10\x12\x00\x04MQTT\x04\x42\x00\x3c\x00\x02ab\x00\x02pw".to_vec(),
            false,
        ),
    ];
    for (what, bytes, after_connect) in cases {
        let mut c = RawClient::tcp(b.addr).await;
        if after_connect {
            c.send_raw(&connect).await;
            assert!(
                matches!(c.recv().await, Some(Packet::ConnectAck(_))),
                "{what}: CONNACK"
            );
        }
        c.send_raw(&bytes).await;
        match c.recv_within(WAIT).await {
            Ok(None) => {}
            other => panic!("{what}: expected the connection to close, got {other:?}"),
        }
    }
    let mut p = RawClient::connect(b.addr, &ConnectOpts::new("p")).await;
    p.publish("still/alive", b"yes", QoS::AtLeastOnce, false)
        .await;
    assert_eq!(good.receive().await.payload, b"yes");
    assert!(Metrics::get(&b.handle().metrics().protocol_errors) >= 12);
}

#[tokio::test]
async fn truncated_packet_then_close_publishes_will() {
    let b = TestBroker::open().await;
    let mut w = RawClient::connect(b.addr, &ConnectOpts::new("w")).await;
    w.subscribe("cut", QoS::AtMostOnce).await;
    let mut c = RawClient::connect(
        b.addr,
        &ConnectOpts::new("c").will("cut", "gone", QoS::AtMostOnce, false),
    )
    .await;
    c.send_raw(b"\x30\x10\x00\x03abc").await; // announces 16 bytes, sends 5
    c.kill();
    assert_eq!(w.receive().await.payload, b"gone");
}
