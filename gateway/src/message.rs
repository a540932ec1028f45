//! The one message type that flows through every stage: sources and MQTT
//! clients produce it, plugins transform it, the broker routes it, the
//! buffer stores it and the upstream forwards it.

use std::time::SystemTime;

use bytes::Bytes;
use bytestring::ByteString;

/// MQTT quality of service, as a plain number 0..=2.
pub type QoS = u8;

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
