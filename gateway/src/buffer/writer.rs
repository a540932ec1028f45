//! The writer thread: the only user of the database. It takes every
//! command waiting on its channel and applies them in one transaction
//! (group commit), publishes how far appends are settled, answers reads,
//! and retries a failed commit every 500 ms.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, SystemTime};

use rusqlite::Connection;
use tokio::sync::{oneshot, watch};
use tracing::{error, info, warn};

use super::memory::Memory;
use super::policy::{self, Admit};
use super::recovery::{self, is_corrupt};
use super::sqlite::{self, Db, Row, Statements};
use super::{ms, BufferError, BufferSettings, BufferStats, Cmd, SyncMode};
use crate::health::Heartbeat;
use crate::message::Seq;

/// QoS 0 messages kept in memory at most while the file cannot be written.
const MAX_PENDING_QOS0: usize = 10_000;

pub(super) struct Writer {
    heartbeat: Arc<Heartbeat>,
    db: Db,
    settings: BufferSettings,
    stats: Arc<BufferStats>,
    settled: watch::Sender<Seq>,
    /// Appends held while the buffer is full under `block`.
    waiting: VecDeque<Row>,
    /// Memory-first mode: rows accepted but not on disk.
    mem: Memory,
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
    pub(super) fn new(
        db: Db,
        settings: BufferSettings,
        stats: Arc<BufferStats>,
        settled: watch::Sender<Seq>,
        heartbeat: Arc<Heartbeat>,
        next_seq: u64,
    ) -> Writer {
        let mem = Memory::new(settings.memory_first);
        Writer {
            heartbeat,
            db,
            settings,
            stats,
            settled,
            waiting: VecDeque::new(),
            mem,
            online: false,
            last_expiry: Instant::now(),
            next_seq,
            highest: next_seq - 1,
        }
    }

