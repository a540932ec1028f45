//! The memory-first tier (`memory_first`, `memory_max_messages`): while the
//! cloud is reachable, new messages are kept in memory only, and forgotten
//! without touching the disk once the cloud acknowledged them (SD card
//! wear). Past the count, past `max_bytes`, while the link is down or while
//! `block` holds appends, everything it holds is spilled, to be written to
//! disk before any newer message so the file stays in sequence order. A
//! crash loses what it holds.

use std::collections::BTreeMap;

use super::sqlite::Row;

/// Rows accepted but not on disk, always newer than every row on disk.
pub(super) struct Memory {
    /// At most this many rows; `None`: memory-first is off, every row goes
    /// to disk and this stays empty.
    limit: Option<usize>,
    rows: BTreeMap<u64, Row>,
}

/// What one group commit did to the tier.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Step {
    /// Acknowledged rows forgotten, and their bytes.
    pub forwarded: u64,
    pub forwarded_bytes: u64,
    /// New rows kept, and their bytes.
    pub kept: u64,
    pub kept_bytes: u64,
    /// Everything the tier held, oldest first, to be written to disk before
    /// the batch's new rows; empty when it kept them.
    pub spill: Vec<Row>,
}

impl Memory {
    pub fn new(limit: Option<usize>) -> Memory {
        Memory {
            limit,
            rows: BTreeMap::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Topic and payload bytes held.
    pub fn bytes(&self) -> u64 {
        self.rows.values().map(Row::size).sum()
    }

    /// Receive time of the oldest row held.
    pub fn oldest_ts(&self) -> Option<i64> {
        self.rows.values().next().map(|r| r.ts_ms)
    }

    /// The rows after `seq`, oldest first.
    pub fn after(&self, seq: u64) -> impl Iterator<Item = &Row> {
        self.rows.range(seq + 1..).map(|(_, r)| r)
    }

    /// Takes back spilled rows a failed commit did not write.
    pub fn restore(&mut self, spill: Vec<Row>) {
        self.rows.extend(spill.into_iter().map(|r| (r.seq.0, r)));
    }

    /// One group commit's share, `None` when memory-first is off. Acks of
    /// rows held here are taken out of `acks` and forgotten; the new rows
    /// are taken out of `appends` and kept if `may_keep` (the cloud is
    /// reachable and `block` holds nothing), the count allows and
    /// `stored_bytes` (memory and disk, before these acks) plus theirs stay
    /// within `max_bytes`. Otherwise all held rows are spilled.
    pub fn step(
        &mut self,
        acks: &mut Vec<u64>,
        appends: &mut Vec<(Row, bool)>,
        may_keep: bool,
        stored_bytes: u64,
        max_bytes: u64,
    ) -> Option<Step> {
        let limit = self.limit?;
        let mut step = Step::default();
        acks.retain(|seq| match self.rows.remove(seq) {
            Some(row) => {
                step.forwarded += 1;
                step.forwarded_bytes += row.size();
                false
            }
            None => true,
        });
        let incoming: u64 = appends.iter().map(|(r, _)| r.size()).sum();
        let keep = may_keep
            && self.rows.len() + appends.len() <= limit
            && stored_bytes - step.forwarded_bytes + incoming <= max_bytes;
        if keep {
            for (row, _) in appends.drain(..) {
                step.kept += 1;
                step.kept_bytes += row.size();
                self.rows.insert(row.seq.0, row);
            }
        } else if !self.rows.is_empty() {
            step.spill = std::mem::take(&mut self.rows).into_values().collect();
        }
        Some(step)
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::buffer::tests::{append, disk_writes, on_disk, settings, settled};
    use crate::buffer::{Buffer, BufferStats, WhenFull};
    use crate::message::{QoS, Seq};

    /// Row `seq`, 10 bytes (topic "t", 9 bytes of payload).
    fn row(seq: u64) -> Row {
        Row {
            seq: Seq(seq),
            topic: "t".into(),
            payload: Bytes::from(format!("{seq:09}")),
            qos: QoS::AtLeastOnce,
            retain: false,
            ts_ms: 1000 + seq as i64,
        }
    }

    fn appends(seqs: std::ops::RangeInclusive<u64>) -> Vec<(Row, bool)> {
        seqs.map(|s| (row(s), true)).collect()
    }

    fn seqs<'a>(rows: impl IntoIterator<Item = &'a Row>) -> Vec<u64> {
        rows.into_iter().map(|r| r.seq.0).collect()
    }

    #[test]
    fn off_it_keeps_nothing_and_leaves_the_batch_alone() {
        let mut m = Memory::new(None);
        let (mut acks, mut new) = (vec![1, 2], appends(3..=4));
        assert_eq!(m.step(&mut acks, &mut new, true, 0, 1000), None);
        assert_eq!((acks.len(), new.len(), m.len()), (2, 2, 0));
    }

    #[test]
    fn online_under_the_count_rows_stay_in_memory_in_order() {
        let mut m = Memory::new(Some(5));
        let mut new = appends(1..=3);
        let step = m.step(&mut vec![], &mut new, true, 0, 1000).unwrap();
        assert_eq!((step.kept, step.kept_bytes), (3, 30));
        assert!(new.is_empty() && step.spill.is_empty());
        assert_eq!((m.len(), m.bytes(), m.oldest_ts()), (3, 30, Some(1001)));
        assert_eq!(seqs(m.after(0)), [1, 2, 3]);
        assert_eq!(seqs(m.after(1).take(1)), [2]);
        assert_eq!(seqs(m.after(3)), Vec::<u64>::new());
    }

    #[test]
    fn acks_of_rows_in_memory_never_reach_the_disk() {
        let mut m = Memory::new(Some(5));
        m.step(&mut vec![], &mut appends(3..=4), true, 20, 1000);
        // 1 and 2 are on disk: their acks are left for it.
        let mut acks = vec![1, 3, 2];
        let step = m.step(&mut acks, &mut vec![], true, 40, 1000).unwrap();
        assert_eq!((step.forwarded, step.forwarded_bytes), (1, 10));
        assert_eq!(acks, [1, 2]);
        assert_eq!(seqs(m.after(0)), [4]);
    }

    #[test]
    fn past_the_count_everything_spills_oldest_first() {
        let mut m = Memory::new(Some(4));
        m.step(&mut vec![], &mut appends(1..=4), true, 0, 1000);
        // An ack frees a place for one more.
        let mut new = appends(5..=5);
        let step = m.step(&mut vec![1], &mut new, true, 40, 1000).unwrap();
        assert_eq!((step.forwarded, step.kept), (1, 1));
        let mut new = appends(6..=7);
        let step = m.step(&mut vec![], &mut new, true, 40, 1000).unwrap();
        assert_eq!(seqs(&step.spill), [2, 3, 4, 5]);
        assert_eq!(step.kept, 0);
        // The new rows are left for the disk, after the spilled ones.
        assert_eq!(seqs(new.iter().map(|(r, _)| r)), [6, 7]);
        assert!(m.is_empty());
    }

    #[test]
    fn offline_or_held_by_block_or_over_max_bytes_it_spills() {
        for (may_keep, stored, max) in [(false, 20, 1000), (true, 20, 39), (true, 991, 1000)] {
            let mut m = Memory::new(Some(100));
            m.step(&mut vec![], &mut appends(1..=2), true, 0, 1000);
            let mut new = appends(3..=4);
            let step = m
                .step(&mut vec![], &mut new, may_keep, stored, max)
                .unwrap();
            assert_eq!(seqs(&step.spill), [1, 2], "{may_keep} {stored} {max}");
            assert_eq!(new.len(), 2);
        }
        // Exactly max_bytes still fits, counting the bytes the acks free.
        let mut m = Memory::new(Some(100));
        m.step(&mut vec![], &mut appends(1..=2), true, 0, 1000);
        let mut new = appends(3..=4);
        let step = m.step(&mut vec![1], &mut new, true, 100, 110).unwrap();
        assert_eq!((step.kept, step.spill.len()), (2, 0));
    }

    #[test]
    fn rows_a_failed_commit_did_not_write_come_back() {
        let mut m = Memory::new(Some(2));
        m.step(&mut vec![], &mut appends(1..=2), true, 0, 1000);
        let step = m.step(&mut vec![], &mut appends(3..=3), true, 20, 1000);
        m.restore(step.unwrap().spill);
        assert_eq!(seqs(m.after(0)), [1, 2]);
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
        let seqs = |rows: Vec<Row>| rows.iter().map(|r| r.seq.0).collect::<Vec<_>>();
        assert_eq!(
            seqs(b.fetch(Seq(0), 100).await.unwrap()),
            (1..=10).collect::<Vec<_>>()
        );
        assert_eq!(seqs(b.fetch(Seq(0), 3).await.unwrap()), [1, 2, 3]);
        assert_eq!(seqs(b.fetch(Seq(3), 2).await.unwrap()), [4, 5]);
        for seq in 1..=5 {
            b.ack(Seq(seq));
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
}
