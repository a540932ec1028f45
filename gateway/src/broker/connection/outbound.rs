//! From the session to the socket: the pump moves queued deliveries into
//! the write buffer, QoS 1/2 ones only while the in-flight window
//! ([`super::flow`]) has room, and a resumed session's in-flight messages
//! go again. The select loop ([`super::run`]) then writes the buffer out.

use bytes::{BufMut, BytesMut};
use rmqtt_codec::v3::Packet;

use super::io::Conn;
use super::nz;
use crate::broker::router::Metrics;
use crate::broker::session::{Delivery, OutState, Outgoing, Session};
use crate::message::QoS;

/// Flush the write buffer once it holds this much, even mid-batch.
const WRITE_HIGH_WATER: usize = 64 * 1024;

/// Moves queued deliveries into the write buffer, within the in-flight
/// window. Returns true when more are ready than were taken.
pub(super) fn pump(conn: &mut Conn, session: &Session) -> bool {
    let max_inflight = conn.shared.settings.max_inflight as usize;
    let mut st = session.lock();
    let len_before = st.queue.len();
    let mut sent = 0u64;
    let mut sent_by_qos = [0u64; 3];
    let mut persistent_change = false;
    let more = loop {
        let Some(front) = st.queue.front() else {
            break false;
        };
        if front.qos > QoS::AtMostOnce && st.outgoing.blocked(max_inflight) {
            break false;
        }
        if conn.wbuf.len() >= WRITE_HIGH_WATER {
            break true;
        }
        let Some(d) = st.queue.pop_front() else {
            break false;
        };
        sent_by_qos[usize::from(d.qos)] += 1;
        if d.qos == QoS::AtMostOnce {
            encode_publish(&mut conn.wbuf, &d, None, false);
        } else {
            let o = st.outgoing.start(d);
            encode_publish(&mut conn.wbuf, &o.delivery, Some(o.packet_id), false);
            persistent_change = true;
        }
        sent += 1;
    };
    if sent > 0 {
        conn.shared.router.queue_drained(&mut st, len_before);
    }
    let clean = st.clean;
    drop(st);
    if sent > 0 {
        let m = &conn.shared.router.metrics;
        Metrics::add(&m.messages_sent, sent);
        for (counter, n) in m.sent_by_qos.iter().zip(sent_by_qos) {
            if n > 0 {
                Metrics::add(counter, n);
            }
        }
    }
    if persistent_change && !clean {
        conn.shared.router.session_changed(session);
    }
    more
}

/// Resume: what was in flight goes again, same packet ids, DUP = 1.
pub(super) fn resend(conn: &mut Conn, session: &Session) {
    let resend: Vec<Outgoing> = session.lock().outgoing.iter().cloned().collect();
    for o in resend {
        match o.state {
            OutState::AwaitPuback | OutState::AwaitPubrec => {
                encode_publish(&mut conn.wbuf, &o.delivery, Some(o.packet_id), true);
            }
            OutState::AwaitPubcomp => conn.send(Packet::PublishRelease {
                packet_id: nz(o.packet_id),
            }),
        }
    }
}

/// Writes a PUBLISH straight into the buffer: the hot path, without the
/// boxing the generic encoder needs.
fn encode_publish(buf: &mut BytesMut, d: &Delivery, packet_id: Option<u16>, dup: bool) {
    let topic = d.message.topic.as_bytes();
    let payload = &d.message.payload;
    let remaining = 2 + topic.len() + if packet_id.is_some() { 2 } else { 0 } + payload.len();
    let mut first = 0x30 | (u8::from(d.qos) << 1);
    if d.retain {
        first |= 0x01;
    }
    if dup {
        first |= 0x08;
    }
    buf.reserve(5 + remaining);
    buf.put_u8(first);
    let mut len = remaining;
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        buf.put_u8(byte);
        if len == 0 {
            break;
        }
    }
    buf.put_u16(topic.len() as u16);
    buf.put_slice(topic);
    if let Some(id) = packet_id {
        buf.put_u16(id);
    }
    buf.put_slice(payload);
}
