//! The buffer's SQLite file: its schema (`outbox`, one row a message, and
//! `meta`, which keeps the next sequence number), opening and checking it,
//! and `Row`, a message as stored.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use rusqlite::{params, Connection, OptionalExtension};

use super::{BufferError, BufferSettings, SyncMode};

/// A message waiting for the cloud.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub seq: u64,
    /// The topic on the cloud broker (rules applied).
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
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
            topic: r.get(1)?,
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
            self.topic,
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
    pub(super) sync: SyncMode,
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
        let sync = match settings.sync {
            SyncMode::Full => "FULL",
            SyncMode::Normal => "NORMAL",
        };
        conn.pragma_update(None, "synchronous", sync).map_err(err)?;
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
}
