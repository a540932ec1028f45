//! A raw MQTT 3.1.1 client that sends and checks exact packets, so a test
//! can send what no well-behaved client library would.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use rmqtt_codec::types::Protocol;
use rmqtt_codec::types::QoS;
use rmqtt_codec::v3::{
    Codec, Connect, ConnectAck, ConnectAckReason, LastWill, Packet, SubscribeReturnCode,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::codec::{Decoder, Encoder};

use crate::{QUIET, WAIT};

/// Options of a CONNECT.
#[derive(Clone, Debug)]
pub struct ConnectOpts {
    pub client_id: String,
    pub clean: bool,
    pub keep_alive: u16,
    pub username: Option<String>,
    pub password: Option<String>,
    pub will: Option<LastWill>,
    pub level: u8,
}

impl ConnectOpts {
    pub fn new(client_id: &str) -> Self {
        ConnectOpts {
            client_id: client_id.into(),
            clean: true,
            keep_alive: 60,
            username: None,
            password: None,
            will: None,
            level: 4,
        }
    }
    pub fn clean(mut self, clean: bool) -> Self {
        self.clean = clean;
        self
    }
    pub fn keep_alive(mut self, secs: u16) -> Self {
        self.keep_alive = secs;
        self
    }
    pub fn login(mut self, user: &str, password: &str) -> Self {
        self.username = Some(user.into());
        self.password = Some(password.into());
        self
    }
    pub fn will(mut self, topic: &str, payload: &str, qos: QoS, retain: bool) -> Self {
        self.will = Some(LastWill {
            qos,
            retain,
            topic: topic.into(),
            message: Bytes::from(payload.to_owned()),
        });
        self
    }
    pub fn packet(&self) -> Packet {
        Packet::Connect(Box::new(Connect {
            protocol: Protocol(self.level),
            clean_session: self.clean,
            keep_alive: self.keep_alive,
            last_will: self.will.clone(),
            client_id: ByteString::from(self.client_id.as_str()),
            username: self.username.as_deref().map(ByteString::from),
            password: self.password.as_ref().map(|p| Bytes::from(p.clone())),
            cert: None,
        }))
    }
}

/// A received PUBLISH, flattened for assertions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: u8,
    pub retain: bool,
    pub dup: bool,
    pub packet_id: Option<u16>,
}

/// A raw MQTT client over TCP.
pub struct RawClient {
    stream: TcpStream,
    rbuf: BytesMut,
    codec: Codec,
    next_id: u16,
}

impl RawClient {
    pub async fn tcp(addr: SocketAddr) -> RawClient {
        let stream = TcpStream::connect(addr).await.expect("TCP connect");
        stream.set_nodelay(true).ok();
        RawClient {
            stream,
            rbuf: BytesMut::new(),
            codec: Codec::new(0),
            next_id: 0,
        }
    }

