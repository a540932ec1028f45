//! From the client to the router: one handler per packet kind a connected
//! client sends, behind [`handle`], in the manner of a command table. QoS 0
//! PUBLISHes are gathered into a batch and routed together
//! ([`flush_batch`]); QoS 1/2 ones are routed at once and acknowledged,
//! the acknowledgement held while a subscriber they fed is congested or
//! their copy bound upstream is not stored yet (publisher flow control).

use std::num::NonZeroU16;
use std::sync::Arc;

use bytestring::ByteString;
use rmqtt_codec::types::Publish;
use rmqtt_codec::v3::{Packet, SubscribeReturnCode};
use tracing::{debug, info};

use super::handshake::Client;
use super::io::Conn;
use super::{nz, End};
use crate::broker::auth::{AclDecision, Action, ClientInfo};
use crate::broker::router::{worth_logging, Metrics};
use crate::broker::session::{Delivery, Inflight, Session};
use crate::broker::{topic, Shared};
use crate::message::{Durability, Message, QoS, Seq};

/// QoS 0 messages of one read routed together (so that a transform plugin
/// taking batches is entered once for them), at most this many / bytes, and
/// at most a sixteenth of `max_queued`: flow control notices a full queue
/// only after a batch, so each publisher may overfill it by one batch.
const BATCH_MESSAGES: usize = 64;
const BATCH_BYTES: usize = 64 * 1024;

/// Handles one packet from a connected client. `Some(end)` closes.
pub(super) fn handle(
    conn: &mut Conn,
    session: &Arc<Session>,
    client: &Client,
    packet: Packet,
) -> Option<End> {
    match packet {
        Packet::Publish(p) => return publish(conn, session, client, &p),
        Packet::PublishAck { packet_id } => puback(conn, session, packet_id),
        Packet::PublishReceived { packet_id } => pubrec(conn, session, packet_id),
        Packet::PublishRelease { packet_id } => pubrel(conn, session, packet_id),
        Packet::PublishComplete { packet_id } => pubcomp(conn, session, packet_id),
        Packet::Subscribe {
            packet_id,
            topic_filters,
        } => subscribe(conn, session, client, packet_id, topic_filters),
        Packet::Unsubscribe {
            packet_id,
            topic_filters,
        } => unsubscribe(conn, session, packet_id, topic_filters),
        Packet::PingRequest => pingreq(conn),
        Packet::Disconnect => return Some(End::Disconnect),
        Packet::Connect(_) => return Some(End::Protocol("second CONNECT".into())),
        other => {
            return Some(End::Protocol(format!(
                "unexpected packet type {:#04x} from a client",
                other.packet_type()
            )));
        }
    }
    None
}

/// PUBLISH: checked, counted, and routed (QoS 0: into the batch), then
/// acknowledged (QoS 1: PUBACK; QoS 2: PUBREC, routed the first time only).
fn publish(conn: &mut Conn, session: &Arc<Session>, client: &Client, p: &Publish) -> Option<End> {
    let shared = conn.shared.clone();
    let router = &shared.router;
    let metrics = &router.metrics;
    if let Err(e) = topic::validate_name_within(&p.topic, shared.settings.max_topic_levels) {
        if matches!(e, topic::TopicError::TooDeep { .. }) {
            Metrics::inc(&metrics.topics_too_deep);
        }
        return Some(End::Protocol(format!("invalid topic name in PUBLISH: {e}")));
    }
    Metrics::inc(&metrics.messages_received);
    let qos = QoS::from(p.qos);
    Metrics::inc(&metrics.received_by_qos[usize::from(qos)]);
    let packet_id = p.packet_id.map(|id| id.get());
    let allowed = publish_allowed(&shared, &client.info, &p.topic);
    if !allowed && worth_logging(&metrics.publish_denied) {
        info!(client_id = %client.info.client_id, username = ?client.info.username, topic = %p.topic, "PUBLISH denied by ACL, message dropped");
    }
    let message = || Message {
        topic: p.topic.clone(),
        payload: p.payload.clone(),
        qos,
        retain: p.retain,
        origin: client.origin.clone(),
        received_at: std::time::SystemTime::now(),
    };
    // QoS 1/2: routed now; the acknowledgement waits until the message is
    // settled upstream.
    let route_waiting = |conn: &mut Conn| {
        let seq = router.publish_from(
            message(),
            Some(session),
            &mut conn.congested,
            Durability::PublisherWaits,
        );
        conn.wait_durable(seq);
    };
    match (qos, packet_id) {
        (QoS::AtMostOnce, _) => {
            if allowed {
                conn.batch_bytes += p.topic.len() + p.payload.len();
                conn.batch.push(message());
                let most = (shared.settings.max_queued / 16).clamp(1, BATCH_MESSAGES);
                if conn.batch.len() >= most || conn.batch_bytes >= BATCH_BYTES {
                    flush_batch(conn, session);
                }
            }
        }
        (QoS::AtLeastOnce, Some(id)) => {
            if allowed {
                route_waiting(conn);
            }
            conn.ack_publish(Packet::PublishAck { packet_id: nz(id) });
        }
        (QoS::ExactlyOnce, Some(id)) => {
            let mut st = session.lock();
            let first_time = st.incoming_qos2.insert(id);
            let clean = st.clean;
            drop(st);
            if first_time {
                if allowed {
                    route_waiting(conn);
                }
                if !clean {
                    router.session_changed(session);
                }
            }
            conn.ack_publish(Packet::PublishReceived { packet_id: nz(id) });
        }
        _ => return Some(End::Protocol("PUBLISH without packet id".into())),
    }
    None
}

