//! A minimal MQTT 3.1.1 client for the load generator: only the packets a
//! benchmark needs, hand-encoded straight into a `BytesMut` so that a batch
//! of PUBLISH packets costs one `write`, and decoded in place from the read
//! buffer without allocating. A general client library would be the
//! bottleneck (a channel hop and an allocation per message cost more than a
//! broker's routing), and the point is to load the broker, not ourselves.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpSocket;

const CONNECT: u8 = 1;
const CONNACK: u8 = 2;
const PUBLISH: u8 = 3;
pub const PUBACK: u8 = 4;
pub const PUBREC: u8 = 5;
pub const PUBREL: u8 = 6;
pub const PUBCOMP: u8 = 7;
const SUBSCRIBE: u8 = 8;
const SUBACK: u8 = 9;
const PINGREQ: u8 = 12;
const PINGRESP: u8 = 13;
const DISCONNECT: u8 = 14;

/// How much a read may append to a connection's read buffer at once.
pub const READ_CHUNK: usize = 64 * 1024;

// ---------------------------------------------------------------- encoding

fn put_remaining_length(buf: &mut BytesMut, mut len: usize) {
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        buf.put_u8(b);
        if len == 0 {
            break;
        }
    }
}

fn put_str(buf: &mut BytesMut, s: &[u8]) {
    buf.put_u16(s.len() as u16);
    buf.put_slice(s);
}

/// CONNECT with a clean session; `login` sets the user name and password flags.
pub fn encode_connect(
    buf: &mut BytesMut,
    client_id: &str,
    keep_alive: u16,
    login: Option<(&str, &str)>,
) {
    let mut flags = 0x02; // clean session
    let mut len = 10 + 2 + client_id.len(); // variable header + client id
    if let Some((user, pass)) = login {
        flags |= 0xc0;
        len += 2 + user.len() + 2 + pass.len();
    }
    buf.put_u8(CONNECT << 4);
    put_remaining_length(buf, len);
    put_str(buf, b"MQTT");
    buf.put_u8(4); // protocol level 3.1.1
    buf.put_u8(flags);
    buf.put_u16(keep_alive);
    put_str(buf, client_id.as_bytes());
    if let Some((user, pass)) = login {
        put_str(buf, user.as_bytes());
        put_str(buf, pass.as_bytes());
    }
}

/// SUBSCRIBE to one filter.
pub fn encode_subscribe(buf: &mut BytesMut, packet_id: u16, filter: &str, qos: u8) {
    buf.put_u8((SUBSCRIBE << 4) | 0x02);
    put_remaining_length(buf, 2 + 2 + filter.len() + 1);
    buf.put_u16(packet_id);
    put_str(buf, filter.as_bytes());
    buf.put_u8(qos);
}

/// PUBLISH (not retained, DUP clear); `packet_id` is ignored at QoS 0.
pub fn encode_publish(buf: &mut BytesMut, topic: &[u8], payload: &[u8], qos: u8, packet_id: u16) {
    let id_len = if qos > 0 { 2 } else { 0 };
    buf.put_u8((PUBLISH << 4) | (qos << 1));
    put_remaining_length(buf, 2 + topic.len() + id_len + payload.len());
    put_str(buf, topic);
    if qos > 0 {
        buf.put_u16(packet_id);
    }
    buf.put_slice(payload);
}

/// PUBACK, PUBREC, PUBREL (fixed-header flags 0010) or PUBCOMP.
pub fn encode_ack(buf: &mut BytesMut, kind: u8, packet_id: u16) {
    debug_assert!((PUBACK..=PUBCOMP).contains(&kind));
    let flags = if kind == PUBREL { 0x02 } else { 0 };
    buf.put_slice(&[(kind << 4) | flags, 2]);
    buf.put_u16(packet_id);
}

pub fn encode_pingreq(buf: &mut BytesMut) {
    buf.put_slice(&[PINGREQ << 4, 0]);
}

pub fn encode_disconnect(buf: &mut BytesMut) {
    buf.put_slice(&[DISCONNECT << 4, 0]);
}

// ---------------------------------------------------------------- decoding

/// A packet from the broker, borrowing the read buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Packet<'a> {
    ConnAck {
        session_present: bool,
        code: u8,
    },
    SubAck {
        packet_id: u16,
        return_codes: &'a [u8],
    },
    Publish {
        qos: u8,
        dup: bool,
        retain: bool,
        packet_id: u16,
        topic: &'a [u8],
        payload: &'a [u8],
    },
    PubAck(u16),
    PubRec(u16),
    PubRel(u16),
    PubComp(u16),
    PingResp,
    /// Any other type: a broker has no business sending it to a client.
    Other(u8),
}

