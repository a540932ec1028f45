//! Persistent sessions and retained messages in SQLite (`broker.sqlite` in the
//! data directory), so they survive a restart.
//!
//! The broker never writes per message: changes are marked dirty and a saver
//! task writes them in one transaction every `persist_interval_ms` and at
//! shutdown (WAL, `synchronous = NORMAL`). A session is saved as its
//! subscriptions, queued and in-flight QoS 1/2 messages, and the QoS 2
//! packet ids it has received but not yet released; the store remembers
//! what it wrote (an index of rows, no payloads), so a save writes only
//! what changed: a new message is one row inserted, an acknowledged one one
//! row deleted, a sent one one small row updated. (Rewriting a dirty session
//! whole made each 1-byte message behind 300 queued 20 KB ones cost 12.5 MB
//! of writes: SD card wear.)

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use bytestring::ByteString;
use rusqlite::{params, Connection};
use thiserror::Error;
use tracing::{error, info};

use super::router::Router;
use super::session::{Delivery, OutState, Outgoing, Session};
use crate::message::{Message, Origin, QoS};

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("SQLite error on {path}: {source}")]
    Sqlite {
        path: String,
        source: rusqlite::Error,
    },
    #[error("cannot create data directory {path}: {source}")]
    Dir {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot create or restrict {path} to mode 0600: {source}")]
    File {
        path: String,
        source: std::io::Error,
    },
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS retained (
    topic   TEXT PRIMARY KEY,
    payload BLOB NOT NULL,
    qos     INTEGER NOT NULL,
    ts_ms   INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    client_id      TEXT PRIMARY KEY,
    last_packet_id INTEGER NOT NULL,
    owner          TEXT,
    owner_known    INTEGER NOT NULL DEFAULT 0,
    detached_ms    INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS subscriptions (
    client_id TEXT NOT NULL,
    filter    TEXT NOT NULL,
    qos       INTEGER NOT NULL,
    PRIMARY KEY (client_id, filter)
);
-- state: 0 queued, 1 awaiting PUBACK, 2 awaiting PUBREC, 3 awaiting PUBCOMP
CREATE TABLE IF NOT EXISTS session_messages (
    client_id TEXT NOT NULL,
    seq       INTEGER NOT NULL,
    state     INTEGER NOT NULL,
    packet_id INTEGER NOT NULL,
    topic     TEXT NOT NULL,
    payload   BLOB NOT NULL,
    qos       INTEGER NOT NULL,
    retain    INTEGER NOT NULL,
    PRIMARY KEY (client_id, seq)
);
CREATE TABLE IF NOT EXISTS incoming_qos2 (
    client_id TEXT NOT NULL,
    packet_id INTEGER NOT NULL,
    PRIMARY KEY (client_id, packet_id)
);
";

/// A session as saved.
#[derive(Debug, Clone)]
pub struct SavedSession {
    pub client_id: Arc<str>,
    pub subscriptions: Vec<(String, QoS)>,
    pub outgoing: Vec<Outgoing>,
    pub queue: Vec<Delivery>,
    pub incoming_qos2: Vec<u16>,
    pub last_packet_id: u16,
    /// The owner's user name (None: anonymous), unless still unclaimed.
    pub owner: Option<Option<Arc<str>>>,
    /// When its last connection detached; None while attached (saved as
    /// 0, read back as "detached when the broker started").
    pub detached_at: Option<SystemTime>,
}

impl SavedSession {
    /// Snapshot of a persistent session; QoS 0 queued messages are not kept.
    pub fn snapshot(session: &Session) -> Self {
        let st = session.lock();
        SavedSession {
            client_id: session.client_id.clone(),
            subscriptions: st
                .subscriptions
                .iter()
                .map(|(f, q)| (f.clone(), *q))
                .collect(),
            outgoing: st.outgoing.iter().cloned().collect(),
            queue: st
                .queue
                .iter()
                .filter(|d| d.qos > QoS::AtMostOnce)
                .cloned()
                .collect(),
            incoming_qos2: st.incoming_qos2.iter().copied().collect(),
            last_packet_id: st.last_packet_id(),
            owner: (!st.owner_unclaimed).then(|| st.owner.clone()),
            detached_at: st.detached_at,
        }
    }
}

/// One save: sessions to rewrite (Some) or delete (None), retained topics to
/// write (Some) or delete (None).
#[derive(Default)]
pub struct Batch {
    pub sessions: Vec<(Arc<str>, Option<SavedSession>)>,
    pub retained: Vec<(ByteString, Option<Arc<Message>>)>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty() && self.retained.is_empty()
    }

    /// Collects what changed in the router since the last call.
    pub fn collect(router: &Router) -> Batch {
        let (ids, retained) = router.take_dirty();
        let sessions = ids
            .into_iter()
            .map(|id| {
                let saved = router.session(&id).and_then(|s| {
                    s.take_dirty();
                    let persistent = !s.lock().clean;
                    persistent.then(|| SavedSession::snapshot(&s))
                });
                (id, saved)
            })
            .collect();
        Batch {
            sessions,
            retained: retained.into_iter().collect(),
        }
    }

    /// A save failed: marks everything in the batch dirty again so the next
    /// save retries it (a change made since then wins over the batch's).
    pub fn give_back(self, router: &Router) {
        for (id, _) in self.sessions {
            router.mark_session_id(&id);
        }
        router.remark_retained(self.retained);
    }
}

pub struct Store {
    conn: Connection,
    path: String,
    /// What the database holds for each session, as last written.
    index: HashMap<Arc<str>, SavedRows>,
}

/// The rows of one session in the database, without the payloads.
#[derive(Debug, Default, Clone)]
struct SavedRows {
    head: Option<SavedHead>,
    subscriptions: HashMap<String, QoS>,
    /// Delivery id (the row's `seq`) -> (state, packet id).
    messages: HashMap<u64, (u8, u16)>,
    incoming_qos2: HashSet<u16>,
}

/// The `sessions` row.
#[derive(Debug, Clone, PartialEq)]
struct SavedHead {
    last_packet_id: u16,
    owner: Option<Option<Arc<str>>>,
    detached_ms: i64,
}

/// A session's message rows as (state, packet id, delivery), in order:
/// in flight first, then queued.
fn message_rows(s: &SavedSession) -> impl Iterator<Item = (u8, u16, &Delivery)> {
    s.outgoing
        .iter()
        .map(|o| {
            let state = match o.state {
                OutState::AwaitPuback => 1,
                OutState::AwaitPubrec => 2,
                OutState::AwaitPubcomp => 3,
            };
            (state, o.packet_id, &o.delivery)
        })
        .chain(s.queue.iter().map(|d| (0, 0, d)))
}

impl SavedRows {
    fn of(s: &SavedSession) -> SavedRows {
        SavedRows {
            head: Some(SavedHead {
                last_packet_id: s.last_packet_id,
                owner: s.owner.clone(),
                detached_ms: s.detached_at.map_or(0, ms),
            }),
            subscriptions: s.subscriptions.iter().cloned().collect(),
            messages: message_rows(s)
                .map(|(state, pid, d)| (d.id, (state, pid)))
                .collect(),
            incoming_qos2: s.incoming_qos2.iter().copied().collect(),
        }
    }
}

fn ms(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Store {
    pub fn open(data_dir: &Path) -> Result<Store, StoreError> {
        crate::files::create_private_dir(data_dir).map_err(|source| StoreError::Dir {
            path: data_dir.display().to_string(),
            source,
        })?;
        let file = data_dir.join("broker.sqlite");
        let path = file.display().to_string();
        let err = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        crate::files::private_database(&file).map_err(|source| StoreError::File {
            path: path.clone(),
            source,
        })?;
        let conn = Connection::open(&file).map_err(err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(err)?;
        conn.busy_timeout(Duration::from_secs(5)).map_err(err)?;
        conn.execute_batch(SCHEMA).map_err(err)?;
        crate::files::quick_check(&conn).map_err(err)?;
        migrate(&conn).map_err(err)?;
        Ok(Store {
            conn,
            path,
            index: HashMap::new(),
        })
    }

    /// Opens and loads the store. A corrupt `broker.sqlite` does not stop
    /// the gateway (under systemd that became a restart loop): it is moved
    /// aside (`broker.sqlite.broken-<ms>`), every row that still reads is
    /// copied into a fresh one, and the log says what was salvaged and
    /// what may be lost. The last value is true when that happened.
    #[allow(clippy::type_complexity)]
    pub fn open_or_recover(
        data_dir: &Path,
    ) -> Result<(Store, Vec<Message>, Vec<Session>, bool), StoreError> {
        let opened = Store::open(data_dir).and_then(|mut s| {
            let (retained, sessions) = s.load()?;
            Ok((s, retained, sessions))
        });
        let e = match opened {
            Ok((s, r, ss)) => return Ok((s, r, ss, false)),
            Err(e) if e.is_corrupt() => e,
            Err(e) => return Err(e),
        };
        error!(error = %e, "broker store corrupted: keeping it aside, salvaging what reads, starting");
        let file = data_dir.join("broker.sqlite");
        let aside = crate::files::move_aside(&file, "broker store");
        let mut store = Store::open(data_dir)?;
        if let Some(aside) = aside {
            salvage(&aside, &store.conn);
        }
        let (retained, sessions) = store.load()?;
        error!(retained = retained.len(), sessions = sessions.len(),
            "broker store recovered: these were salvaged; retained messages and sessions not listed above are lost");
        Ok((store, retained, sessions, true))
    }

    fn err(&self) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
        move |source| StoreError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    /// Writes one batch in one transaction: for each session, only the
    /// rows that differ from what the database holds.
    pub fn save(&mut self, batch: &Batch) -> Result<(), StoreError> {
        let path = self.path.clone();
        let err = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(err)?;
        for (topic, m) in &batch.retained {
            match m {
                Some(m) => {
                    tx.prepare_cached("INSERT OR REPLACE INTO retained (topic, payload, qos, ts_ms) VALUES (?1, ?2, ?3, ?4)")
                        .and_then(|mut s| s.execute(params![&**topic, &m.payload[..], m.qos, ms(m.received_at)]))
                        .map_err(err)?;
                }
                None => {
                    tx.prepare_cached("DELETE FROM retained WHERE topic = ?1")
                        .and_then(|mut s| s.execute(params![&**topic]))
                        .map_err(err)?;
                }
            }
        }
        // The index changes only once the transaction is committed.
        let mut written: Vec<(Arc<str>, Option<SavedRows>)> = Vec::new();
        let none = SavedRows::default();
        for (id, saved) in &batch.sessions {
            let old = self.index.get(id);
            let Some(s) = saved else {
                if old.is_some() {
                    for table in [
                        "sessions",
                        "subscriptions",
                        "session_messages",
                        "incoming_qos2",
                    ] {
                        tx.prepare_cached(&format!("DELETE FROM {table} WHERE client_id = ?1"))
                            .and_then(|mut st| st.execute(params![&**id]))
                            .map_err(err)?;
                    }
                    written.push((id.clone(), None));
                }
                continue;
            };
            let old = old.unwrap_or(&none);
            let new = SavedRows::of(s);
            if let Some(h) = new.head.as_ref().filter(|h| old.head.as_ref() != Some(h)) {
                tx.prepare_cached("INSERT OR REPLACE INTO sessions (client_id, last_packet_id, owner, owner_known, detached_ms) VALUES (?1, ?2, ?3, ?4, ?5)")
                    .and_then(|mut st| {
                        st.execute(params![
                            &**id,
                            h.last_packet_id,
                            h.owner.as_ref().and_then(|o| o.as_deref()),
                            h.owner.is_some(),
                            h.detached_ms
                        ])
                    })
                    .map_err(err)?;
            }
            for filter in old.subscriptions.keys() {
                if !new.subscriptions.contains_key(filter) {
                    tx.prepare_cached(
                        "DELETE FROM subscriptions WHERE client_id = ?1 AND filter = ?2",
                    )
                    .and_then(|mut st| st.execute(params![&**id, filter]))
                    .map_err(err)?;
                }
            }
            for (filter, qos) in &new.subscriptions {
                if old.subscriptions.get(filter) != Some(qos) {
                    tx.prepare_cached("INSERT OR REPLACE INTO subscriptions (client_id, filter, qos) VALUES (?1, ?2, ?3)")
                        .and_then(|mut st| st.execute(params![&**id, filter, qos]))
                        .map_err(err)?;
                }
            }
            for seq in old.messages.keys() {
                if !new.messages.contains_key(seq) {
                    tx.prepare_cached(
                        "DELETE FROM session_messages WHERE client_id = ?1 AND seq = ?2",
                    )
                    .and_then(|mut st| st.execute(params![&**id, *seq as i64]))
                    .map_err(err)?;
                }
            }
            for (state, packet_id, d) in message_rows(s) {
                match old.messages.get(&d.id) {
                    None => {
                        tx.prepare_cached(
                            "INSERT OR REPLACE INTO session_messages (client_id, seq, state, packet_id, topic, payload, qos, retain)
                             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                        )
                        .and_then(|mut st| {
                            st.execute(params![
                                &**id,
                                d.id as i64,
                                state,
                                packet_id,
                                &*d.message.topic,
                                &d.message.payload[..],
                                d.qos,
                                d.retain
                            ])
                        })
                        .map_err(err)?;
                    }
                    Some(&was) if was != (state, packet_id) => {
                        tx.prepare_cached("UPDATE session_messages SET state = ?3, packet_id = ?4 WHERE client_id = ?1 AND seq = ?2")
                            .and_then(|mut st| st.execute(params![&**id, d.id as i64, state, packet_id]))
                            .map_err(err)?;
                    }
                    Some(_) => {}
                }
            }
            for pid in old.incoming_qos2.difference(&new.incoming_qos2) {
                tx.prepare_cached(
                    "DELETE FROM incoming_qos2 WHERE client_id = ?1 AND packet_id = ?2",
                )
                .and_then(|mut st| st.execute(params![&**id, pid]))
                .map_err(err)?;
            }
            for pid in new.incoming_qos2.difference(&old.incoming_qos2) {
                tx.prepare_cached(
                    "INSERT OR REPLACE INTO incoming_qos2 (client_id, packet_id) VALUES (?1, ?2)",
                )
                .and_then(|mut st| st.execute(params![&**id, pid]))
                .map_err(err)?;
            }
            written.push((id.clone(), Some(new)));
        }
        tx.commit().map_err(err)?;
        for (id, rows) in written {
            match rows {
                Some(r) => self.index.insert(id, r),
                None => self.index.remove(&id),
            };
        }
        Ok(())
    }

    /// Everything saved: retained messages and offline persistent sessions.
    pub fn load(&mut self) -> Result<(Vec<Message>, Vec<Session>), StoreError> {
        let mut index: HashMap<Arc<str>, SavedRows> = HashMap::new();
        let err = self.err();
        let mut retained = Vec::new();
        let mut stmt = self
            .conn
            .prepare("SELECT topic, payload, qos, ts_ms FROM retained")
            .map_err(&err)?;
        let rows = stmt
            .query_map([], |r| {
                let topic: String = r.get(0)?;
                let payload: Vec<u8> = r.get(1)?;
                let qos: QoS = r.get(2)?;
                let ts: i64 = r.get(3)?;
                Ok((topic, payload, qos, ts))
            })
            .map_err(&err)?;
        for row in rows {
            let (topic, payload, qos, ts) = row.map_err(&err)?;
            let mut m = Message::new(topic, Bytes::from(payload), qos, true, Origin::Broker);
            m.received_at = SystemTime::UNIX_EPOCH + Duration::from_millis(ts.max(0) as u64);
            retained.push(m);
        }

        type Head = (u16, Option<Option<Arc<str>>>, SystemTime);
        let mut last_ids: HashMap<String, Head> = HashMap::new();
        let mut stmt = self
            .conn
            .prepare(
                "SELECT client_id, last_packet_id, owner, owner_known, detached_ms FROM sessions",
            )
            .map_err(&err)?;
        for row in stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, u16>(1)?,
                    r.get::<_, Option<String>>(2)?,
                    r.get::<_, bool>(3)?,
                    r.get::<_, i64>(4)?,
                ))
            })
            .map_err(&err)?
        {
            let (id, last, owner, known, detached) = row.map_err(&err)?;
            let owner = known.then(|| owner.map(|o| Arc::from(o.as_str())));
            index.entry(Arc::from(id.as_str())).or_default().head = Some(SavedHead {
                last_packet_id: last,
                owner: owner.clone(),
                detached_ms: detached,
            });
            // A row from before detach times were kept: as if detached now.
            let detached = if detached > 0 {
                SystemTime::UNIX_EPOCH + Duration::from_millis(detached as u64)
            } else {
                SystemTime::now()
            };
            last_ids.insert(id, (last, owner, detached));
        }
        let mut subs: HashMap<String, HashMap<String, QoS>> = HashMap::new();
        let mut stmt = self
            .conn
            .prepare("SELECT client_id, filter, qos FROM subscriptions")
            .map_err(&err)?;
        for row in stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, QoS>(2)?,
                ))
            })
            .map_err(&err)?
        {
            let (id, filter, qos) = row.map_err(&err)?;
            if let Some(rows) = index.get_mut(id.as_str()) {
                rows.subscriptions.insert(filter.clone(), qos);
            }
            subs.entry(id).or_default().insert(filter, qos);
        }
        let mut queues: HashMap<String, (VecDeque<Outgoing>, VecDeque<Delivery>)> = HashMap::new();
        let mut stmt = self
            .conn
            .prepare("SELECT client_id, state, packet_id, topic, payload, qos, retain, seq FROM session_messages ORDER BY client_id, seq")
            .map_err(&err)?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, u8>(1)?,
                    r.get::<_, u16>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, Vec<u8>>(4)?,
                    r.get::<_, QoS>(5)?,
                    r.get::<_, bool>(6)?,
                    r.get::<_, i64>(7)?,
                ))
            })
            .map_err(&err)?;
        for row in rows {
            let (id, state, packet_id, topic, payload, qos, retain, seq) = row.map_err(&err)?;
            let seq = seq.max(0) as u64;
            if let Some(rows) = index.get_mut(id.as_str()) {
                rows.messages.insert(seq, (state, packet_id));
            }
            let message = Arc::new(Message::new(
                topic,
                Bytes::from(payload),
                qos,
                retain,
                Origin::Broker,
            ));
            let delivery = Delivery {
                id: seq,
                message,
                qos: qos,
                retain,
            };
            let entry = queues.entry(id).or_default();
            let state = match state {
                1 => OutState::AwaitPuback,
                2 => OutState::AwaitPubrec,
                3 => OutState::AwaitPubcomp,
                _ => {
                    entry.1.push_back(delivery);
                    continue;
                }
            };
            entry.0.push_back(Outgoing {
                packet_id,
                delivery,
                state,
            });
        }
        let mut qos2: HashMap<String, HashSet<u16>> = HashMap::new();
        let mut stmt = self
            .conn
            .prepare("SELECT client_id, packet_id FROM incoming_qos2")
            .map_err(&err)?;
        for row in stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, u16>(1)?)))
            .map_err(&err)?
        {
            let (id, pid) = row.map_err(&err)?;
            if let Some(rows) = index.get_mut(id.as_str()) {
                rows.incoming_qos2.insert(pid);
            }
            qos2.entry(id).or_default().insert(pid);
        }
        let sessions = last_ids
            .into_iter()
            .map(|(id, (last, owner, detached))| {
                let (outgoing, queue) = queues.remove(&id).unwrap_or_default();
                Session::restore(
                    Arc::from(id.as_str()),
                    owner,
                    detached,
                    subs.remove(&id).unwrap_or_default(),
                    queue,
                    outgoing,
                    qos2.remove(&id).unwrap_or_default(),
                    last,
                )
            })
            .collect();
        drop(err);
        self.index = index;
        Ok((retained, sessions))
    }
}

