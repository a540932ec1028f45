//! MQTT 3.1/3.1.1 framing on top of `rmqtt-codec`.
//!
//! `rmqtt-codec` parses and encodes the packets; this layer frames them first
//! (fixed header, remaining length, size limit checked before the body is
//! buffered) and refuses what the crate lets through but MQTT 3.1.1 forbids:
//! a password without a user name, reserved SUBSCRIBE option bits, DUP on a
//! QoS 0 PUBLISH, a PINGREQ or DISCONNECT with a body. Topic names and
//! filters are checked by the broker with [`super::topic`].

use bytes::{Buf, BytesMut};
use rmqtt_codec::error::DecodeError;
use rmqtt_codec::v3::Codec as V3Codec;
pub use rmqtt_codec::v3::Packet;
use thiserror::Error;
use tokio_util::codec::{Decoder, Encoder};

#[derive(Debug, Error)]
pub enum CodecError {
    #[error("packet of {size} bytes exceeds max_packet_size {max}")]
    TooLarge { size: u32, max: u32 },
    #[error("malformed remaining length")]
    BadRemainingLength,
    #[error("malformed packet: {0}")]
    Decode(#[from] DecodeError),
    #[error("protocol violation: {0}")]
    Violation(&'static str),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Frames and decodes client packets, encodes server packets.
#[derive(Debug)]
pub struct MqttCodec {
    inner: V3Codec,
    max_packet_size: u32,
}

impl MqttCodec {
    pub fn new(max_packet_size: u32) -> Self {
        MqttCodec {
            inner: V3Codec::new(0),
            max_packet_size,
        }
    }
}

/// Reads the variable-length remaining length after the first byte.
/// `Ok(None)`: more bytes needed.
fn remaining_length(src: &[u8]) -> Result<Option<(u32, usize)>, CodecError> {
    let mut value: u32 = 0;
    for (i, byte) in src.iter().enumerate().skip(1).take(4) {
        value |= u32::from(byte & 0x7f) << (7 * (i - 1));
        if byte & 0x80 == 0 {
            return Ok(Some((value, i + 1)));
        }
    }
    if src.len() >= 5 {
        return Err(CodecError::BadRemainingLength);
    }
    Ok(None)
}

/// Checks MQTT 3.1.1 rules the decoder does not enforce, on one whole frame.
fn check_frame(first: u8, body: &[u8]) -> Result<(), CodecError> {
    match first >> 4 {
        // CONNECT: password flag requires user name flag (MQTT-3.1.2-22).
        1 if body.len() >= 2 => {
            let name_len = u16::from_be_bytes([body[0], body[1]]) as usize;
            if let Some(&flags) = body.get(2 + name_len + 1) {
                if flags & 0x40 != 0 && flags & 0x80 == 0 {
                    return Err(CodecError::Violation(
                        "password flag set without user name flag",
                    ));
                }
            }
        }
        // PUBLISH: DUP must be 0 for QoS 0 (MQTT-3.3.1-2); QoS 3 is refused by the decoder.
        3 if first & 0x08 != 0 && first & 0x06 == 0 => {
            return Err(CodecError::Violation("DUP flag set on a QoS 0 PUBLISH"));
        }
        // SUBSCRIBE: upper six bits of each requested QoS byte are reserved (MQTT-3-8.3-4).
        8 => {
            let mut rest = body.get(2..).unwrap_or_default();
            while rest.len() >= 2 {
                let len = u16::from_be_bytes([rest[0], rest[1]]) as usize;
                let Some(&options) = rest.get(2 + len) else {
                    break;
                };
                if options & 0xfc != 0 {
                    return Err(CodecError::Violation(
                        "reserved bits set in SUBSCRIBE options",
                    ));
                }
                if options & 0x03 == 3 {
                    return Err(CodecError::Violation("SUBSCRIBE requests QoS 3"));
                }
                rest = &rest[2 + len + 1..];
            }
        }
        // PINGREQ, DISCONNECT: no variable header, no payload.
        12 | 14 if !body.is_empty() => {
            return Err(CodecError::Violation("PINGREQ or DISCONNECT with a body"));
        }
        _ => {}
    }
    Ok(())
}

impl Decoder for MqttCodec {
    type Item = Packet;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Packet>, CodecError> {
        if src.len() < 2 {
            return Ok(None);
        }
        let Some((len, header)) = remaining_length(src)? else {
            return Ok(None);
        };
        if len > self.max_packet_size {
            return Err(CodecError::TooLarge {
                size: len,
                max: self.max_packet_size,
            });
        }
        let total = header + len as usize;
        if src.len() < total {
            src.reserve(total - src.len());
            return Ok(None);
        }
        check_frame(src[0], &src[header..total])?;
        match self.inner.decode(src)? {
            Some((packet, _)) => Ok(Some(packet)),
            None => {
                // Cannot happen: the whole frame is buffered. Drop it rather
                // than loop, and report it as malformed.
                src.advance(total);
                Err(CodecError::Violation("frame not decodable"))
            }
        }
    }
}

impl Encoder<Packet> for MqttCodec {
    type Error = rmqtt_codec::error::EncodeError;

    fn encode(&mut self, item: Packet, dst: &mut BytesMut) -> Result<(), Self::Error> {
        self.inner.encode(item, dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(bytes: &[u8]) -> Result<Option<Packet>, CodecError> {
        MqttCodec::new(1024).decode(&mut BytesMut::from(bytes))
    }

    #[test]
    fn connect_311() {
        let p = decode(b"\x10\x10\x00\x04MQTT\x04\x02\x00\x3c\x00\x04abcd")
            .unwrap()
            .unwrap();
        assert!(matches!(p, Packet::Connect(c) if c.client_id == "abcd" && c.keep_alive == 60));
    }

    #[test]
    fn connect_31_mqisdp() {
        let p = decode(b"\x10\x12\x00\x06MQIsdp\x03\x02\x00\x3c\x00\x04abcd")
            .unwrap()
            .unwrap();
        assert!(matches!(p, Packet::Connect(c) if c.protocol.level() == 3));
    }

    #[test]
    fn partial_frames_wait() {
        assert!(decode(b"\x10").unwrap().is_none());
        assert!(decode(b"\x10\x10\x00\x04MQ").unwrap().is_none());
        assert!(decode(b"\x30\xff\xff").unwrap().is_none());
    }

    #[test]
    fn refusals() {
        // password without user name
        assert!(matches!(
            decode(b"\x10\x12\x00\x04MQTT\x04\x42\x00\x3c\x00\x02ab\x00\x02pw"),
            Err(CodecError::Violation(_))
        ));
        // reserved subscribe option bits
        assert!(matches!(
            decode(b"\x82\x06\x00\x01\x00\x01a\x04"),
            Err(CodecError::Violation(_))
        ));
        // QoS 0 with DUP
        assert!(matches!(
            decode(b"\x38\x03\x00\x01a"),
            Err(CodecError::Violation(_))
        ));
        // PINGREQ with a body
        assert!(matches!(
            decode(b"\xc0\x01\x00"),
            Err(CodecError::Violation(_))
        ));
        // remaining length of five bytes
        assert!(matches!(
            decode(b"\x30\xff\xff\xff\xff\x01"),
            Err(CodecError::BadRemainingLength)
        ));
        // too large, refused from the header alone
        assert!(matches!(
            decode(b"\x30\x80\x10"),
            Err(CodecError::TooLarge { .. })
        ));
        // QoS 3 publish
        assert!(decode(b"\x36\x05\x00\x01a\x00\x01").is_err());
        // unknown packet type 0 and 15
        assert!(decode(b"\x00\x00").is_err());
        assert!(decode(b"\xf0\x00").is_err());
        // PUBREL with wrong flags
        assert!(decode(b"\x60\x02\x00\x01").is_err());
    }

    #[test]
    fn two_packets_in_one_buffer() {
        let mut codec = MqttCodec::new(1024);
        let mut buf = BytesMut::from(&b"\xc0\x00\xe0\x00"[..]);
        assert!(matches!(
            codec.decode(&mut buf).unwrap(),
            Some(Packet::PingRequest)
        ));
        assert!(matches!(
            codec.decode(&mut buf).unwrap(),
            Some(Packet::Disconnect)
        ));
        assert!(codec.decode(&mut buf).unwrap().is_none());
    }
}
