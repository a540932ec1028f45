//! The publisher task, the load generator's hot loop: publishes until told
//! to stop, flat out in batches or paced by a token bucket, within a window
//! of unacknowledged QoS 1/2 messages (`Pipe`), then waits a while for the
//! last acknowledgements.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::{Buf, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::time::MissedTickBehavior;

use super::client::{self, Conn, Packet};
use super::{stats, Plan, Shared, AUTO_BATCH_BYTES, KEEP_ALIVE_S};

/// How long stopped QoS 1/2 publishers wait for their last acknowledgements.
const ACK_WAIT: Duration = Duration::from_secs(5);
/// Paced publishers send what is due once per tick.
const PACE_TICK: Duration = Duration::from_millis(1);

/// Publishes until `shared.stop`, then waits (a while) for outstanding
/// acknowledgements; returns the connection and how many stayed unacknowledged.
///
/// Flat out, it encodes a batch per write and, at QoS 1/2, refills the window
/// in chunks of a quarter of it (one write per chunk, not one per
/// acknowledgement). Paced, it sends what the token bucket allows each
/// millisecond.
pub async fn publisher(
    i: u32,
    mut conn: Conn,
    plan: Arc<Plan>,
    shared: Arc<Shared>,
) -> anyhow::Result<(Conn, usize)> {
    let topic = if plan.fan_in {
        format!("{}/all", plan.topic)
    } else {
        format!("{}/{i}", plan.topic)
    };
    let mut payload: Vec<u8> = (0..plan.payload_size).map(|b| b as u8).collect();
    let qos = plan.qos;
    let paced = plan.rate_per_publisher > 0.0;
    let mut p = Pipe {
        i,
        inflight: 0,
        awaiting_rec: 0,
        pending_rel: 0,
        wbuf: BytesMut::with_capacity(AUTO_BATCH_BYTES * 2),
    };
    let (mut seq, mut next_id) = (0u64, 0u16);
    // Token bucket: tokens accrue at the publisher's rate, at most 50 ms worth.
    let bucket_max = (plan.rate_per_publisher * 0.05).max(1.0);
    let mut tokens = 0.0f64;
    let mut refilled = Instant::now();
    let mut tick = tokio::time::interval(PACE_TICK);
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let refill_at = (plan.window / 4).clamp(1, plan.batch);
    let mut pinged = Instant::now();
    let ping_every = Duration::from_secs(u64::from(KEEP_ALIVE_S) / 2);

    while !shared.stop.load(Ordering::Acquire) {
        let free = if qos > 0 {
            plan.window - p.inflight
        } else {
            usize::MAX
        };
        let n = if paced {
            let now = Instant::now();
            tokens = (tokens
                + now.duration_since(refilled).as_secs_f64() * plan.rate_per_publisher)
                .min(bucket_max);
            refilled = now;
            (tokens as usize).min(free)
        } else if free >= refill_at {
            plan.batch.min(free)
        } else {
            0
        };
        for _ in 0..n {
            stats::write_header(&mut payload, i, seq, shared.now_ns());
            next_id = next_id.wrapping_add(1).max(1);
            client::encode_publish(&mut p.wbuf, topic.as_bytes(), &payload, qos, next_id);
            seq += 1;
        }
        if n > 0 {
            if qos > 0 {
                p.inflight += n;
            }
            if qos == 2 {
                p.awaiting_rec += n;
            }
            if paced {
                tokens -= n as f64;
            }
            shared.sent[i as usize].store(seq, Ordering::Release);
        }
        if pinged.elapsed() >= ping_every {
            client::encode_pingreq(&mut p.wbuf);
            pinged = Instant::now();
        }
        if n > 0 || paced || p.rels_due(refill_at) {
            p.flush(&mut conn).await?;
        }
        if qos > 0 {
            // Take whatever acknowledgements are there without waiting.
            for _ in 0..4 {
                match conn
                    .try_read()
                    .with_context(|| format!("publisher {i}: reading from the broker"))?
                {
                    Some(0) => bail!("publisher {i}: the broker closed the connection"),
                    Some(_) => {}
                    None => break,
                }
            }
            p.take_acks(&mut conn)?;
        }
        if paced {
            if qos > 0 {
                tokio::select! {
                    _ = tick.tick() => {}
                    r = conn.read() => p.after_read(&mut conn, r)?,
                }
            } else {
                tick.tick().await;
            }
        } else if qos > 0 && plan.window - p.inflight < refill_at {
            // Window (nearly) full: answer the PUBRECs read so far, then wait.
            if p.rels_due(refill_at) {
                p.flush(&mut conn).await?;
            }
            let r = conn.read().await;
            p.after_read(&mut conn, r)?;
        } else {
            tokio::task::yield_now().await;
        }
    }

    // Stopped: finish the QoS 1/2 exchanges in flight.
    let give_up = tokio::time::Instant::now() + ACK_WAIT;
    loop {
        p.flush(&mut conn).await?;
        if p.inflight == 0 {
            break;
        }
        match tokio::time::timeout_at(give_up, conn.read()).await {
            Ok(Ok(0)) | Err(_) => break,
            Ok(r) => p.after_read(&mut conn, r)?,
        }
    }
    Ok((conn, p.inflight))
}

/// A publisher's outgoing buffer and window.
struct Pipe {
    i: u32,
    /// Messages not completely acknowledged (PUBACK, PUBCOMP).
    inflight: usize,
    /// QoS 2 messages without their PUBREC yet.
    awaiting_rec: usize,
    /// PUBRELs in `wbuf`, not written yet.
    pending_rel: usize,
    wbuf: BytesMut,
}

impl Pipe {
    async fn flush(&mut self, conn: &mut Conn) -> anyhow::Result<()> {
        if !self.wbuf.is_empty() {
            let i = self.i;
            conn.writer
                .write_all(&self.wbuf)
                .await
                .with_context(|| format!("publisher {i}: writing to the broker"))?;
            self.wbuf.clear();
            self.pending_rel = 0;
        }
        Ok(())
    }

    /// Whether the PUBRELs in `wbuf` should go now: flat out, they are
    /// written with the next batch of PUBLISH or once a chunk of them
    /// accumulated, or when no other PUBREC is coming to add to them.
    fn rels_due(&self, chunk: usize) -> bool {
        !self.wbuf.is_empty() && (self.pending_rel >= chunk || self.awaiting_rec == 0)
    }

    fn after_read(&mut self, conn: &mut Conn, read: std::io::Result<usize>) -> anyhow::Result<()> {
        let i = self.i;
        if read.with_context(|| format!("publisher {i}: reading from the broker"))? == 0 {
            bail!("publisher {i}: the broker closed the connection");
        }
        self.take_acks(conn)
    }

    /// Processes the acknowledgements read so far: PUBACK and PUBCOMP free a
    /// slot of the window, PUBREC is answered with PUBREL.
    fn take_acks(&mut self, conn: &mut Conn) -> anyhow::Result<()> {
        while let Some((packet, used)) = client::decode(&conn.rbuf)? {
            match packet {
                Packet::PubAck(_) | Packet::PubComp(_) => {
                    self.inflight = self.inflight.saturating_sub(1)
                }
                Packet::PubRec(id) => {
                    client::encode_ack(&mut self.wbuf, client::PUBREL, id);
                    self.awaiting_rec = self.awaiting_rec.saturating_sub(1);
                    self.pending_rel += 1;
                }
                _ => {}
            }
            conn.rbuf.advance(used);
        }
        Ok(())
    }
}