impl StoreError {
    /// The database file is damaged or not a database at all.
    pub fn is_corrupt(&self) -> bool {
        matches!(self, StoreError::Sqlite { source: rusqlite::Error::SqliteFailure(f, _), .. }
            if matches!(f.code, rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase))
    }
}

/// Copies every row that still reads from each table of a broken store
/// into `fresh`: in rowid order up to the first unreadable page, then from
/// the end back to it. Logs, per table, how many rows were saved and
/// whether reading stopped early (rows past a damaged page are lost).
fn salvage(broken: &Path, fresh: &Connection) {
    let Ok(old) = Connection::open(broken) else {
        error!(file = %broken.display(), "broker store: nothing salvaged (the file does not open)");
        return;
    };
    for table in [
        "retained",
        "sessions",
        "subscriptions",
        "session_messages",
        "incoming_qos2",
    ] {
        let mut copied = 0usize;
        let mut complete = true;
        for order in ["ASC", "DESC"] {
            let done = copy_rows(&old, fresh, table, order, &mut copied);
            if done {
                break;
            }
            complete = false;
        }
        if complete {
            info!(table, rows = copied, "broker store: table salvaged whole");
        } else {
            error!(
                table,
                rows = copied,
                "broker store: table partly salvaged; rows on damaged pages are lost"
            );
        }
    }
}

