//! One client connection: CONNECT handshake, then a loop that reads packets,
//! writes what the session has queued, and enforces keep-alive, until the
//! client disconnects, breaks the protocol, is taken over, or the broker
//! shuts down. Bad input closes this connection only, with a log line and a
//! counter.
//!
//! This file holds [`serve`], the select loop ([`run`]) and the teardown.
//! The rest, in the order data flows:
//! - [`io`]: the socket, its buffers and codec ([`io::Conn`]);
//! - [`handshake`](mod@handshake): the CONNECT, up to CONNACK;
//! - [`inbound`]: one handler per packet a connected client sends, on to
//!   the router, and the publisher flow control;
//! - [`outbound`]: the pump from the session's queue to the socket;
//!
//! The outgoing in-flight window is the session's (`session/flow.rs`): it
//! outlives the connection.

mod handshake;
mod inbound;
mod io;
mod outbound;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rmqtt_codec::v3::Packet;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::codec::Decoder;
use tracing::{debug, info, warn};

use handshake::{handshake, read_connect, Client};
use inbound::{flush_batch, handle, release};
use io::{Conn, READ_MAX, READ_MIN};
use outbound::pump;

use super::router::Metrics;
use super::session::{Kick, Session};
use super::Shared;
use crate::message::Message;

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

/// Serves one accepted TCP connection to the end.
pub(crate) async fn serve(stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let mut conn = Conn::new(stream, shared.clone());
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

/// The select loop: handles the packets read, pumps the session's queue
/// out, and waits for the socket, the session, flow control, keep-alive,
/// take-over or shutdown, until the connection ends.
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