    /// Applies commands until every sender is gone, then writes what
    /// memory holds and returns.
    pub(super) fn run(mut self, rx: mpsc::Receiver<Cmd>) {
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
                    Cmd::Append { row, durability } => {
                        batch.highest = batch.highest.max(row.seq.0);
                        batch.appends.push((row, durability.publisher_waits()));
                    }
                    Cmd::Ack(seq) => batch.acks.push(seq.0),
                    Cmd::Fetch {
                        after,
                        limit,
                        reply,
                    } => batch.fetches.push((after.0, limit, reply)),
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
            Some(w) => w.seq.0 - 1,
            None => self.highest,
        };
        if Seq(settled) > *self.settled.borrow() {
            self.settled.send_replace(Seq(settled));
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
            self.mem.restore(spill);
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
        let s = &self.stats;
        let (depth, bytes) = (BufferStats::get(&s.depth), BufferStats::get(&s.bytes));
        let may_keep = self.online && self.waiting.is_empty();
        let max = self.settings.max_bytes;
        let Some(step) = self
            .mem
            .step(&mut batch.acks, &mut batch.appends, may_keep, bytes, max)
        else {
            return Vec::new();
        };
        let depth = depth - step.forwarded + step.kept;
        let bytes = bytes - step.forwarded_bytes + step.kept_bytes;
        s.depth.store(depth, Ordering::Relaxed);
        s.bytes.store(bytes, Ordering::Relaxed);
        s.forwarded.fetch_add(step.forwarded, Ordering::Relaxed);
        s.appended.fetch_add(step.kept, Ordering::Relaxed);
        step.spill
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
        self.db.set_sync(want).map_err(err)?;
        let tx = self.db.conn.transaction().map_err(err)?;
        let mut depth = BufferStats::get(&self.stats.depth);
        let mut bytes = BufferStats::get(&self.stats.bytes);
        let (mut forwarded, mut dropped_old, mut dropped_new, mut dropped_q0, mut expired) =
            (0u64, 0u64, 0u64, 0u64, 0u64);
        let (mut appended, mut disk_writes) = (0u64, 0u64);
        {
            let mut st = Statements::prepare(&tx).map_err(err)?;
            for &seq in &batch.acks {
                if let Some(size) = st.delete_acked(seq).map_err(err)? {
                    depth -= 1;
                    bytes -= size;
                    forwarded += 1;
                }
            }
            if let Some(age) = expire {
                let cutoff = now_ms - age.as_millis() as i64;
                let (n, b) = sqlite::expire(&tx, cutoff).map_err(err)?;
                if n > 0 {
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
            // Spilled rows are counted in depth and bytes already.
            for row in spill {
                st.insert(row).map_err(err)?;
                disk_writes += 1;
            }
            // Held appends first (they are older), then the new ones.
            let mut incoming: VecDeque<(Row, bool)> =
                self.waiting.drain(..).map(|r| (r, true)).collect();
            incoming.extend(batch.appends.iter().cloned());
            while let Some((row, publisher_waits)) = incoming.pop_front() {
                let size = row.size();
                let max = self.settings.max_bytes;
                match policy::admit(bytes, size, max, self.settings.when_full) {
                    Admit::Store => {}
                    Admit::DropNewest => {
                        dropped_new += 1;
                        continue;
                    }
                    Admit::Hold => {
                        if publisher_waits {
                            // Held until the cloud frees room: its
                            // publisher's PUBACK waits with it, and so do
                            // those of every later message (order).
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
                    Admit::Evict { bytes: need } => {
                        let mut freed = 0u64;
                        while freed < need && depth > 0 {
                            let victims = st.oldest().map_err(err)?;
                            if victims.is_empty() {
                                break;
                            }
                            for (seq, vsize) in victims {
                                if freed >= need {
                                    break;
                                }
                                st.delete(seq).map_err(err)?;
                                depth -= 1;
                                bytes -= vsize;
                                freed += vsize;
                                dropped_old += 1;
                            }
                        }
                        if freed < need {
                            dropped_new += 1; // larger than the whole buffer
                            continue;
                        }
                    }
                }
                st.insert(&row).map_err(err)?;
                depth += 1;
                bytes += size;
                appended += 1;
                disk_writes += 1;
            }
            if batch.highest >= self.next_seq {
                self.next_seq = batch.highest + 1;
                sqlite::save_next_seq(&tx, self.next_seq).map_err(err)?;
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
            let ts = self.db.oldest_ts().or_else(|| self.mem.oldest_ts());
            let _ = reply.send(ts);
        }
    }

    fn read(&self, after: u64, limit: usize) -> Result<Vec<Row>, BufferError> {
        let mut rows = self.db.read(after, limit)?;
        // Rows in memory are newer than every row on disk.
        let after = rows.last().map_or(after, |r| r.seq.0);
        let room = limit - rows.len();
        rows.extend(self.mem.after(after).take(room).cloned());
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
                let in_memory = self.mem.bytes();
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
    use std::time::{Duration, SystemTime};

    use crate::message::{Durability, Message, Origin, QoS, Seq};

    use crate::buffer::tests::{append, on_disk, settings, settled};
    use crate::buffer::{Buffer, BufferStats, WhenFull};

    #[tokio::test]
    async fn messages_older_than_max_age_expire_and_are_counted() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = settings(dir.path(), 1 << 20, WhenFull::DropOldest);
        cfg.max_age = Some(Duration::from_secs(3600));
        let b = Buffer::open(cfg).unwrap();
        let two_hours_ago = SystemTime::now() - Duration::from_secs(7200);
        for i in 0..3 {
            let mut m = Message::new(
                "t",
                format!("old-{i}"),
                QoS::AtLeastOnce,
                false,
                Origin::Broker,
            );
            m.received_at = two_hours_ago;
            b.append(m, Durability::PublisherWaits);
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
        let rows = b.fetch(Seq(0), 10).await.unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(&rows[0].payload[..], b"fresh");
        b.close();
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
            let rows = b.fetch(Seq(0), 1000).await.unwrap();
            assert_eq!(rows.len(), 100, "{policy:?}");
            assert_eq!(rows[0].seq.0, expect_first, "{policy:?}");
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
        assert_eq!(b.settled().borrow().0, 10);
        assert_eq!(b.stats().dropped(), 0);
        for s in 1..=5 {
            b.ack(Seq(s));
        }
        settled(&b, 15).await;
        let rows = b.fetch(Seq(0), 100).await.unwrap();
        assert_eq!(rows.first().map(|r| r.seq.0), Some(6));
        assert_eq!(rows.last().map(|r| r.seq.0), Some(15));
    }
}
