//! Hostile clients (issue 13): deep topics, too many subscriptions, retained
//! messages and sessions, another user's client id, reading what one may not
//! read, and clients that stop reading. Each test failed on the broker
//! before its limit or check existed; every other client keeps being served.

use std::sync::Arc;
use std::time::Duration;

use capteurs_gateway::broker::auth::{passwd::hash_password, Acl, FileAuth, PasswordFile};
use capteurs_gateway::broker::router::Metrics;
use capteurs_tests::*;

/// Users alice / bob (passwords "a" / "b") and an ACL.
fn users_with_acl(acl: &str) -> Arc<dyn capteurs_gateway::broker::auth::Authenticator> {
    let passwd = format!("alice:{}\nbob:{}\n", hash_password("a"), hash_password("b"));
    Arc::new(FileAuth::from_parts(
        false,
        Some(PasswordFile::parse(&passwd, "test").unwrap()),
        Some(Acl::parse(acl, "test").unwrap()),
    ))
}

/// A pair of clients that must keep working whatever the others did.
async fn still_serves(b: &TestBroker) {
    let mut s = RawClient::connect(b.addr, &ConnectOpts::new("witness-sub")).await;
    assert_eq!(
        s.subscribe("witness/#", QoS::AtLeastOnce).await,
        SubscribeReturnCode::Success(QoS::AtLeastOnce)
    );
    let mut p = RawClient::connect(b.addr, &ConnectOpts::new("witness-pub")).await;
    p.publish("witness/1", b"ok", QoS::AtLeastOnce, false).await;
    assert_eq!(s.receive().await.payload, b"ok");
    s.disconnect().await;
    p.disconnect().await;
}

/// `"/" * 10000` used to abort the whole process with a stack overflow
/// when the client unsubscribed or left (recursive trie removal and drop),
/// and every later shutdown when the session was persistent.
#[tokio::test]
async fn a_filter_deeper_than_max_topic_levels_is_refused_and_nothing_crashes() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_owned();
    let mut b = TestBroker::start(open_auth(), |s| s.data_dir = Some(data.clone())).await;
    let mut c = RawClient::connect(b.addr, &ConnectOpts::new("deep").clean(false)).await;
    let deep = "/".repeat(10_000);
    let at_limit = "/".repeat(199); // 200 levels
    let codes = c
        .subscribe_many(&[
            (&deep, QoS::AtMostOnce),
            (&at_limit, QoS::AtMostOnce),
            (&format!("a{}", "/a".repeat(12_000)), QoS::AtMostOnce),
        ])
        .await;
    assert_eq!(
        codes,
        vec![
            SubscribeReturnCode::Failure,
            SubscribeReturnCode::Success(QoS::AtMostOnce),
            SubscribeReturnCode::Failure
        ]
    );
    assert_eq!(Metrics::get(&b.handle().metrics().topics_too_deep), 2);
    c.unsubscribe(&deep).await;
    c.unsubscribe(&at_limit).await;
    c.subscribe(&at_limit, QoS::AtMostOnce).await;
    c.kill();
    still_serves(&b).await;
    // A PUBLISH to a topic that deep closes its connection, counted.
    let mut p = RawClient::connect(b.addr, &ConnectOpts::new("deep-pub")).await;
    p.send(publish_packet(
        &format!("x{deep}"),
        b"1",
        QoS::AtMostOnce,
        false,
        None,
        false,
    ))
    .await;
    p.expect_closed().await;
    assert_eq!(Metrics::get(&b.handle().metrics().topics_too_deep), 3);
    // Saved and restored with its 200-level filter; stopping works.
    b.stop().await;
    let mut b = TestBroker::start(open_auth(), |s| s.data_dir = Some(data.clone())).await;
    still_serves(&b).await;
    b.stop().await;
}

#[tokio::test]
async fn subscriptions_per_client_are_capped() {
    let b = TestBroker::start(open_auth(), |s| s.max_subscriptions_per_client = 3).await;
    let mut c = RawClient::connect(b.addr, &ConnectOpts::new("greedy")).await;
    let codes = c
        .subscribe_many(&[
            ("a", QoS::AtMostOnce),
            ("b", QoS::AtMostOnce),
            ("c", QoS::AtMostOnce),
            ("d", QoS::AtMostOnce),
        ])
        .await;
    assert_eq!(codes[3], SubscribeReturnCode::Failure);
    assert!(codes[..3]
        .iter()
        .all(|c| *c != SubscribeReturnCode::Failure));
    // Re-subscribing to a filter it holds is an update, not one more.
    assert_eq!(
        c.subscribe("a", QoS::AtLeastOnce).await,
        SubscribeReturnCode::Success(QoS::AtLeastOnce)
    );
    c.unsubscribe("b").await;
    assert_eq!(
        c.subscribe("d", QoS::AtMostOnce).await,
        SubscribeReturnCode::Success(QoS::AtMostOnce)
    );
    assert_eq!(
        Metrics::get(&b.handle().metrics().subscriptions_over_limit),
        1
    );
    still_serves(&b).await;
}

