//! One client connection: CONNECT handshake, then a loop that reads packets,
//! writes what the session has queued, and enforces keep-alive, until the
//! client disconnects, breaks the protocol, is taken over, or the broker
//! shuts down. Bad input closes this connection only, with a log line and a
//! counter.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use rmqtt_codec::v3::Packet;
use tokio::io::AsyncReadExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::codec::{CodecError, MqttCodec};
use super::router::Metrics;
use super::session::{Kick, Session};
use super::Shared;
use crate::message::Message;
use tokio_util::codec::{Decoder, Encoder};

mod flow;
mod handshake;
mod inbound;
mod outbound;

pub use flow::Inflight;
use handshake::{handshake, read_connect, Client};
use inbound::{flush_batch, handle, release};
use outbound::pump;

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
    let Some(connect) = read_connect(&mut conn, peer).await else {
        return;
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

fn nz(id: u16) -> std::num::NonZeroU16 {
    std::num::NonZeroU16::new(id).unwrap_or(std::num::NonZeroU16::MIN)
}
