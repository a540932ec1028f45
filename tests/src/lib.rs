//! Helpers shared by the end-to-end tests: an in-process broker on a free
//! loopback port, and a raw MQTT client that sends and checks exact packets
//! (so a test can send what no well-behaved client library would).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use capteurs_gateway::broker::auth::{Authenticator, FileAuth};
use capteurs_gateway::broker::{Broker, BrokerHandle, BrokerSettings};
use rmqtt_codec::types::Protocol;
pub use rmqtt_codec::types::QoS;
pub use rmqtt_codec::v3::{
    Codec, Connect, ConnectAck, ConnectAckReason, LastWill, Packet, SubscribeReturnCode,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::codec::{Decoder, Encoder};

/// How long a test waits for something that must happen: a ceiling, not a
/// pace (every wait ends as soon as the event comes). It was 5 s, which a
/// debug build on two cores busy with the rest of the suite exceeded:
/// reloading a plugin compiles it with a debug build of Cranelift (about
/// 2.2 s of CPU for celsius-json on an idle machine) after up to 2 s for
/// the file watcher's tick, and `sighup_and_a_replaced_file_...` failed.
pub const WAIT: Duration = Duration::from_secs(20);
/// How long a test waits to be sure something does NOT happen.
pub const QUIET: Duration = Duration::from_millis(300);

/// Waits (polling every 10 ms, up to [`WAIT`]) until `ready` holds, for
/// state that has no event to await (counters, files written by the broker).
pub async fn eventually(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !ready() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The workspace root (for configs/ and the course scripts).
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

/// Every client allowed, no passwords.
pub fn open_auth() -> Arc<dyn Authenticator> {
    Arc::new(FileAuth::new(true, None, None).expect("open auth"))
}

/// The course's classroom: G1..G16 / isimaGX, prof / isimaProf, per-group ACL.
pub fn classroom_auth() -> Arc<dyn Authenticator> {
    let c = workspace().join("configs");
    Arc::new(
        FileAuth::new(
            false,
            Some(&c.join("classroom.passwd")),
            Some(&c.join("classroom.acl")),
        )
        .expect("classroom auth"),
    )
}

/// A broker running in this process on 127.0.0.1:<free port>.
pub struct TestBroker {
    pub handle: Option<BrokerHandle>,
    pub addr: SocketAddr,
    pub settings: BrokerSettings,
}

impl TestBroker {
    pub async fn start(
        auth: Arc<dyn Authenticator>,
        tweak: impl FnOnce(&mut BrokerSettings),
    ) -> TestBroker {
        let mut settings = BrokerSettings::ephemeral();
        tweak(&mut settings);
        let handle = Broker::start(settings.clone(), auth)
            .await
            .expect("broker starts");
        let addr = handle.local_addr();
        TestBroker {
            handle: Some(handle),
            addr,
            settings,
        }
    }

    pub async fn open() -> TestBroker {
        Self::start(open_auth(), |_| {}).await
    }

    pub fn handle(&self) -> &BrokerHandle {
        self.handle.as_ref().expect("broker running")
    }

    pub async fn stop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.shutdown().await;
        }
    }
}

/// Options of a CONNECT.
#[derive(Clone, Debug)]
pub struct ConnectOpts {
    pub client_id: String,
    pub clean: bool,
    pub keep_alive: u16,
    pub username: Option<String>,
    pub password: Option<String>,
    pub will: Option<LastWill>,
    pub level: u8,
}

impl ConnectOpts {
    pub fn new(client_id: &str) -> Self {
        ConnectOpts {
            client_id: client_id.into(),
            clean: true,
            keep_alive: 60,
            username: None,
            password: None,
            will: None,
            level: 4,
        }
    }
    pub fn clean(mut self, clean: bool) -> Self {
        self.clean = clean;
        self
    }
    pub fn keep_alive(mut self, secs: u16) -> Self {
        self.keep_alive = secs;
        self
    }
    pub fn login(mut self, user: &str, password: &str) -> Self {
        self.username = Some(user.into());
        self.password = Some(password.into());
        self
    }
    pub fn will(mut self, topic: &str, payload: &str, qos: QoS, retain: bool) -> Self {
        self.will = Some(LastWill {
            qos,
            retain,
            topic: topic.into(),
            message: Bytes::from(payload.to_owned()),
        });
        self
    }
    pub fn packet(&self) -> Packet {
        Packet::Connect(Box::new(Connect {
            protocol: Protocol(self.level),
            clean_session: self.clean,
            keep_alive: self.keep_alive,
            last_will: self.will.clone(),
            client_id: ByteString::from(self.client_id.as_str()),
            username: self.username.as_deref().map(ByteString::from),
            password: self.password.as_ref().map(|p| Bytes::from(p.clone())),
            cert: None,
        }))
    }
}

