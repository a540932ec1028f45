//! One client connection: CONNECT handshake, then a loop that reads packets,
//! writes what the session has queued, and enforces keep-alive, until the
//! client disconnects, breaks the protocol, is taken over, or the broker
//! shuts down. Bad input closes this connection only, with a log line and a
//! counter.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use bytestring::ByteString;
use rmqtt_codec::error::DecodeError;
use rmqtt_codec::v3::{Connect, ConnectAck, ConnectAckReason, Packet};
use tokio::io::AsyncReadExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::auth::{ClientInfo, ConnectDecision, ConnectRefusal};
use super::codec::{CodecError, MqttCodec};
use super::router::Metrics;
use super::session::{Attached, Kick, Session};
use super::topic;
use super::Shared;
use crate::message::{Message, Origin};
use tokio_util::codec::{Decoder, Encoder};

mod flow;
mod inbound;
mod outbound;

pub use flow::Inflight;
use inbound::{flush_batch, handle, publish_allowed, release};
use outbound::pump;

static NEXT_CONN_ID: AtomicU64 = AtomicU64::new(1);

/// Socket reads start this large and double, up to `READ_MAX`, while they
/// come back full (a busy publisher: fewer reads, longer batches); an idle
/// connection keeps the small buffer.
const READ_MIN: usize = 1024;
const READ_MAX: usize = 16 * 1024;

/// Why a connection ended; decides whether the will is published.
#[derive(Debug)]
enum End {
    Disconnect,
    Eof,
    Io(std::io::Error),
    Protocol(String),
    KeepAlive,
    WriteTimeout,
    Kicked(Kick),
    Shutdown,
}

impl End {
    fn publishes_will(&self) -> bool {
        match self {
            End::Disconnect | End::Shutdown => false,
            End::Kicked(k) => k.publish_will,
            End::Eof | End::Io(_) | End::Protocol(_) | End::KeepAlive | End::WriteTimeout => true,
        }
    }
}

struct Conn {
    reader: OwnedReadHalf,
    writer: OwnedWriteHalf,
    rbuf: BytesMut,
    /// How much the next read asks for (READ_MIN..=READ_MAX).
    read_chunk: usize,
    wbuf: BytesMut,
    codec: MqttCodec,
    shared: Arc<Shared>,
    /// Flow control: online subscribers whose queue this client's
    /// publishes filled. While any is left, QoS 1/2 acknowledgements are
    /// held in `held_acks` (the client's own in-flight window then stops it)
    /// and after a QoS 0 publish the socket is not read (TCP stops it).
    congested: Vec<Arc<Session>>,
    held_acks: Vec<Packet>,
    pause_reading: bool,
    congested_since: Option<Instant>,
    /// Outbox sequence number this client's held acknowledgements wait
    /// for (its messages bound upstream stored durably), and the watch of
    /// what is settled.
    durable_needed: u64,
    durable: tokio::sync::watch::Receiver<u64>,
    /// QoS 0 messages decoded but not routed yet ([`flush_batch`]), and
    /// their bytes.
    batch: Vec<Message>,
    batch_bytes: usize,
    /// A packet decoded but held back by flow control.
    stashed: Option<Packet>,
}

impl Conn {
    fn send(&mut self, packet: Packet) {
        // Encoding server packets built here cannot fail (ids are set,
        // sizes are bounded by what was accepted).
        if let Err(e) = self.codec.encode(packet, &mut self.wbuf) {
            warn!(error = %e, "cannot encode packet");
        }
    }

