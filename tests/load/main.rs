//! Load under attack: a crowd of hostile clients against one gateway
//! process while a well-behaved pair is measured (issue 13). A binary of
//! its own: cargo runs test binaries one after another, so the pair's
//! latency is measured against the attackers, not against the rest of the
//! suite running beside it on the same two cores.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use capteurs_gateway::broker::auth::passwd::hash_password;
use capteurs_tests::*;

/// One MQTT packet as bytes (hostile clients write them as they like).
fn bytes_of(p: Packet) -> Vec<u8> {
    use tokio_util::codec::Encoder;
    let mut buf = bytes::BytesMut::new();
    Codec::new(0).encode(p, &mut buf).expect("encode");
    buf.to_vec()
}

/// The kinds of hostile clients, each a loop that never panics: its
/// connection is the broker's to close.
#[derive(Clone, Copy, Debug)]
enum Attack {
    /// TCP, then nothing.
    Idle,
    /// A CONNECT sent a byte at a time, slowly.
    SlowLoris,
    /// Subscribes to what the pair exchanges, and never reads.
    NonReader,
    /// Filters 10,000 levels deep, and at the limit, subscribed and dropped.
    DeepFilters,
    /// 500 filters in one SUBSCRIBE (the limit here is 100).
    ManyFilters,
    /// The pair's user name with wrong passwords.
    BadPassword,
    /// A valid other user taking the pair's client id.
    TakeOver,
    /// Bytes that are no MQTT.
    Garbage,
}

const ATTACKS: [Attack; 8] = [
    Attack::Idle,
    Attack::SlowLoris,
    Attack::NonReader,
    Attack::DeepFilters,
    Attack::ManyFilters,
    Attack::BadPassword,
    Attack::TakeOver,
    Attack::Garbage,
];

