//! Password files, compatible with `mosquitto_passwd`.
//!
//! One `user:hash` per line; blank lines and lines starting with `#` are
//! ignored. Hashes:
//! - `$7$<iterations>$<salt>$<hash>`: PBKDF2-HMAC-SHA512, base64 salt and
//!   64-byte hash (mosquitto 2.0's format; what we write, 12-byte salt);
//! - `$6$<salt>$<hash>`: SHA-512(password ‖ salt) (mosquitto 1.x; read only).
//!
//! So a file made by `mosquitto_passwd` works here and one made by
//! `capteurs-gateway passwd` works with mosquitto.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use base64::Engine;
use sha2::{Digest, Sha512};
use thiserror::Error;

/// Iterations used when writing `$7$` hashes.
pub const ITERATIONS: u32 = 1000;
const SALT_LEN: usize = 12;
const HASH_LEN: usize = 64;

#[derive(Debug, Error)]
pub enum PasswdError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("{origin} line {line}: {what}")]
    Syntax {
        origin: String,
        line: usize,
        what: String,
    },
    #[error("invalid user name {0:?}: it must be non-empty, without ':' or control characters")]
    BadUser(String),
    #[error("user {0:?} is not in the file")]
    NoSuchUser(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Hash {
    Pbkdf2 {
        iterations: u32,
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
    Sha512 {
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
}

fn b64(s: &str) -> Option<Vec<u8>> {
    STANDARD
        .decode(s)
        .or_else(|_| STANDARD_NO_PAD.decode(s))
        .ok()
}

impl Hash {
    fn parse(s: &str) -> Result<Hash, String> {
        let parts: Vec<&str> = s.split('$').collect();
        match parts.as_slice() {
            ["", "7", iterations, salt, hash] => {
                let iterations: u32 = iterations
                    .parse()
                    .map_err(|_| format!("bad iteration count {iterations:?}"))?;
                if iterations == 0 {
                    return Err("iteration count 0".into());
                }
                let salt = b64(salt).ok_or("salt is not base64")?;
                let hash = b64(hash).ok_or("hash is not base64")?;
                if hash.len() != HASH_LEN {
                    return Err(format!("hash is {} bytes, expected {HASH_LEN}", hash.len()));
                }
                Ok(Hash::Pbkdf2 {
                    iterations,
                    salt,
                    hash,
                })
            }
            ["", "6", salt, hash] => {
                let salt = b64(salt).ok_or("salt is not base64")?;
                let hash = b64(hash).ok_or("hash is not base64")?;
                if hash.len() != HASH_LEN {
                    return Err(format!("hash is {} bytes, expected {HASH_LEN}", hash.len()));
                }
                Ok(Hash::Sha512 { salt, hash })
            }
            _ => Err("unknown hash format (expected $7$... or $6$...)".into()),
        }
    }

    fn verify(&self, password: &[u8]) -> bool {
        match self {
            Hash::Pbkdf2 {
                iterations,
                salt,
                hash,
            } => {
                let mut out = [0u8; HASH_LEN];
                pbkdf2::pbkdf2_hmac::<Sha512>(password, salt, *iterations, &mut out);
                constant_time_eq(&out, hash)
            }
            Hash::Sha512 { salt, hash } => {
                let mut h = Sha512::new();
                h.update(password);
                h.update(salt);
                constant_time_eq(&h.finalize(), hash)
            }
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A `$7$` hash of `password` with a fresh random salt.
pub fn hash_password(password: &str) -> String {
    let salt: [u8; SALT_LEN] = rand::random();
    hash_with_salt(password, &salt, ITERATIONS)
}

fn hash_with_salt(password: &str, salt: &[u8], iterations: u32) -> String {
    let mut out = [0u8; HASH_LEN];
    pbkdf2::pbkdf2_hmac::<Sha512>(password.as_bytes(), salt, iterations, &mut out);
    format!(
        "$7${iterations}${}${}",
        STANDARD.encode(salt),
        STANDARD.encode(out)
    )
}

/// A loaded password file.
#[derive(Debug, Clone, Default)]
pub struct PasswordFile {
    users: HashMap<String, Hash>,
    /// Checked against for unknown users, at the file's highest iteration
    /// count: a wrong password takes as long for a user that does not
    /// exist as for one that does (no user enumeration by timing).
    dummy: Option<Hash>,
}

impl PasswordFile {
    pub fn load(path: &Path) -> Result<PasswordFile, PasswdError> {
        let text = std::fs::read_to_string(path).map_err(|source| PasswdError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses file contents; `origin` names the file in errors.
    pub fn parse(text: &str, origin: &str) -> Result<PasswordFile, PasswdError> {
        let mut users = HashMap::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let syntax = |what: String| PasswdError::Syntax {
                origin: origin.to_owned(),
                line: i + 1,
                what,
            };
            let (user, hash) = line
                .split_once(':')
                .ok_or_else(|| syntax("expected user:hash".into()))?;
            check_user(user).map_err(|e| syntax(e.to_string()))?;
            let hash = Hash::parse(hash).map_err(syntax)?;
            users.insert(user.to_owned(), hash);
        }
        let iterations = users
            .values()
            .map(|h| match h {
                Hash::Pbkdf2 { iterations, .. } => *iterations,
                Hash::Sha512 { .. } => 1,
            })
            .max()
            .unwrap_or(ITERATIONS);
        let dummy = Some(Hash::Pbkdf2 {
            iterations,
            salt: rand::random::<[u8; SALT_LEN]>().to_vec(),
            hash: vec![0; HASH_LEN],
        });
        Ok(PasswordFile { users, dummy })
    }

    /// `None`: unknown user; `Some(ok)`: whether the password is right.
    /// Takes as long either way (an unknown user is checked against a
    /// dummy hash). CPU-bound: call it from a blocking thread.
    pub fn verify(&self, user: &str, password: &[u8]) -> Option<bool> {
        match self.users.get(user) {
            Some(h) => Some(h.verify(password)),
            None => {
                if let Some(d) = &self.dummy {
                    std::hint::black_box(d.verify(password));
                }
                None
            }
        }
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

fn check_user(user: &str) -> Result<(), PasswdError> {
    if user.is_empty() || user.contains(':') || user.chars().any(char::is_control) {
        return Err(PasswdError::BadUser(user.to_owned()));
    }
    Ok(())
}

fn read_lines(path: &Path) -> Result<Vec<String>, PasswdError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(text.lines().map(str::to_owned).collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(source) => Err(PasswdError::Read {
            path: path.display().to_string(),
            source,
        }),
    }
}

/// Is this the line of `user`? Same reading as [`PasswordFile::parse`]:
/// leading/trailing blanks ignored, the name is everything before the first `:`.
fn is_user_line(line: &str, user: &str) -> bool {
    let line = line.trim();
    !line.starts_with('#') && line.split_once(':').is_some_and(|(u, _)| u == user)
}

/// Writes the file atomically (temporary file + rename). A new file is
/// mode 0600; an existing one keeps its mode, owner and group (the packaged
/// `root:capteurs 0640` file must stay readable to the service).
fn write_lines(path: &Path, lines: &[String]) -> Result<(), PasswdError> {
    let err = |source| PasswdError::Write {
        path: path.display().to_string(),
        source,
    };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(
        ".{name}.{}.{:08x}.tmp",
        std::process::id(),
        rand::random::<u32>()
    ));
    let existing = match std::fs::metadata(path) {
        Ok(m) => Some(m),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(err(e)),
    };
    let written = (|| {
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
        let mut opts = std::fs::OpenOptions::new();
        // create_new: never follow or clobber something already there.
        // 0600 until owner and mode are those of the file it replaces.
        opts.write(true).create_new(true).mode(0o600);
        let mut f = opts.open(&tmp)?;
        if let Some(m) = &existing {
            std::os::unix::fs::fchown(&f, Some(m.uid()), Some(m.gid())).map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!(
                        "cannot keep the file's owner {}:{} ({e}); run as its owner or root",
                        m.uid(),
                        m.gid()
                    ),
                )
            })?;
            f.set_permissions(std::fs::Permissions::from_mode(m.mode() & 0o7777))?;
        }
        let mut text = String::new();
        for l in lines {
            text.push_str(l);
            text.push('\n');
        }
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map_err(err)
}

/// Sets `user`'s password: replaces its line, or appends one. Other lines
/// and comments are kept as they are; the file is created if missing.
pub fn set_password(path: &Path, user: &str, password: &str) -> Result<(), PasswdError> {
    check_user(user)?;
    let entry = format!("{user}:{}", hash_password(password));
    let mut lines = read_lines(path)?;
    match lines.iter().position(|l| is_user_line(l, user)) {
        Some(i) => lines[i] = entry,
        None => lines.push(entry),
    }
    write_lines(path, &lines)
}

/// Removes `user` from the file.
pub fn delete_user(path: &Path, user: &str) -> Result<(), PasswdError> {
    let mut lines = read_lines(path)?;
    let before = lines.len();
    lines.retain(|l| !is_user_line(l, user));
    if lines.len() == before {
        return Err(PasswdError::NoSuchUser(user.to_owned()));
    }
    write_lines(path, &lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pbkdf2_round_trip() {
        let h = hash_password("isimaG1");
        let f = PasswordFile::parse(&format!("G1:{h}\n"), "t").unwrap();
        assert_eq!(f.verify("G1", b"isimaG1"), Some(true));
        assert_eq!(f.verify("G1", b"isimaG2"), Some(false));
        assert_eq!(f.verify("G2", b"isimaG1"), None);
    }

    /// `$7$` lines made outside this crate: by Python's
    /// `hashlib.pbkdf2_hmac("sha512", b"secret", b"0123456789ab", 101, 64)`
    /// and by mosquitto_passwd 2.0 (`mosquitto_passwd -c -b f alice 'S3cret pw!'`).
    #[test]
    fn mosquitto_7_format() {
        let text = "\
carol:$7$101$MDEyMzQ1Njc4OWFi$EO/lLlkeUgIiBaS8G8UK0ZMP1u508TA7Tl+AdJ1cEsmlbGyEPAERErpfq84j1kepISs0UzmcdL4ucgZ2uodxfQ==
alice:$7$101$2aQDbC8IGJZnsEfh$cPAUuUVjq/DFfFCpra8hEwDTN7ADWX0Rqzyl/gVX8jI/fx+5SpVYV4DUAa0Hav9upY58hgMJfqHbMbh0iiYBFw==
";
        let f = PasswordFile::parse(text, "t").unwrap();
        assert_eq!(f.verify("carol", b"secret"), Some(true));
        assert_eq!(f.verify("carol", b"Secret"), Some(false));
        assert_eq!(f.verify("alice", b"S3cret pw!"), Some(true));
        assert_eq!(f.verify("alice", b"S3cret pw"), Some(false));
        // And what we write is byte for byte the same thing.
        assert_eq!(
            format!("carol:{}", hash_with_salt("secret", b"0123456789ab", 101)),
            text.lines().next().unwrap()
        );
    }

    #[test]
    fn mosquitto_6_format() {
        let salt = b"saltsaltsalt";
        let mut h = Sha512::new();
        h.update(b"pw");
        h.update(salt);
        let line = format!(
            "old:$6${}${}",
            STANDARD.encode(salt),
            STANDARD.encode(h.finalize())
        );
        let f = PasswordFile::parse(&line, "t").unwrap();
        assert_eq!(f.verify("old", b"pw"), Some(true));
        assert_eq!(f.verify("old", b"pW"), Some(false));
        // From `mosquitto_passwd -H sha512 -b f bob bobpw`.
        let f = PasswordFile::parse(
            "bob:$6$pbO+9BCx8LPkP/lp$L4QPDkIpbQjaW7c+ibeOlJ3VPhA2cVi4Ebl+/7dMD+9U9GaUFZhRlx386VFoZMViLTBeMB/3dgkQpdEyPKq8bA==",
            "t",
        )
        .unwrap();
        assert_eq!(f.verify("bob", b"bobpw"), Some(true));
        assert_eq!(f.verify("bob", b"bobpx"), Some(false));
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let err = PasswordFile::parse("# users\nG1:$7$x$y$z\n", "classroom.passwd")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("classroom.passwd line 2:"), "{err}");
        let err = PasswordFile::parse("\n\nnocolon\n", "p")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 3"), "{err}");
        let err = PasswordFile::parse("u:$5$abc$def\n", "p")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown hash format"), "{err}");
    }

    #[test]
    fn set_password_replaces_appends_and_keeps_comments() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("passwd");
        std::fs::write(&p, "# classroom\n#G1:commented out\nG1:$7$1$AAAA$AAAA\n\n").unwrap();
        set_password(&p, "G1", "one").unwrap();
        set_password(&p, "G2", "two").unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5, "{text}");
        assert_eq!(lines[0], "# classroom");
        assert_eq!(lines[1], "#G1:commented out");
        assert!(lines[2].starts_with("G1:$7$1000$"));
        assert_eq!(lines[3], "");
        assert!(lines[4].starts_with("G2:$7$1000$"));
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "no temporary file left behind");
        let f = PasswordFile::load(&p).unwrap();
        assert_eq!(f.verify("G1", b"one"), Some(true));
        assert_eq!(f.verify("G2", b"two"), Some(true));
        delete_user(&p, "G1").unwrap();
        assert!(delete_user(&p, "G1").is_err());
        assert_eq!(PasswordFile::load(&p).unwrap().verify("G1", b"one"), None);
        assert!(set_password(&p, "a:b", "x").is_err());
        assert!(set_password(&p, "a\nb", "x").is_err());
        assert!(set_password(&p, "", "x").is_err());

        let fresh = dir.path().join("sub.passwd");
        set_password(&fresh, "prof", "isimaProf").unwrap();
        let f = PasswordFile::load(&fresh).unwrap();
        assert_eq!(f.verify("prof", b"isimaProf"), Some(true));
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(&fresh).unwrap().mode() & 0o7777, 0o600);
    }

    /// A wrong password for a known user used to take ~9x longer than any
    /// password for an unknown one (PBKDF2 skipped): user enumeration.
    #[test]
    fn unknown_users_take_as_long_as_known_ones() {
        let file = PasswordFile::parse(&format!("G1:{}\n", hash_password("x")), "t").unwrap();
        let time = |user: &str| {
            let t = std::time::Instant::now();
            for _ in 0..20 {
                file.verify(user, b"wrong");
            }
            t.elapsed()
        };
        // Warm up, then the fastest of three rounds of each.
        time("G1");
        let known = (0..3).map(|_| time("G1")).min().unwrap();
        let unknown = (0..3).map(|_| time("nobody")).min().unwrap();
        assert!(
            unknown * 2 > known,
            "unknown user {unknown:?} vs known {known:?}: enumerable by timing"
        );
        assert_eq!(file.verify("nobody", b"x"), None);
        assert_eq!(file.verify("G1", b"x"), Some(true));
    }

    /// The packaged file is root:capteurs 0640: rewriting it used to leave
    /// it 0600 owned by the caller, unreadable to the service.
    #[test]
    fn rewriting_keeps_mode_owner_and_group() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("passwd");
        std::fs::write(&p, "").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        let me = std::fs::metadata(&p).unwrap();
        // As root (CI, packaging), a group other than the caller's proves
        // the group is copied, not inherited.
        let gid = if me.uid() == 0 { 4 } else { me.gid() };
        std::os::unix::fs::chown(&p, None, Some(gid)).unwrap();
        set_password(&p, "G1", "one").unwrap();
        delete_user(&p, "G1").unwrap();
        set_password(&p, "G2", "two").unwrap();
        let after = std::fs::metadata(&p).unwrap();
        assert_eq!(after.mode() & 0o7777, 0o640);
        assert_eq!((after.uid(), after.gid()), (me.uid(), gid));
        assert_eq!(
            PasswordFile::load(&p).unwrap().verify("G2", b"two"),
            Some(true)
        );
    }

    #[test]
    fn shipped_classroom_file() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/classroom.passwd");
        let f = PasswordFile::load(&p).unwrap();
        assert_eq!(f.len(), 17);
        for g in 1..=16 {
            assert_eq!(
                f.verify(&format!("G{g}"), format!("isimaG{g}").as_bytes()),
                Some(true),
                "G{g}"
            );
        }
        assert_eq!(f.verify("G5", b"isimaG6"), Some(false));
        assert_eq!(f.verify("prof", b"isimaProf"), Some(true));
    }
}
