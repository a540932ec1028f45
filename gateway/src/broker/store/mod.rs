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
//!
//! This file holds the store's API ([`Store`], [`Batch`], [`SavedSession`]);
//! [`rows`] how a session lies in rows and the diff a save writes,
//! [`schema`] the tables and the set-up of a connection, [`salvage`] the
//! recovery of a corrupt file.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use bytestring::ByteString;
use rusqlite::Connection;
use thiserror::Error;
use tracing::error;

use super::router::Router;
use super::session::{Delivery, Outgoing, Session};
use crate::message::{Message, QoS};

mod rows;
mod salvage;
mod schema;

use rows::SavedRows;

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

impl StoreError {
    /// The database file is damaged or not a database at all.
    pub fn is_corrupt(&self) -> bool {
        matches!(self, StoreError::Sqlite { source: rusqlite::Error::SqliteFailure(f, _), .. }
            if matches!(f.code, rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase))
    }
}

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

impl Store {
    pub fn open(data_dir: &Path) -> Result<Store, StoreError> {
        crate::files::create_private_dir(data_dir).map_err(|source| StoreError::Dir {
            path: data_dir.display().to_string(),
            source,
        })?;
        let file = data_dir.join("broker.sqlite");
        let path = file.display().to_string();
        crate::files::private_database(&file).map_err(|source| StoreError::File {
            path: path.clone(),
            source,
        })?;
        let conn = Connection::open(&file)
            .and_then(|conn| schema::set_up(&conn).map(|()| conn))
            .map_err(sqlite_error(&path))?;
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
            salvage::salvage(&aside, &store.conn);
        }
        let (retained, sessions) = store.load()?;
        error!(retained = retained.len(), sessions = sessions.len(),
            "broker store recovered: these were salvaged; retained messages and sessions not listed above are lost");
        Ok((store, retained, sessions, true))
    }

    /// Writes one batch in one transaction: for each session, only the
    /// rows that differ from what the database holds.
    pub fn save(&mut self, batch: &Batch) -> Result<(), StoreError> {
        let err = sqlite_error(&self.path);
        let tx = self.conn.transaction().map_err(&err)?;
        for (topic, m) in &batch.retained {
            rows::write_retained(&tx, topic, m.as_deref()).map_err(&err)?;
        }
        // The index changes only once the transaction is committed.
        let mut written: Vec<(Arc<str>, Option<SavedRows>)> = Vec::new();
        let none = SavedRows::default();
        for (id, saved) in &batch.sessions {
            let old = self.index.get(id);
            match saved {
                Some(s) => {
                    let new =
                        rows::write_session(&tx, id, old.unwrap_or(&none), s).map_err(&err)?;
                    written.push((id.clone(), Some(new)));
                }
                None if old.is_some() => {
                    rows::delete_session(&tx, id).map_err(&err)?;
                    written.push((id.clone(), None));
                }
                None => {}
            }
        }
        tx.commit().map_err(&err)?;
        for (id, saved) in written {
            match saved {
                Some(r) => self.index.insert(id, r),
                None => self.index.remove(&id),
            };
        }
        Ok(())
    }

    /// Everything saved: retained messages and offline persistent sessions.
    pub fn load(&mut self) -> Result<(Vec<Message>, Vec<Session>), StoreError> {
        let err = sqlite_error(&self.path);
        let retained = rows::read_retained(&self.conn).map_err(&err)?;
        let (sessions, index) = rows::read_sessions(&self.conn).map_err(&err)?;
        self.index = index;
        Ok((retained, sessions))
    }
}

/// Turns a SQLite error into a [`StoreError`] naming the file.
fn sqlite_error(path: &str) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
    move |source| StoreError::Sqlite {
        path: path.to_owned(),
        source,
    }
}

