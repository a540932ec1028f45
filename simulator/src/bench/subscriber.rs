//! The subscriber task: reads, acknowledges (QoS 1/2) and tallies what the
//! broker delivers (`stats::Tally`) until told to stop.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;
use tokio::time::MissedTickBehavior;

use super::client::{self, Conn, Packet};
use super::stats::{self, Tally};
use super::{Plan, Shared, KEEP_ALIVE_S};

/// Receives, acknowledges and tallies until told to stop. Returns the
/// connection (unless the broker closed it, then why) and the tally.
pub async fn subscriber(
    mut conn: Conn,
    plan: Arc<Plan>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<(Option<Conn>, Tally, Option<String>)> {
    let mut tally = Tally::new(plan.publishers as usize);
    let mut wbuf = BytesMut::with_capacity(16 * 1024);
    let mut ping = tokio::time::interval(Duration::from_secs(u64::from(KEEP_ALIVE_S) / 2));
    ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
    ping.tick().await;
    let mut rx_ns = shared.now_ns();
    let dropped = loop {
        let measure_from = shared.measure_from_ns.load(Ordering::Relaxed);
        let (mut new, mut dup) = (0u64, 0u64);
        while let Some((packet, used)) = client::decode(&conn.rbuf)? {
            match packet {
                Packet::Publish {
                    qos,
                    packet_id,
                    payload,
                    ..
                } => {
                    match tally.record(payload, rx_ns, measure_from) {
                        stats::Receipt::New => new += 1,
                        stats::Receipt::Duplicate => dup += 1,
                        stats::Receipt::Malformed => {}
                    }
                    match qos {
                        1 => client::encode_ack(&mut wbuf, client::PUBACK, packet_id),
                        2 => client::encode_ack(&mut wbuf, client::PUBREC, packet_id),
                        _ => {}
                    }
                }
                Packet::PubRel(id) => client::encode_ack(&mut wbuf, client::PUBCOMP, id),
                _ => {}
            }
            conn.rbuf.advance(used);
        }
        if new > 0 {
            shared.received.fetch_add(new, Ordering::AcqRel);
            shared.last_receive_ns.fetch_max(rx_ns, Ordering::AcqRel);
        }
        if dup > 0 {
            shared.duplicated.fetch_add(dup, Ordering::Relaxed);
        }
        if !wbuf.is_empty() {
            if let Err(e) = conn.writer.write_all(&wbuf).await {
                break Some(format!("writing to the broker: {e}"));
            }
            wbuf.clear();
        }
        // Let the other connections run before reading again: under load,
        // more messages arrive meanwhile, so fewer reads and ack writes per
        // message; idle, it costs next to nothing.
        tokio::task::yield_now().await;
        tokio::select! {
            biased;
            r = conn.read() => match r {
                Ok(0) => break Some("the broker closed the connection".to_string()),
                Ok(_) => rx_ns = shared.now_ns(),
                Err(e) => break Some(format!("reading from the broker: {e}")),
            },
            _ = stop.changed() => break None,
            _ = ping.tick() => client::encode_pingreq(&mut wbuf),
        }
    };
    Ok((dropped.is_none().then_some(conn), tally, dropped))
}