/// Copies `table`'s rows in rowid `order` until one does not read; true if
/// it reached the end.
fn copy_rows(
    old: &Connection,
    fresh: &Connection,
    table: &str,
    order: &str,
    copied: &mut usize,
) -> bool {
    let Ok(mut st) = old.prepare(&format!("SELECT * FROM {table} ORDER BY rowid {order}")) else {
        return false;
    };
    let columns: Vec<String> = st.column_names().iter().map(|c| c.to_string()).collect();
    let marks = vec!["?"; columns.len()].join(", ");
    let sql = format!(
        "INSERT OR IGNORE INTO {table} ({}) VALUES ({marks})",
        columns.join(", ")
    );
    let Ok(mut ins) = fresh.prepare(&sql) else {
        return false;
    };
    let Ok(mut rows) = st.query([]) else {
        return false;
    };
    loop {
        match rows.next() {
            Ok(None) => return true,
            Err(_) => return false,
            Ok(Some(r)) => {
                let values: Result<Vec<rusqlite::types::Value>, _> =
                    (0..columns.len()).map(|i| r.get(i)).collect();
                let Ok(values) = values else { return false };
                match ins.execute(rusqlite::params_from_iter(values)) {
                    Ok(n) => *copied += n,
                    Err(_) => return false,
                }
            }
        }
    }
}