    /// Writes what the socket takes now, without waiting; true when the
    /// buffer is empty. The common case (room in the socket) costs no timer
    /// and no `select!`.
    fn write_now(&mut self) -> std::io::Result<bool> {
        while !self.wbuf.is_empty() {
            match self.writer.try_write(&self.wbuf) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    Metrics::add(&self.shared.router.metrics.bytes_sent, n as u64);
                    self.wbuf.advance(n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        self.wbuf.clear();
        Ok(true)
    }

    /// Writes the buffer out. The socket must take something within
    /// `limit` each time it is full, or this fails with `TimedOut`: a
    /// client that stopped reading costs its connection, never the broker
    /// a task stuck forever. Called inside the connection's `select!` (see
    /// [`Conn::flush_or_end`]).
    async fn flush_within(&mut self, limit: Duration) -> std::io::Result<()> {
        let mut deadline = Instant::now() + limit;
        loop {
            let before = self.wbuf.len();
            if self.write_now()? {
                return Ok(());
            }
            // Progress resets the clock; only a socket that takes nothing
            // for `limit` times out.
            if self.wbuf.len() < before {
                deadline = Instant::now() + limit;
            }
            match tokio::time::timeout_at(deadline, self.writer.writable()).await {
                Err(_) => return Err(std::io::ErrorKind::TimedOut.into()),
                Ok(r) => r?,
            }
        }
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        let limit = self.shared.settings.write_timeout;
        self.flush_within(limit).await
    }

    /// [`Conn::flush`] that also ends on shutdown and take-over, so a
    /// client that does not read delays neither. What fits in the socket
    /// is written at once; only a full socket waits, in the `select!`.
    async fn flush_or_end(&mut self, kick_rx: &mut oneshot::Receiver<Kick>) -> Result<(), End> {
        match self.write_now() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => return Err(End::Io(e)),
        }
        let shared = self.shared.clone();
        tokio::select! {
            biased;
            _ = shared.shutdown.cancelled() => Err(End::Shutdown),
            k = kick_rx => Err(End::Kicked(k.unwrap_or(Kick { publish_will: false }))),
            r = self.flush() => r.map_err(|e| {
                if e.kind() == std::io::ErrorKind::TimedOut {
                    End::WriteTimeout
                } else {
                    End::Io(e)
                }
            }),
        }
    }

    /// Reads until one whole packet is decoded. `Ok(None)` on clean EOF.
    async fn read_packet(&mut self) -> Result<Option<Packet>, ReadError> {
        loop {
            if let Some(p) = self.codec.decode(&mut self.rbuf)? {
                return Ok(Some(p));
            }
            let n = self.reader.read_buf(&mut self.rbuf).await?;
            if n == 0 {
                return if self.rbuf.is_empty() {
                    Ok(None)
                } else {
                    Err(ReadError::Truncated)
                };
            }
            Metrics::add(&self.shared.router.metrics.bytes_received, n as u64);
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum ReadError {
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("connection closed in the middle of a packet")]
    Truncated,
}

/// Serves one accepted TCP connection to the end.
pub(crate) async fn serve(stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let (reader, writer) = stream.into_split();
    let mut conn = Conn {
        reader,
        writer,
        rbuf: BytesMut::with_capacity(READ_MIN),
        read_chunk: READ_MIN,
        wbuf: BytesMut::with_capacity(1024),
        codec: MqttCodec::new(shared.settings.max_packet_size),
        shared: shared.clone(),
        congested: Vec::new(),
        held_acks: Vec::new(),
        pause_reading: false,
        congested_since: None,
        durable_needed: 0,
        durable: match &shared.router.outbox {
            Some(o) => o.settled(),
            None => tokio::sync::watch::channel(u64::MAX).1,
        },
        batch: Vec::new(),
        batch_bytes: 0,
        stashed: None,
    };
    let metrics = &shared.router.metrics;
    let first = tokio::select! {
        r = tokio::time::timeout(shared.settings.connect_timeout, conn.read_packet()) => r,
        _ = shared.shutdown.cancelled() => return,
    };
    let connect = match first {
        Err(_) => {
            Metrics::inc(&metrics.connect_timeouts);
            info!(%peer, "closing connection: no CONNECT within connect_timeout_ms");
            return;
        }
        Ok(Ok(Some(Packet::Connect(c)))) => c,
        Ok(Ok(None)) => return,
        Ok(Ok(Some(other))) => {
            Metrics::inc(&metrics.protocol_errors);
            info!(%peer, packet = ?other.packet_type(), "closing connection: first packet is not CONNECT");
            return;
        }
        Ok(Err(ReadError::Codec(CodecError::Decode(DecodeError::UnsupportedProtocolLevel)))) => {
            Metrics::inc(&metrics.connections_refused);
            info!(%peer, "refusing connection: unacceptable protocol version (CONNACK 1)");
            refuse(&mut conn, ConnectAckReason::UnacceptableProtocolVersion).await;
            return;
        }
        Ok(Err(ReadError::Codec(CodecError::Decode(DecodeError::InvalidClientId)))) => {
            Metrics::inc(&metrics.connections_refused);
            info!(%peer, "refusing connection: empty client id without clean session (CONNACK 2)");
            refuse(&mut conn, ConnectAckReason::IdentifierRejected).await;
            return;
        }
        Ok(Err(e)) => {
            Metrics::inc(&metrics.protocol_errors);
            info!(%peer, error = %e, "closing connection: invalid CONNECT");
            return;
        }
    };
    let Some((session, client, kick_rx, gone_tx)) = handshake(&mut conn, *connect, peer).await
    else {
        return;
    };
    let will = client.will.clone();
    let end = run(&mut conn, &session, &client, kick_rx).await;
    // What is left goes out if the client reads it soon; at shutdown or
    // after a write timeout, not worth waiting for.
    let limit = match end {
        End::Shutdown | End::WriteTimeout | End::Kicked(_) => Duration::from_millis(100),
        _ => shared.settings.write_timeout.min(Duration::from_secs(1)),
    };
    let _ = conn.flush_within(limit).await;
    teardown(&shared, &session, &client, end, will);
    drop(gone_tx);
}

async fn refuse(conn: &mut Conn, reason: ConnectAckReason) {
    conn.send(Packet::ConnectAck(ConnectAck {
        return_code: reason,
        session_present: false,
    }));
    // A refused client gets a second to read its CONNACK, not more.
    let limit = conn
        .shared
        .settings
        .write_timeout
        .min(Duration::from_secs(1));
    let _ = conn.flush_within(limit).await;
}

/// What the connection keeps about its client.
struct Client {
    info: ClientInfo,
    /// Built once: every message from this client carries it.
    origin: Origin,
    conn_id: u64,
    keep_alive: u16,
    will: Option<Message>,
}

/// Checks the CONNECT, authenticates, attaches the session (taking over an
/// older connection with the same client id) and sends CONNACK.
async fn handshake(
    conn: &mut Conn,
    connect: Connect,
    peer: SocketAddr,
) -> Option<(
    Arc<Session>,
    Client,
    oneshot::Receiver<Kick>,
    oneshot::Sender<()>,
)> {
    let shared = conn.shared.clone();
    let metrics = &shared.router.metrics;
    let client_id: Arc<str> = if connect.client_id.is_empty() {
        format!("auto-{:016x}", rand::random::<u64>()).into()
    } else {
        Arc::from(&*connect.client_id)
    };
    if client_id.contains('\0') {
        Metrics::inc(&metrics.connections_refused);
        info!(%peer, "refusing connection: client id contains NUL (CONNACK 2)");
        refuse(conn, ConnectAckReason::IdentifierRejected).await;
        return None;
    }
    let info = ClientInfo {
        client_id: client_id.to_string(),
        username: connect.username.as_ref().map(|u| u.to_string()),
        peer,
    };
    // An address that failed to log in repeatedly waits first (each
    // further failure doubles the wait), so guessing passwords is slow
    // however many sockets it opens.
    let wait = shared
        .login_backoff
        .wait(peer.ip(), std::time::Instant::now());
    if !wait.is_zero() {
        Metrics::inc(&metrics.logins_delayed);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shared.shutdown.cancelled() => return None,
        }
    }
    // Hashing a password (PBKDF2) is CPU work: on the blocking pool, a few
    // at a time, not on a worker that serves other connections. Without a
    // password there is nothing to hash: answered here, as fast as before
    // (auth plugins guard their own slow calls, see plugins::runtime).
    let decision = if connect.password.is_none() {
        shared.auth.authenticate(&info, None)
    } else {
        let _slot = tokio::select! {
            p = shared.login_slots.acquire() => p.expect("never closed"),
            _ = shared.shutdown.cancelled() => return None,
        };
        let auth = shared.auth.clone();
        let who = info.clone();
        let password = connect.password.clone();
        tokio::task::spawn_blocking(move || auth.authenticate(&who, password.as_deref()))
            .await
            .unwrap_or(ConnectDecision::Refuse(ConnectRefusal::NotAuthorized))
    };
    let refusal = match decision {
        ConnectDecision::Accept => {
            shared.login_backoff.succeeded(peer.ip());
            None
        }
        ConnectDecision::Refuse(r) => Some(r),
        ConnectDecision::Abstain => Some(ConnectRefusal::NotAuthorized),
    };
    if refusal.is_some() {
        shared
            .login_backoff
            .failed(peer.ip(), std::time::Instant::now());
    }
    let will = match &connect.last_will {
        None => None,
        Some(w) => {
            if let Err(e) = topic::validate_name_within(&w.topic, shared.settings.max_topic_levels)
            {
                if matches!(e, topic::TopicError::TooDeep { .. }) {
                    Metrics::inc(&metrics.topics_too_deep);
                }
                Metrics::inc(&metrics.protocol_errors);
                info!(%peer, client_id = %client_id, error = %e, "closing connection: invalid will topic");
                return None;
            }
            Some(Message::new(
                w.topic.clone(),
                w.message.clone(),
                w.qos.value(),
                w.retain,
                Origin::Will(ByteString::from(&*client_id)),
            ))
        }
    };
    let refusal = refusal.or_else(|| {
        let denied = will
            .as_ref()
            .is_some_and(|w| !publish_allowed(&shared, &info, &w.topic));
        denied.then_some(ConnectRefusal::NotAuthorized)
    });
    if let Some(r) = refusal {
        Metrics::inc(&metrics.connections_refused);
        let reason = match r {
            ConnectRefusal::BadCredentials => ConnectAckReason::BadUserNameOrPassword,
            ConnectRefusal::NotAuthorized => ConnectAckReason::NotAuthorized,
        };
        info!(%peer, client_id = %client_id, username = ?info.username, code = u8::from(reason), "refusing connection: {}", reason.reason());
        refuse(conn, reason).await;
        return None;
    }

    let conn_id = NEXT_CONN_ID.fetch_add(1, Ordering::Relaxed);
    let clean = connect.clean_session;
    let router = &shared.router;
    let username = info.username.as_deref();
    let (session, session_present, kick_rx, gone_tx) = loop {
        let existing = router.session(&client_id);
        if let Some(s) = &existing {
            let taken = {
                let mut st = s.lock();
                if st.usable_by(username) {
                    Ok(st.attached.take())
                } else {
                    Err(())
                }
            };
            let Ok(attached) = taken else {
                // Another user's client id: neither its session nor its
                // connection is this client's to take. Counted as a failed
                // login from that address (repeated, it is slowed down).
                shared
                    .login_backoff
                    .failed(peer.ip(), std::time::Instant::now());
                Metrics::inc(&metrics.connections_refused);
                if super::router::worth_logging(&metrics.client_id_taken) {
                    warn!(%peer, client_id = %client_id, username = ?info.username,
                        "refusing connection: the client id belongs to another user's session (CONNACK 5)");
                }
                refuse(conn, ConnectAckReason::NotAuthorized).await;
                return None;
            };
            if let Some(old) = attached {
                info!(client_id = %client_id, "client take-over: closing the previous connection");
                let _ = old.kick.send(Kick {
                    publish_will: clean,
                });
                let _ = tokio::time::timeout(Duration::from_secs(5), old.gone).await;
                continue;
            }
        }
        let (kick_tx, kick_rx) = oneshot::channel();
        let (gone_tx, gone_rx) = oneshot::channel();
        let attached = Attached {
            conn_id,
            kick: kick_tx,
            gone: gone_rx,
        };
        match existing {
            Some(s) if !clean && !s.lock().clean => {
                let mut st = s.lock();
                if st.attached.is_some() {
                    continue;
                }
                st.attached = Some(attached);
                st.detached_at = None;
                st.claim(username);
                st.reader.peer = peer;
                st.read_cache.clear();
                drop(st);
                break (s, true, kick_rx, gone_tx);
            }
            other => {
                if let Some(old) = other {
                    router.remove_session(&old);
                }
                let owner = username.map(Arc::from);
                let s = Arc::new(Session::new(client_id.clone(), clean, owner));
                {
                    let mut st = s.lock();
                    st.attached = Some(attached);
                    st.reader.peer = peer;
                }
                let inserted = {
                    let mut map = router.sessions.lock().unwrap_or_else(|e| e.into_inner());
                    if map.contains_key(&client_id) {
                        None
                    } else if map.len() >= shared.settings.max_sessions {
                        Some(false)
                    } else {
                        map.insert(client_id.clone(), s.clone());
                        Some(true)
                    }
                };
                match inserted {
                    None => continue,
                    Some(true) => break (s, false, kick_rx, gone_tx),
                    Some(false) => {
                        Metrics::inc(&metrics.connections_refused);
                        if super::router::worth_logging(&metrics.sessions_over_limit) {
                            warn!(%peer, client_id = %client_id, max_sessions = shared.settings.max_sessions,
                                "refusing connection: broker.max_sessions reached (CONNACK 3)");
                        }
                        refuse(conn, ConnectAckReason::ServiceUnavailable).await;
                        return None;
                    }
                }
            }
        }
    };
    if !clean {
        router.session_changed(&session);
    }
    Metrics::inc(&metrics.connections_accepted);
    metrics.clients_connected.fetch_add(1, Ordering::Relaxed);
    conn.send(Packet::ConnectAck(ConnectAck {
        return_code: ConnectAckReason::ConnectionAccepted,
        session_present,
    }));
    info!(
        client_id = %client_id, %peer, username = ?info.username, clean_session = clean,
        session_present, keep_alive = connect.keep_alive, protocol = connect.protocol.level(),
        "client connected"
    );
    outbound::resend(conn, &session);
    let origin = Origin::Client(ByteString::from(&*client_id));
    let client = Client {
        info,
        origin,
        conn_id,
        keep_alive: connect.keep_alive,
        will,
    };
    Some((session, client, kick_rx, gone_tx))
}

fn nz(id: u16) -> std::num::NonZeroU16 {
    std::num::NonZeroU16::new(id).unwrap_or(std::num::NonZeroU16::MIN)
}

async fn run(
    conn: &mut Conn,
    session: &Arc<Session>,
    client: &Client,
    mut kick_rx: oneshot::Receiver<Kick>,
) -> End {
    let shared = conn.shared.clone();
    let keep_alive =
        (client.keep_alive > 0).then(|| Duration::from_millis(u64::from(client.keep_alive) * 1500));
    let far = Duration::from_secs(86400 * 365);
    let deadline = tokio::time::sleep(keep_alive.unwrap_or(far));
    tokio::pin!(deadline);
    loop {
        // Packets already buffered (pipelined after CONNECT, or several per read).
        // QoS 0 PUBLISHes in a row are routed together; anything else
        // routes them first, so the client's order holds.
        // A packet decoded when the batch before it filled a subscriber
        // waits, unhandled, until reading resumes (as if never read).
        while !conn.pause_reading {
            let packet = match conn.stashed.take() {
                Some(p) => p,
                None => match conn.codec.decode(&mut conn.rbuf) {
                    Ok(Some(p)) => p,
                    Ok(None) => break,
                    Err(e) => {
                        flush_batch(conn, session);
                        return End::Protocol(e.to_string());
                    }
                },
            };
            if !matches!(&packet, Packet::Publish(p) if p.qos.value() == 0) {
                flush_batch(conn, session);
                if conn.pause_reading {
                    conn.stashed = Some(packet);
                    break;
                }
            }
            if let Some(end) = handle(conn, session, client, packet) {
                flush_batch(conn, session);
                return end;
            }
        }
        flush_batch(conn, session);
        let more = pump(conn, session);
        if let Err(end) = conn.flush_or_end(&mut kick_rx).await {
            return end;
        }
        if more {
            session.notify.notify_one();
        }
        // Flow control: created before the re-check so a drain in between
        // is not missed.
        let space = (!conn.congested.is_empty()).then(|| shared.router.space.notified());
        conn.congested.retain(|s| shared.router.still_congested(s));
        let durable_ok = conn.durable_ok();
        if conn.congested.is_empty() && durable_ok {
            let was_throttled = conn.congested_since.take().is_some();
            if was_throttled || conn.pause_reading || !conn.held_acks.is_empty() {
                release(conn);
                if let Some(ka) = keep_alive {
                    deadline.as_mut().reset(Instant::now() + ka);
                }
                continue;
            }
        } else if conn.congested_since.is_none() {
            conn.congested_since = Some(Instant::now());
            Metrics::inc(&shared.router.metrics.publishers_throttled);
        }
        let throttled = conn.congested_since.is_some();
        let spare = conn.rbuf.capacity() - conn.rbuf.len();
        if spare < conn.read_chunk / 2 {
            conn.rbuf.reserve(conn.read_chunk);
        }
        let spare = conn.rbuf.capacity() - conn.rbuf.len();
        let give_up = conn.congested_since.map_or(Instant::now(), |t| {
            t + shared.settings.slow_subscriber_timeout
        });
        tokio::select! {
            biased;
            _ = shared.shutdown.cancelled() => return End::Shutdown,
            k = &mut kick_rx => return End::Kicked(k.unwrap_or(Kick { publish_will: false })),
            _ = async { match space { Some(s) => s.await, None => std::future::pending().await } }, if throttled => {}
            _ = conn.durable.changed(), if !durable_ok => {}
            _ = tokio::time::sleep_until(give_up), if throttled => {
                for s in conn.congested.drain(..) {
                    shared.router.mark_slow(&s);
                }
            }
            r = conn.reader.read_buf(&mut conn.rbuf), if !conn.pause_reading => match r {
                Ok(0) => return End::Eof,
                Ok(n) => {
                    Metrics::add(&shared.router.metrics.bytes_received, n as u64);
                    if n >= spare && conn.read_chunk < READ_MAX {
                        conn.read_chunk *= 2;
                    } else if n < conn.read_chunk / 8 && conn.read_chunk > READ_MIN {
                        conn.read_chunk /= 2;
                        if conn.rbuf.is_empty() && conn.rbuf.capacity() > 2 * conn.read_chunk {
                            conn.rbuf = BytesMut::with_capacity(conn.read_chunk);
                        }
                    }
                    if let Some(ka) = keep_alive {
                        deadline.as_mut().reset(Instant::now() + ka);
                    }
                }
                Err(e) => return End::Io(e),
            },
            _ = session.notify.notified() => {}
            _ = &mut deadline, if keep_alive.is_some() && !conn.pause_reading => return End::KeepAlive,
        }
    }
}

fn teardown(
    shared: &Shared,
    session: &Arc<Session>,
    client: &Client,
    end: End,
    will: Option<Message>,
) {
    let router = &shared.router;
    let metrics = &router.metrics;
    metrics.clients_connected.fetch_sub(1, Ordering::Relaxed);
    let mut st = session.lock();
    let still_mine = st
        .attached
        .as_ref()
        .is_some_and(|a| a.conn_id == client.conn_id);
    if still_mine {
        st.attached = None;
        st.detached_at = Some(std::time::SystemTime::now());
    }
    if still_mine && st.queue.len() >= shared.settings.max_queued {
        // Publishers held back by this client stop waiting for it.
        router.space.notify_waiters();
    }
    let clean = st.clean;
    drop(st);
    if still_mine && clean {
        router.remove_session(session);
    } else if !clean {
        router.session_changed(session);
    }
    let client_id = &client.info.client_id;
    match &end {
        End::Disconnect => info!(%client_id, "client disconnected"),
        End::Shutdown => debug!(%client_id, "connection closed: broker shutting down"),
        End::Eof => info!(%client_id, "client closed the connection without DISCONNECT"),
        End::Io(e) => info!(%client_id, error = %e, "connection lost"),
        End::Kicked(_) => info!(%client_id, "connection closed: taken over by a new connection"),
        End::WriteTimeout => {
            Metrics::inc(&metrics.write_timeouts);
            info!(%client_id, write_timeout_ms = shared.settings.write_timeout.as_millis() as u64,
                "connection closed: the client stopped reading (write timeout)");
        }
        End::KeepAlive => {
            Metrics::inc(&metrics.keepalive_timeouts);
            info!(%client_id, keep_alive = client.keep_alive, "connection closed: keep-alive timeout");
        }
        End::Protocol(why) => {
            Metrics::inc(&metrics.protocol_errors);
            warn!(%client_id, peer = %client.info.peer, error = %why, "connection closed: protocol violation");
        }
    }
    if end.publishes_will() {
        if let Some(w) = will {
            Metrics::inc(&metrics.wills_published);
            info!(%client_id, topic = %w.topic, "publishing will");
            router.publish(w);
        }
    }
}
