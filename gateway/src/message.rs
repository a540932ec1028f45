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