#[derive(Debug, PartialEq, Eq)]
pub struct DecodeError(pub &'static str);

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "malformed packet from the broker: {}", self.0)
    }
}

impl std::error::Error for DecodeError {}

fn id_of(body: &[u8]) -> Result<u16, DecodeError> {
    match body {
        [a, b] => Ok(u16::from_be_bytes([*a, *b])),
        _ => Err(DecodeError("acknowledgement without a 2-byte packet id")),
    }
}

/// Decodes the packet at the start of `buf`: `Ok(None)` while incomplete,
/// else the packet and how many bytes it took (the caller advances past them
/// once done with the packet).
pub fn decode(buf: &[u8]) -> Result<Option<(Packet<'_>, usize)>, DecodeError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let mut len = 0usize;
    let mut at = 1;
    loop {
        let Some(&b) = buf.get(at) else {
            return Ok(None);
        };
        len |= usize::from(b & 0x7f) << (7 * (at - 1));
        at += 1;
        if b & 0x80 == 0 {
            break;
        }
        if at > 4 {
            return Err(DecodeError("remaining length longer than 4 bytes"));
        }
    }
    let Some(body) = buf.get(at..at + len) else {
        return Ok(None);
    };
    let (kind, flags) = (first >> 4, first & 0x0f);
    let packet = match kind {
        CONNACK => match body {
            [ack_flags, code] => Packet::ConnAck {
                session_present: ack_flags & 1 != 0,
                code: *code,
            },
            _ => return Err(DecodeError("CONNACK is not 2 bytes")),
        },
        SUBACK => {
            if body.len() < 3 {
                return Err(DecodeError("SUBACK too short"));
            }
            Packet::SubAck {
                packet_id: u16::from_be_bytes([body[0], body[1]]),
                return_codes: &body[2..],
            }
        }
        PUBLISH => {
            let qos = (flags >> 1) & 3;
            if qos == 3 {
                return Err(DecodeError("PUBLISH with QoS 3"));
            }
            if body.len() < 2 {
                return Err(DecodeError("PUBLISH without a topic"));
            }
            let topic_end = 2 + u16::from_be_bytes([body[0], body[1]]) as usize;
            let id_end = topic_end + if qos > 0 { 2 } else { 0 };
            if body.len() < id_end {
                return Err(DecodeError("PUBLISH shorter than its topic and packet id"));
            }
            let packet_id = if qos > 0 {
                u16::from_be_bytes([body[topic_end], body[topic_end + 1]])
            } else {
                0
            };
            Packet::Publish {
                qos,
                dup: flags & 0x08 != 0,
                retain: flags & 0x01 != 0,
                packet_id,
                topic: &body[2..topic_end],
                payload: &body[id_end..],
            }
        }
        PUBACK => Packet::PubAck(id_of(body)?),
        PUBREC => Packet::PubRec(id_of(body)?),
        PUBREL => Packet::PubRel(id_of(body)?),
        PUBCOMP => Packet::PubComp(id_of(body)?),
        PINGRESP => Packet::PingResp,
        other => Packet::Other(other),
    };
    Ok(Some((packet, at + len)))
}

/// The CONNACK return codes of MQTT 3.1.1 (§3.2.2.3).
pub fn connack_meaning(code: u8) -> &'static str {
    match code {
        0 => "connection accepted",
        1 => "unacceptable protocol version",
        2 => "identifier rejected",
        3 => "server unavailable",
        4 => "bad user name or password",
        5 => "not authorised",
        _ => "unknown return code",
    }
}

// ---------------------------------------------------------------- connection

/// One connected client: the two halves of its socket and whatever the
/// broker sent after CONNACK (or SUBACK) that is not processed yet.
pub struct Conn {
    pub reader: OwnedReadHalf,
    pub writer: OwnedWriteHalf,
    pub rbuf: BytesMut,
}

