//! Session fuzzing: random scripts of whole client sessions (several
//! clients, users and client ids, persistent sessions, QoS 0/1/2 with and
//! without acknowledgements, wildcards, retained messages, wills, abrupt
//! drops, take-overs, garbage and truncated packets, broker restarts)
//! against the broker state machine, not only its decoder.
//!
//! Each script is a byte string read as a list of operations, so a failing
//! one is reproduced from its seed. After every script the broker must
//! still serve a witness pair, no task of it may have panicked, and no
//! client may ever have received a message its user may not read.
//!
//! `cargo test -p capteurs-tests --test fuzz` runs it for `FUZZ_SECS`
//! seconds (5 by default; BENCHMARKS.md has the 30-minute run), from
//! `FUZZ_SEED` (random by default, printed).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use capteurs_gateway::broker::auth::{
    passwd::hash_password, Acl, Action, Authenticator, ClientInfo, FileAuth, PasswordFile,
};
use capteurs_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::codec::{Decoder, Encoder};

const ACL: &str = "\
topic read pub/#
user alice
topic readwrite a/#
topic readwrite pub/#
topic deny a/secret
user bob
topic readwrite b/#
topic readwrite pub/#
";

const USERS: [Option<(&str, &str)>; 6] = [
    None,
    Some(("alice", "a")),
    Some(("bob", "b")),
    Some(("alice", "a")),
    Some(("bob", "b")),
    Some(("alice", "wrong")),
];
const CLIENT_IDS: [&str; 6] = ["c0", "c1", "c2", "c3", "shared", ""];
const FILTERS: [&str; 14] = [
    "#", "+/+", "a/#", "a/secret", "b/+", "pub/#", "pub/x", "$SYS/#", "a/+/c", "+", "a/#/b",
    "bad+", "", "x/y/z",
];
const TOPICS: [&str; 7] = [
    "a/x", "a/secret", "b/y", "pub/x", "pub/y/z", "a/b/c", "x/y/z",
];
/// Topic names a PUBLISH or a will may not have (the connection closes).
const BAD_TOPICS: [&str; 3] = ["a/+", "", "a/b/c/d/e/f/g/h/i/j"];

/// The bytes of a script, read as numbers; zeros once it is used up.
struct Script<'a> {
    data: &'a [u8],
    at: usize,
}

impl Script<'_> {
    /// A topic name: now and then one that is not valid.
    fn topic(&mut self) -> &'static str {
        if self.byte() % 16 == 0 {
            self.pick(&BAD_TOPICS)
        } else {
            self.pick(&TOPICS)
        }
    }
    fn byte(&mut self) -> u8 {
        let b = self.data.get(self.at).copied().unwrap_or(0);
        self.at += 1;
        b
    }
    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.byte() as usize % from.len()]
    }
    fn done(&self) -> bool {
        self.at >= self.data.len()
    }
}

/// One fuzzed client connection.
struct Client {
    stream: tokio::net::TcpStream,
    rbuf: BytesMut,
    codec: Codec,
    /// Who it logged in as (the read check of what it receives).
    user: Option<&'static str>,
    client_id: String,
    accepted: bool,
    next_id: u16,
}

struct Fuzz {
    broker: TestBroker,
    acl: Acl,
    data_dir: std::path::PathBuf,
    clients: Vec<Option<Client>>,
    /// PUBLISHes received, checked for read permission.
    received: u64,
}

fn encode(p: Packet) -> BytesMut {
    let mut buf = BytesMut::new();
    Codec::new(0).encode(p, &mut buf).expect("encode");
    buf
}

fn auth() -> Arc<dyn Authenticator> {
    let passwd = format!("alice:{}\nbob:{}\n", hash_password("a"), hash_password("b"));
    Arc::new(FileAuth::from_parts(
        true,
        Some(PasswordFile::parse(&passwd, "fuzz").unwrap()),
        Some(Acl::parse(ACL, "fuzz").unwrap()),
    ))
}

