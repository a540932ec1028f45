//! The store-and-forward buffer: every message bound upstream is appended
//! to one SQLite file (`data_dir/buffer.sqlite`, WAL) before its publisher
//! is acknowledged, and deleted only when the cloud acknowledged that very
//! message.
//!
//! One writer thread owns the database. Appends, acknowledgements and reads
//! reach it over a channel; it takes everything waiting and applies it in
//! one transaction (group commit: one fsync for many messages), then
//! publishes the highest sequence number now settled on a watch channel —
//! connections hold their clients' PUBACKs until it passes theirs.
//!
//! Sequence numbers are per gateway, strictly increasing, and survive
//! restarts (kept in the database even when the buffer is empty): the
//! upstream can send them along so consumers drop duplicates.
//!
//! This file holds the handle the rest of the gateway uses ([`Buffer`],
//! its settings and errors). The writer thread is in `writer`, the
//! `when_full` decision in `policy`, the memory-first tier in `memory`,
//! the schema and statements in `sqlite`, corrupt-file recovery in
//! `recovery`, the counters in `stats`, and `[buffer]` of the
//! configuration in `config`.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use thiserror::Error;
use tokio::sync::{oneshot, watch};
use tracing::{error, info};

use crate::health::Heartbeat;
use crate::message::{Durability, Message, Seq};

pub mod config;
mod memory;
mod policy;
mod recovery;
mod sqlite;
mod stats;
mod writer;

pub use config::{BufferConfig, SyncMode, WhenFull};
pub use sqlite::Row;
pub use stats::BufferStats;
use writer::Writer;

#[derive(Debug, Error)]
pub enum BufferError {
    #[error("buffer database {path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("cannot create {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the buffer's writer thread has stopped")]
    Stopped,
}

/// Limits and durability.
#[derive(Debug, Clone)]
pub struct BufferSettings {
    pub path: PathBuf,
    pub max_bytes: u64,
    pub max_age: Option<Duration>,
    pub when_full: WhenFull,
    pub sync: SyncMode,
    /// Memory-first mode: while the cloud is reachable, keep up to this many
    /// new messages in memory only (a crash loses them); `None`: every
    /// message goes to disk.
    pub memory_first: Option<usize>,
}

enum Cmd {
    Append {
        row: Row,
        durability: Durability,
    },
    Ack(Seq),
    Fetch {
        after: Seq,
        limit: usize,
        reply: oneshot::Sender<Vec<Row>>,
    },
    Oldest(oneshot::Sender<Option<i64>>),
    /// The upstream link is up (memory-first mode keeps new rows in
    /// memory) or down (they go to disk, and so does what memory holds).
    Online(bool),
}

/// A handle on the buffer; clones share it.
#[derive(Clone)]
pub struct Buffer {
    inner: Arc<Inner>,
}

struct Inner {
    /// The next sequence number and the channel, under one lock so that
    /// commands arrive in sequence order.
    tx: Mutex<(u64, mpsc::Sender<Cmd>)>,
    settled: watch::Receiver<Seq>,
    stats: Arc<BufferStats>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    heartbeat: Arc<Heartbeat>,
}

