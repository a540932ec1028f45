//! The connection itself: the socket halves, the read and write buffers,
//! the codec, and the state the select loop keeps between packets. Reading
//! a packet, and writing the buffer out within `write_timeout`, are here;
//! what the publisher flow control does with its fields is in
//! [`super::inbound`].

use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use rmqtt_codec::v3::Packet;
use tokio::io::AsyncReadExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::codec::{Decoder, Encoder};
use tracing::warn;

use super::End;
use crate::broker::codec::{CodecError, MqttCodec};
use crate::broker::router::Metrics;
use crate::broker::session::{Kick, Session};
use crate::broker::Shared;
use crate::message::{Message, Seq};

/// Socket reads start this large and double, up to `READ_MAX`, while they
/// come back full (a busy publisher: fewer reads, longer batches); an idle
/// connection keeps the small buffer.
pub(super) const READ_MIN: usize = 1024;
pub(super) const READ_MAX: usize = 16 * 1024;

/// One client's connection, from accept to close.
pub(super) struct Conn {
    pub(super) reader: OwnedReadHalf,
    writer: OwnedWriteHalf,
    pub(super) rbuf: BytesMut,
    /// How much the next read asks for (READ_MIN..=READ_MAX).
    pub(super) read_chunk: usize,
    pub(super) wbuf: BytesMut,
    pub(super) codec: MqttCodec,
    pub(super) shared: Arc<Shared>,
    /// Flow control: online subscribers whose queue this client's
    /// publishes filled. While any is left, QoS 1/2 acknowledgements are
    /// held in `held_acks` (the client's own in-flight window then stops it)
    /// and after a QoS 0 publish the socket is not read (TCP stops it).
    pub(super) congested: Vec<Arc<Session>>,
    pub(super) held_acks: Vec<Packet>,
    pub(super) pause_reading: bool,
    pub(super) congested_since: Option<Instant>,
    /// Outbox sequence number this client's held acknowledgements wait
    /// for (its messages bound upstream stored durably), and the watch of
    /// what is settled.
    pub(super) durable_needed: Seq,
    pub(super) durable: tokio::sync::watch::Receiver<Seq>,
    /// QoS 0 messages decoded but not routed yet
    /// ([`super::inbound::flush_batch`]), and their bytes.
    pub(super) batch: Vec<Message>,
    pub(super) batch_bytes: usize,
    /// A packet decoded but held back by flow control.
    pub(super) stashed: Option<Packet>,
}

impl Conn {
    pub(super) fn new(stream: TcpStream, shared: Arc<Shared>) -> Conn {
        let (reader, writer) = stream.into_split();
        Conn {
            reader,
            writer,
            rbuf: BytesMut::with_capacity(READ_MIN),
            read_chunk: READ_MIN,
            wbuf: BytesMut::with_capacity(1024),
            codec: MqttCodec::new(shared.settings.max_packet_size),
            congested: Vec::new(),
            held_acks: Vec::new(),
            pause_reading: false,
            congested_since: None,
            durable_needed: Seq(0),
            durable: match &shared.router.outbox {
                Some(o) => o.settled(),
                None => tokio::sync::watch::channel(Seq(u64::MAX)).1,
            },
            batch: Vec::new(),
            batch_bytes: 0,
            stashed: None,
            shared,
        }
    }

    pub(super) fn send(&mut self, packet: Packet) {
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
    pub(super) async fn flush_within(&mut self, limit: Duration) -> std::io::Result<()> {
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
    pub(super) async fn flush_or_end(
        &mut self,
        kick_rx: &mut oneshot::Receiver<Kick>,
    ) -> Result<(), End> {
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
    pub(super) async fn read_packet(&mut self) -> Result<Option<Packet>, ReadError> {
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
pub(super) enum ReadError {
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("connection closed in the middle of a packet")]
    Truncated,
}
