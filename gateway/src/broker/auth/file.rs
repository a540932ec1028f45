//! The built-in authenticator: `allow_anonymous`, the password file and the
//! ACL file from `[broker]`. Last in a chain (the default) it always gives a
//! definite answer. Asked first (`builtin_auth_first`), it *defers*: it
//! answers for what its files know (a listed user, a rule that grants) and
//! leaves the rest to the auth plugins behind it.

use std::path::Path;

use thiserror::Error;

use super::{Acl, AclError, PasswdError, PasswordFile};
use super::{AclDecision, Action, Authenticator, ClientInfo, ConnectDecision, ConnectRefusal};

#[derive(Debug, Error)]
pub enum AuthError {
    #[error("password file: {0}")]
    Passwd(#[from] PasswdError),
    #[error("ACL file: {0}")]
    Acl(#[from] AclError),
}

#[derive(Debug, Clone, Default)]
pub struct FileAuth {
    allow_anonymous: bool,
    passwords: Option<PasswordFile>,
    acl: Option<Acl>,
    /// Abstain instead of refusing what the files do not cover.
    defer: bool,
}

impl FileAuth {
    pub fn new(
        allow_anonymous: bool,
        password_file: Option<&Path>,
        acl_file: Option<&Path>,
    ) -> Result<Self, AuthError> {
        Ok(FileAuth {
            allow_anonymous,
            passwords: password_file.map(PasswordFile::load).transpose()?,
            acl: acl_file.map(Acl::load).transpose()?,
            defer: false,
        })
    }

    pub fn from_parts(
        allow_anonymous: bool,
        passwords: Option<PasswordFile>,
        acl: Option<Acl>,
    ) -> Self {
        FileAuth {
            allow_anonymous,
            passwords,
            acl,
            defer: false,
        }
    }

    /// In front of other authenticators: an unknown user, an anonymous
    /// client not allowed here, or a topic no rule grants is left to them
    /// (a listed user with a wrong password is still refused).
    pub fn deferring(mut self) -> Self {
        self.defer = true;
        self
    }

    fn refuse(&self, why: ConnectRefusal) -> ConnectDecision {
        if self.defer {
            ConnectDecision::Abstain
        } else {
            ConnectDecision::Refuse(why)
        }
    }
}

impl Authenticator for FileAuth {
    fn authenticate(&self, client: &ClientInfo, password: Option<&[u8]>) -> ConnectDecision {
        let Some(user) = &client.username else {
            return if self.allow_anonymous {
                ConnectDecision::Accept
            } else {
                self.refuse(ConnectRefusal::NotAuthorized)
            };
        };
        match &self.passwords {
            Some(file) => match (file.verify(user, password.unwrap_or_default()), password) {
                (Some(true), Some(_)) => ConnectDecision::Accept,
                (None, _) => self.refuse(ConnectRefusal::BadCredentials),
                _ => ConnectDecision::Refuse(ConnectRefusal::BadCredentials),
            },
            None if self.allow_anonymous => ConnectDecision::Accept,
            None => self.refuse(ConnectRefusal::NotAuthorized),
        }
    }

    fn authorize(&self, client: &ClientInfo, action: Action, topic: &str) -> AclDecision {
        match &self.acl {
            None if self.defer => AclDecision::Abstain,
            None => AclDecision::Allow,
            Some(acl) if acl.check(client, action, topic) => AclDecision::Allow,
            Some(_) if self.defer => AclDecision::Abstain,
            Some(_) => AclDecision::Deny,
        }
    }

    fn checks_receive(&self) -> bool {
        self.acl.is_some() || self.defer
    }

    fn covers_reads(&self, client: &ClientInfo, filter: &str) -> bool {
        match &self.acl {
            None => !self.defer,
            // A rule that allows is answered Allow, deferring or not.
            Some(acl) => acl.covers_reads(client, filter),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    fn client(user: Option<&str>) -> ClientInfo {
        ClientInfo {
            client_id: "c".into(),
            username: user.map(Into::into),
            peer: SocketAddr::from(([127, 0, 0, 1], 1)),
        }
    }

    #[test]
    fn connect_decisions() {
        let pw = PasswordFile::parse(
            &format!("G1:{}\n", super::super::passwd::hash_password("isimaG1")),
            "t",
        )
        .unwrap();
        let closed = FileAuth::from_parts(false, Some(pw.clone()), None);
        assert_eq!(
            closed.authenticate(&client(None), None),
            ConnectDecision::Refuse(ConnectRefusal::NotAuthorized)
        );
        assert_eq!(
            closed.authenticate(&client(Some("G1")), Some(b"isimaG1")),
            ConnectDecision::Accept
        );
        let bad = ConnectDecision::Refuse(ConnectRefusal::BadCredentials);
        assert_eq!(closed.authenticate(&client(Some("G1")), Some(b"nope")), bad);
        assert_eq!(closed.authenticate(&client(Some("G1")), None), bad);
        assert_eq!(
            closed.authenticate(&client(Some("G9")), Some(b"isimaG1")),
            bad
        );
        let open = FileAuth::from_parts(true, Some(pw), None);
        assert_eq!(
            open.authenticate(&client(None), None),
            ConnectDecision::Accept
        );
        assert_eq!(
            open.authenticate(&client(Some("G1")), Some(b"nope")),
            bad,
            "a given name is always checked"
        );
        let no_file = FileAuth::from_parts(false, None, None);
        assert_eq!(
            no_file.authenticate(&client(Some("x")), Some(b"y")),
            ConnectDecision::Refuse(ConnectRefusal::NotAuthorized)
        );
        assert_eq!(
            no_file.authorize(&client(None), Action::Publish, "a"),
            AclDecision::Allow
        );
    }

    /// The shipped classroom configuration, loaded as the gateway loads it.
    #[test]
    fn classroom_files() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
        let auth = FileAuth::new(
            false,
            Some(&dir.join("classroom.passwd")),
            Some(&dir.join("classroom.acl")),
        )
        .unwrap();
        let g5 = client(Some("G5"));
        assert_eq!(
            auth.authenticate(&g5, Some(b"isimaG5")),
            ConnectDecision::Accept
        );
        assert_eq!(
            auth.authenticate(&g5, Some(b"isimaG6")),
            ConnectDecision::Refuse(ConnectRefusal::BadCredentials)
        );
        assert_eq!(
            auth.authenticate(&client(None), None),
            ConnectDecision::Refuse(ConnectRefusal::NotAuthorized)
        );
        assert_eq!(
            auth.authorize(&g5, Action::Publish, "isima/G5/temp"),
            AclDecision::Allow
        );
        assert_eq!(
            auth.authorize(&g5, Action::Publish, "isima/G6"),
            AclDecision::Deny
        );
        assert_eq!(
            auth.authorize(&g5, Action::Subscribe, "isima/#"),
            AclDecision::Allow
        );
        assert_eq!(
            auth.authorize(&g5, Action::Subscribe, "#"),
            AclDecision::Deny
        );
    }

    #[test]
    fn load_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let acl = dir.path().join("bad.acl");
        std::fs::write(&acl, "user G1\ntopic raed isima/#\n").unwrap();
        let err = FileAuth::new(true, None, Some(&acl))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("ACL file: "), "{err}");
        assert!(err.contains("bad.acl line 2: unknown access"), "{err}");
        let missing = dir.path().join("missing.passwd");
        let err = FileAuth::new(true, Some(&missing), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.passwd"), "{err}");
    }
}