    /// TCP connect, CONNECT, and return the CONNACK.
    pub async fn connect_with(addr: SocketAddr, opts: &ConnectOpts) -> (RawClient, ConnectAck) {
        let mut c = RawClient::tcp(addr).await;
        c.send(opts.packet()).await;
        match c.recv().await {
            Some(Packet::ConnectAck(ack)) => (c, ack),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    /// Connects and asserts the connection is accepted.
    pub async fn connect(addr: SocketAddr, opts: &ConnectOpts) -> RawClient {
        let (c, ack) = Self::connect_with(addr, opts).await;
        assert_eq!(
            ack.return_code,
            ConnectAckReason::ConnectionAccepted,
            "CONNACK for {}",
            opts.client_id
        );
        c
    }

    pub fn next_packet_id(&mut self) -> std::num::NonZeroU16 {
        self.next_id = self.next_id.wrapping_add(1).max(1);
        std::num::NonZeroU16::new(self.next_id).expect("non-zero")
    }

    pub async fn send(&mut self, packet: Packet) {
        let mut buf = BytesMut::new();
        self.codec.encode(packet, &mut buf).expect("encode");
        self.send_raw(&buf).await;
    }

    /// Sends without panicking; false when the connection is gone.
    pub async fn try_send(&mut self, packet: Packet) -> bool {
        let mut buf = BytesMut::new();
        self.codec.encode(packet, &mut buf).expect("encode");
        self.stream.write_all(&buf).await.is_ok()
    }

    /// Sends packets in one write: the broker reads them at once (what a
    /// busy client's socket holds).
    pub async fn send_all(&mut self, packets: Vec<Packet>) {
        let mut buf = BytesMut::new();
        for p in packets {
            self.codec.encode(p, &mut buf).expect("encode");
        }
        self.send_raw(&buf).await;
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }

    /// Next packet within `d`: `Err` on timeout, `Ok(None)` when the
    /// broker closed the connection.
    pub async fn recv_within(
        &mut self,
        d: Duration,
    ) -> Result<Option<Packet>, tokio::time::error::Elapsed> {
        tokio::time::timeout(d, async {
            loop {
                if let Some((p, _)) = self
                    .codec
                    .decode(&mut self.rbuf)
                    .expect("broker sent a malformed packet")
                {
                    return Some(p);
                }
                match self.stream.read_buf(&mut self.rbuf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        })
        .await
    }

    /// Next packet; panics if none arrives within [`WAIT`].
    pub async fn recv(&mut self) -> Option<Packet> {
        self.recv_within(WAIT)
            .await
            .expect("timed out waiting for a packet")
    }

    /// Asserts the broker closes the connection (within [`WAIT`]), with no
    /// packet before.
    pub async fn expect_closed(&mut self) {
        match self.recv().await {
            None => {}
            Some(p) => panic!("expected the connection to be closed, got {p:?}"),
        }
    }

    /// Asserts nothing arrives for [`QUIET`].
    pub async fn expect_nothing(&mut self) {
        if let Ok(p) = self.recv_within(QUIET).await {
            panic!("expected nothing, got {p:?}");
        }
    }

    pub async fn subscribe_many(&mut self, filters: &[(&str, QoS)]) -> Vec<SubscribeReturnCode> {
        let packet_id = self.next_packet_id();
        let topic_filters = filters
            .iter()
            .map(|(f, q)| (ByteString::from(*f), *q))
            .collect();
        self.send(Packet::Subscribe {
            packet_id,
            topic_filters,
        })
        .await;
        match self.recv().await {
            Some(Packet::SubscribeAck {
                packet_id: id,
                status,
            }) => {
                assert_eq!(id, packet_id);
                status
            }
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    pub async fn subscribe(&mut self, filter: &str, qos: QoS) -> SubscribeReturnCode {
        self.subscribe_many(&[(filter, qos)]).await[0]
    }

    pub async fn unsubscribe(&mut self, filter: &str) {
        let packet_id = self.next_packet_id();
        self.send(Packet::Unsubscribe {
            packet_id,
            topic_filters: vec![filter.into()],
        })
        .await;
        match self.recv().await {
            Some(Packet::UnsubscribeAck { packet_id: id }) => assert_eq!(id, packet_id),
            other => panic!("expected UNSUBACK, got {other:?}"),
        }
    }

    /// Publishes and completes the QoS flow (waits for PUBACK / PUBREC+PUBCOMP).
    pub async fn publish(&mut self, topic: &str, payload: &[u8], qos: QoS, retain: bool) {
        let packet_id = (qos != QoS::AtMostOnce).then(|| self.next_packet_id());
        self.send(publish_packet(
            topic, payload, qos, retain, packet_id, false,
        ))
        .await;
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => match self.recv().await {
                Some(Packet::PublishAck { packet_id: id }) => assert_eq!(Some(id), packet_id),
                other => panic!("expected PUBACK, got {other:?}"),
            },
            QoS::ExactlyOnce => {
                let id = packet_id.expect("id");
                match self.recv().await {
                    Some(Packet::PublishReceived { packet_id: got }) => assert_eq!(got, id),
                    other => panic!("expected PUBREC, got {other:?}"),
                }
                self.send(Packet::PublishRelease { packet_id: id }).await;
                match self.recv().await {
                    Some(Packet::PublishComplete { packet_id: got }) => assert_eq!(got, id),
                    other => panic!("expected PUBCOMP, got {other:?}"),
                }
            }
        }
    }

    /// Next packet must be a PUBLISH; it is returned without acknowledging it.
    pub async fn expect_publish(&mut self) -> Received {
        match self.recv().await {
            Some(Packet::Publish(p)) => Received {
                topic: p.topic.to_string(),
                payload: p.payload.to_vec(),
                qos: p.qos.value(),
                retain: p.retain,
                dup: p.dup,
                packet_id: p.packet_id.map(|i| i.get()),
            },
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }

    /// Receives a PUBLISH and completes its QoS flow as a subscriber.
    pub async fn receive(&mut self) -> Received {
        let r = self.expect_publish().await;
        self.ack(&r).await;
        r
    }

    /// Acknowledges a received PUBLISH (PUBACK, or PUBREC/PUBREL/PUBCOMP).
    pub async fn ack(&mut self, r: &Received) {
        let Some(id) = r.packet_id.and_then(std::num::NonZeroU16::new) else {
            return;
        };
        if r.qos == 1 {
            self.send(Packet::PublishAck { packet_id: id }).await;
        } else if r.qos == 2 {
            self.send(Packet::PublishReceived { packet_id: id }).await;
            match self.recv().await {
                Some(Packet::PublishRelease { packet_id: got }) => assert_eq!(got, id),
                other => panic!("expected PUBREL, got {other:?}"),
            }
            self.send(Packet::PublishComplete { packet_id: id }).await;
        }
    }

    pub async fn disconnect(mut self) {
        self.send(Packet::Disconnect).await;
        let _ = self.stream.shutdown().await;
    }

    /// Drops the TCP connection without DISCONNECT (the will must fire).
    pub fn kill(self) {
        drop(self.stream);
    }
}

pub fn publish_packet(
    topic: &str,
    payload: &[u8],
    qos: QoS,
    retain: bool,
    packet_id: Option<std::num::NonZeroU16>,
    dup: bool,
) -> Packet {
    Packet::Publish(Box::new(rmqtt_codec::types::Publish {
        dup,
        retain,
        qos,
        topic: ByteString::from(topic),
        packet_id,
        payload: Bytes::copy_from_slice(payload),
        properties: None,
    }))
}