/// PUBACK: a QoS 1 message sent to the client is delivered.
fn puback(conn: &Conn, session: &Session, packet_id: NonZeroU16) {
    ack_outgoing(conn, session, packet_id.get(), Inflight::puback);
}

/// PUBREC: a QoS 2 message sent to the client is received; PUBREL goes.
fn pubrec(conn: &mut Conn, session: &Session, packet_id: NonZeroU16) {
    let mut st = session.lock();
    st.outgoing.pubrec(packet_id.get());
    let clean = st.clean;
    drop(st);
    if !clean {
        conn.shared.router.session_changed(session);
    }
    conn.send(Packet::PublishRelease { packet_id });
}

/// PUBREL: the client's QoS 2 message may be forgotten; PUBCOMP goes.
fn pubrel(conn: &mut Conn, session: &Session, packet_id: NonZeroU16) {
    let mut st = session.lock();
    st.incoming_qos2.remove(&packet_id.get());
    let clean = st.clean;
    drop(st);
    if !clean {
        conn.shared.router.session_changed(session);
    }
    conn.send(Packet::PublishComplete { packet_id });
}

/// PUBCOMP: a QoS 2 message sent to the client is done.
fn pubcomp(conn: &Conn, session: &Session, packet_id: NonZeroU16) {
    ack_outgoing(conn, session, packet_id.get(), Inflight::pubcomp);
}

/// PUBACK or PUBCOMP: `ack` ends the exchange in the session's window.
fn ack_outgoing(
    conn: &Conn,
    session: &Session,
    id: u16,
    ack: impl FnOnce(&mut Inflight, u16) -> bool,
) {
    let mut st = session.lock();
    if !ack(&mut st.outgoing, id) {
        debug!(client_id = %session.client_id, packet_id = id, "acknowledgement for an unknown packet id ignored")
    }
    let clean = st.clean;
    drop(st);
    if !clean {
        conn.shared.router.session_changed(session);
    }
    // A freed in-flight slot may let queued messages go.
    session.notify.notify_one();
}