#[tokio::test]
async fn retained_messages_are_capped_by_count_and_bytes() {
    let b = TestBroker::start(open_auth(), |s| {
        s.max_retained = 2;
        s.max_retained_bytes = 1000;
    })
    .await;
    let view = b.handle().view();
    let usage = || view.router().retained_usage();
    let mut p = RawClient::connect(b.addr, &ConnectOpts::new("p")).await;
    p.publish("r/1", b"one", QoS::AtLeastOnce, true).await;
    p.publish("r/2", b"two", QoS::AtLeastOnce, true).await;
    // Over the count: delivered, not retained.
    let mut live = RawClient::connect(b.addr, &ConnectOpts::new("live")).await;
    live.subscribe("r/#", QoS::AtMostOnce).await;
    live.expect_publish().await;
    live.expect_publish().await;
    p.publish("r/3", b"three", QoS::AtLeastOnce, true).await;
    assert_eq!(live.expect_publish().await.payload, b"three");
    assert_eq!(usage().0, 2);
    assert_eq!(Metrics::get(&b.handle().metrics().retained_over_limit), 1);
    // Over the bytes: refused, and the topic's old value goes too (it is no
    // longer the last message).
    p.publish("r/2", &[b'x'; 2000], QoS::AtLeastOnce, true)
        .await;
    assert_eq!(usage(), (1, 6));
    assert_eq!(Metrics::get(&b.handle().metrics().retained_over_limit), 2);
    let mut late = RawClient::connect(b.addr, &ConnectOpts::new("late")).await;
    late.subscribe("r/#", QoS::AtMostOnce).await;
    assert_eq!(late.expect_publish().await.payload, b"one");
    late.expect_nothing().await;
    // Deleting frees room.
    p.publish("r/1", b"", QoS::AtLeastOnce, true).await;
    p.publish("r/4", b"four", QoS::AtLeastOnce, true).await;
    p.publish("r/5", b"five", QoS::AtLeastOnce, true).await;
    assert_eq!(usage(), (2, 14));
}

#[tokio::test]
async fn sessions_are_capped_and_expire() {
    let b = TestBroker::start(open_auth(), |s| {
        s.max_sessions = 2;
        s.session_expiry = Duration::from_secs(1);
    })
    .await;
    let mut s1 = RawClient::connect(b.addr, &ConnectOpts::new("s1").clean(false)).await;
    s1.subscribe("q/#", QoS::AtLeastOnce).await;
    s1.disconnect().await;
    let s2 = RawClient::connect(b.addr, &ConnectOpts::new("s2")).await;
    let (_, ack) = RawClient::connect_with(b.addr, &ConnectOpts::new("s3")).await;
    assert_eq!(ack.return_code, ConnectAckReason::ServiceUnavailable);
    assert_eq!(Metrics::get(&b.handle().metrics().sessions_over_limit), 1);
    // s1's offline session expires, which makes room.
    let m = b.handle().metrics();
    eventually("s1's session expired", || {
        Metrics::get(&m.sessions_expired) == 1
    })
    .await;
    let (s1, ack) = RawClient::connect_with(b.addr, &ConnectOpts::new("s1").clean(false)).await;
    assert_eq!(ack.return_code, ConnectAckReason::ConnectionAccepted);
    assert!(!ack.session_present, "the expired session is gone");
    // s2 is online: never expired.
    s2.disconnect().await;
    s1.disconnect().await;
}

