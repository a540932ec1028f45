//! `BufferStats`: the buffer's counters, written by its writer thread and
//! read at any time (stats message, metrics, logs, tests).

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters, readable at any time (stats message, logs, tests).
#[derive(Debug, Default)]
pub struct BufferStats {
    /// Messages stored now, and their bytes.
    pub depth: AtomicU64,
    pub bytes: AtomicU64,
    pub appended: AtomicU64,
    /// Deleted after the cloud acknowledged them.
    pub forwarded: AtomicU64,
    pub dropped_oldest: AtomicU64,
    pub dropped_newest: AtomicU64,
    /// QoS 0 messages refused while the buffer was full under `block`.
    pub dropped_blocked_qos0: AtomicU64,
    pub expired: AtomicU64,
    /// QoS 0 messages dropped while the file could not be written (disk
    /// full): past MAX_PENDING_QOS0 waiting, the newest.
    pub dropped_unwritable: AtomicU64,
    pub write_errors: AtomicU64,
    /// Times a broken database file was moved aside and a fresh one started.
    pub recovered: AtomicU64,
    /// Messages written to the database file (appends and memory spills).
    pub disk_writes: AtomicU64,
    /// Messages held in memory only now (memory-first mode).
    pub in_memory: AtomicU64,
}

impl BufferStats {
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
    pub fn dropped(&self) -> u64 {
        Self::get(&self.dropped_oldest)
            + Self::get(&self.dropped_newest)
            + Self::get(&self.dropped_blocked_qos0)
            + Self::get(&self.expired)
            + Self::get(&self.dropped_unwritable)
    }
}