/// SUBSCRIBE: each filter checked (syntax, depth, the client's limit, the
/// ACL) and subscribed, or refused (0x80); SUBACK, then the retained
/// messages that match.
fn subscribe(
    conn: &mut Conn,
    session: &Arc<Session>,
    client: &Client,
    packet_id: NonZeroU16,
    topic_filters: Vec<(ByteString, rmqtt_codec::types::QoS)>,
) {
    let shared = conn.shared.clone();
    let router = &shared.router;
    let metrics = &router.metrics;
    let mut codes = Vec::with_capacity(topic_filters.len());
    let mut retained = Vec::new();
    let limits = &shared.settings;
    for (filter, qos) in topic_filters {
        if let Err(e) = topic::validate_filter(&filter) {
            if worth_logging(&metrics.invalid_filters) {
                info!(client_id = %client.info.client_id, %filter, error = %e, "SUBSCRIBE refused: invalid filter");
            }
            codes.push(SubscribeReturnCode::Failure);
            continue;
        }
        if let Err(e) = topic::check_levels(&filter, limits.max_topic_levels) {
            if worth_logging(&metrics.topics_too_deep) {
                info!(client_id = %client.info.client_id, error = %e, "SUBSCRIBE refused (0x80)");
            }
            codes.push(SubscribeReturnCode::Failure);
            continue;
        }
        let full = {
            let st = session.lock();
            st.subscriptions.len() >= limits.max_subscriptions_per_client
                && !st.subscriptions.contains_key(&*filter)
        };
        if full {
            if worth_logging(&metrics.subscriptions_over_limit) {
                info!(client_id = %client.info.client_id, max = limits.max_subscriptions_per_client,
                    "SUBSCRIBE refused (0x80): broker.max_subscriptions_per_client reached");
            }
            codes.push(SubscribeReturnCode::Failure);
            continue;
        }
        if shared
            .auth
            .authorize(&client.info, Action::Subscribe, &filter)
            != AclDecision::Allow
        {
            if worth_logging(&metrics.subscribe_denied) {
                info!(client_id = %client.info.client_id, username = ?client.info.username, %filter, "SUBSCRIBE denied by ACL (0x80)");
            }
            codes.push(SubscribeReturnCode::Failure);
            continue;
        }
        let granted = QoS::from(qos);
        session
            .lock()
            .subscriptions
            .insert(filter.to_string(), granted);
        router.subscribe(&filter, session, granted);
        debug!(client_id = %client.info.client_id, %filter, qos = u8::from(granted), "subscribed");
        for m in router.retained_matching(&filter) {
            let q = m.qos.min(granted);
            retained.push(Delivery {
                id: 0,
                message: m,
                qos: q,
                retain: true,
            });
        }
        codes.push(SubscribeReturnCode::Success(qos));
    }
    conn.send(Packet::SubscribeAck {
        packet_id,
        status: codes,
    });
    if !session.lock().clean {
        router.session_changed(session);
    }
    for d in retained {
        router.deliver(session, d);
    }
}

/// UNSUBSCRIBE: every filter dropped (unknown ones too), then UNSUBACK.
fn unsubscribe(
    conn: &mut Conn,
    session: &Arc<Session>,
    packet_id: NonZeroU16,
    topic_filters: Vec<ByteString>,
) {
    let router = &conn.shared.router;
    for filter in topic_filters {
        session.lock().subscriptions.remove(&*filter);
        router.unsubscribe(&filter, session);
    }
    if !session.lock().clean {
        router.session_changed(session);
    }
    conn.send(Packet::UnsubscribeAck { packet_id });
}

/// PINGREQ: PINGRESP.
fn pingreq(conn: &mut Conn) {
    conn.send(Packet::PingResponse);
}

/// A client may publish on `topic`: never on `$SYS`, else as the ACL says.
pub(super) fn publish_allowed(shared: &Shared, info: &ClientInfo, topic: &str) -> bool {
    if topic.starts_with("$SYS") {
        return false;
    }
    shared.auth.authorize(info, Action::Publish, topic) == AclDecision::Allow
}

/// Routes the QoS 0 messages decoded since the last flush; a subscriber
/// they filled stops reading this client (flow control).
pub(super) fn flush_batch(conn: &mut Conn, session: &Arc<Session>) {
    if conn.batch.is_empty() {
        return;
    }
    let batch = std::mem::take(&mut conn.batch);
    conn.batch_bytes = 0;
    let router = &conn.shared.router;
    if batch.len() == 1 {
        let m = batch.into_iter().next().expect("one message");
        router.publish_from(
            m,
            Some(session),
            &mut conn.congested,
            Durability::BestEffort,
        );
    } else {
        router.publish_batch_from(batch, Some(session), &mut conn.congested);
    }
    if !conn.congested.is_empty() {
        conn.pause_reading = true;
    }
}

/// The congested subscribers caught up (or were marked slow): send the held
/// acknowledgements and read the client again.
pub(super) fn release(conn: &mut Conn) {
    for ack in std::mem::take(&mut conn.held_acks) {
        conn.send(ack);
    }
    conn.pause_reading = false;
}

/// Publisher flow control: the acknowledgements of this client's PUBLISHes.
impl Conn {
    /// PUBACK/PUBREC for a client's PUBLISH: sent now, or held while a
    /// subscriber it feeds is congested (in order, MQTT-4.6.0-2).
    fn ack_publish(&mut self, ack: Packet) {
        if self.congested.is_empty() && self.held_acks.is_empty() && self.durable_ok() {
            self.send(ack);
        } else {
            self.held_acks.push(ack);
        }
    }

    /// Every message of this client bound upstream is stored.
    pub(super) fn durable_ok(&self) -> bool {
        *self.durable.borrow() >= self.durable_needed
    }

    fn wait_durable(&mut self, seq: Option<Seq>) {
        if let Some(seq) = seq {
            self.durable_needed = self.durable_needed.max(seq);
        }
    }
}