async fn start(data: &std::path::Path) -> TestBroker {
    let data = data.to_owned();
    TestBroker::start(auth(), move |s| {
        s.data_dir = Some(data);
        s.persist_interval = Duration::from_millis(20);
        s.max_inflight = 4;
        s.max_queued = 16;
        s.max_subscriptions_per_client = 6;
        s.max_retained = 8;
        s.max_retained_bytes = 4096;
        // Five persistent client ids, four connections and the witness
        // pair: the limit is reached now and then.
        s.max_sessions = 8;
        s.max_topic_levels = 8;
        s.write_timeout = Duration::from_millis(300);
        s.slow_subscriber_timeout = Duration::from_millis(50);
        s.connect_timeout = Duration::from_millis(500);
        // Exercised, but short: the scripts fail logins and take-overs
        // all the time, from one address.
        s.login_backoff_max = Duration::from_millis(5);
    })
    .await
}

impl Fuzz {
    /// Reads what has arrived for client `k` (waiting up to `wait`) and
    /// answers it as a client would, or not at all when `ack` is false.
    async fn drain(&mut self, k: usize, wait: Duration, ack: bool) {
        self.drain_until(k, wait, ack, false).await
    }

    /// [`Fuzz::drain`], returning at the CONNACK when `connack`.
    async fn drain_until(&mut self, k: usize, wait: Duration, ack: bool, connack: bool) {
        let Some(c) = self.clients[k].as_mut() else {
            return;
        };
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let packet = match c.codec.decode(&mut c.rbuf) {
                Ok(Some((p, _))) => p,
                Ok(None) => {
                    let read =
                        tokio::time::timeout_at(deadline, c.stream.read_buf(&mut c.rbuf)).await;
                    match read {
                        Err(_) => return,
                        Ok(Ok(n)) if n > 0 => continue,
                        Ok(_) => {
                            self.clients[k] = None;
                            return;
                        }
                    }
                }
                Err(e) => panic!("the broker sent bytes that do not decode: {e:?}"),
            };
            let reply = match packet {
                Packet::ConnectAck(a) => {
                    c.accepted = a.return_code == ConnectAckReason::ConnectionAccepted;
                    if connack {
                        return;
                    }
                    None
                }
                Packet::Publish(p) => {
                    self.received += 1;
                    let reader = ClientInfo {
                        client_id: c.client_id.clone(),
                        username: c.user.map(str::to_owned),
                        peer: "127.0.0.1:1".parse().unwrap(),
                    };
                    assert!(
                        self.acl.check(&reader, Action::Receive, &p.topic),
                        "{:?} (client id {:?}) received {:?}, which it may not read",
                        c.user,
                        c.client_id,
                        p.topic
                    );
                    match (p.qos, p.packet_id) {
                        (QoS::AtMostOnce, _) | (_, None) => None,
                        (QoS::AtLeastOnce, Some(id)) => Some(Packet::PublishAck { packet_id: id }),
                        (QoS::ExactlyOnce, Some(id)) => {
                            Some(Packet::PublishReceived { packet_id: id })
                        }
                    }
                }
                Packet::PublishReceived { packet_id } => Some(Packet::PublishRelease { packet_id }),
                Packet::PublishRelease { packet_id } => Some(Packet::PublishComplete { packet_id }),
                _ => None,
            };
            if let (Some(r), true) = (reply, ack) {
                if c.stream.write_all(&encode(r)).await.is_err() {
                    self.clients[k] = None;
                    return;
                }
            }
        }
    }

    async fn send(&mut self, k: usize, bytes: &[u8]) {
        if let Some(c) = self.clients[k].as_mut() {
            let w =
                tokio::time::timeout(Duration::from_millis(200), c.stream.write_all(bytes)).await;
            if !matches!(w, Ok(Ok(()))) {
                self.clients[k] = None;
            }
        }
    }

    fn packet_id(&mut self, k: usize) -> std::num::NonZeroU16 {
        let c = self.clients[k].as_mut().expect("connected");
        c.next_id = c.next_id.wrapping_add(1).max(1);
        std::num::NonZeroU16::new(c.next_id).unwrap()
    }

    async fn op(&mut self, s: &mut Script<'_>) {
        let k = s.byte() as usize % self.clients.len();
        let mut op = s.byte() % 16;
        // A client with no connection mostly connects first: scripts spend
        // their bytes on sessions, not on writes to nothing.
        if self.clients[k].is_none() && op % 4 != 3 {
            op = 0;
        }
        match op {
            // CONNECT (over any connection this client had).
            0 | 1 => {
                let user = s.pick(&USERS);
                let id = s.pick(&CLIENT_IDS);
                let flags = s.byte();
                let mut o = ConnectOpts::new(id)
                    .clean(flags & 1 == 0)
                    .keep_alive(u16::from(flags >> 5));
                if let Some((u, p)) = user {
                    o = o.login(u, p);
                }
                if flags & 2 != 0 {
                    o = o.will(s.topic(), "gone", QoS::AtLeastOnce, flags & 4 != 0);
                }
                let Ok(Ok(stream)) = tokio::time::timeout(
                    Duration::from_secs(2),
                    tokio::net::TcpStream::connect(self.broker.addr),
                )
                .await
                else {
                    return;
                };
                self.clients[k] = Some(Client {
                    stream,
                    rbuf: BytesMut::new(),
                    codec: Codec::new(0),
                    user: user.map(|(u, _)| u),
                    client_id: id.to_owned(),
                    accepted: false,
                    next_id: 0,
                });
                self.send(k, &encode(o.packet())).await;
                self.drain_until(k, Duration::from_millis(500), true, true)
                    .await;
            }
            2..=4 => {
                if self.clients[k].is_none() {
                    return;
                }
                let n = 1 + s.byte() % 3;
                let filters = (0..n)
                    .map(|_| {
                        (
                            s.pick(&FILTERS).into(),
                            s.pick(&[QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce]),
                        )
                    })
                    .collect();
                let packet_id = self.packet_id(k);
                self.send(
                    k,
                    &encode(Packet::Subscribe {
                        packet_id,
                        topic_filters: filters,
                    }),
                )
                .await;
            }
            5 => {
                if self.clients[k].is_none() {
                    return;
                }
                let packet_id = self.packet_id(k);
                let f = s.pick(&FILTERS);
                self.send(
                    k,
                    &encode(Packet::Unsubscribe {
                        packet_id,
                        topic_filters: vec![f.into()],
                    }),
                )
                .await;
            }
            6..=10 => {
                if self.clients[k].is_none() {
                    return;
                }
                let flags = s.byte();
                let qos = [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce][flags as usize % 3];
                let id = (qos != QoS::AtMostOnce).then(|| self.packet_id(k));
                let size = [0usize, 1, 10, 300, 2000][(flags >> 2) as usize % 5];
                let p = publish_packet(
                    s.topic(),
                    &vec![b'x'; size],
                    qos,
                    flags & 0x80 != 0,
                    id,
                    flags & 0x40 != 0,
                );
                self.send(k, &encode(p)).await;
            }
            11 => {
                let ack = s.byte() % 4 != 0;
                self.drain(k, Duration::from_millis(3), ack).await;
            }
            12 => {
                // Gone: politely or not.
                if s.byte() % 2 == 0 {
                    self.send(k, &encode(Packet::Disconnect)).await;
                }
                self.clients[k] = None;
            }
            13 => {
                // Garbage: random bytes, a truncated packet, or an ack for
                // nothing.
                let b = s.byte();
                let bytes: Vec<u8> = match b % 4 {
                    0 => (0..1 + b % 16).map(|_| s.byte()).collect(),
                    1 => {
                        let full = encode(publish_packet(
                            "a/x",
                            b"cut",
                            QoS::AtLeastOnce,
                            false,
                            std::num::NonZeroU16::new(1),
                            false,
                        ));
                        full[..full.len() / 2].to_vec()
                    }
                    2 => encode(Packet::PublishRelease {
                        packet_id: std::num::NonZeroU16::new(u16::from(b) + 1).unwrap(),
                    })
                    .to_vec(),
                    _ => encode(Packet::PingRequest).to_vec(),
                };
                self.send(k, &bytes).await;
            }
            14 => {
                if s.byte() % 8 == 0 {
                    self.restart().await;
                }
            }
            _ => {
                // A second CONNECT on the same connection: a protocol error.
                if s.byte() % 4 == 0 {
                    self.send(k, &encode(ConnectOpts::new("again").packet()))
                        .await;
                }
            }
        }
    }

    /// Stops the broker (everything saved) and starts it again on the same
    /// data: the clients' connections are gone.
    async fn restart(&mut self) {
        for c in &mut self.clients {
            *c = None;
        }
        tokio::time::timeout(Duration::from_secs(30), self.broker.stop())
            .await
            .expect("the broker stops");
        self.broker = start(&self.data_dir).await;
    }

    /// The broker still serves: a fresh pair exchanges a QoS 1 message.
    async fn witness(&mut self) {
        let addr = self.broker.addr;
        // The scripts' clients were just dropped: until the broker has seen
        // them go, their sessions may still count against max_sessions.
        let connect = |id: &'static str| async move {
            let o = ConnectOpts::new(id).login("bob", "b");
            loop {
                let (c, ack) = RawClient::connect_with(addr, &o).await;
                match ack.return_code {
                    ConnectAckReason::ConnectionAccepted => return c,
                    ConnectAckReason::ServiceUnavailable => {
                        tokio::time::sleep(Duration::from_millis(20)).await
                    }
                    other => panic!("witness refused: {other:?}"),
                }
            }
        };
        let check = async {
            let mut sub = connect("witness-sub").await;
            sub.subscribe("b/witness", QoS::AtLeastOnce).await;
            let mut p = connect("witness-pub").await;
            p.publish("b/witness", b"ok", QoS::AtLeastOnce, false).await;
            assert_eq!(sub.receive().await.payload, b"ok");
        };
        tokio::time::timeout(Duration::from_secs(30), check)
            .await
            .expect("the broker still serves a well-behaved pair");
    }
}

