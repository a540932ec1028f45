//! A buffer file SQLite reports as corrupt is moved aside
//! (`buffer.sqlite.broken-<ms>`, with its `-wal` and `-shm`, kept for
//! inspection) and a fresh one started, into which every row still readable
//! in the broken file is copied.

use std::path::Path;
use std::sync::atomic::Ordering;

use rusqlite::{params, Connection};
use tracing::error;

use super::sqlite::{Db, Row};
use super::{BufferError, BufferSettings, BufferStats};

/// SQLite says the file is damaged or not a database at all.
pub(super) fn is_corrupt(e: &BufferError) -> bool {
    matches!(e, BufferError::Sqlite { source: rusqlite::Error::SqliteFailure(f, _), .. }
        if matches!(f.code, rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase))
}

/// Opens the database. Only a broken file is moved aside (and counted in
/// `recovered`); a full disk or a permission problem is reported as it is,
/// the file untouched.
pub(super) fn open(
    settings: &BufferSettings,
    stats: &BufferStats,
) -> Result<(Db, u64), BufferError> {
    match Db::open(settings) {
        Ok(x) => Ok(x),
        Err(e) if is_corrupt(&e) => {
            error!(error = %e, "buffer database corrupted; keeping it aside and starting a fresh one");
            stats.recovered.fetch_add(1, Ordering::Relaxed);
            start_fresh(settings)
        }
        Err(e) => Err(e),
    }
}

/// Moves the (closed) broken file aside and opens a fresh one with what
/// could be salvaged from it; returns it with the next sequence number,
/// never lower than the broken file implies.
pub(super) fn start_fresh(settings: &BufferSettings) -> Result<(Db, u64), BufferError> {
    let aside = crate::files::move_aside(&settings.path, "buffer");
    let (mut db, next) = Db::open(settings)?;
    let next = match aside {
        Some(aside) => next.max(salvage(&aside, &mut db)),
        None => next,
    };
    Ok((db, next))
}

/// Copies every row still readable in a broken buffer file into `db`:
/// from the start up to the first unreadable page, then from the end back
/// to it. Returns the next sequence number the broken file implies, so
/// numbers never go back.
fn salvage(broken: &Path, db: &mut Db) -> u64 {
    let Ok(old) = Connection::open(broken) else {
        return 1;
    };
    let read = |order: &str, rows: &mut Vec<Row>, stop_at: u64| {
        let sql = format!(
            "SELECT seq, topic, payload, qos, retain, ts_ms FROM outbox ORDER BY seq {order}"
        );
        let Ok(mut st) = old.prepare(&sql) else {
            return;
        };
        let Ok(mut it) = st.query([]) else { return };
        while let Ok(Some(r)) = it.next() {
            let row = Row::from_sql(r);
            match row {
                Ok(row) if row.seq.0 > stop_at => rows.push(row),
                _ => return,
            }
        }
    };
    let mut head = Vec::new();
    read("ASC", &mut head, 0);
    let mut tail = Vec::new();
    read("DESC", &mut tail, head.last().map_or(0, |r| r.seq.0));
    tail.reverse();
    let saved: u64 = old
        .query_row("SELECT value FROM meta WHERE key = 'next_seq'", [], |r| {
            r.get(0)
        })
        .unwrap_or(1);
    let rows: Vec<Row> = head.into_iter().chain(tail).collect();
    let next = rows.last().map_or(1, |r| r.seq.0 + 1).max(saved);
    let stored = (|| {
        let tx = db.conn.transaction()?;
        {
            let mut ins = tx.prepare(
                "INSERT OR IGNORE INTO outbox (seq, topic, payload, qos, retain, ts_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            for r in &rows {
                r.insert(&mut ins)?;
            }
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('next_seq', ?1)
                 ON CONFLICT(key) DO UPDATE SET value = max(value, excluded.value)",
                params![next],
            )?;
        }
        tx.commit()
    })();
    match stored {
        Ok(()) => error!(
            salvaged = rows.len(),
            from = %broken.display(),
            "rows still readable in the broken buffer file copied to the fresh one; any others stay in the kept file"
        ),
        Err(e) => error!(error = %e, "cannot copy rows out of the broken buffer file"),
    }
    next
}

#[cfg(test)]
mod tests {
    use crate::buffer::tests::{append, settings, settled};
    use crate::buffer::{Buffer, BufferStats, WhenFull};
    use crate::message::Seq;

    /// Files moved aside in `dir` (`buffer.sqlite.broken-<ms>`).
    fn kept_aside(dir: &std::path::Path) -> usize {
        std::fs::read_dir(dir)
            .unwrap()
            .filter(|e| {
                let name = e.as_ref().unwrap().file_name();
                name.to_string_lossy().contains(".broken-")
            })
            .count()
    }

    #[tokio::test]
    async fn a_file_that_is_not_a_database_is_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("buffer.sqlite");
        std::fs::write(&path, vec![0x42u8; 8192]).unwrap();
        let b = Buffer::open(settings(dir.path(), 1 << 20, WhenFull::DropOldest)).unwrap();
        assert_eq!(BufferStats::get(&b.stats().recovered), 1);
        append(&b, "t", "fresh");
        settled(&b, 1).await;
        assert_eq!(kept_aside(dir.path()), 1);
    }

    #[tokio::test]
    async fn a_corrupted_page_keeps_the_file_aside_and_salvages_what_reads() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = settings(dir.path(), 1 << 30, WhenFull::DropOldest);
        let b = Buffer::open(cfg.clone()).unwrap();
        let payload = "x".repeat(200);
        for _ in 0..2000 {
            append(&b, "capteurs/t", &payload);
        }
        settled(&b, 2000).await;
        b.close();
        // Garbage over one page in the middle of the table.
        let path = dir.path().join("buffer.sqlite");
        let mut bytes = std::fs::read(&path).unwrap();
        let pages = bytes.len() / 4096;
        let at = pages / 2 * 4096;
        for (i, byte) in bytes[at..at + 4096].iter_mut().enumerate() {
            *byte = (i * 7 + 13) as u8;
        }
        std::fs::write(&path, &bytes).unwrap();
        let b = Buffer::open(cfg).unwrap();
        assert_eq!(BufferStats::get(&b.stats().recovered), 1);
        let depth = BufferStats::get(&b.stats().depth);
        assert!(
            depth > 1500 && depth < 2000,
            "salvaged {depth} of 2000 (one page holds ~18 rows)"
        );
        let rows = b.fetch(Seq(0), 5000).await.unwrap();
        assert_eq!(rows.len() as u64, depth);
        assert_eq!(rows.first().map(|r| r.seq.0), Some(1));
        assert_eq!(rows.last().map(|r| r.seq.0), Some(2000));
        assert!(rows.windows(2).all(|w| w[0].seq < w[1].seq));
        assert_eq!(
            append(&b, "t", "next"),
            2001,
            "sequence numbers never go back"
        );
        assert_eq!(
            kept_aside(dir.path()),
            1,
            "the broken file is kept for inspection"
        );
    }
}