async fn attack(
    addr: std::net::SocketAddr,
    kind: Attack,
    n: usize,
    stop: Arc<AtomicBool>,
    started: Arc<AtomicUsize>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let connect = |id: String, login: Option<(&str, &str)>| {
        let mut o = ConnectOpts::new(&id);
        if let Some((u, p)) = login {
            o = o.login(u, p);
        }
        bytes_of(o.packet())
    };
    while !stop.load(Ordering::Relaxed) {
        let round = async {
            let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
            started.fetch_add(1, Ordering::Relaxed);
            let mut buf = vec![0u8; 4096];
            match kind {
                Attack::Idle => {
                    let _ = s.read(&mut buf).await;
                }
                Attack::SlowLoris => {
                    for b in connect(format!("loris-{n}"), None) {
                        s.write_all(&[b]).await.ok()?;
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                }
                Attack::NonReader => {
                    s.write_all(&connect(format!("deaf-{n}"), Some(("mallory", "m"))))
                        .await
                        .ok()?;
                    let sub = Packet::Subscribe {
                        packet_id: std::num::NonZeroU16::new(1).unwrap(),
                        topic_filters: vec![("pair/#".into(), QoS::AtLeastOnce)],
                    };
                    s.write_all(&bytes_of(sub)).await.ok()?;
                    // Never reads; held until the test ends.
                    while !stop.load(Ordering::Relaxed) {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
                Attack::DeepFilters | Attack::ManyFilters => {
                    s.write_all(&connect(format!("greedy-{n}"), None))
                        .await
                        .ok()?;
                    let filters: Vec<(bytestring::ByteString, QoS)> = match kind {
                        Attack::DeepFilters => vec![
                            ("/".repeat(10_000).into(), QoS::AtMostOnce),
                            ("/".repeat(199).into(), QoS::AtMostOnce),
                        ],
                        _ => (0..500)
                            .map(|i| (format!("g/{n}/{i}").into(), QoS::AtMostOnce))
                            .collect(),
                    };
                    let sub = Packet::Subscribe {
                        packet_id: std::num::NonZeroU16::new(1).unwrap(),
                        topic_filters: filters,
                    };
                    s.write_all(&bytes_of(sub)).await.ok()?;
                    let _ = s.read(&mut buf).await;
                    let _ = s.read(&mut buf).await;
                }
                Attack::BadPassword => {
                    s.write_all(&connect(format!("guess-{n}"), Some(("alice", "guess"))))
                        .await
                        .ok()?;
                    let _ = s.read(&mut buf).await;
                }
                Attack::TakeOver => {
                    s.write_all(&connect("pair-sub".into(), Some(("mallory", "m"))))
                        .await
                        .ok()?;
                    let _ = s.read(&mut buf).await;
                }
                Attack::Garbage => {
                    s.write_all(&[0x10, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F, 0xDE, 0xAD])
                        .await
                        .ok()?;
                    let _ = s.read(&mut buf).await;
                }
            }
            Some(())
        };
        let _ = tokio::time::timeout(Duration::from_secs(15), round).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// 200 hostile connections of the kinds above at once, while a
/// well-behaved publisher/subscriber pair exchanges QoS 1 messages through
/// a gateway process: the pair loses nothing, in order, and its p99 stays
/// under 10 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_hostile_connections_leave_a_well_behaved_pair_alone() {
    let dir = tempfile::tempdir().unwrap();
    let passwd = format!(
        "alice:{}\nmallory:{}\n",
        hash_password("a"),
        hash_password("m")
    );
    std::fs::write(dir.path().join("passwd"), passwd).unwrap();
    std::fs::write(
        dir.path().join("acl"),
        "topic read $SYS/#\nuser alice\ntopic readwrite pair/#\nuser mallory\ntopic read pair/#\n",
    )
    .unwrap();
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        "[gateway]\ndata_dir = \"data\"\n[broker]\nlisten = \"127.0.0.1:0\"\n\
         password_file = \"passwd\"\nacl_file = \"acl\"\nallow_anonymous = true\n\
         connect_timeout_ms = 2000\nwrite_timeout_ms = 2000\nmax_subscriptions_per_client = 100\n",
    )
    .unwrap();
    let mut gw = GatewayProcess::start(&config);
    let alice = |id: &str| ConnectOpts::new(id).clean(false).login("alice", "a");
    let mut sub = RawClient::connect(gw.addr, &alice("pair-sub")).await;
    sub.subscribe("pair/#", QoS::AtLeastOnce).await;
    let mut publ = RawClient::connect(gw.addr, &alice("pair-pub")).await;

    let stop = Arc::new(AtomicBool::new(false));
    let started = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for n in 0..200 {
        let kind = ATTACKS[n % ATTACKS.len()];
        tasks.push(tokio::spawn(attack(
            gw.addr,
            kind,
            n,
            stop.clone(),
            started.clone(),
        )));
    }
    // Every attacker connected at least once before measuring.
    eventually("200 hostile connections", || {
        started.load(Ordering::Relaxed) >= 200
    })
    .await;
    let mut latencies = Vec::new();
    for i in 0..500u32 {
        let body = i.to_string();
        let t = std::time::Instant::now();
        publ.publish("pair/t", body.as_bytes(), QoS::AtLeastOnce, false)
            .await;
        let m = sub.receive().await;
        latencies.push(t.elapsed());
        assert_eq!(
            std::str::from_utf8(&m.payload).unwrap(),
            body,
            "in order, nothing lost"
        );
    }
    stop.store(true, Ordering::Relaxed);
    latencies.sort();
    let p50 = latencies[latencies.len() / 2];
    let p99 = latencies[latencies.len() * 99 / 100];
    eprintln!(
        "pair under 200 hostile connections: p50 {p50:?}, p99 {p99:?}, max {:?}",
        latencies.last().unwrap()
    );
    assert!(p99 < Duration::from_millis(10), "p99 {p99:?} (p50 {p50:?})");
    for t in tasks {
        let _ = tokio::time::timeout(WAIT, t).await;
    }
    // Still there, and still serving.
    publ.publish("pair/t", b"last", QoS::AtLeastOnce, false)
        .await;
    assert_eq!(sub.receive().await.payload, b"last");
    let status = gw.terminate(WAIT).await;
    assert!(status.success(), "{status:?}");
}
