//! Feeds arbitrary bytes to the broker's packet decoding path: framing,
//! the extra MQTT 3.1.1 checks, `rmqtt-codec`, and the topic checks the
//! broker applies to what comes out. Nothing may panic or loop.
#![no_main]

use bytes::BytesMut;
use capteurs_gateway::broker::codec::{MqttCodec, Packet};
use capteurs_gateway::broker::topic;
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
    let mut codec = MqttCodec::new(64 * 1024);
    let mut buf = BytesMut::from(data);
    // Each successful decode consumes at least two bytes, so this ends.
    for _ in 0..data.len() + 1 {
        match codec.decode(&mut buf) {
            Ok(Some(packet)) => inspect(&packet),
            Ok(None) | Err(_) => break,
        }
    }
});

fn inspect(packet: &Packet) {
    match packet {
        Packet::Publish(p) => {
            let _ = topic::validate_name(&p.topic);
        }
        Packet::Subscribe { topic_filters, .. } => {
            for (f, _) in topic_filters {
                if topic::validate_filter(f).is_ok() {
                    let _ = topic::matches(f, "capteurs/temperature/fr/aubiere/rue_chebarde");
                    let _ = topic::covers("isima/#", f);
                }
            }
        }
        Packet::Unsubscribe { topic_filters, .. } => {
            for f in topic_filters {
                let _ = topic::validate_filter(f);
            }
        }
        Packet::Connect(c) => {
            if let Some(w) = &c.last_will {
                let _ = topic::validate_name(&w.topic);
            }
        }
        _ => {}
    }
}