/// bob used to get alice's session (session present, her queued messages,
/// her live stream) by connecting with her client id, and could kick her
/// off by reusing it.
#[tokio::test]
async fn a_client_id_belongs_to_the_user_who_made_its_session() {
    let b = TestBroker::start(
        users_with_acl("user alice\ntopic readwrite alice/#\nuser bob\ntopic readwrite bob/#\n"),
        |_| {},
    )
    .await;
    let alice = ConnectOpts::new("box").clean(false).login("alice", "a");
    let mut a = RawClient::connect(b.addr, &alice).await;
    a.subscribe("alice/#", QoS::AtLeastOnce).await;
    // bob cannot take her live connection over...
    let bob = ConnectOpts::new("box").clean(false).login("bob", "b");
    let (_, ack) = RawClient::connect_with(b.addr, &bob).await;
    assert_eq!(ack.return_code, ConnectAckReason::NotAuthorized);
    let mut p = RawClient::connect(b.addr, &ConnectOpts::new("p").login("alice", "a")).await;
    p.publish("alice/1", b"still mine", QoS::AtLeastOnce, false)
        .await;
    assert_eq!(a.receive().await.payload, b"still mine");
    // ...nor resume her offline session (with a clean session either).
    a.kill();
    p.publish("alice/2", b"queued", QoS::AtLeastOnce, false)
        .await;
    for opts in [bob.clone(), bob.clone().clean(true)] {
        let (_, ack) = RawClient::connect_with(b.addr, &opts).await;
        assert_eq!(ack.return_code, ConnectAckReason::NotAuthorized);
    }
    assert_eq!(Metrics::get(&b.handle().metrics().client_id_taken), 3);
    // alice gets it all back.
    let (mut a, ack) = RawClient::connect_with(b.addr, &alice).await;
    assert_eq!(ack.return_code, ConnectAckReason::ConnectionAccepted);
    assert!(ack.session_present);
    assert_eq!(a.receive().await.payload, b"queued");
}

/// `topic deny test/nosubscribe` used to refuse `#` and `+/+` outright.
/// Now the wildcard is granted and the denied topic filtered at delivery,
/// as mosquitto does; subscribing to the denied topic itself is refused.
#[tokio::test]
async fn read_permission_holds_at_delivery() {
    let b = TestBroker::start(
        users_with_acl(
            "user alice\ntopic deny test/nosubscribe\ntopic readwrite #\nuser bob\ntopic readwrite #\n",
        ),
        |_| {},
    )
    .await;
    let mut a = RawClient::connect(b.addr, &ConnectOpts::new("a").login("alice", "a")).await;
    let codes = a
        .subscribe_many(&[
            ("#", QoS::AtLeastOnce),
            ("+/+", QoS::AtLeastOnce),
            ("test/nosubscribe", QoS::AtLeastOnce),
        ])
        .await;
    assert_eq!(
        codes,
        vec![
            SubscribeReturnCode::Success(QoS::AtLeastOnce),
            SubscribeReturnCode::Success(QoS::AtLeastOnce),
            SubscribeReturnCode::Failure,
        ]
    );
    let mut p = RawClient::connect(b.addr, &ConnectOpts::new("p").login("bob", "b")).await;
    p.publish("test/nosubscribe", b"secret", QoS::AtLeastOnce, true)
        .await;
    p.publish("test/ok", b"fine", QoS::AtLeastOnce, false).await;
    assert_eq!(a.receive().await.payload, b"fine");
    a.expect_nothing().await;
    // Retained, too: a new subscription does not get the denied topic.
    let mut a2 = RawClient::connect(b.addr, &ConnectOpts::new("a2").login("alice", "a")).await;
    a2.subscribe("test/+", QoS::AtLeastOnce).await;
    a2.expect_nothing().await;
    assert!(Metrics::get(&b.handle().metrics().receive_denied) >= 2);
}

/// Subscriptions restored from broker.sqlite were never checked again: an
/// admin removed alice's read rule and restarted, and she still received.
#[tokio::test]
async fn a_revoked_read_rule_holds_for_restored_subscriptions() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_owned();
    let before = "user alice\ntopic readwrite shared/#\nuser bob\ntopic readwrite shared/#\n";
    let mut b =
        TestBroker::start(users_with_acl(before), |s| s.data_dir = Some(data.clone())).await;
    let alice = ConnectOpts::new("alice-box")
        .clean(false)
        .login("alice", "a");
    let mut a = RawClient::connect(b.addr, &alice).await;
    a.subscribe("shared/#", QoS::AtLeastOnce).await;
    a.disconnect().await;
    b.stop().await;
    let after = "user alice\ntopic write shared/#\nuser bob\ntopic readwrite shared/#\n";
    let b = TestBroker::start(users_with_acl(after), |s| s.data_dir = Some(data.clone())).await;
    let mut p = RawClient::connect(b.addr, &ConnectOpts::new("p").login("bob", "b")).await;
    p.publish("shared/x", b"not for alice", QoS::AtLeastOnce, false)
        .await;
    let (mut a, ack) = RawClient::connect_with(b.addr, &alice).await;
    assert!(ack.session_present);
    p.publish("shared/y", b"nor this", QoS::AtLeastOnce, false)
        .await;
    a.expect_nothing().await;
    assert_eq!(Metrics::get(&b.handle().metrics().receive_denied), 2);
}

