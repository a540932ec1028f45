//! The buffer's SQLite file: its schema (`outbox`, one row a message, and
//! `meta`, which keeps the next sequence number), opening and checking it,
//! and `Row`, a message as stored.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use bytestring::ByteString;
use rusqlite::{params, CachedStatement, Connection, OptionalExtension};

use super::{BufferError, BufferSettings, SyncMode};
use crate::message::{QoS, Seq};

/// A message waiting for the cloud.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub seq: Seq,
    /// The topic on the cloud broker (rules applied).
    pub topic: ByteString,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    /// When the gateway received it, ms since the epoch.
    pub ts_ms: i64,
}

impl Row {
    pub(super) fn size(&self) -> u64 {
        (self.topic.len() + self.payload.len()) as u64
    }

    /// From `SELECT seq, topic, payload, qos, retain, ts_ms`.
    pub(super) fn from_sql(r: &rusqlite::Row) -> rusqlite::Result<Row> {
        Ok(Row {
            seq: r.get(0)?,
            topic: ByteString::from(r.get::<_, String>(1)?),
            payload: Bytes::from(r.get::<_, Vec<u8>>(2)?),
            qos: r.get(3)?,
            retain: r.get(4)?,
            ts_ms: r.get(5)?,
        })
    }

    /// Through `INSERT INTO outbox (seq, topic, payload, qos, retain, ts_ms)`.
    pub(super) fn insert(&self, st: &mut rusqlite::Statement) -> rusqlite::Result<usize> {
        st.execute(params![
            self.seq,
            &*self.topic,
            &self.payload[..],
            self.qos,
            self.retain,
            self.ts_ms
        ])
    }
}