/// A received PUBLISH, flattened for assertions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: u8,
    pub retain: bool,
    pub dup: bool,
    pub packet_id: Option<u16>,
}

/// A raw MQTT client over TCP.
pub struct RawClient {
    stream: TcpStream,
    rbuf: BytesMut,
    codec: Codec,
    next_id: u16,
}

impl RawClient {
    pub async fn tcp(addr: SocketAddr) -> RawClient {
        let stream = TcpStream::connect(addr).await.expect("TCP connect");
        stream.set_nodelay(true).ok();
        RawClient {
            stream,
            rbuf: BytesMut::new(),
            codec: Codec::new(0),
            next_id: 0,
        }
    }

    /// TCP connect, CONNECT, and return the CONNACK.
    pub async fn connect_with(addr: SocketAddr, opts: &ConnectOpts) -> (RawClient, ConnectAck) {
        let mut c = RawClient::tcp(addr).await;
        c.send(opts.packet()).await;
        match c.recv().await {
            Some(Packet::ConnectAck(ack)) => (c, ack),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    /// Connects and asserts the connection is accepted.
    pub async fn connect(addr: SocketAddr, opts: &ConnectOpts) -> RawClient {
        let (c, ack) = Self::connect_with(addr, opts).await;
        assert_eq!(
            ack.return_code,
            ConnectAckReason::ConnectionAccepted,
            "CONNACK for {}",
            opts.client_id
        );
        c
    }

    pub fn next_packet_id(&mut self) -> std::num::NonZeroU16 {
        self.next_id = self.next_id.wrapping_add(1).max(1);
        std::num::NonZeroU16::new(self.next_id).expect("non-zero")
    }

    pub async fn send(&mut self, packet: Packet) {
        let mut buf = BytesMut::new();
        self.codec.encode(packet, &mut buf).expect("encode");
        self.send_raw(&buf).await;
    }

    /// Sends without panicking; false when the connection is gone.
    pub async fn try_send(&mut self, packet: Packet) -> bool {
        let mut buf = BytesMut::new();
        self.codec.encode(packet, &mut buf).expect("encode");
        self.stream.write_all(&buf).await.is_ok()
    }

    /// Sends packets in one write: the broker reads them at once (what a
    /// busy client's socket holds).
    pub async fn send_all(&mut self, packets: Vec<Packet>) {
        let mut buf = BytesMut::new();
        for p in packets {
            self.codec.encode(p, &mut buf).expect("encode");
        }
        self.send_raw(&buf).await;
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }

    /// Next packet within `d`: `Err` on timeout, `Ok(None)` when the
    /// broker closed the connection.
    pub async fn recv_within(
        &mut self,
        d: Duration,
    ) -> Result<Option<Packet>, tokio::time::error::Elapsed> {
        tokio::time::timeout(d, async {
            loop {
                if let Some((p, _)) = self
                    .codec
                    .decode(&mut self.rbuf)
                    .expect("broker sent a malformed packet")
                {
                    return Some(p);
                }
                match self.stream.read_buf(&mut self.rbuf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        })
        .await
    }

    /// Next packet; panics if none arrives within [`WAIT`].
    pub async fn recv(&mut self) -> Option<Packet> {
        self.recv_within(WAIT)
            .await
            .expect("timed out waiting for a packet")
    }

    /// Asserts the broker closes the connection (within [`WAIT`]), with no
    /// packet before.
    pub async fn expect_closed(&mut self) {
        match self.recv().await {
            None => {}
            Some(p) => panic!("expected the connection to be closed, got {p:?}"),
        }
    }

    /// Asserts nothing arrives for [`QUIET`].
    pub async fn expect_nothing(&mut self) {
        if let Ok(p) = self.recv_within(QUIET).await {
            panic!("expected nothing, got {p:?}");
        }
    }

    pub async fn subscribe_many(&mut self, filters: &[(&str, QoS)]) -> Vec<SubscribeReturnCode> {
        let packet_id = self.next_packet_id();
        let topic_filters = filters
            .iter()
            .map(|(f, q)| (ByteString::from(*f), *q))
            .collect();
        self.send(Packet::Subscribe {
            packet_id,
            topic_filters,
        })
        .await;
        match self.recv().await {
            Some(Packet::SubscribeAck {
                packet_id: id,
                status,
            }) => {
                assert_eq!(id, packet_id);
                status
            }
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    pub async fn subscribe(&mut self, filter: &str, qos: QoS) -> SubscribeReturnCode {
        self.subscribe_many(&[(filter, qos)]).await[0]
    }

    pub async fn unsubscribe(&mut self, filter: &str) {
        let packet_id = self.next_packet_id();
        self.send(Packet::Unsubscribe {
            packet_id,
            topic_filters: vec![filter.into()],
        })
        .await;
        match self.recv().await {
            Some(Packet::UnsubscribeAck { packet_id: id }) => assert_eq!(id, packet_id),
            other => panic!("expected UNSUBACK, got {other:?}"),
        }
    }

    /// Publishes and completes the QoS flow (waits for PUBACK / PUBREC+PUBCOMP).
    pub async fn publish(&mut self, topic: &str, payload: &[u8], qos: QoS, retain: bool) {
        let packet_id = (qos != QoS::AtMostOnce).then(|| self.next_packet_id());
        self.send(publish_packet(
            topic, payload, qos, retain, packet_id, false,
        ))
        .await;
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => match self.recv().await {
                Some(Packet::PublishAck { packet_id: id }) => assert_eq!(Some(id), packet_id),
                other => panic!("expected PUBACK, got {other:?}"),
            },
            QoS::ExactlyOnce => {
                let id = packet_id.expect("id");
                match self.recv().await {
                    Some(Packet::PublishReceived { packet_id: got }) => assert_eq!(got, id),
                    other => panic!("expected PUBREC, got {other:?}"),
                }
                self.send(Packet::PublishRelease { packet_id: id }).await;
                match self.recv().await {
                    Some(Packet::PublishComplete { packet_id: got }) => assert_eq!(got, id),
                    other => panic!("expected PUBCOMP, got {other:?}"),
                }
            }
        }
    }

    /// Next packet must be a PUBLISH; it is returned without acknowledging it.
    pub async fn expect_publish(&mut self) -> Received {
        match self.recv().await {
            Some(Packet::Publish(p)) => Received {
                topic: p.topic.to_string(),
                payload: p.payload.to_vec(),
                qos: p.qos.value(),
                retain: p.retain,
                dup: p.dup,
                packet_id: p.packet_id.map(|i| i.get()),
            },
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }

    /// Receives a PUBLISH and completes its QoS flow as a subscriber.
    pub async fn receive(&mut self) -> Received {
        let r = self.expect_publish().await;
        self.ack(&r).await;
        r
    }

    /// Acknowledges a received PUBLISH (PUBACK, or PUBREC/PUBREL/PUBCOMP).
    pub async fn ack(&mut self, r: &Received) {
        let Some(id) = r.packet_id.and_then(std::num::NonZeroU16::new) else {
            return;
        };
        if r.qos == 1 {
            self.send(Packet::PublishAck { packet_id: id }).await;
        } else if r.qos == 2 {
            self.send(Packet::PublishReceived { packet_id: id }).await;
            match self.recv().await {
                Some(Packet::PublishRelease { packet_id: got }) => assert_eq!(got, id),
                other => panic!("expected PUBREL, got {other:?}"),
            }
            self.send(Packet::PublishComplete { packet_id: id }).await;
        }
    }

    pub async fn disconnect(mut self) {
        self.send(Packet::Disconnect).await;
        let _ = self.stream.shutdown().await;
    }

    /// Drops the TCP connection without DISCONNECT (the will must fire).
    pub fn kill(self) {
        drop(self.stream);
    }
}

pub fn publish_packet(
    topic: &str,
    payload: &[u8],
    qos: QoS,
    retain: bool,
    packet_id: Option<std::num::NonZeroU16>,
    dup: bool,
) -> Packet {
    Packet::Publish(Box::new(rmqtt_codec::types::Publish {
        dup,
        retain,
        qos,
        topic: ByteString::from(topic),
        packet_id,
        payload: Bytes::copy_from_slice(payload),
        properties: None,
    }))
}

/// A loopback port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Waits until something accepts TCP connections on `addr`.
pub async fn wait_listening(addr: SocketAddr) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while TcpStream::connect(addr).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing listens on {addr}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Debian's `mosquitto` on a loopback port: the cloud stand-in and the
/// reference broker. Anonymous clients allowed; nothing on disk unless the
/// extra configuration says so; killed on drop.
pub struct Mosquitto {
    child: Option<std::process::Child>,
    pub addr: SocketAddr,
    conf: PathBuf,
    pub dir: tempfile::TempDir,
}

fn mosquitto_bin() -> &'static str {
    ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("mosquitto not found: install it (tests/run.sh does)")
}

impl Mosquitto {
    pub async fn start() -> Mosquitto {
        Self::start_with("").await
    }

    /// With extra lines for its configuration file (`{dir}` is replaced by
    /// its own temporary directory).
    pub async fn start_with(extra: &str) -> Mosquitto {
        // The port is free now; another process could take it before
        // mosquitto binds it, hence the retries.
        for _ in 0..5 {
            if let Some(m) = Self::try_on(free_port(), extra).await {
                return m;
            }
        }
        panic!("mosquitto did not start");
    }

    /// On a given port (a server the gateway fails over to later).
    pub async fn start_on(port: u16, extra: &str) -> Mosquitto {
        Self::try_on(port, extra)
            .await
            .unwrap_or_else(|| panic!("mosquitto did not start on port {port}"))
    }

    async fn try_on(port: u16, extra: &str) -> Option<Mosquitto> {
        let dir = tempfile::tempdir().expect("temp dir");
        let conf = dir.path().join("mosquitto.conf");
        let extra = extra.replace("{dir}", &dir.path().display().to_string());
        std::fs::write(
            &conf,
            // `user root`: run as root (CI), mosquitto would switch to the
            // `mosquitto` user, who cannot read our temporary files.
            format!("user root\nlistener {port} 127.0.0.1\nallow_anonymous true\n{extra}\n"),
        )
        .expect("write mosquitto.conf");
        let mut m = Mosquitto {
            child: None,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            conf,
            dir,
        };
        m.spawn().await.then_some(m)
    }

    async fn spawn(&mut self) -> bool {
        let mut child = std::process::Command::new(mosquitto_bin())
            .arg("-c")
            .arg(&self.conf)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("mosquitto starts");
        let deadline = tokio::time::Instant::now() + WAIT;
        while tokio::time::Instant::now() < deadline {
            if TcpStream::connect(self.addr).await.is_ok() {
                self.child = Some(child);
                return true;
            }
            if child.try_wait().ok().flatten().is_some() {
                return false; // port taken
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }

    /// Kills it (SIGKILL: an outage, nothing saved).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port with the same configuration.
    pub async fn restart(&mut self) {
        self.kill();
        for _ in 0..50 {
            if self.spawn().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("mosquitto did not restart on {}", self.addr);
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The `capteurs-gateway` binary of this build (next to the test
/// executable; `cargo test --workspace` and tests/run.sh build it).
pub fn gateway_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let bin = dir.join("capteurs-gateway");
    assert!(
        bin.exists(),
        "{} not built: run `cargo build -p capteurs-gateway` (tests/run.sh does)",
        bin.display()
    );
    bin
}

/// The `capteurs-sim` binary next to the test executable.
pub fn sim_bin() -> PathBuf {
    let bin = gateway_bin().with_file_name("capteurs-sim");
    assert!(
        bin.exists(),
        "{} not built: run `cargo build -p capteurs-sim` (tests/run.sh does)",
        bin.display()
    );
    bin
}

/// `capteurs-sim ARGS --pty`, and the path of the pseudo-terminal it made
/// (its first line of output).
pub fn sim_pty(sim: &Path, args: &[&str]) -> (std::process::Child, String) {
    use std::io::BufRead;
    let mut child = std::process::Command::new(sim)
        .args(args)
        .arg("--pty")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    let path = first
        .trim()
        .strip_prefix("pty: ")
        .unwrap_or_else(|| panic!("first line {first:?}"))
        .to_owned();
    (child, path)
}

/// What `capteurs-sim serial` says it wrote: good lines and each kind of
/// corruption.
#[derive(Debug, Clone, Copy)]
pub struct Injected {
    pub good: u64,
    pub garbage: u64,
    pub overlong: u64,
}

/// One sensor's 300 `format` lines from `capteurs-sim serial`, a fifth of
/// them garbage or over-long (seed 5), written to a pty that appears at
/// `link`; returns what the simulator says it injected once it is done.
pub async fn sim_corrupt_serial(sim: &Path, format: &str, link: &Path) -> Injected {
    use std::io::Read;
    let args = [
        "serial",
        "--quiet",
        "--line-format",
        format,
        "--sensors",
        "1",
        "--period-ms",
        "2",
        "--count",
        "300",
        "--corrupt-rate",
        "0.2",
        "--corrupt",
        "garbage,overlong",
        "--seed",
        "5",
    ];
    let (mut child, path) = sim_pty(sim, &args);
    std::os::unix::fs::symlink(&path, link).unwrap();
    let (status, err) = tokio::task::spawn_blocking(move || {
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        (child.wait().unwrap(), err)
    })
    .await
    .unwrap();
    // The simulator is gone and its pty number free for the next one made
    // (by another test): the gateway must not reopen this name onto it.
    let _ = std::fs::remove_file(link);
    assert!(status.success(), "{err}");
    // "lines written 300: good G, garbage A, cut 0, overlong C"
    let [written, good, garbage, cut, overlong] = numbers(&err)[..] else {
        panic!("{err}")
    };
    assert_eq!((written, cut), (300, 0));
    assert!(garbage > 0 && overlong > 0, "{err}");
    Injected {
        good,
        garbage,
        overlong,
    }
}

/// The numbers in `s`, in order.
pub fn numbers(s: &str) -> Vec<u64> {
    s.split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap())
        .collect()
}

/// A whole gateway in-process (broker, buffer, upstream) from TOML: the
/// given text plus a loopback port 0 listener and `data_dir`.
pub struct TestGateway {
    pub gateway: Option<capteurs_gateway::gateway::Gateway>,
    pub addr: SocketAddr,
}

impl TestGateway {
    pub async fn start(data_dir: &Path, toml: &str) -> TestGateway {
        let text = format!(
            "[gateway]\ndata_dir = {:?}\n[broker]\nlisten = \"127.0.0.1:0\"\n{toml}",
            data_dir.display().to_string()
        );
        let cfg = capteurs_gateway::GatewayConfig::parse(&text, "test config", data_dir)
            .unwrap_or_else(|e| panic!("{e}"));
        let gateway = capteurs_gateway::gateway::start(&cfg)
            .await
            .unwrap_or_else(|e| panic!("gateway starts: {e}"));
        let addr = gateway.broker.local_addr();
        TestGateway {
            gateway: Some(gateway),
            addr,
        }
    }

    pub fn buffer(&self) -> &capteurs_gateway::buffer::Buffer {
        self.gateway
            .as_ref()
            .and_then(|g| g.buffer.as_ref())
            .expect("upstream enabled")
    }

    pub fn upstream(&self) -> &capteurs_gateway::upstream::UpstreamStats {
        self.gateway
            .as_ref()
            .and_then(|g| g.upstream.as_ref())
            .expect("upstream enabled")
            .stats()
    }

    pub fn plugins(&self) -> &std::sync::Arc<capteurs_gateway::plugins::Plugins> {
        self.gateway
            .as_ref()
            .and_then(|g| g.plugins.as_ref())
            .expect("plugins configured")
    }

    pub fn sources(&self) -> &std::sync::Arc<capteurs_gateway::sources::SourceStats> {
        self.gateway
            .as_ref()
            .and_then(|g| g.sources.as_ref())
            .expect("sources configured")
            .stats()
    }

    pub async fn stop(&mut self) {
        if let Some(g) = self.gateway.take() {
            g.shutdown().await;
        }
    }
}

/// A `capteurs-gateway` process (for crash tests): started with a config
/// file, its address read from its log; SIGKILLed on drop.
pub struct GatewayProcess {
    child: std::process::Child,
    pub addr: SocketAddr,
    /// Every line it logged so far.
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl GatewayProcess {
    pub fn start(config: &Path) -> GatewayProcess {
        use std::io::BufRead;
        let mut child = std::process::Command::new(gateway_bin())
            .arg("--config")
            .arg(config)
            .env("NO_COLOR", "1")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("gateway starts");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = lines.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if let Some(addr) = line
                    .split("MQTT broker listening addr=")
                    .nth(1)
                    .and_then(|a| a.split_whitespace().next())
                    .and_then(|a| a.parse::<SocketAddr>().ok())
                {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(addr);
                    }
                }
                if std::env::var_os("CAPTEURS_TEST_LOG").is_some() {
                    eprintln!("gateway: {line}");
                }
                kept.lock().unwrap().push(line);
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the gateway logs its address");
        GatewayProcess { child, addr, lines }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The first line logged so far that contains `needle`.
    pub fn logged(&self, needle: &str) -> Option<String> {
        let lines = self.lines.lock().unwrap();
        lines.iter().find(|l| l.contains(needle)).cloned()
    }

    /// SIGTERM, then waits (up to `within`) for the process to exit.
    pub async fn terminate(&mut self, within: Duration) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                // Let the reader thread take the last lines.
                tokio::time::sleep(Duration::from_millis(100)).await;
                return status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the gateway did not exit within {within:?} of SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL: no clean-up of any kind.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A pseudo-terminal pair: the gateway opens `path` (the slave) as a serial
/// port, the test writes to `master`. Dropping it closes the master: to the
/// gateway, the device is unplugged.
pub struct Pty {
    pub master: std::fs::File,
    pub path: PathBuf,
    _slave: std::os::fd::OwnedFd,
}

impl Pty {
    pub fn open() -> Pty {
        use std::os::fd::FromRawFd;
        let (mut master, mut slave) = (-1, -1);
        let mut name = [0 as libc::c_char; 128];
        // SAFETY: openpty fills two fds and a NUL-terminated name (128 bytes
        // is above glibc's limit for pty names).
        let rc = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                name.as_mut_ptr(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
        // SAFETY: openpty succeeded: both fds are ours, the name is NUL-terminated.
        let (master, slave) = unsafe {
            (
                std::fs::File::from_raw_fd(master),
                std::os::fd::OwnedFd::from_raw_fd(slave),
            )
        };
        let path = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        // Raw from the start, like a serial line: no echo, no line editing.
        {
            use std::os::fd::AsRawFd;
            // SAFETY: termios is plain data, filled by tcgetattr.
            let mut t: libc::termios = unsafe { std::mem::zeroed() };
            unsafe {
                assert_eq!(libc::tcgetattr(slave.as_raw_fd(), &mut t), 0);
                libc::cfmakeraw(&mut t);
                assert_eq!(libc::tcsetattr(slave.as_raw_fd(), libc::TCSANOW, &t), 0);
            }
        }
        Pty {
            master,
            path: PathBuf::from(path),
            _slave: slave,
        }
    }

    /// Writes raw bytes as the device would.
    pub fn write(&mut self, bytes: &[u8]) {
        use std::io::Write;
        self.master.write_all(bytes).expect("write to the pty");
    }
}

/// The interpreter with paho-mqtt 1.6: `$CAPTEURS_PYTHON`, which
/// tests/run.sh sets to its `.venv`. Checked once; never skipped.
pub fn python() -> &'static str {
    static PYTHON: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PYTHON.get_or_init(|| {
        let python = std::env::var("CAPTEURS_PYTHON").unwrap_or_else(|_| {
            panic!(
                "CAPTEURS_PYTHON is not set: run tests/run.sh, or set it to a Python \
                 with paho-mqtt==1.6.1 (python3 -m venv .venv && \
                 .venv/bin/pip install paho-mqtt==1.6.1)"
            )
        });
        let out = std::process::Command::new(&python)
            .args(["-c", "import paho.mqtt; print(paho.mqtt.__version__)"])
            .output()
            .unwrap_or_else(|e| panic!("CAPTEURS_PYTHON={python} does not run: {e}"));
        let version = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert!(
            out.status.success() && version.starts_with("1.6"),
            "CAPTEURS_PYTHON={python} lacks paho-mqtt 1.6 (the course's API): \
             version {version:?}, {}",
            String::from_utf8_lossy(&out.stderr)
        );
        python
    })
}

/// The example plugins (and tests/plugins/misbehave), built once for
/// wasm32-wasip2 by the first test that needs them; returns the path of
/// `name`.wasm (`name` with `_`, as cargo writes it).
pub fn plugin_wasm(name: &str) -> PathBuf {
    static BUILT: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    let dir = BUILT
        .get_or_init(|| {
            let root = workspace();
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let out = std::process::Command::new(cargo)
                .args(["build", "--release", "--target", "wasm32-wasip2", "--manifest-path"])
                .arg(root.join("plugins/Cargo.toml"))
                .output()
                .map_err(|e| format!("cannot run cargo: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "building the plugins failed (is the wasm32-wasip2 target installed? tests/run.sh adds it):\n{}",
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
            Ok(root.join("plugins/target/wasm32-wasip2/release"))
        })
        .as_ref()
        .unwrap_or_else(|e| panic!("{e}"));
    let path = dir.join(format!("{}.wasm", name.replace('-', "_")));
    assert!(path.exists(), "{} was not built", path.display());
    path
}
