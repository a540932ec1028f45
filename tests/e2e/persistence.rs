//! Retained messages and persistent sessions survive a restart of the broker
//! (SQLite in the data directory).

use std::time::Duration;

use capteurs_gateway::broker::router::Metrics;
use capteurs_tests::*;

#[tokio::test]
async fn retained_and_sessions_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_owned();
    let mut b = TestBroker::start(open_auth(), |s| s.data_dir = Some(data.clone())).await;
    let mut p = RawClient::connect(b.addr, &ConnectOpts::new("p")).await;
    p.publish(
        "capteurs/temperature/fr/aubiere/rue_chebarde",
        b"21.37",
        QoS::AtLeastOnce,
        true,
    )
    .await;
    p.publish("gone", b"soon deleted", QoS::AtMostOnce, true)
        .await;
    p.publish("gone", b"", QoS::AtMostOnce, true).await;
    // A persistent subscriber, offline with queued messages and one in flight.
    let mut s = RawClient::connect(b.addr, &ConnectOpts::new("keeper").clean(false)).await;
    s.subscribe("cmd/#", QoS::ExactlyOnce).await;
    p.publish("cmd/1", b"in flight", QoS::AtLeastOnce, false)
        .await;
    let inflight = s.expect_publish().await;
    s.kill();
    for i in 0..3 {
        p.publish(
            "cmd/2",
            format!("queued {i}").as_bytes(),
            QoS::ExactlyOnce,
            false,
        )
        .await;
    }
    // A clean session leaves nothing behind.
    let c = RawClient::connect(b.addr, &ConnectOpts::new("ephemeral")).await;
    c.disconnect().await;
    p.disconnect().await;
    b.stop().await;

    let b = TestBroker::start(open_auth(), |s| s.data_dir = Some(data.clone())).await;
    let mut r = RawClient::connect(b.addr, &ConnectOpts::new("reader")).await;
    r.subscribe("#", QoS::AtLeastOnce).await;
    let got = r.receive().await;
    assert_eq!(
        (got.topic.as_str(), &got.payload[..], got.retain),
        (
            "capteurs/temperature/fr/aubiere/rue_chebarde",
            &b"21.37"[..],
            true
        )
    );
    r.expect_nothing().await; // "gone" stayed deleted
    let (mut s, ack) =
        RawClient::connect_with(b.addr, &ConnectOpts::new("keeper").clean(false)).await;
    assert!(ack.session_present, "persistent session restored");
    let again = s.expect_publish().await;
    assert_eq!(
        (again.packet_id, again.dup, &again.payload[..]),
        (inflight.packet_id, true, &b"in flight"[..])
    );
    s.ack(&again).await;
    let queued = [
        s.expect_publish().await,
        s.expect_publish().await,
        s.expect_publish().await,
    ];
    for (i, m) in queued.iter().enumerate() {
        assert_eq!(m.payload, format!("queued {i}").as_bytes());
        assert_eq!(m.qos, 2);
    }
    for m in &queued {
        s.ack(m).await;
    }
    // The subscription itself was restored.
    let mut p = RawClient::connect(b.addr, &ConnectOpts::new("p2")).await;
    p.publish("cmd/3", b"after restart", QoS::AtLeastOnce, false)
        .await;
    assert_eq!(s.receive().await.payload, b"after restart");
    let (_, ack) =
        RawClient::connect_with(b.addr, &ConnectOpts::new("ephemeral").clean(false)).await;
    assert!(!ack.session_present, "clean sessions are not persisted");
}

#[tokio::test]
async fn a_failed_save_is_retried_not_lost() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_owned();
    let mut b = TestBroker::start(open_auth(), |s| {
        s.data_dir = Some(data.clone());
        s.persist_interval = Duration::from_millis(20);
    })
    .await;
    // Break the store under the broker: its next save fails.
    let db = rusqlite::Connection::open(data.join("broker.sqlite")).unwrap();
    let schema: String = db
        .query_row(
            "SELECT sql FROM sqlite_master WHERE name = 'retained'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    db.execute_batch("DROP TABLE retained").unwrap();
    let mut p = RawClient::connect(b.addr, &ConnectOpts::new("p")).await;
    p.publish("keep/me", b"22.5", QoS::AtLeastOnce, true).await;
    let failures = || Metrics::get(&b.handle().metrics().persist_failures);
    eventually("a failed save", || failures() >= 1).await;
    // Repaired: the retry writes the message the failed save had taken.
    db.execute_batch(&schema).unwrap();
    let saved = || {
        db.query_row(
            "SELECT count(*) FROM retained WHERE topic = 'keep/me'",
            [],
            |r| r.get::<_, i64>(0),
        )
        .unwrap()
            == 1
    };
    eventually("the retried save", saved).await;
    p.disconnect().await;
    b.stop().await;

    let b = TestBroker::start(open_auth(), |s| s.data_dir = Some(data.clone())).await;
    let mut r = RawClient::connect(b.addr, &ConnectOpts::new("reader")).await;
    r.subscribe("keep/#", QoS::AtLeastOnce).await;
    let got = r.receive().await;
    assert_eq!(
        (got.topic.as_str(), &got.payload[..]),
        ("keep/me", &b"22.5"[..])
    );
}

/// When the final save at shutdown fails (a full disk; here another
/// process holds the database's write lock), the log says what the next
/// start will not find, instead of a bare "will retry" nothing retries.
#[tokio::test]
async fn a_failed_final_save_says_what_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        "[gateway]\ndata_dir = \"data\"\n[broker]\nlisten = \"127.0.0.1:0\"\npersist_interval_ms = 600000\n",
    )
    .unwrap();
    let mut gw = GatewayProcess::start(&config);
    let mut s = RawClient::connect(gw.addr, &ConnectOpts::new("keeper").clean(false)).await;
    s.subscribe("keep/#", QoS::AtLeastOnce).await;
    s.disconnect().await;
    let mut p = RawClient::connect(gw.addr, &ConnectOpts::new("p")).await;
    p.publish("keep/a", b"1", QoS::AtLeastOnce, true).await;
    p.publish("keep/b", b"2", QoS::AtLeastOnce, false).await;
    p.disconnect().await;
    let db = rusqlite::Connection::open(dir.path().join("data/broker.sqlite")).unwrap();
    db.execute_batch("BEGIN IMMEDIATE").unwrap();
    // The store waits up to 5 s for the lock before it gives up.
    let status = gw.terminate(WAIT).await;
    assert!(status.success(), "{status:?}");
    let line = gw
        .logged("final save failed")
        .expect("the failed final save is reported");
    for field in ["sessions=1", "queued_messages=2", "retained_changes=1"] {
        assert!(line.contains(field), "{field} in {line}");
    }
    db.execute_batch("ROLLBACK").unwrap();
}
