//! The CONNECT handshake: the first packet read within `connect_timeout`,
//! the client id and will checked, the login (password hashing off the
//! worker threads, repeated failures slowed down), the session attached or
//! taken over, CONNACK sent, and what was in flight sent again. A refusal
//! gets its CONNACK code and a second to read it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytestring::ByteString;
use rmqtt_codec::error::DecodeError;
use rmqtt_codec::v3::{Connect, ConnectAck, ConnectAckReason, Packet};
use tokio::sync::oneshot;
use tracing::{info, warn};

use super::inbound::publish_allowed;
use super::io::{Conn, ReadError};
use super::outbound;
use crate::broker::auth::{ClientInfo, ConnectDecision, ConnectRefusal};
use crate::broker::codec::CodecError;
use crate::broker::router::{worth_logging, Metrics};
use crate::broker::session::{Attached, Kick, Session};
use crate::broker::topic;
use crate::message::{Message, Origin};

static NEXT_CONN_ID: AtomicU64 = AtomicU64::new(1);

/// Reads the first packet, which must be a CONNECT, within
/// `connect_timeout`. `None` (closed, refused or given up, logged and
/// counted): the connection ends.
pub(super) async fn read_connect(conn: &mut Conn, peer: SocketAddr) -> Option<Box<Connect>> {
    let shared = conn.shared.clone();
    let metrics = &shared.router.metrics;
    let first = tokio::select! {
        r = tokio::time::timeout(shared.settings.connect_timeout, conn.read_packet()) => r,
        _ = shared.shutdown.cancelled() => return None,
    };
    match first {
        Err(_) => {
            Metrics::inc(&metrics.connect_timeouts);
            info!(%peer, "closing connection: no CONNECT within connect_timeout_ms");
            None
        }
        Ok(Ok(Some(Packet::Connect(c)))) => Some(c),
        Ok(Ok(None)) => None,
        Ok(Ok(Some(other))) => {
            Metrics::inc(&metrics.protocol_errors);
            info!(%peer, packet = ?other.packet_type(), "closing connection: first packet is not CONNECT");
            None
        }
        Ok(Err(ReadError::Codec(CodecError::Decode(DecodeError::UnsupportedProtocolLevel)))) => {
            Metrics::inc(&metrics.connections_refused);
            info!(%peer, "refusing connection: unacceptable protocol version (CONNACK 1)");
            refuse(conn, ConnectAckReason::UnacceptableProtocolVersion).await;
            None
        }
        Ok(Err(ReadError::Codec(CodecError::Decode(DecodeError::InvalidClientId)))) => {
            Metrics::inc(&metrics.connections_refused);
            info!(%peer, "refusing connection: empty client id without clean session (CONNACK 2)");
            refuse(conn, ConnectAckReason::IdentifierRejected).await;
            None
        }
        Ok(Err(e)) => {
            Metrics::inc(&metrics.protocol_errors);
            info!(%peer, error = %e, "closing connection: invalid CONNECT");
            None
        }
    }
}

/// Checks the CONNECT, authenticates, attaches the session (taking over an
/// older connection with the same client id) and sends CONNACK.
pub(super) async fn handshake(
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
                w.qos.into(),
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
                if worth_logging(&metrics.client_id_taken) {
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
                        if worth_logging(&metrics.sessions_over_limit) {
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

/// What the connection keeps about its client.
pub(super) struct Client {
    pub(super) info: ClientInfo,
    /// Built once: every message from this client carries it.
    pub(super) origin: Origin,
    pub(super) conn_id: u64,
    pub(super) keep_alive: u16,
    pub(super) will: Option<Message>,
}

/// Sends CONNACK with a refusal code.
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
