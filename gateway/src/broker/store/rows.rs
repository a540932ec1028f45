//! How sessions and retained messages lie in `broker.sqlite`'s rows. A
//! save writes a session as the difference between the rows the database
//! holds (the store's index of [`SavedRows`]: no payloads) and the session
//! as it is now; a load reads every row back and rebuilds that index.
//! Everything here runs on the connection (or in the transaction) the
//! store gives it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use rusqlite::{params, Connection, Transaction};

use super::schema::SESSION_TABLES;
use super::SavedSession;
use crate::broker::session::{Delivery, OutState, Outgoing, Session};
use crate::message::{Message, Origin, QoS};

/// The rows of one session in the database, without the payloads.
#[derive(Debug, Default, Clone)]
pub(super) struct SavedRows {
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

/// Writes (Some) or deletes (None) the retained message of `topic`.
pub(super) fn write_retained(
    tx: &Transaction,
    topic: &str,
    m: Option<&Message>,
) -> rusqlite::Result<()> {
    match m {
        Some(m) => {
            tx.prepare_cached("INSERT OR REPLACE INTO retained (topic, payload, qos, ts_ms) VALUES (?1, ?2, ?3, ?4)")
                .and_then(|mut s| s.execute(params![topic, &m.payload[..], m.qos, ms(m.received_at)]))?;
        }
        None => {
            tx.prepare_cached("DELETE FROM retained WHERE topic = ?1")
                .and_then(|mut s| s.execute(params![topic]))?;
        }
    }
    Ok(())
}

/// Deletes every row of a session.
pub(super) fn delete_session(tx: &Transaction, id: &str) -> rusqlite::Result<()> {
    for table in SESSION_TABLES {
        tx.prepare_cached(&format!("DELETE FROM {table} WHERE client_id = ?1"))
            .and_then(|mut st| st.execute(params![id]))?;
    }
    Ok(())
}

/// Writes the rows of `s` that differ from `old`, what the database holds
/// for it; returns what it holds then.
pub(super) fn write_session(
    tx: &Transaction,
    id: &str,
    old: &SavedRows,
    s: &SavedSession,
) -> rusqlite::Result<SavedRows> {
    let new = SavedRows::of(s);
    if let Some(h) = new.head.as_ref().filter(|h| old.head.as_ref() != Some(h)) {
        tx.prepare_cached("INSERT OR REPLACE INTO sessions (client_id, last_packet_id, owner, owner_known, detached_ms) VALUES (?1, ?2, ?3, ?4, ?5)")
            .and_then(|mut st| {
                st.execute(params![
                    id,
                    h.last_packet_id,
                    h.owner.as_ref().and_then(|o| o.as_deref()),
                    h.owner.is_some(),
                    h.detached_ms
                ])
            })?;
    }
    for filter in old.subscriptions.keys() {
        if !new.subscriptions.contains_key(filter) {
            tx.prepare_cached("DELETE FROM subscriptions WHERE client_id = ?1 AND filter = ?2")
                .and_then(|mut st| st.execute(params![id, filter]))?;
        }
    }
    for (filter, qos) in &new.subscriptions {
        if old.subscriptions.get(filter) != Some(qos) {
            tx.prepare_cached(
                "INSERT OR REPLACE INTO subscriptions (client_id, filter, qos) VALUES (?1, ?2, ?3)",
            )
            .and_then(|mut st| st.execute(params![id, filter, qos]))?;
        }
    }
    for seq in old.messages.keys() {
        if !new.messages.contains_key(seq) {
            tx.prepare_cached("DELETE FROM session_messages WHERE client_id = ?1 AND seq = ?2")
                .and_then(|mut st| st.execute(params![id, *seq as i64]))?;
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
                        id,
                        d.id as i64,
                        state,
                        packet_id,
                        &*d.message.topic,
                        &d.message.payload[..],
                        d.qos,
                        d.retain
                    ])
                })?;
            }
            Some(&was) if was != (state, packet_id) => {
                tx.prepare_cached("UPDATE session_messages SET state = ?3, packet_id = ?4 WHERE client_id = ?1 AND seq = ?2")
                    .and_then(|mut st| st.execute(params![id, d.id as i64, state, packet_id]))?;
            }
            Some(_) => {}
        }
    }
    for pid in old.incoming_qos2.difference(&new.incoming_qos2) {
        tx.prepare_cached("DELETE FROM incoming_qos2 WHERE client_id = ?1 AND packet_id = ?2")
            .and_then(|mut st| st.execute(params![id, pid]))?;
    }
    for pid in new.incoming_qos2.difference(&old.incoming_qos2) {
        tx.prepare_cached(
            "INSERT OR REPLACE INTO incoming_qos2 (client_id, packet_id) VALUES (?1, ?2)",
        )
        .and_then(|mut st| st.execute(params![id, pid]))?;
    }
    Ok(new)
}

