//! Recovery of a corrupt `broker.sqlite`: once the file is moved aside,
//! every row that still reads is copied into a fresh one, table by table,
//! and the log says what was saved and what may be lost.

use std::path::Path;

use rusqlite::Connection;
use tracing::{error, info};

use super::schema::TABLES;

/// Copies every row that still reads from each table of a broken store
/// into `fresh`: in rowid order up to the first unreadable page, then from
/// the end back to it. Logs, per table, how many rows were saved and
/// whether reading stopped early (rows past a damaged page are lost).
pub(super) fn salvage(broken: &Path, fresh: &Connection) {
    let Ok(old) = Connection::open(broken) else {
        error!(file = %broken.display(), "broker store: nothing salvaged (the file does not open)");
        return;
    };
    for table in TABLES {
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytestring::ByteString;

    use crate::broker::session::Session;
    use crate::broker::store::tests::{fresh_store, save_session};
    use crate::broker::store::{Batch, Store};
    use crate::message::{Message, Origin, QoS};

    /// A corrupt broker.sqlite used to stop the gateway (a restart loop
    /// under systemd). It is moved aside and what reads is salvaged.
    #[test]
    fn a_corrupt_store_is_moved_aside_and_what_reads_is_salvaged() {
        let (dir, mut store) = fresh_store();
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
