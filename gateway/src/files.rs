//! The gateway's own files are private to it: the data directory is 0700
//! and the SQLite files in it 0600 (they hold queued messages, sessions and
//! retained messages), whatever the umask, under systemd or not.

use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Creates `dir` (and missing parents) as 0700. An existing directory is
/// left as it is: it may be one the administrator chose and shares.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Makes sure the SQLite database `file` exists as 0600 before SQLite opens
/// it (SQLite gives its `-wal` and `-shm` files the database's mode), and
/// takes group and other bits away from an older one and its companions.
pub fn private_database(file: &Path) -> io::Result<()> {
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(file)
    {
        Ok(_) => return Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    for suffix in ["", "-wal", "-shm"] {
        let mut name = file.as_os_str().to_owned();
        name.push(suffix);
        let path = Path::new(&name);
        let Ok(m) = std::fs::metadata(path) else {
            continue;
        };
        // Only our own files: chmod on another user's fails anyway.
        if m.mode() & 0o077 != 0 && m.uid() == me {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(m.mode() & 0o700))?;
        }
    }
    Ok(())
}

/// `PRAGMA quick_check`: a damaged database is reported as SQLite's own
/// "corrupt" error, which callers already treat as such.
pub fn quick_check(conn: &rusqlite::Connection) -> rusqlite::Result<()> {
    let ok: String = conn.query_row("PRAGMA quick_check(1)", [], |r| r.get(0))?;
    if ok == "ok" {
        return Ok(());
    }
    Err(rusqlite::Error::SqliteFailure(
        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CORRUPT),
        Some(ok),
    ))
}

/// Moves a broken SQLite database (and its `-wal` and `-shm`) aside as
/// `<file>.broken-<ms>` for inspection; returns the new name of the main
/// file. `what` names it in the log ("buffer", "broker store").
pub fn move_aside(path: &Path, what: &str) -> Option<std::path::PathBuf> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let name = |n: u32| match n {
        0 => format!("{}.broken-{stamp}", path.display()),
        n => format!("{}.broken-{stamp}-{n}", path.display()),
    };
    let mut n = 0;
    while Path::new(&name(n)).exists() {
        n += 1;
    }
    let base = name(n);
    let mut moved = None;
    for suffix in ["", "-wal", "-shm"] {
        let from = std::path::PathBuf::from(format!("{}{suffix}", path.display()));
        if from.exists() {
            let to = std::path::PathBuf::from(format!("{base}{suffix}"));
            match std::fs::rename(&from, &to) {
                Ok(()) => {
                    tracing::error!(from = %from.display(), to = %to.display(), "broken {what} file kept aside");
                    if suffix.is_empty() {
                        moved = Some(to);
                    }
                }
                Err(e) => {
                    tracing::error!(file = %from.display(), error = %e, "cannot move the broken {what} file aside")
                }
            }
        }
    }
    moved
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_dir_and_databases_are_private() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data/sub");
        create_private_dir(&dir).unwrap();
        assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
        let db = dir.join("broker.sqlite");
        private_database(&db).unwrap();
        assert_eq!(std::fs::metadata(&db).unwrap().mode() & 0o777, 0o600);
        // An older file and its WAL, written under a 022 umask: tightened.
        let old = dir.join("buffer.sqlite");
        for f in [old.clone(), dir.join("buffer.sqlite-wal")] {
            std::fs::write(&f, b"").unwrap();
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        private_database(&old).unwrap();
        for f in [old.clone(), dir.join("buffer.sqlite-wal")] {
            assert_eq!(
                std::fs::metadata(&f).unwrap().mode() & 0o777,
                0o600,
                "{f:?}"
            );
        }
    }
}

/// A QoS is kept in SQLite as its number; a number above 2 (a file written
/// by hand, or damaged) reads as 2, as the broker and buffer always did.
impl rusqlite::types::ToSql for crate::message::QoS {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        Ok(u8::from(*self).into())
    }
}

impl rusqlite::types::FromSql for crate::message::QoS {
    fn column_result(value: rusqlite::types::ValueRef<'_>) -> rusqlite::types::FromSqlResult<Self> {
        let n = u8::column_result(value)?;
        Ok(crate::message::QoS::from_u8(n.min(2)).expect("0..=2 is a QoS"))
    }
}

/// A sequence number is kept in SQLite as an integer.
impl rusqlite::types::ToSql for crate::message::Seq {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        self.0.to_sql()
    }
}

impl rusqlite::types::FromSql for crate::message::Seq {
    fn column_result(value: rusqlite::types::ValueRef<'_>) -> rusqlite::types::FromSqlResult<Self> {
        u64::column_result(value).map(crate::message::Seq)
    }
}