impl Conn {
    /// TCP connect, CONNECT, wait for CONNACK; a refusal is an error naming
    /// the code and its meaning. `send_buffer` sets SO_SNDBUF (else the
    /// system's autotuning).
    pub async fn open(
        addr: SocketAddr,
        client_id: &str,
        keep_alive: u16,
        login: Option<(&str, &str)>,
        send_buffer: Option<u32>,
    ) -> anyhow::Result<Conn> {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if let Some(bytes) = send_buffer {
            socket.set_send_buffer_size(bytes)?;
        }
        let stream = tokio::time::timeout(Duration::from_secs(5), socket.connect(addr))
            .await
            .map_err(|_| {
                anyhow::anyhow!("cannot connect to the broker at {addr}: timed out after 5 s")
            })?
            .with_context(|| format!("cannot connect to the broker at {addr}"))?;
        stream.set_nodelay(true)?;
        let (reader, mut writer) = stream.into_split();
        let mut wbuf = BytesMut::with_capacity(128);
        encode_connect(&mut wbuf, client_id, keep_alive, login);
        writer
            .write_all(&wbuf)
            .await
            .with_context(|| format!("sending CONNECT to {addr}"))?;
        let mut conn = Conn {
            reader,
            writer,
            rbuf: BytesMut::with_capacity(READ_CHUNK),
        };
        let code = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Some((packet, used)) = decode(&conn.rbuf)? {
                    let code = match packet {
                        Packet::ConnAck { code, .. } => code,
                        other => bail!("the broker at {addr} answered CONNECT with {other:?}"),
                    };
                    bytes::Buf::advance(&mut conn.rbuf, used);
                    return Ok(code);
                }
                if conn.read().await? == 0 {
                    bail!("the broker at {addr} closed the connection before CONNACK");
                }
            }
        })
        .await
        .map_err(|_| anyhow::anyhow!("no CONNACK from the broker at {addr} within 10 s"))??;
        if code != 0 {
            bail!(
                "the broker at {addr} refused the connection of {client_id}: CONNACK {code}: {}",
                connack_meaning(code)
            );
        }
        Ok(conn)
    }

    /// Reads what is there (waiting for at least one byte); 0 at end of stream.
    pub async fn read(&mut self) -> std::io::Result<usize> {
        self.rbuf.reserve(READ_CHUNK);
        self.reader.read_buf(&mut self.rbuf).await
    }

    /// Reads without waiting: `Ok(None)` when nothing is there yet.
    pub fn try_read(&mut self) -> std::io::Result<Option<usize>> {
        self.rbuf.reserve(READ_CHUNK);
        match self.reader.try_read_buf(&mut self.rbuf) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// SUBSCRIBE to one filter and wait for its SUBACK; returns the granted QoS.
    pub async fn subscribe(&mut self, filter: &str, qos: u8) -> anyhow::Result<u8> {
        let mut wbuf = BytesMut::with_capacity(64 + filter.len());
        encode_subscribe(&mut wbuf, 1, filter, qos);
        self.writer.write_all(&wbuf).await?;
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Some((packet, used)) = decode(&self.rbuf)? {
                    let granted = match packet {
                        Packet::SubAck {
                            packet_id: 1,
                            return_codes: &[code],
                        } => Some(code),
                        Packet::SubAck { .. } => {
                            bail!("SUBACK does not match the SUBSCRIBE to {filter}")
                        }
                        _ => None, // e.g. a retained message under the filter: skipped
                    };
                    bytes::Buf::advance(&mut self.rbuf, used);
                    match granted {
                        Some(0x80) => {
                            bail!("the broker refused the subscription to {filter} (SUBACK 0x80)")
                        }
                        Some(code) => return Ok(code),
                        None => continue,
                    }
                }
                if self.read().await? == 0 {
                    bail!("the broker closed the connection before SUBACK");
                }
            }
        })
        .await
        .map_err(|_| anyhow::anyhow!("no SUBACK for {filter} within 10 s"))?
    }

    /// Sends DISCONNECT and shuts the socket's write side.
    pub async fn disconnect(mut self) {
        let mut wbuf = BytesMut::with_capacity(2);
        encode_disconnect(&mut wbuf);
        let _ = self.writer.write_all(&wbuf).await;
        let _ = self.writer.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Buf;

    fn one(buf: &[u8]) -> Packet<'_> {
        let (p, used) = decode(buf).unwrap().unwrap();
        assert_eq!(used, buf.len());
        p
    }

    #[test]
    fn connect_bytes() {
        let mut buf = BytesMut::new();
        encode_connect(&mut buf, "ab", 60, None);
        assert_eq!(&buf[..], b"\x10\x0e\x00\x04MQTT\x04\x02\x00\x3c\x00\x02ab");
        buf.clear();
        encode_connect(&mut buf, "c", 30, Some(("u", "pw")));
        assert_eq!(
            &buf[..],
            b"\x10\x14\x00\x04MQTT\x04\xc2\x00\x1e\x00\x01c\x00\x01u\x00\x02pw"
        );
    }

    #[test]
    fn subscribe_ping_disconnect_bytes() {
        let mut buf = BytesMut::new();
        encode_subscribe(&mut buf, 1, "b/#", 2);
        encode_pingreq(&mut buf);
        encode_disconnect(&mut buf);
        assert_eq!(&buf[..], b"\x82\x08\x00\x01\x00\x03b/#\x02\xc0\x00\xe0\x00");
    }

    #[test]
    fn acks_bytes_and_decode() {
        let mut buf = BytesMut::new();
        for (kind, flags) in [
            (PUBACK, 0x40),
            (PUBREC, 0x50),
            (PUBREL, 0x62),
            (PUBCOMP, 0x70),
        ] {
            buf.clear();
            encode_ack(&mut buf, kind, 0x0102);
            assert_eq!(&buf[..], &[flags, 2, 1, 2]);
        }
        assert_eq!(one(&[0x40, 2, 1, 2]), Packet::PubAck(0x0102));
        assert_eq!(one(&[0x50, 2, 0, 7]), Packet::PubRec(7));
        assert_eq!(one(&[0x62, 2, 0, 8]), Packet::PubRel(8));
        assert_eq!(one(&[0x70, 2, 0, 9]), Packet::PubComp(9));
        assert_eq!(one(&[0xd0, 0]), Packet::PingResp);
        assert!(decode(&[0x40, 1, 1]).is_err());
    }

    #[test]
    fn connack_and_suback() {
        assert_eq!(
            one(&[0x20, 2, 0, 5]),
            Packet::ConnAck {
                session_present: false,
                code: 5
            }
        );
        assert_eq!(
            one(&[0x90, 3, 0, 1, 0x01]),
            Packet::SubAck {
                packet_id: 1,
                return_codes: &[1]
            }
        );
        assert_eq!(connack_meaning(5), "not authorised");
        assert!(decode(&[0x20, 1, 0]).is_err());
    }

    #[test]
    fn publish_round_trip_and_partial_frames() {
        let payload = vec![7u8; 200]; // 2-byte remaining length
        let mut buf = BytesMut::new();
        encode_publish(&mut buf, b"bench/1", &payload, 1, 42);
        encode_publish(&mut buf, b"t", b"x", 0, 0);
        encode_publish(&mut buf, b"q2", b"yz", 2, 65535);
        let whole = buf.clone();
        // Every strict prefix of the first packet is incomplete, not an error.
        let first_len = 1 + 2 + 2 + 7 + 2 + 200;
        for cut in 0..first_len {
            assert_eq!(decode(&whole[..cut]), Ok(None), "prefix of {cut} bytes");
        }
        let (p, used) = decode(&buf).unwrap().unwrap();
        assert_eq!(used, first_len);
        assert_eq!(
            p,
            Packet::Publish {
                qos: 1,
                dup: false,
                retain: false,
                packet_id: 42,
                topic: b"bench/1",
                payload: &payload
            }
        );
        buf.advance(used);
        let (p, used) = decode(&buf).unwrap().unwrap();
        assert_eq!(
            p,
            Packet::Publish {
                qos: 0,
                dup: false,
                retain: false,
                packet_id: 0,
                topic: b"t",
                payload: b"x"
            }
        );
        buf.advance(used);
        let (p, used) = decode(&buf).unwrap().unwrap();
        assert_eq!(
            p,
            Packet::Publish {
                qos: 2,
                dup: false,
                retain: false,
                packet_id: 65535,
                topic: b"q2",
                payload: b"yz"
            }
        );
        buf.advance(used);
        assert_eq!(decode(&buf), Ok(None));
    }

    #[test]
    fn publish_flags_and_long_lengths() {
        // DUP + QoS 1 + RETAIN, and a 3-byte remaining length.
        let payload = vec![1u8; 20_000];
        let mut buf = BytesMut::new();
        encode_publish(&mut buf, b"a", &payload, 1, 3);
        buf[0] |= 0x09;
        assert_eq!(&buf[1..4], &[0xa5, 0x9c, 0x01]); // 2 + 1 + 2 + 20000 = 20005
        match one(&buf) {
            Packet::Publish {
                qos: 1,
                dup: true,
                retain: true,
                packet_id: 3,
                topic: b"a",
                payload: p,
            } => {
                assert_eq!(p.len(), 20_000)
            }
            other => panic!("{other:?}"),
        }
        assert!(
            decode(&[0x30, 0x80, 0x80, 0x80, 0x80, 0x01]).is_err(),
            "5-byte remaining length"
        );
        assert!(decode(&[0x36, 2, 0, 0]).is_err(), "QoS 3");
        assert!(
            decode(&[0x32, 3, 0, 1, b'a']).is_err(),
            "QoS 1 without packet id"
        );
    }
}