pub(super) struct Db {
    pub(super) conn: Connection,
    pub(super) path: PathBuf,
    /// The `synchronous` mode set on the connection now.
    sync: SyncMode,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS outbox (
    seq     INTEGER PRIMARY KEY,
    topic   TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos     INTEGER NOT NULL,
    retain  INTEGER NOT NULL,
    ts_ms   INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
";

impl Db {
    /// Opens, checks and prepares the database; returns it with the next
    /// sequence number.
    pub(super) fn open(settings: &BufferSettings) -> Result<(Db, u64), BufferError> {
        let path = settings.path.clone();
        let err = |source| BufferError::Sqlite {
            path: path.clone(),
            source,
        };
        crate::files::private_database(&path).map_err(|source| BufferError::Io {
            path: path.clone(),
            source,
        })?;
        let conn = Connection::open(&path).map_err(err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err)?;
        conn.pragma_update(None, "synchronous", synchronous(settings.sync))
            .map_err(err)?;
        conn.busy_timeout(Duration::from_secs(5)).map_err(err)?;
        conn.execute_batch(SCHEMA).map_err(err)?;
        crate::files::quick_check(&conn).map_err(err)?;
        let max: Option<u64> = conn
            .query_row("SELECT max(seq) FROM outbox", [], |r| r.get(0))
            .map_err(err)?;
        let saved: Option<u64> = conn
            .query_row("SELECT value FROM meta WHERE key = 'next_seq'", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(err)?;
        let next = max.map_or(1, |m| m + 1).max(saved.unwrap_or(1));
        Ok((
            Db {
                conn,
                path,
                sync: settings.sync,
            },
            next,
        ))
    }

    pub(super) fn err(&self, source: rusqlite::Error) -> BufferError {
        BufferError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    pub(super) fn depth(&self) -> Result<(u64, u64), BufferError> {
        self.conn
            .query_row(
                "SELECT count(*), coalesce(sum(length(topic) + length(payload)), 0) FROM outbox",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(|e| self.err(e))
    }
    /// Sets `synchronous` to `want` unless it is already.
    pub(super) fn set_sync(&mut self, want: SyncMode) -> rusqlite::Result<()> {
        if self.sync != want {
            self.conn
                .pragma_update(None, "synchronous", synchronous(want))?;
            self.sync = want;
        }
        Ok(())
    }

    /// Up to `limit` rows after `after`, oldest first.
    pub(super) fn read(&self, after: u64, limit: usize) -> Result<Vec<Row>, BufferError> {
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT seq, topic, payload, qos, retain, ts_ms FROM outbox WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            )
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map(params![after, limit as i64], Row::from_sql)
            .map_err(|e| self.err(e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.err(e))?;
        Ok(rows)
    }

    /// Receive time of the oldest row; `None` if there is none or it
    /// cannot be read.
    pub(super) fn oldest_ts(&self) -> Option<i64> {
        self.conn
            .query_row("SELECT ts_ms FROM outbox ORDER BY seq LIMIT 1", [], |r| {
                r.get(0)
            })
            .optional()
            .ok()
            .flatten()
    }
}

fn synchronous(mode: SyncMode) -> &'static str {
    match mode {
        SyncMode::Full => "FULL",
        SyncMode::Normal => "NORMAL",
    }
}

/// The statements a group commit runs per message, taken from the
/// connection's cache once per commit.
pub(super) struct Statements<'c> {
    delete_acked: CachedStatement<'c>,
    insert: CachedStatement<'c>,
    oldest: CachedStatement<'c>,
    delete: CachedStatement<'c>,
}

impl<'c> Statements<'c> {
    /// `conn`: the commit's transaction.
    pub(super) fn prepare(conn: &'c Connection) -> rusqlite::Result<Statements<'c>> {
        Ok(Statements {
            delete_acked: conn.prepare_cached(
                "DELETE FROM outbox WHERE seq = ?1 RETURNING length(topic) + length(payload)",
            )?,
            insert: conn.prepare_cached(
                "INSERT INTO outbox (seq, topic, payload, qos, retain, ts_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?,
            oldest: conn.prepare_cached(
                "SELECT seq, length(topic) + length(payload) FROM outbox ORDER BY seq LIMIT 256",
            )?,
            delete: conn.prepare_cached("DELETE FROM outbox WHERE seq = ?1")?,
        })
    }

    /// Deletes an acknowledged row; returns its size, `None` if it was not
    /// stored (already deleted, dropped or expired).
    pub(super) fn delete_acked(&mut self, seq: u64) -> rusqlite::Result<Option<u64>> {
        self.delete_acked
            .query_row(params![seq], |r| r.get(0))
            .optional()
    }

    pub(super) fn insert(&mut self, row: &Row) -> rusqlite::Result<()> {
        row.insert(&mut self.insert).map(drop)
    }

    /// Sequence numbers and sizes of the oldest rows, up to 256.
    pub(super) fn oldest(&mut self) -> rusqlite::Result<Vec<(u64, u64)>> {
        self.oldest
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect()
    }

    pub(super) fn delete(&mut self, seq: u64) -> rusqlite::Result<()> {
        self.delete.execute(params![seq]).map(drop)
    }
}

/// Deletes the rows received before `cutoff_ms`; returns how many, and
/// their bytes.
pub(super) fn expire(conn: &Connection, cutoff_ms: i64) -> rusqlite::Result<(u64, u64)> {
    let (n, b): (u64, u64) = conn.query_row(
        "SELECT count(*), coalesce(sum(length(topic) + length(payload)), 0) FROM outbox WHERE ts_ms < ?1",
        params![cutoff_ms],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    if n > 0 {
        conn.execute("DELETE FROM outbox WHERE ts_ms < ?1", params![cutoff_ms])?;
    }
    Ok((n, b))
}

/// Keeps the next sequence number, so numbers never go back even when the
/// buffer is empty.
pub(super) fn save_next_seq(conn: &Connection, next: u64) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO meta (key, value) VALUES ('next_seq', ?1)
         ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        params![next],
    )
    .map(drop)
}
