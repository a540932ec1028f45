//! The layout of `broker.sqlite`: its tables, how a connection to it is set
//! up (WAL, `synchronous = NORMAL`, a quick integrity check), and the
//! migration of a file written by an older gateway.

use std::collections::HashSet;
use std::time::Duration;

use rusqlite::Connection;

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

/// Every table, in the order a salvage copies them.
pub(super) const TABLES: [&str; 5] = [
    "retained",
    "sessions",
    "subscriptions",
    "session_messages",
    "incoming_qos2",
];

/// The tables that hold a session's rows (keyed by `client_id`).
pub(super) const SESSION_TABLES: [&str; 4] = [
    "sessions",
    "subscriptions",
    "session_messages",
    "incoming_qos2",
];

/// Makes a fresh connection ready: journal, durability, lock wait, the
/// tables, an integrity check (a corrupt file fails here, not later), and
/// the columns an older file lacks.
pub(super) fn set_up(conn: &Connection) -> rusqlite::Result<()> {
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.execute_batch(SCHEMA)?;
    crate::files::quick_check(conn)?;
    migrate(conn)
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