impl Buffer {
    /// Opens (or creates) the buffer and starts its writer thread. A file
    /// that is not a readable database is moved aside (`.broken-<time>`) and
    /// a fresh buffer started, with an error in the log.
    pub fn open(settings: BufferSettings) -> Result<Buffer, BufferError> {
        if let Some(dir) = settings.path.parent() {
            crate::files::create_private_dir(dir).map_err(|source| BufferError::Io {
                path: dir.to_owned(),
                source,
            })?;
        }
        let stats = Arc::new(BufferStats::default());
        let (db, next_seq) = recovery::open(&settings, &stats)?;
        let (depth, bytes) = db.depth()?;
        stats.depth.store(depth, Ordering::Relaxed);
        stats.bytes.store(bytes, Ordering::Relaxed);
        info!(path = %settings.path.display(), messages = depth, bytes, next_seq, "buffer opened");
        let (tx, rx) = mpsc::channel();
        let (settled_tx, settled) = watch::channel(Seq(next_seq - 1));
        let heartbeat = Heartbeat::new("buffer writer");
        let writer = Writer::new(
            db,
            settings,
            stats.clone(),
            settled_tx,
            heartbeat.clone(),
            next_seq,
        );
        let thread = std::thread::Builder::new()
            .name("buffer-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|source| BufferError::Io {
                path: PathBuf::from("buffer-writer thread"),
                source,
            })?;
        Ok(Buffer {
            inner: Arc::new(Inner {
                tx: Mutex::new((next_seq, tx)),
                settled,
                stats,
                thread: Mutex::new(Some(thread)),
                heartbeat,
            }),
        })
    }

    /// Appends a message as it goes to the cloud (its topic and QoS those
    /// of the upstream rule); returns its sequence number. It is durable
    /// once [`Buffer::settled`] reaches it.
    pub fn append(&self, message: Message, durability: Durability) -> Seq {
        let mut g = self.inner.tx.lock().unwrap_or_else(|e| e.into_inner());
        let seq = Seq(g.0);
        g.0 += 1;
        let row = Row {
            seq,
            topic: message.topic,
            payload: message.payload,
            qos: message.qos,
            retain: message.retain,
            ts_ms: ms(message.received_at),
        };
        if g.1.send(Cmd::Append { row, durability }).is_err() {
            error!(%seq, "buffer writer stopped: message not stored");
        }
        seq
    }

    /// The cloud acknowledged this message: delete it.
    pub fn ack(&self, seq: Seq) {
        let g = self.inner.tx.lock().unwrap_or_else(|e| e.into_inner());
        let _ = g.1.send(Cmd::Ack(seq));
    }

    /// Up to `limit` stored messages after `after`, oldest first.
    pub async fn fetch(&self, after: Seq, limit: usize) -> Result<Vec<Row>, BufferError> {
        let (reply, rx) = oneshot::channel();
        {
            let g = self.inner.tx.lock().unwrap_or_else(|e| e.into_inner());
            g.1.send(Cmd::Fetch {
                after,
                limit,
                reply,
            })
            .map_err(|_| BufferError::Stopped)?;
        }
        rx.await.map_err(|_| BufferError::Stopped)
    }

    /// Tells the buffer whether the cloud is reachable (memory-first mode).
    pub fn set_online(&self, online: bool) {
        let g = self.inner.tx.lock().unwrap_or_else(|e| e.into_inner());
        let _ = g.1.send(Cmd::Online(online));
    }

    /// Receive time (ms since the epoch) of the oldest stored message.
    pub async fn oldest(&self) -> Option<i64> {
        let (reply, rx) = oneshot::channel();
        {
            let g = self.inner.tx.lock().unwrap_or_else(|e| e.into_inner());
            g.1.send(Cmd::Oldest(reply)).ok()?;
        }
        rx.await.ok().flatten()
    }

    /// Highest sequence number up to which every append is settled.
    pub fn settled(&self) -> watch::Receiver<Seq> {
        self.inner.settled.clone()
    }

    pub fn stats(&self) -> &Arc<BufferStats> {
        &self.inner.stats
    }

    /// The writer thread's liveness, for the watchdog.
    pub fn heartbeat(&self) -> &Arc<Heartbeat> {
        &self.inner.heartbeat
    }

    /// Writes what is pending and stops the writer thread.
    pub fn close(&self) {
        let mut g = self.inner.tx.lock().unwrap_or_else(|e| e.into_inner());
        // Replacing the sender ends the writer's loop once it has drained.
        let (dead, _) = mpsc::channel();
        g.1 = dead;
        drop(g);
        let thread = self
            .inner
            .thread
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

fn ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
pub(super) mod tests {
    use std::path::Path;

    use rusqlite::Connection;

    use super::*;
    use crate::message::{Durability, Message, Origin, QoS, Seq};

    // Helpers for the tests here and in the submodules (through a buffer
    // on a temporary directory).

    pub(super) fn settings(dir: &Path, max_bytes: u64, when_full: WhenFull) -> BufferSettings {
        BufferSettings {
            path: dir.join("buffer.sqlite"),
            max_bytes,
            max_age: None,
            when_full,
            sync: SyncMode::Normal,
            memory_first: None,
        }
    }

    /// Rows on disk, read with a second connection (not through the buffer).
    pub(super) fn on_disk(dir: &Path) -> Vec<u64> {
        let c = Connection::open(dir.join("buffer.sqlite")).unwrap();
        let mut st = c.prepare("SELECT seq FROM outbox ORDER BY seq").unwrap();
        st.query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    pub(super) async fn disk_writes(b: &Buffer, want: u64) {
        let s = b.stats().clone();
        for _ in 0..500 {
            if BufferStats::get(&s.disk_writes) == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("disk_writes {} != {want}", BufferStats::get(&s.disk_writes));
    }

    pub(super) fn append(b: &Buffer, topic: &str, payload: &str) -> u64 {
        let m = Message::new(
            topic.to_owned(),
            payload.to_owned(),
            QoS::AtLeastOnce,
            false,
            Origin::Broker,
        );
        b.append(m, Durability::PublisherWaits).0
    }

    pub(super) async fn settled(b: &Buffer, seq: u64) {
        let mut w = b.settled();
        tokio::time::timeout(Duration::from_secs(5), w.wait_for(|s| s.0 >= seq))
            .await
            .expect("settled in time")
            .unwrap();
    }

    #[tokio::test]
    async fn appended_rows_are_read_in_order_and_deleted_on_ack() {
        let dir = tempfile::tempdir().unwrap();
        let b = Buffer::open(settings(dir.path(), 1 << 20, WhenFull::DropOldest)).unwrap();
        let seqs: Vec<u64> = (0..10).map(|i| append(&b, "t", &format!("{i}"))).collect();
        assert_eq!(seqs, (1..=10).collect::<Vec<_>>());
        settled(&b, 10).await;
        let rows = b.fetch(Seq(0), 100).await.unwrap();
        assert_eq!(rows.len(), 10);
        assert_eq!(&rows[3].payload[..], b"3");
        let rows = b.fetch(Seq(4), 3).await.unwrap();
        assert_eq!(rows.iter().map(|r| r.seq.0).collect::<Vec<_>>(), [5, 6, 7]);
        b.ack(Seq(1));
        b.ack(Seq(2));
        b.ack(Seq(2)); // twice: counted once
        append(&b, "t", "x");
        settled(&b, 11).await;
        assert_eq!(b.fetch(Seq(0), 1).await.unwrap()[0].seq.0, 3);
        assert_eq!(BufferStats::get(&b.stats().forwarded), 2);
        assert_eq!(BufferStats::get(&b.stats().depth), 9);
    }

    #[tokio::test]
    async fn rows_and_sequence_numbers_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let b = Buffer::open(settings(dir.path(), 1 << 20, WhenFull::DropOldest)).unwrap();
        for i in 0..5 {
            append(&b, "t", &format!("{i}"));
        }
        settled(&b, 5).await;
        for s in 1..=5 {
            b.ack(Seq(s));
        }
        append(&b, "t", "kept");
        settled(&b, 6).await;
        b.close();
        let b = Buffer::open(settings(dir.path(), 1 << 20, WhenFull::DropOldest)).unwrap();
        let rows = b.fetch(Seq(0), 10).await.unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!((rows[0].seq.0, &rows[0].payload[..]), (6, &b"kept"[..]));
        assert_eq!(append(&b, "t", "next"), 7, "sequence numbers never go back");
        b.ack(Seq(6));
        b.ack(Seq(7));
        settled(&b, 7).await;
        b.fetch(Seq(0), 1).await.unwrap();
        b.close();
        let b = Buffer::open(settings(dir.path(), 1 << 20, WhenFull::DropOldest)).unwrap();
        assert_eq!(append(&b, "t", "after empty"), 8);
    }
}