/// Every retained message saved.
pub(super) fn read_retained(conn: &Connection) -> rusqlite::Result<Vec<Message>> {
    let mut retained = Vec::new();
    let mut stmt = conn.prepare("SELECT topic, payload, qos, ts_ms FROM retained")?;
    let rows = stmt.query_map([], |r| {
        let topic: String = r.get(0)?;
        let payload: Vec<u8> = r.get(1)?;
        let qos: QoS = r.get(2)?;
        let ts: i64 = r.get(3)?;
        Ok((topic, payload, qos, ts))
    })?;
    for row in rows {
        let (topic, payload, qos, ts) = row?;
        let mut m = Message::new(topic, Bytes::from(payload), qos, true, Origin::Broker);
        m.received_at = SystemTime::UNIX_EPOCH + Duration::from_millis(ts.max(0) as u64);
        retained.push(m);
    }
    Ok(retained)
}

/// Every session saved, and the index of what the database holds for each.
#[allow(clippy::type_complexity)]
pub(super) fn read_sessions(
    conn: &Connection,
) -> rusqlite::Result<(Vec<Session>, HashMap<Arc<str>, SavedRows>)> {
    let mut index: HashMap<Arc<str>, SavedRows> = HashMap::new();
    type Head = (u16, Option<Option<Arc<str>>>, SystemTime);
    let mut last_ids: HashMap<String, Head> = HashMap::new();
    let mut stmt = conn.prepare(
        "SELECT client_id, last_packet_id, owner, owner_known, detached_ms FROM sessions",
    )?;
    for row in stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, u16>(1)?,
            r.get::<_, Option<String>>(2)?,
            r.get::<_, bool>(3)?,
            r.get::<_, i64>(4)?,
        ))
    })? {
        let (id, last, owner, known, detached) = row?;
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
    let mut stmt = conn.prepare("SELECT client_id, filter, qos FROM subscriptions")?;
    for row in stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, QoS>(2)?,
        ))
    })? {
        let (id, filter, qos) = row?;
        if let Some(rows) = index.get_mut(id.as_str()) {
            rows.subscriptions.insert(filter.clone(), qos);
        }
        subs.entry(id).or_default().insert(filter, qos);
    }
    let mut queues: HashMap<String, (VecDeque<Outgoing>, VecDeque<Delivery>)> = HashMap::new();
    let mut stmt = conn.prepare(
        "SELECT client_id, state, packet_id, topic, payload, qos, retain, seq FROM session_messages ORDER BY client_id, seq",
    )?;
    let rows = stmt.query_map([], |r| {
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
    })?;
    for row in rows {
        let (id, state, packet_id, topic, payload, qos, retain, seq) = row?;
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
            qos,
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
    let mut stmt = conn.prepare("SELECT client_id, packet_id FROM incoming_qos2")?;
    for row in stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, u16>(1)?)))? {
        let (id, pid) = row?;
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
    Ok((sessions, index))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use rusqlite::Connection;

    use crate::broker::session::{OutState, Outgoing, Session};
    use crate::broker::store::tests::{alices_box, delivery, fresh_store, save_session};
    use crate::broker::store::{Batch, SavedSession, Store};
    use crate::message::QoS;

    /// With 300 queued 20 KB messages, each new 1-byte message used to
    /// rewrite the whole session (12.5 MB per message). Now a save touches
    /// only the rows that changed.
    #[test]
    fn a_save_writes_only_what_changed() {
        let (dir, mut store) = fresh_store();
        let s = alices_box();
        {
            let mut st = s.lock();
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
        let (dir, mut store) = fresh_store();
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
}
