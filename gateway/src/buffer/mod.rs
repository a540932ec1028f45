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

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use rusqlite::{params, Connection, OptionalExtension};
use thiserror::Error;
use tokio::sync::{oneshot, watch};
use tracing::{error, info, warn};

use crate::config::{SyncMode, WhenFull};
use crate::health::Heartbeat;

mod recovery;
mod sqlite;
mod stats;

use recovery::is_corrupt;
use sqlite::Db;
pub use sqlite::Row;
pub use stats::BufferStats;

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
        publisher_waits: bool,
    },
    Ack(u64),
    Fetch {
        after: u64,
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
    settled: watch::Receiver<u64>,
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
        let (settled_tx, settled) = watch::channel(next_seq - 1);
        let heartbeat = Heartbeat::new("buffer writer");
        let writer = Writer {
            heartbeat: heartbeat.clone(),
            db,
            settings,
            stats: stats.clone(),
            settled: settled_tx,
            waiting: VecDeque::new(),
            mem: BTreeMap::new(),
            online: false,
            last_expiry: Instant::now(),
            next_seq,
            highest: next_seq - 1,
        };
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

    /// Appends a message; returns its sequence number. It is durable once
    /// [`Buffer::settled`] reaches it.
    pub fn append(
        &self,
        topic: String,
        payload: Bytes,
        qos: u8,
        retain: bool,
        received_at: SystemTime,
        publisher_waits: bool,
    ) -> u64 {
        let mut g = self.inner.tx.lock().unwrap_or_else(|e| e.into_inner());
        let seq = g.0;
        g.0 += 1;
        let row = Row {
            seq,
            topic,
            payload,
            qos,
            retain,
            ts_ms: ms(received_at),
        };
        if g.1
            .send(Cmd::Append {
                row,
                publisher_waits,
            })
            .is_err()
        {
            error!(seq, "buffer writer stopped: message not stored");
        }
        seq
    }

    /// The cloud acknowledged this message: delete it.
    pub fn ack(&self, seq: u64) {
        let g = self.inner.tx.lock().unwrap_or_else(|e| e.into_inner());
        let _ = g.1.send(Cmd::Ack(seq));
    }

    /// Up to `limit` stored messages after `after`, oldest first.
    pub async fn fetch(&self, after: u64, limit: usize) -> Result<Vec<Row>, BufferError> {
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
    pub fn settled(&self) -> watch::Receiver<u64> {
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

/// QoS 0 messages kept in memory at most while the file cannot be written.
const MAX_PENDING_QOS0: usize = 10_000;

struct Writer {
    heartbeat: Arc<Heartbeat>,
    db: Db,
    settings: BufferSettings,
    stats: Arc<BufferStats>,
    settled: watch::Sender<u64>,
    /// Appends held while the buffer is full under `block`.
    waiting: VecDeque<Row>,
    /// Memory-first mode: rows accepted but not on disk. Always newer than
    /// every row on disk (anything that goes to disk spills these first).
    mem: BTreeMap<u64, Row>,
    online: bool,
    last_expiry: Instant,
    next_seq: u64,
    /// Highest sequence number applied (stored, dropped or held).
    highest: u64,
}

/// What one group commit changes.
#[derive(Default)]
struct Batch {
    appends: Vec<(Row, bool)>,
    acks: Vec<u64>,
    fetches: Vec<(u64, usize, oneshot::Sender<Vec<Row>>)>,
    oldest: Vec<oneshot::Sender<Option<i64>>>,
    highest: u64,
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Cmd>) {
        let mut retry: Option<Batch> = None;
        loop {
            // At least every second (the idle wait below), unless a call
            // into SQLite hangs.
            self.heartbeat.beat();
            let mut batch = retry.take().unwrap_or_default();
            let first = if batch.appends.is_empty() && batch.acks.is_empty() {
                match rx.recv_timeout(Duration::from_secs(1)) {
                    Ok(c) => Some(c),
                    Err(mpsc::RecvTimeoutError::Timeout) => None,
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        // Shutting down: what memory holds goes to disk.
                        self.online = false;
                        if self.waiting.is_empty() && self.mem.is_empty() {
                            return;
                        }
                        if self.waiting.is_empty() {
                            if let Err(e) = self.apply(&mut Batch::default()) {
                                error!(error = %e, messages = self.mem.len(), "cannot save the in-memory messages at shutdown: they are lost");
                            }
                            return;
                        }
                        None
                    }
                }
            } else {
                None
            };
            // Group commit: everything already waiting, up to a bound.
            let mut taken = 0usize;
            let more = std::iter::from_fn(|| {
                taken += 1;
                (taken < 8192).then(|| rx.try_recv().ok()).flatten()
            });
            for cmd in first.into_iter().chain(more) {
                match cmd {
                    Cmd::Append {
                        row,
                        publisher_waits,
                    } => {
                        batch.highest = batch.highest.max(row.seq);
                        batch.appends.push((row, publisher_waits));
                    }
                    Cmd::Ack(seq) => batch.acks.push(seq),
                    Cmd::Fetch {
                        after,
                        limit,
                        reply,
                    } => batch.fetches.push((after, limit, reply)),
                    Cmd::Oldest(reply) => batch.oldest.push(reply),
                    Cmd::Online(online) => self.online = online,
                }
            }
            match self.apply(&mut batch) {
                Ok(()) => {
                    self.highest = self.highest.max(batch.highest);
                    self.publish_settled();
                    self.answer(batch);
                }
                Err(e) => {
                    self.stats.write_errors.fetch_add(1, Ordering::Relaxed);
                    error!(error = %e, pending = batch.appends.len(), "buffer write failed (disk full?); retrying every 500 ms, QoS 1/2 publishers wait for their PUBACK");
                    self.bound_pending_qos0(&mut batch);
                    if is_corrupt(&e) {
                        self.recover();
                    }
                    // Reads can be answered from what is stored.
                    let fetches = std::mem::take(&mut batch.fetches);
                    let oldest = std::mem::take(&mut batch.oldest);
                    self.answer(Batch {
                        fetches,
                        oldest,
                        ..Batch::default()
                    });
                    retry = Some(batch);
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
        }
    }

    /// While writes fail, QoS 1/2 appends are bounded by their publishers
    /// (each waits for its PUBACK); QoS 0 ones are not, so past
    /// MAX_PENDING_QOS0 the newest are dropped and counted.
    fn bound_pending_qos0(&mut self, batch: &mut Batch) {
        let mut qos0 = 0usize;
        let before = batch.appends.len();
        batch.appends.retain(|(_, publisher_waits)| {
            if *publisher_waits {
                return true;
            }
            qos0 += 1;
            qos0 <= MAX_PENDING_QOS0
        });
        let dropped = (before - batch.appends.len()) as u64;
        if dropped > 0 {
            self.stats
                .dropped_unwritable
                .fetch_add(dropped, Ordering::Relaxed);
            warn!(
                dropped,
                kept = MAX_PENDING_QOS0,
                "buffer unwritable: newest QoS 0 messages dropped"
            );
        }
    }

    /// All appends up to `highest` are stored or dropped; those held by
    /// `block` are not settled yet.
    fn publish_settled(&self) {
        let settled = match self.waiting.front() {
            Some(w) => w.seq - 1,
            None => self.highest,
        };
        if settled > *self.settled.borrow() {
            self.settled.send_replace(settled);
        }
    }

    /// One transaction; on failure nothing changed (appends held by
    /// `block` are held again).
    fn apply(&mut self, batch: &mut Batch) -> Result<(), BufferError> {
        let spill = self.memory_step(batch);
        let held = self.waiting.clone();
        let r = self.apply_inner(batch, &spill);
        if r.is_err() {
            self.waiting = held;
            // Nothing was written: the spilled rows are in memory again.
            self.mem.extend(spill.into_iter().map(|r| (r.seq, r)));
        } else if !spill.is_empty() {
            info!(
                messages = spill.len(),
                online = self.online,
                "in-memory messages written to disk"
            );
        }
        self.stats
            .in_memory
            .store(self.mem.len() as u64, Ordering::Relaxed);
        r
    }

    /// Memory-first mode: acknowledgements of rows held in memory never
    /// touch the disk, and new rows stay in memory while the cloud is
    /// reachable, nothing is held by `block` and the thresholds allow.
    /// Otherwise everything in memory is returned, to be written to disk
    /// before the new rows (the file stays in sequence order).
    fn memory_step(&mut self, batch: &mut Batch) -> Vec<Row> {
        let Some(limit) = self.settings.memory_first else {
            return Vec::new();
        };
        let s = &self.stats;
        let (mut depth, mut bytes) = (BufferStats::get(&s.depth), BufferStats::get(&s.bytes));
        let (mut forwarded, mut appended) = (0u64, 0u64);
        batch.acks.retain(|seq| match self.mem.remove(seq) {
            Some(row) => {
                depth -= 1;
                bytes -= row.size();
                forwarded += 1;
                false
            }
            None => true,
        });
        let incoming: u64 = batch.appends.iter().map(|(r, _)| r.size()).sum();
        let keep = self.online
            && self.waiting.is_empty()
            && self.mem.len() + batch.appends.len() <= limit
            && bytes + incoming <= self.settings.max_bytes;
        let mut spill = Vec::new();
        if keep {
            for (row, _) in batch.appends.drain(..) {
                depth += 1;
                bytes += row.size();
                appended += 1;
                self.mem.insert(row.seq, row);
            }
        } else if !self.mem.is_empty() {
            spill = std::mem::take(&mut self.mem).into_values().collect();
        }
        s.depth.store(depth, Ordering::Relaxed);
        s.bytes.store(bytes, Ordering::Relaxed);
        s.forwarded.fetch_add(forwarded, Ordering::Relaxed);
        s.appended.fetch_add(appended, Ordering::Relaxed);
        spill
    }

    fn apply_inner(&mut self, batch: &mut Batch, spill: &[Row]) -> Result<(), BufferError> {
        let path = self.db.path.clone();
        let err = |source| BufferError::Sqlite {
            path: path.clone(),
            source,
        };
        let now_ms = ms(SystemTime::now());
        let expire = self
            .settings
            .max_age
            .filter(|_| self.last_expiry.elapsed() >= Duration::from_secs(1));
        // Only appends need the fsync: a delete lost in a power cut costs a
        // duplicate, not a message. Ack-only commits skip it (WAL keeps
        // them ordered; the next fsync makes them durable too).
        let durable = !batch.appends.is_empty() || !spill.is_empty() || !self.waiting.is_empty();
        let want = if durable {
            self.settings.sync
        } else {
            SyncMode::Normal
        };
        if self.db.sync != want {
            let v = match want {
                SyncMode::Full => "FULL",
                SyncMode::Normal => "NORMAL",
            };
            self.db
                .conn
                .pragma_update(None, "synchronous", v)
                .map_err(err)?;
            self.db.sync = want;
        }
        let tx = self.db.conn.transaction().map_err(err)?;
        let mut depth = BufferStats::get(&self.stats.depth);
        let mut bytes = BufferStats::get(&self.stats.bytes);
        let (mut forwarded, mut dropped_old, mut dropped_new, mut dropped_q0, mut expired) =
            (0u64, 0u64, 0u64, 0u64, 0u64);
        let (mut appended, mut disk_writes) = (0u64, 0u64);
        {
            let mut del = tx
                .prepare_cached(
                    "DELETE FROM outbox WHERE seq = ?1 RETURNING length(topic) + length(payload)",
                )
                .map_err(err)?;
            for seq in &batch.acks {
                let size: Option<u64> = del
                    .query_row(params![seq], |r| r.get(0))
                    .optional()
                    .map_err(err)?;
                if let Some(size) = size {
                    depth -= 1;
                    bytes -= size;
                    forwarded += 1;
                }
            }
            if let Some(age) = expire {
                let cutoff = now_ms - age.as_millis() as i64;
                let (n, b): (u64, u64) = tx
                    .query_row(
                        "SELECT count(*), coalesce(sum(length(topic) + length(payload)), 0) FROM outbox WHERE ts_ms < ?1",
                        params![cutoff],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .map_err(err)?;
                if n > 0 {
                    tx.execute("DELETE FROM outbox WHERE ts_ms < ?1", params![cutoff])
                        .map_err(err)?;
                    depth -= n;
                    bytes -= b;
                    expired += n;
                    warn!(
                        messages = n,
                        max_age_secs = age.as_secs(),
                        "buffered messages expired"
                    );
                }
            }
            let mut ins = tx
                .prepare_cached(
                    "INSERT INTO outbox (seq, topic, payload, qos, retain, ts_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )
                .map_err(err)?;
            let mut oldest = tx
                .prepare_cached("SELECT seq, length(topic) + length(payload) FROM outbox ORDER BY seq LIMIT 256")
                .map_err(err)?;
            let mut del_oldest = tx
                .prepare_cached("DELETE FROM outbox WHERE seq = ?1")
                .map_err(err)?;
            // Spilled rows are counted in depth and bytes already.
            for row in spill {
                row.insert(&mut ins).map_err(err)?;
                disk_writes += 1;
            }
            // Held appends first (they are older), then the new ones.
            let mut incoming: VecDeque<(Row, bool)> =
                self.waiting.drain(..).map(|r| (r, true)).collect();
            incoming.extend(batch.appends.iter().cloned());
            while let Some((row, publisher_waits)) = incoming.pop_front() {
                let size = row.size();
                if bytes + size > self.settings.max_bytes {
                    match self.settings.when_full {
                        WhenFull::DropNewest => {
                            dropped_new += 1;
                            continue;
                        }
                        WhenFull::Block if size <= self.settings.max_bytes => {
                            if publisher_waits {
                                // Held until the cloud frees room: its
                                // publisher's PUBACK waits with it.
                                self.waiting.push_back(row);
                                for (r, w) in incoming.drain(..) {
                                    if w {
                                        self.waiting.push_back(r);
                                    } else {
                                        dropped_q0 += 1;
                                    }
                                }
                            } else {
                                dropped_q0 += 1;
                            }
                            continue;
                        }
                        WhenFull::Block => {
                            dropped_new += 1; // larger than the whole buffer
                            continue;
                        }
                        WhenFull::DropOldest => {
                            while bytes + size > self.settings.max_bytes && depth > 0 {
                                let victims: Vec<(u64, u64)> = oldest
                                    .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                                    .map_err(err)?
                                    .collect::<Result<_, _>>()
                                    .map_err(err)?;
                                if victims.is_empty() {
                                    break;
                                }
                                for (seq, vsize) in victims {
                                    if bytes + size <= self.settings.max_bytes {
                                        break;
                                    }
                                    del_oldest.execute(params![seq]).map_err(err)?;
                                    depth -= 1;
                                    bytes -= vsize;
                                    dropped_old += 1;
                                }
                            }
                            if bytes + size > self.settings.max_bytes {
                                dropped_new += 1; // larger than the whole buffer
                                continue;
                            }
                        }
                    }
                }
                row.insert(&mut ins).map_err(err)?;
                depth += 1;
                bytes += size;
                appended += 1;
                disk_writes += 1;
            }
            if batch.highest >= self.next_seq {
                self.next_seq = batch.highest + 1;
                tx.execute(
                    "INSERT INTO meta (key, value) VALUES ('next_seq', ?1)
                     ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    params![self.next_seq],
                )
                .map_err(err)?;
            }
        }
        tx.commit().map_err(err)?;
        if expire.is_some() {
            self.last_expiry = Instant::now();
        }
        let s = &self.stats;
        s.depth.store(depth, Ordering::Relaxed);
        s.bytes.store(bytes, Ordering::Relaxed);
        s.appended.fetch_add(appended, Ordering::Relaxed);
        s.disk_writes.fetch_add(disk_writes, Ordering::Relaxed);
        s.forwarded.fetch_add(forwarded, Ordering::Relaxed);
        s.dropped_oldest.fetch_add(dropped_old, Ordering::Relaxed);
        s.dropped_newest.fetch_add(dropped_new, Ordering::Relaxed);
        s.dropped_blocked_qos0
            .fetch_add(dropped_q0, Ordering::Relaxed);
        s.expired.fetch_add(expired, Ordering::Relaxed);
        if dropped_old + dropped_new + dropped_q0 > 0 {
            warn!(
                dropped_oldest = dropped_old,
                dropped_newest = dropped_new,
                dropped_qos0_blocked = dropped_q0,
                max_bytes = self.settings.max_bytes,
                policy = ?self.settings.when_full,
                "buffer full: messages dropped"
            );
        }
        batch.appends.clear();
        batch.acks.clear();
        Ok(())
    }

    fn answer(&mut self, batch: Batch) {
        for (after, limit, reply) in batch.fetches {
            let rows = match self.read(after, limit) {
                Ok(rows) => rows,
                // A page went bad under us: keep the file aside, go on
                // with what can be read out of it.
                Err(e) if is_corrupt(&e) => {
                    self.recover();
                    self.read(after, limit).unwrap_or_default()
                }
                Err(e) => {
                    error!(error = %e, "buffer read failed");
                    Vec::new()
                }
            };
            let _ = reply.send(rows);
        }
        for reply in batch.oldest {
            let ts = self
                .db
                .conn
                .query_row("SELECT ts_ms FROM outbox ORDER BY seq LIMIT 1", [], |r| {
                    r.get(0)
                })
                .optional()
                .ok()
                .flatten()
                .or_else(|| self.mem.values().next().map(|r| r.ts_ms));
            let _ = reply.send(ts);
        }
    }

    fn read(&self, after: u64, limit: usize) -> Result<Vec<Row>, BufferError> {
        let mut st = self
            .db
            .conn
            .prepare_cached(
                "SELECT seq, topic, payload, qos, retain, ts_ms FROM outbox WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            )
            .map_err(|e| self.db.err(e))?;
        let rows = st
            .query_map(params![after, limit as i64], Row::from_sql)
            .map_err(|e| self.db.err(e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.db.err(e))?;
        // Rows in memory are newer than every row on disk.
        let mut rows = rows;
        let after = rows.last().map_or(after, |r| r.seq);
        let room = limit - rows.len();
        rows.extend(
            self.mem
                .range(after + 1..)
                .take(room)
                .map(|(_, r)| r.clone()),
        );
        Ok(rows)
    }

    /// The database file is broken: keep it aside, start a fresh one. The
    /// messages still in memory (this batch) are written to the new one;
    /// those stored only in the broken file are lost, and said so.
    fn recover(&mut self) {
        let lost = BufferStats::get(&self.stats.depth);
        error!(path = %self.db.path.display(), messages_in_broken_file = lost, "buffer database corrupted");
        // Close the broken file before moving it aside.
        let Ok(dead) = Connection::open_in_memory() else {
            return;
        };
        drop(std::mem::replace(&mut self.db.conn, dead));
        match recovery::start_fresh(&self.settings) {
            Ok((db, next)) => {
                let (depth, bytes) = db.depth().unwrap_or((0, 0));
                self.db = db;
                self.next_seq = self.next_seq.max(next);
                let in_memory: u64 = self.mem.values().map(Row::size).sum();
                self.stats
                    .depth
                    .store(depth + self.mem.len() as u64, Ordering::Relaxed);
                self.stats.bytes.store(bytes + in_memory, Ordering::Relaxed);
                self.stats.recovered.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => error!(error = %e, "cannot start a fresh buffer database"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn settings(dir: &Path, max_bytes: u64, when_full: WhenFull) -> BufferSettings {
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
    fn on_disk(dir: &Path) -> Vec<u64> {
        let c = Connection::open(dir.join("buffer.sqlite")).unwrap();
        let mut st = c.prepare("SELECT seq FROM outbox ORDER BY seq").unwrap();
        st.query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    async fn disk_writes(b: &Buffer, want: u64) {
        let s = b.stats().clone();
        for _ in 0..500 {
            if BufferStats::get(&s.disk_writes) == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("disk_writes {} != {want}", BufferStats::get(&s.disk_writes));
    }

    #[tokio::test]
    async fn memory_first_stays_off_disk_online_and_spills_offline_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = settings(dir.path(), 1 << 20, WhenFull::DropOldest);
        cfg.memory_first = Some(100);
        // Offline at start: rows go to disk.
        let b = Buffer::open(cfg.clone()).unwrap();
        append(&b, "t", "disk-1");
        settled(&b, 1).await;
        assert_eq!(on_disk(dir.path()), [1]);
        // Online: new rows stay in memory, after the ones on disk.
        b.set_online(true);
        for i in 2..=10 {
            append(&b, "t", &format!("{i}"));
        }
        settled(&b, 10).await;
        assert_eq!(BufferStats::get(&b.stats().in_memory), 9);
        assert_eq!(BufferStats::get(&b.stats().depth), 10);
        assert_eq!(BufferStats::get(&b.stats().disk_writes), 1);
        let seqs = |rows: Vec<Row>| rows.iter().map(|r| r.seq).collect::<Vec<_>>();
        assert_eq!(
            seqs(b.fetch(0, 100).await.unwrap()),
            (1..=10).collect::<Vec<_>>()
        );
        assert_eq!(seqs(b.fetch(0, 3).await.unwrap()), [1, 2, 3]);
        assert_eq!(seqs(b.fetch(3, 2).await.unwrap()), [4, 5]);
        for seq in 1..=5 {
            b.ack(seq);
        }
        append(&b, "t", "11");
        settled(&b, 11).await;
        assert_eq!(BufferStats::get(&b.stats().forwarded), 5);
        assert_eq!(on_disk(dir.path()), Vec::<u64>::new());
        assert_eq!(BufferStats::get(&b.stats().disk_writes), 1);
        // The link drops: memory goes to disk.
        b.set_online(false);
        disk_writes(&b, 7).await;
        assert_eq!(on_disk(dir.path()), [6, 7, 8, 9, 10, 11]);
        assert_eq!(BufferStats::get(&b.stats().in_memory), 0);
        b.close();
        let b = Buffer::open(cfg).unwrap();
        assert_eq!(append(&b, "t", "12"), 12);
    }

    #[tokio::test]
    async fn memory_first_spills_past_its_threshold_and_at_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = settings(dir.path(), 1 << 20, WhenFull::DropOldest);
        cfg.memory_first = Some(4);
        let b = Buffer::open(cfg.clone()).unwrap();
        b.set_online(true);
        for i in 1..=3 {
            append(&b, "t", &format!("{i}"));
            settled(&b, i).await;
        }
        assert_eq!(BufferStats::get(&b.stats().disk_writes), 0);
        for i in 4..=6 {
            append(&b, "t", &format!("{i}"));
            settled(&b, i).await;
        }
        // The fifth unacknowledged row passed the threshold: all went to disk.
        assert!(BufferStats::get(&b.stats().disk_writes) >= 5);
        append(&b, "t", "7");
        settled(&b, 7).await;
        // A clean stop writes what memory holds.
        b.close();
        assert_eq!(on_disk(dir.path()), (1..=7).collect::<Vec<_>>());
    }

    fn append(b: &Buffer, topic: &str, payload: &str) -> u64 {
        b.append(
            topic.into(),
            Bytes::from(payload.to_owned()),
            1,
            false,
            SystemTime::now(),
            true,
        )
    }

    async fn settled(b: &Buffer, seq: u64) {
        let mut w = b.settled();
        tokio::time::timeout(Duration::from_secs(5), w.wait_for(|s| *s >= seq))
            .await
            .expect("settled in time")
            .unwrap();
    }

    #[tokio::test]
    async fn messages_older_than_max_age_expire_and_are_counted() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = settings(dir.path(), 1 << 20, WhenFull::DropOldest);
        cfg.max_age = Some(Duration::from_secs(3600));
        let b = Buffer::open(cfg).unwrap();
        let two_hours_ago = SystemTime::now() - Duration::from_secs(7200);
        for i in 0..3 {
            b.append(
                "t".into(),
                Bytes::from(format!("old-{i}")),
                1,
                false,
                two_hours_ago,
                true,
            );
        }
        append(&b, "t", "fresh");
        settled(&b, 4).await;
        // Expiry runs at most once a second, in the writer's next commit.
        let s = b.stats().clone();
        for _ in 0..300 {
            if BufferStats::get(&s.expired) > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(BufferStats::get(&s.expired), 3);
        assert_eq!(BufferStats::get(&s.depth), 1);
        assert_eq!(s.dropped(), 3);
        assert_eq!(on_disk(dir.path()), [4]);
        let rows = b.fetch(0, 10).await.unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(&rows[0].payload[..], b"fresh");
        b.close();
    }

    #[tokio::test]
    async fn appended_rows_are_read_in_order_and_deleted_on_ack() {
        let dir = tempfile::tempdir().unwrap();
        let b = Buffer::open(settings(dir.path(), 1 << 20, WhenFull::DropOldest)).unwrap();
        let seqs: Vec<u64> = (0..10).map(|i| append(&b, "t", &format!("{i}"))).collect();
        assert_eq!(seqs, (1..=10).collect::<Vec<_>>());
        settled(&b, 10).await;
        let rows = b.fetch(0, 100).await.unwrap();
        assert_eq!(rows.len(), 10);
        assert_eq!(&rows[3].payload[..], b"3");
        let rows = b.fetch(4, 3).await.unwrap();
        assert_eq!(rows.iter().map(|r| r.seq).collect::<Vec<_>>(), [5, 6, 7]);
        b.ack(1);
        b.ack(2);
        b.ack(2); // twice: counted once
        append(&b, "t", "x");
        settled(&b, 11).await;
        assert_eq!(b.fetch(0, 1).await.unwrap()[0].seq, 3);
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
            b.ack(s);
        }
        append(&b, "t", "kept");
        settled(&b, 6).await;
        b.close();
        let b = Buffer::open(settings(dir.path(), 1 << 20, WhenFull::DropOldest)).unwrap();
        let rows = b.fetch(0, 10).await.unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!((rows[0].seq, &rows[0].payload[..]), (6, &b"kept"[..]));
        assert_eq!(append(&b, "t", "next"), 7, "sequence numbers never go back");
        b.ack(6);
        b.ack(7);
        settled(&b, 7).await;
        b.fetch(0, 1).await.unwrap();
        b.close();
        let b = Buffer::open(settings(dir.path(), 1 << 20, WhenFull::DropOldest)).unwrap();
        assert_eq!(append(&b, "t", "after empty"), 8);
    }

    #[tokio::test]
    async fn full_buffer_policies_count_exactly() {
        // Each row: topic "t" (1) + payload 9 = 10 bytes; room for 100.
        for (policy, expect_first) in [(WhenFull::DropOldest, 51), (WhenFull::DropNewest, 1)] {
            let dir = tempfile::tempdir().unwrap();
            let b = Buffer::open(settings(dir.path(), 1000, policy)).unwrap();
            for i in 0..150 {
                append(&b, "t", &format!("{i:09}"));
            }
            settled(&b, 150).await;
            let rows = b.fetch(0, 1000).await.unwrap();
            assert_eq!(rows.len(), 100, "{policy:?}");
            assert_eq!(rows[0].seq, expect_first, "{policy:?}");
            assert_eq!(b.stats().dropped(), 50, "{policy:?}");
        }
    }

    #[tokio::test]
    async fn block_policy_holds_appends_until_acks_free_room() {
        let dir = tempfile::tempdir().unwrap();
        let b = Buffer::open(settings(dir.path(), 100, WhenFull::Block)).unwrap();
        for i in 0..15 {
            append(&b, "t", &format!("{i:09}"));
        }
        settled(&b, 10).await;
        // 11..15 wait: not settled, not stored, not dropped.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(*b.settled().borrow(), 10);
        assert_eq!(b.stats().dropped(), 0);
        for s in 1..=5 {
            b.ack(s);
        }
        settled(&b, 15).await;
        let rows = b.fetch(0, 100).await.unwrap();
        assert_eq!(rows.first().map(|r| r.seq), Some(6));
        assert_eq!(rows.last().map(|r| r.seq), Some(15));
    }

    #[tokio::test]
    async fn a_file_that_is_not_a_database_is_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("buffer.sqlite");
        std::fs::write(&path, vec![0x42u8; 8192]).unwrap();
        let b = Buffer::open(settings(dir.path(), 1 << 20, WhenFull::DropOldest)).unwrap();
        assert_eq!(BufferStats::get(&b.stats().recovered), 1);
        append(&b, "t", "fresh");
        settled(&b, 1).await;
        let kept = std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .contains(".broken-")
            })
            .count();
        assert_eq!(kept, 1);
    }

    #[tokio::test]
    async fn a_corrupted_page_keeps_the_file_aside_and_salvages_what_reads() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = settings(dir.path(), 1 << 30, WhenFull::DropOldest);
        let b = Buffer::open(cfg.clone()).unwrap();
        let payload = "x".repeat(200);
        for _ in 0..2000 {
            append(&b, "capteurs/t", &payload);
        }
        settled(&b, 2000).await;
        b.close();
        // Garbage over one page in the middle of the table.
        let path = dir.path().join("buffer.sqlite");
        let mut bytes = std::fs::read(&path).unwrap();
        let pages = bytes.len() / 4096;
        let at = pages / 2 * 4096;
        for (i, byte) in bytes[at..at + 4096].iter_mut().enumerate() {
            *byte = (i * 7 + 13) as u8;
        }
        std::fs::write(&path, &bytes).unwrap();
        let b = Buffer::open(cfg).unwrap();
        assert_eq!(BufferStats::get(&b.stats().recovered), 1);
        let depth = BufferStats::get(&b.stats().depth);
        assert!(
            depth > 1500 && depth < 2000,
            "salvaged {depth} of 2000 (one page holds ~18 rows)"
        );
        let rows = b.fetch(0, 5000).await.unwrap();
        assert_eq!(rows.len() as u64, depth);
        assert_eq!(rows.first().map(|r| r.seq), Some(1));
        assert_eq!(rows.last().map(|r| r.seq), Some(2000));
        assert!(rows.windows(2).all(|w| w[0].seq < w[1].seq));
        assert_eq!(
            append(&b, "t", "next"),
            2001,
            "sequence numbers never go back"
        );
        let kept = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".broken-"))
            .count();
        assert_eq!(kept, 1, "the broken file is kept for inspection");
    }
}