/// Brings a database written by an older gateway up to this schema:
/// sessions gained an owner (unknown, hence unclaimed, for old rows) and a
/// detach time (expiry).
fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    let mut have = HashSet::new();
    let mut stmt = conn.prepare("PRAGMA table_info(sessions)")?;
    for name in stmt.query_map([], |r| r.get::<_, String>(1))? {
        have.insert(name?);
    }
    for (column, decl) in [
        ("owner", "TEXT"),
        ("owner_known", "INTEGER NOT NULL DEFAULT 0"),
        ("detached_ms", "INTEGER NOT NULL DEFAULT 0"),
    ] {
        if !have.contains(column) {
            conn.execute_batch(&format!("ALTER TABLE sessions ADD COLUMN {column} {decl}"))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(id: u64, topic: &str, payload: &[u8]) -> Delivery {
        Delivery {
            id,
            message: Arc::new(Message::new(
                topic.to_owned(),
                Bytes::copy_from_slice(payload),
                QoS::AtLeastOnce,
                false,
                Origin::Broker,
            )),
            qos: QoS::AtLeastOnce,
            retain: false,
        }
    }

    fn save_session(store: &mut Store, s: &Session) -> u64 {
        let before = store.conn.total_changes();
        let batch = Batch {
            sessions: vec![(s.client_id.clone(), Some(SavedSession::snapshot(s)))],
            retained: Vec::new(),
        };
        store.save(&batch).unwrap();
        store.conn.total_changes() - before
    }

    /// With 300 queued 20 KB messages, each new 1-byte message used to
    /// rewrite the whole session (12.5 MB per message). Now a save touches
    /// only the rows that changed.
    #[test]
    fn a_save_writes_only_what_changed() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        let s = Session::new(Arc::from("box"), false, Some(Arc::from("alice")));
        {
            let mut st = s.lock();
            st.subscriptions.insert("a/#".into(), QoS::AtLeastOnce);
            for id in 1..=300 {
                st.queue.push_back(delivery(id, "a/big", &[7u8; 20_000]));
            }
        }
        assert!(save_session(&mut store, &s) >= 302);
        let wal = dir.path().join("broker.sqlite-wal");
        store
            .conn
            .execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
            .unwrap();
        // One more 1-byte message: one row (and the session's head row,
        // whose detach time moves while attached... here it is offline).
        s.lock().queue.push_back(delivery(301, "a/small", b"1"));
        assert_eq!(save_session(&mut store, &s), 1);
        let written = std::fs::metadata(&wal).map_or(0, |m| m.len());
        assert!(
            written < 64 * 1024,
            "{written} bytes of WAL for a 1-byte message"
        );
        // Sent: the row is updated in place, not rewritten with its payload.
        {
            let mut st = s.lock();
            let d = st.queue.pop_front().unwrap();
            st.outgoing.push_back(Outgoing {
                packet_id: 9,
                delivery: d,
                state: OutState::AwaitPuback,
            });
        }
        assert_eq!(save_session(&mut store, &s), 1);
        // Acknowledged: one row deleted. Unsubscribed: one more.
        {
            let mut st = s.lock();
            st.outgoing.clear();
            st.subscriptions.clear();
            st.subscriptions.insert("b".into(), QoS::AtMostOnce);
        }
        assert_eq!(save_session(&mut store, &s), 3);
        assert_eq!(save_session(&mut store, &s), 0, "nothing changed");
        drop(store);

        // What is on disk is the session as it is.
        let mut store = Store::open(dir.path()).unwrap();
        let (_, sessions) = store.load().unwrap();
        let st = sessions[0].lock();
        assert_eq!(st.queue.len(), 300);
        assert_eq!(st.queue.front().unwrap().id, 2);
        assert_eq!(&st.queue.back().unwrap().message.payload[..], b"1");
        assert!(st.outgoing.is_empty());
        assert_eq!(st.subscriptions.keys().collect::<Vec<_>>(), vec!["b"]);
        assert_eq!(st.owner.as_deref(), Some("alice"));
        assert_eq!(st.next_delivery_id, 302, "ids go on after the saved ones");
        drop(st);
        // The index was rebuilt from the database: saving it again writes
        // only its head row, once (it was attached when saved, and now has
        // a detach time: the broker's start), then nothing.
        assert_eq!(save_session(&mut store, &sessions[0]), 1);
        assert_eq!(save_session(&mut store, &sessions[0]), 0);
    }

    /// A failed save leaves the index as it was, so the retry writes the
    /// same rows again.
    #[test]
    fn a_failed_save_changes_nothing_it_remembers() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        let s = Session::new(Arc::from("box"), false, None);
        s.lock().queue.push_back(delivery(1, "a", b"x"));
        save_session(&mut store, &s);
        s.lock().queue.push_back(delivery(2, "a", b"y"));
        // A second connection holds the write lock: the save fails.
        let other = Connection::open(dir.path().join("broker.sqlite")).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        store.conn.busy_timeout(Duration::from_millis(10)).unwrap();
        let batch = Batch {
            sessions: vec![(s.client_id.clone(), Some(SavedSession::snapshot(&s)))],
            retained: Vec::new(),
        };
        assert!(store.save(&batch).is_err());
        other.execute_batch("ROLLBACK").unwrap();
        assert_eq!(save_session(&mut store, &s), 1, "the new row, written now");
    }

    /// A corrupt broker.sqlite used to stop the gateway (a restart loop
    /// under systemd). It is moved aside and what reads is salvaged.
    #[test]
    fn a_corrupt_store_is_moved_aside_and_what_reads_is_salvaged() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        let mut batch = Batch::default();
        for i in 0..2000 {
            let m = Message::new(
                format!("r/{i:05}"),
                "x".repeat(200),
                QoS::AtLeastOnce,
                true,
                Origin::Broker,
            );
            batch
                .retained
                .push((ByteString::from(format!("r/{i:05}")), Some(Arc::new(m))));
        }
        store.save(&batch).unwrap();
        let s = Session::new(Arc::from("box"), false, None);
        s.lock()
            .subscriptions
            .insert("r/#".into(), QoS::AtLeastOnce);
        save_session(&mut store, &s);
        store
            .conn
            .execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
            .unwrap();
        drop(store);
        let path = dir.path().join("broker.sqlite");
        let mut bytes = std::fs::read(&path).unwrap();
        let page = 4096;
        let at = bytes.len() / page / 2 * page;
        for (i, b) in bytes[at..at + page].iter_mut().enumerate() {
            *b = (i * 7 + 13) as u8;
        }
        std::fs::write(&path, &bytes).unwrap();

        let (_, retained, sessions, recovered) = Store::open_or_recover(dir.path()).unwrap();
        assert!(recovered);
        assert!(
            retained.len() > 1500 && retained.len() < 2000,
            "salvaged {} of 2000 retained messages",
            retained.len()
        );
        assert_eq!(sessions.len(), 1, "the session's pages were not hit");
        let aside = std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .contains(".broken-")
            })
            .count();
        assert!(aside >= 1, "the broken file is kept for inspection");

        // Not a database at all: moved aside, started empty.
        std::fs::write(&path, vec![0x55u8; 8192]).unwrap();
        let _ = std::fs::remove_file(dir.path().join("broker.sqlite-wal"));
        let (_, retained, sessions, recovered) = Store::open_or_recover(dir.path()).unwrap();
        assert!(recovered);
        assert!(retained.is_empty() && sessions.is_empty());
    }
}