/// The save and load of a whole session, and the helpers all the
/// store's tests share.
#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use bytes::Bytes;

    use super::*;
    use crate::broker::session::{Inflight, OutState};
    use crate::message::Origin;

    /// An empty store in a directory of its own (removed when dropped).
    pub(super) fn fresh_store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        (dir, store)
    }

    /// A persistent session "box" of alice's, subscribed to `a/#`.
    pub(super) fn alices_box() -> Session {
        let s = Session::new(Arc::from("box"), false, Some(Arc::from("alice")));
        s.lock()
            .subscriptions
            .insert("a/#".into(), QoS::AtLeastOnce);
        s
    }

    pub(super) fn delivery(id: u64, topic: &str, payload: &[u8]) -> Delivery {
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

    pub(super) fn save_session(store: &mut Store, s: &Session) -> u64 {
        let before = store.conn.total_changes();
        let batch = Batch {
            sessions: vec![(s.client_id.clone(), Some(SavedSession::snapshot(s)))],
            retained: Vec::new(),
        };
        store.save(&batch).unwrap();
        store.conn.total_changes() - before
    }

    /// A delivery as the store keeps it (the message's QoS is the one it
    /// is delivered at: what comes back from the rows).
    fn at(id: u64, topic: &str, qos: QoS, retain: bool) -> Delivery {
        let message = Message::new(
            topic.to_owned(),
            topic.to_owned(),
            qos,
            retain,
            Origin::Broker,
        );
        Delivery {
            id,
            message: Arc::new(message),
            qos,
            retain,
        }
    }

    /// The in-flight window the round trip saves: QoS 1 and 2 exchanges at
    /// each stage.
    fn window() -> Vec<Outgoing> {
        let sent = |packet_id, delivery, state| Outgoing {
            packet_id,
            delivery,
            state,
        };
        vec![
            sent(
                3,
                at(7, "o/1", QoS::AtLeastOnce, false),
                OutState::AwaitPuback,
            ),
            sent(
                4,
                at(8, "o/2", QoS::ExactlyOnce, false),
                OutState::AwaitPubrec,
            ),
            sent(
                5,
                at(9, "o/3", QoS::ExactlyOnce, true),
                OutState::AwaitPubcomp,
            ),
        ]
    }

    /// What a test compares of a delivery.
    fn seen(d: &Delivery) -> (u64, String, Vec<u8>, QoS, bool) {
        let m = &d.message;
        (
            d.id,
            m.topic.to_string(),
            m.payload.to_vec(),
            d.qos,
            d.retain,
        )
    }

    fn epoch_ms(ms: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(ms)
    }

    #[test]
    fn a_session_and_retained_messages_come_back_as_saved() {
        let (dir, mut store) = fresh_store();
        let s = alices_box();
        {
            let mut st = s.lock();
            st.subscriptions.insert("b/+/c".into(), QoS::ExactlyOnce);
            st.queue.push_back(at(10, "q/1", QoS::AtLeastOnce, false));
            st.queue.push_back(at(11, "q/2", QoS::ExactlyOnce, true));
            st.queue.push_back(at(12, "q/0", QoS::AtMostOnce, false));
            st.outgoing = Inflight::restore(window().into(), 41);
            st.incoming_qos2.extend([17, 300]);
            st.detached_at = Some(epoch_ms(1_700_000_000_123));
        }
        let gone = Session::new(Arc::from("gone"), false, None);
        save_session(&mut store, &gone);
        let mut r1 = Message::new("r/1", "21.5", QoS::AtLeastOnce, true, Origin::Broker);
        r1.received_at = epoch_ms(1_600_000_000_456);
        let r2 = Message::new("r/2", "x", QoS::AtMostOnce, true, Origin::Broker);
        store
            .save(&Batch {
                sessions: vec![
                    (s.client_id.clone(), Some(SavedSession::snapshot(&s))),
                    (gone.client_id.clone(), None),
                ],
                retained: vec![
                    ("r/1".into(), Some(Arc::new(r1))),
                    ("r/2".into(), Some(Arc::new(r2))),
                ],
            })
            .unwrap();
        store
            .save(&Batch {
                sessions: Vec::new(),
                retained: vec![("r/2".into(), None)],
            })
            .unwrap();
        drop(store);

        let (mut store, retained, sessions, recovered) =
            Store::open_or_recover(dir.path()).unwrap();
        assert!(!recovered);
        let [r] = &retained[..] else {
            panic!("{retained:?}")
        };
        assert_eq!(
            (&*r.topic, &r.payload[..], r.qos, r.retain),
            ("r/1", &b"21.5"[..], QoS::AtLeastOnce, true)
        );
        assert_eq!(r.received_at, epoch_ms(1_600_000_000_456));
        let [s] = &sessions[..] else {
            panic!("{} sessions", sessions.len())
        };
        assert_eq!(&*s.client_id, "box");
        let st = s.lock();
        assert!(!st.clean && !st.owner_unclaimed);
        assert_eq!(st.owner.as_deref(), Some("alice"));
        assert_eq!(st.detached_at, Some(epoch_ms(1_700_000_000_123)));
        let subs = HashMap::from([
            ("a/#".to_owned(), QoS::AtLeastOnce),
            ("b/+/c".to_owned(), QoS::ExactlyOnce),
        ]);
        assert_eq!(st.subscriptions, subs);
        let queue: Vec<_> = st.queue.iter().map(seen).collect();
        let expected = [
            at(10, "q/1", QoS::AtLeastOnce, false),
            at(11, "q/2", QoS::ExactlyOnce, true),
        ];
        assert_eq!(
            queue,
            expected.iter().map(seen).collect::<Vec<_>>(),
            "QoS 0 is not kept"
        );
        let exchange = |o: &Outgoing| (o.packet_id, o.state, seen(&o.delivery));
        let saved: Vec<_> = window().iter().map(exchange).collect();
        assert_eq!(st.outgoing.iter().map(exchange).collect::<Vec<_>>(), saved);
        assert_eq!(st.last_packet_id(), 41);
        assert_eq!(st.incoming_qos2, HashSet::from([17, 300]));
        assert_eq!(st.next_delivery_id, 12);
        drop(st);
        assert_eq!(
            save_session(&mut store, s),
            0,
            "the index read back is what was written"
        );
    }
}