/// xorshift64*: scripts from a seed, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_client_sessions_never_break_the_broker() {
    let secs: u64 = std::env::var("FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let seed: u64 = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("session fuzzing: FUZZ_SEED={seed} FUZZ_SECS={secs}");
    // A panic in any broker task is a failure, even one the task absorbed.
    let panicked = Arc::new(AtomicBool::new(false));
    {
        let panicked = panicked.clone();
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            panicked.store(true, Ordering::SeqCst);
            default(info);
        }));
    }
    let dir = tempfile::tempdir().unwrap();
    let mut f = Fuzz {
        broker: start(dir.path()).await,
        acl: Acl::parse(ACL, "fuzz").unwrap(),
        data_dir: dir.path().to_owned(),
        clients: (0..4).map(|_| None).collect(),
        received: 0,
    };
    let mut rng = Rng(seed);
    let until = Instant::now() + Duration::from_secs(secs);
    let mut scripts = 0u64;
    let mut ops = 0u64;
    while Instant::now() < until {
        let script_seed = rng.next();
        let mut r = Rng(script_seed | 1);
        let len = 16 + (r.next() % 240) as usize;
        let data: Vec<u8> = (0..len).map(|_| r.next() as u8).collect();
        let mut s = Script { data: &data, at: 0 };
        while !s.done() {
            f.op(&mut s).await;
            // What has arrived is read (and acknowledged) as it comes.
            for k in 0..f.clients.len() {
                f.drain(k, Duration::ZERO, true).await;
            }
            ops += 1;
        }
        for k in 0..f.clients.len() {
            f.drain(k, Duration::from_millis(5), true).await;
            f.clients[k] = None;
        }
        assert!(
            !panicked.load(Ordering::SeqCst),
            "a panic during script {script_seed} (seed {seed})"
        );
        scripts += 1;
        if scripts % 16 == 0 {
            f.witness().await;
        }
    }
    f.witness().await;
    f.broker.stop().await;
    assert!(!panicked.load(Ordering::SeqCst), "a panic (seed {seed})");
    eprintln!(
        "session fuzzing: {scripts} scripts, {ops} operations, {} messages received and checked, in {secs} s",
        f.received
    );
    assert!(
        scripts > 0 && f.received > 0,
        "the fuzzer exercised nothing"
    );
}