/// Publishes 64 MB of QoS 0 messages on `flood`: far more than the
/// loopback socket buffers of a subscriber that reads nothing hold. (The
/// broker holds the publisher back for `slow_subscriber_timeout`, then
/// marks the subscriber slow and drops its oldest messages instead.)
async fn flood(b: &TestBroker) -> RawClient {
    let mut p = RawClient::connect(b.addr, &ConnectOpts::new("flooder")).await;
    let payload = vec![0u8; 64 * 1024];
    for _ in 0..1000 {
        assert!(
            p.try_send(publish_packet(
                "flood",
                &payload,
                QoS::AtMostOnce,
                false,
                None,
                false
            ))
            .await,
            "the publisher was disconnected"
        );
    }
    p
}

/// A broker whose one subscriber on `flood` has stopped reading, and the
/// flooding publisher that filled its socket.
async fn stuck_subscriber(write_timeout: Duration) -> (TestBroker, RawClient, RawClient) {
    let b = TestBroker::start(open_auth(), |s| {
        s.write_timeout = write_timeout;
        s.max_queued = 50;
        s.slow_subscriber_timeout = Duration::from_millis(100);
    })
    .await;
    let mut stuck = RawClient::connect(b.addr, &ConnectOpts::new("stuck")).await;
    stuck.subscribe("flood", QoS::AtMostOnce).await;
    let p = flood(&b).await;
    (b, stuck, p)
}

/// A subscriber that stops reading: its socket fills, and the write used to
/// wait forever outside the connection's select (keep-alive, shutdown and
/// take-over all waited with it).
#[tokio::test]
async fn a_client_that_stops_reading_is_closed_and_does_not_hold_up_shutdown() {
    let (mut b, stuck, _p) = stuck_subscriber(Duration::from_millis(500)).await;
    let m = b.handle().metrics();
    eventually("the stuck subscriber's write timed out", || {
        Metrics::get(&m.write_timeouts) == 1
    })
    .await;
    still_serves(&b).await;
    drop(stuck);
    b.stop().await;

    // The same with a long write timeout: shutdown does not wait for it.
    let (mut b, stuck, _p) = stuck_subscriber(Duration::from_secs(600)).await;
    tokio::time::timeout(WAIT, b.stop())
        .await
        .expect("shutdown does not wait for a client that does not read");
    drop(stuck);
}

/// An authenticator whose receive answer and generation a test sets.
struct Switch {
    receive: std::sync::atomic::AtomicBool,
    generation: std::sync::atomic::AtomicU64,
}

impl capteurs_gateway::broker::auth::Authenticator for Switch {
    fn authenticate(
        &self,
        _: &capteurs_gateway::broker::auth::ClientInfo,
        _: Option<&[u8]>,
    ) -> capteurs_gateway::broker::auth::ConnectDecision {
        capteurs_gateway::broker::auth::ConnectDecision::Accept
    }

    fn authorize(
        &self,
        _: &capteurs_gateway::broker::auth::ClientInfo,
        action: capteurs_gateway::broker::auth::Action,
        _: &str,
    ) -> capteurs_gateway::broker::auth::AclDecision {
        use capteurs_gateway::broker::auth::{AclDecision, Action};
        let ok =
            action != Action::Receive || self.receive.load(std::sync::atomic::Ordering::SeqCst);
        if ok {
            AclDecision::Allow
        } else {
            AclDecision::Deny
        }
    }

    fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Cached receive decisions are dropped when the authenticator's answers
/// change (a reloaded auth plugin): the router kept a generation of its own
/// that nothing bumped, so a revocation by reload went unseen.
#[tokio::test]
async fn a_new_auth_generation_drops_cached_receive_decisions() {
    let switch = Arc::new(Switch {
        receive: true.into(),
        generation: 0.into(),
    });
    let b = TestBroker::start(switch.clone(), |_| {}).await;
    let mut s = RawClient::connect(b.addr, &ConnectOpts::new("s")).await;
    s.subscribe("t/#", QoS::AtLeastOnce).await;
    let mut p = RawClient::connect(b.addr, &ConnectOpts::new("p")).await;
    p.publish("t/1", b"before", QoS::AtLeastOnce, false).await;
    assert_eq!(s.receive().await.payload, b"before");
    switch
        .receive
        .store(false, std::sync::atomic::Ordering::SeqCst);
    switch
        .generation
        .store(1, std::sync::atomic::Ordering::SeqCst);
    p.publish("t/1", b"after", QoS::AtLeastOnce, false).await;
    s.expect_nothing().await;
    assert_eq!(Metrics::get(&b.handle().metrics().receive_denied), 1);
}
