//! Persistent sessions and retained messages in SQLite (`broker.sqlite` in the
//! data directory), so they survive a restart.
//!
//! The broker never writes per message: changes are marked dirty and a saver
//! task writes them in one transaction every `persist_interval_ms` and at
//! shutdown (WAL, `synchronous = NORMAL`). A dirty session is rewritten whole:
//! its subscriptions, queued and in-flight QoS 1/2 messages, and the QoS 2
//! packet ids it has received but not yet released.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use bytestring::ByteString;
use rusqlite::{params, Connection};
use thiserror::Error;

use super::router::Router;
use super::session::{Delivery, OutState, Outgoing, Session};
use crate::message::{Message, Origin};

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
    pub subscriptions: Vec<(String, u8)>,
    pub outgoing: Vec<Outgoing>,
    pub queue: Vec<Delivery>,
    pub incoming_qos2: Vec<u16>,
    pub last_packet_id: u16,
    /// The owner's user name (None: anonymous), unless still unclaimed.
    pub owner: Option<Option<Arc<str>>>,
    /// When its last connection detached (now, if attached).
    pub detached_at: SystemTime,
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
            queue: st.queue.iter().filter(|d| d.qos > 0).cloned().collect(),
            incoming_qos2: st.incoming_qos2.iter().copied().collect(),
            last_packet_id: st.last_packet_id(),
            owner: (!st.owner_unclaimed).then(|| st.owner.clone()),
            detached_at: st.detached_at.unwrap_or_else(SystemTime::now),
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
        migrate(&conn).map_err(err)?;
        Ok(Store { conn, path })
    }

    fn err(&self) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
        move |source| StoreError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    /// Writes one batch in one transaction.
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
        for (id, saved) in &batch.sessions {
            for table in [
                "sessions",
                "subscriptions",
                "session_messages",
                "incoming_qos2",
            ] {
                tx.prepare_cached(&format!("DELETE FROM {table} WHERE client_id = ?1"))
                    .and_then(|mut s| s.execute(params![&**id]))
                    .map_err(err)?;
            }
            let Some(s) = saved else { continue };
            tx.prepare_cached("INSERT INTO sessions (client_id, last_packet_id, owner, owner_known, detached_ms) VALUES (?1, ?2, ?3, ?4, ?5)")
                .and_then(|mut st| {
                    st.execute(params![
                        &**id,
                        s.last_packet_id,
                        s.owner.as_ref().and_then(|o| o.as_deref()),
                        s.owner.is_some(),
                        ms(s.detached_at)
                    ])
                })
                .map_err(err)?;
            for (filter, qos) in &s.subscriptions {
                tx.prepare_cached(
                    "INSERT INTO subscriptions (client_id, filter, qos) VALUES (?1, ?2, ?3)",
                )
                .and_then(|mut st| st.execute(params![&**id, filter, qos]))
                .map_err(err)?;
            }
            let rows = s
                .outgoing
                .iter()
                .map(|o| {
                    let state = match o.state {
                        OutState::AwaitPuback => 1,
                        OutState::AwaitPubrec => 2,
                        OutState::AwaitPubcomp => 3,
                    };
                    (state, o.packet_id, &o.delivery)
                })
                .chain(s.queue.iter().map(|d| (0, 0, d)));
            for (seq, (state, packet_id, d)) in rows.enumerate() {
                tx.prepare_cached(
                    "INSERT INTO session_messages (client_id, seq, state, packet_id, topic, payload, qos, retain)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                )
                .and_then(|mut st| {
                    st.execute(params![
                        &**id,
                        seq as i64,
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
            for pid in &s.incoming_qos2 {
                tx.prepare_cached(
                    "INSERT INTO incoming_qos2 (client_id, packet_id) VALUES (?1, ?2)",
                )
                .and_then(|mut st| st.execute(params![&**id, pid]))
                .map_err(err)?;
            }
        }
        tx.commit().map_err(err)
    }

    /// Everything saved: retained messages and offline persistent sessions.
    pub fn load(&self) -> Result<(Vec<Message>, Vec<Session>), StoreError> {
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
                let qos: u8 = r.get(2)?;
                let ts: i64 = r.get(3)?;
                Ok((topic, payload, qos, ts))
            })
            .map_err(&err)?;
        for row in rows {
            let (topic, payload, qos, ts) = row.map_err(&err)?;
            let mut m = Message::new(
                topic,
                Bytes::from(payload),
                qos.min(2),
                true,
                Origin::Broker,
            );
            m.received_at = SystemTime::UNIX_EPOCH + Duration::from_millis(ts.max(0) as u64);
            retained.push(m);
        }

        type Head = (u16, Option<Option<Arc<str>>>, SystemTime);
        let mut last_ids: HashMap<String, Head> = HashMap::new();
        let mut stmt = self
            .conn
            .prepare("SELECT client_id, last_packet_id, owner, owner_known, detached_ms FROM sessions")
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
            // A row from before detach times were kept: as if detached now.
            let detached = if detached > 0 {
                SystemTime::UNIX_EPOCH + Duration::from_millis(detached as u64)
            } else {
                SystemTime::now()
            };
            last_ids.insert(id, (last, owner, detached));
        }
        let mut subs: HashMap<String, HashMap<String, u8>> = HashMap::new();
        let mut stmt = self
            .conn
            .prepare("SELECT client_id, filter, qos FROM subscriptions")
            .map_err(&err)?;
        for row in stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, u8>(2)?,
                ))
            })
            .map_err(&err)?
        {
            let (id, filter, qos) = row.map_err(&err)?;
            subs.entry(id).or_default().insert(filter, qos.min(2));
        }
        let mut queues: HashMap<String, (VecDeque<Outgoing>, VecDeque<Delivery>)> = HashMap::new();
        let mut stmt = self
            .conn
            .prepare("SELECT client_id, state, packet_id, topic, payload, qos, retain FROM session_messages ORDER BY client_id, seq")
            .map_err(&err)?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, u8>(1)?,
                    r.get::<_, u16>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, Vec<u8>>(4)?,
                    r.get::<_, u8>(5)?,
                    r.get::<_, bool>(6)?,
                ))
            })
            .map_err(&err)?;
        for row in rows {
            let (id, state, packet_id, topic, payload, qos, retain) = row.map_err(&err)?;
            let message = Arc::new(Message::new(
                topic,
                Bytes::from(payload),
                qos.min(2),
                retain,
                Origin::Broker,
            ));
            let delivery = Delivery {
                message,
                qos: qos.min(2),
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
        Ok((retained, sessions))
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
