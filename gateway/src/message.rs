//! The one message type that flows through every stage: sources and MQTT
//! clients produce it, plugins transform it, the broker routes it, the
//! buffer stores it and the upstream forwards it.

use std::time::SystemTime;

use bytes::Bytes;
use bytestring::ByteString;

/// MQTT quality of service. Ordered: the lower of two is `min`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum QoS {
    #[default]
    AtMostOnce = 0,
    AtLeastOnce = 1,
    ExactlyOnce = 2,
}

impl QoS {
    /// The QoS of the wire's (and the database's, and WIT's) number.
    pub fn from_u8(n: u8) -> Option<QoS> {
        match n {
            0 => Some(QoS::AtMostOnce),
            1 => Some(QoS::AtLeastOnce),
            2 => Some(QoS::ExactlyOnce),
            _ => None,
        }
    }

    /// The wire's number, 0..=2.
    pub fn as_u8(self) -> u8 {
        self as u8
    }
}

impl std::fmt::Display for QoS {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        u8::from(*self).fmt(f)
    }
}

/// In configuration files a QoS is its number: `qos = 1`.
impl<'de> serde::Deserialize<'de> for QoS {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<QoS, D::Error> {
        let n = u8::deserialize(d)?;
        QoS::from_u8(n).ok_or_else(|| {
            serde::de::Error::invalid_value(serde::de::Unexpected::Unsigned(n.into()), &"0, 1 or 2")
        })
    }
}

impl From<QoS> for u8 {
    fn from(q: QoS) -> u8 {
        q as u8
    }
}

/// For counters indexed by QoS.
impl From<QoS> for usize {
    fn from(q: QoS) -> usize {
        q as usize
    }
}

impl From<rmqtt_codec::types::QoS> for QoS {
    fn from(q: rmqtt_codec::types::QoS) -> QoS {
        match q {
            rmqtt_codec::types::QoS::AtMostOnce => QoS::AtMostOnce,
            rmqtt_codec::types::QoS::AtLeastOnce => QoS::AtLeastOnce,
            rmqtt_codec::types::QoS::ExactlyOnce => QoS::ExactlyOnce,
        }
    }
}

impl From<QoS> for rmqtt_codec::types::QoS {
    fn from(q: QoS) -> rmqtt_codec::types::QoS {
        match q {
            QoS::AtMostOnce => rmqtt_codec::types::QoS::AtMostOnce,
            QoS::AtLeastOnce => rmqtt_codec::types::QoS::AtLeastOnce,
            QoS::ExactlyOnce => rmqtt_codec::types::QoS::ExactlyOnce,
        }
    }
}

/// A message's place in the store-and-forward buffer: strictly increasing
/// per gateway, across restarts; the upstream can send it along so that
/// consumers drop duplicates.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Seq(pub u64);

impl std::fmt::Display for Seq {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Whether the publisher's acknowledgement waits for the buffer to hold
/// the message (QoS 1/2 from a client: PUBACK after the group commit), or
/// nobody waits (QoS 0, the gateway's own messages). A full buffer with
/// `when_full = "block"` holds the first and drops the second (counted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Nobody waits: stored with the next group commit, or dropped when
    /// the buffer would have to block.
    BestEffort,
    /// The publisher's acknowledgement waits until it is stored.
    PublisherWaits,
}

impl Durability {
    pub fn publisher_waits(self) -> bool {
        self == Durability::PublisherWaits
    }
}

/// Where a message came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// An MQTT client of the embedded broker (its client id).
    Client(ByteString),
    /// A client's Last Will, published by the broker.
    Will(ByteString),
    /// The broker itself (`$SYS`).
    Broker,
    /// The cloud broker, through an `in` upstream rule (never sent back out).
    Upstream,
    /// A serial or BLE sensor of the registry (its id), or an unknown
    /// device's discovery report.
    Sensor(ByteString),
}

/// What the gateway does with a message, by where it came from: the one
/// place that decides it (the router asks; the outlet and the transforms
/// do not decide again).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// The transform plugins see it. Not the broker's own messages (`$SYS`,
    /// the gateway's status, discovery): they are the gateway's word.
    pub transform: bool,
    /// The upstream rules may send it to the cloud. Never what came from
    /// the cloud: no loops.
    pub upstream: bool,
}

impl Origin {
    pub fn policy(&self) -> Policy {
        match self {
            Origin::Broker => Policy {
                transform: false,
                upstream: true,
            },
            Origin::Upstream => Policy {
                transform: true,
                upstream: false,
            },
            Origin::Client(_) | Origin::Will(_) | Origin::Sensor(_) => Policy {
                transform: true,
                upstream: true,
            },
        }
    }
}

/// A message: topic, payload and the publish flags, plus where and when it
/// entered the gateway. Cheap to clone (`Bytes` are reference counted), and
/// shared between subscribers behind an `Arc`.
#[derive(Debug, Clone)]
pub struct Message {
    pub topic: ByteString,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    pub origin: Origin,
    pub received_at: SystemTime,
}

impl Message {
    pub fn new(
        topic: impl Into<ByteString>,
        payload: impl Into<Bytes>,
        qos: QoS,
        retain: bool,
        origin: Origin,
    ) -> Self {
        Message {
            topic: topic.into(),
            payload: payload.into(),
            qos,
            retain,
            origin,
            received_at: SystemTime::now(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cloud_never_gets_its_own_back_and_plugins_leave_the_broker_alone() {
        assert!(!Origin::Upstream.policy().upstream);
        assert!(Origin::Upstream.policy().transform);
        assert!(!Origin::Broker.policy().transform);
        assert!(Origin::Broker.policy().upstream);
        for o in [
            Origin::Client("c".into()),
            Origin::Will("c".into()),
            Origin::Sensor("s".into()),
        ] {
            assert_eq!(
                o.policy(),
                Policy {
                    transform: true,
                    upstream: true
                }
            );
        }
    }
}
