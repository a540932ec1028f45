//! Several authenticators asked in order; the first definite answer wins.
//! WASM auth plugins go in front of the built-in [`super::FileAuth`].

use std::sync::Arc;

use super::{AclDecision, Action, Authenticator, ClientInfo, ConnectDecision, ConnectRefusal};

pub struct AuthChain(pub Vec<Arc<dyn Authenticator>>);

impl Authenticator for AuthChain {
    fn authenticate(&self, client: &ClientInfo, password: Option<&[u8]>) -> ConnectDecision {
        self.0
            .iter()
            .map(|a| a.authenticate(client, password))
            .find(|d| *d != ConnectDecision::Abstain)
            .unwrap_or(ConnectDecision::Refuse(ConnectRefusal::NotAuthorized))
    }

    fn authorize(&self, client: &ClientInfo, action: Action, topic: &str) -> AclDecision {
        self.0
            .iter()
            .map(|a| a.authorize(client, action, topic))
            .find(|d| *d != AclDecision::Abstain)
            .unwrap_or(AclDecision::Deny)
    }

    fn checks_receive(&self) -> bool {
        self.0.iter().any(|a| a.checks_receive())
    }

    /// The first authenticator's Allow is the chain's answer: when it
    /// allows every name of the filter, so does the chain.
    fn covers_reads(&self, client: &ClientInfo, filter: &str) -> bool {
        self.0
            .first()
            .is_some_and(|a| a.covers_reads(client, filter))
    }

    fn generation(&self) -> u64 {
        self.0.iter().fold(0, |g, a| g.wrapping_add(a.generation()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::auth::FileAuth;

    struct Abstains;
    impl Authenticator for Abstains {
        fn authenticate(&self, _: &ClientInfo, _: Option<&[u8]>) -> ConnectDecision {
            ConnectDecision::Abstain
        }
        fn authorize(&self, _: &ClientInfo, _: Action, _: &str) -> AclDecision {
            AclDecision::Abstain
        }
    }

    #[test]
    fn first_definite_answer_wins() {
        let c = ClientInfo {
            client_id: "c".into(),
            username: None,
            peer: ([127, 0, 0, 1], 1).into(),
        };
        let empty = AuthChain(vec![Arc::new(Abstains)]);
        assert_eq!(
            empty.authenticate(&c, None),
            ConnectDecision::Refuse(ConnectRefusal::NotAuthorized)
        );
        assert_eq!(empty.authorize(&c, Action::Publish, "t"), AclDecision::Deny);
        let chain = AuthChain(vec![
            Arc::new(Abstains),
            Arc::new(FileAuth::from_parts(true, None, None)),
        ]);
        assert_eq!(chain.authenticate(&c, None), ConnectDecision::Accept);
        assert_eq!(
            chain.authorize(&c, Action::Publish, "t"),
            AclDecision::Allow
        );
    }

    /// A plugin that knows one user and one topic.
    struct Plugin;
    impl Authenticator for Plugin {
        fn authenticate(&self, c: &ClientInfo, _: Option<&[u8]>) -> ConnectDecision {
            match c.username.as_deref() {
                Some("G1") => ConnectDecision::Accept,
                _ => ConnectDecision::Refuse(ConnectRefusal::BadCredentials),
            }
        }
        fn authorize(&self, _: &ClientInfo, _: Action, topic: &str) -> AclDecision {
            if topic == "isima/G1" {
                AclDecision::Allow
            } else {
                AclDecision::Deny
            }
        }
    }

    /// builtin_auth_first: the password file and ACL answer for what they
    /// list and leave the rest to the plugin behind them.
    #[test]
    fn a_deferring_builtin_leaves_the_unknown_to_the_plugins() {
        use crate::broker::auth::{passwd::hash_password, Acl, PasswordFile};
        let passwords =
            PasswordFile::parse(&format!("prof:{}\n", hash_password("isimaProf")), "t").unwrap();
        let acl = Acl::parse("user prof\ntopic readwrite isima/#\n", "t").unwrap();
        let builtin = FileAuth::from_parts(false, Some(passwords), Some(acl)).deferring();
        let chain = AuthChain(vec![Arc::new(builtin), Arc::new(Plugin)]);
        let who = |user: &str| ClientInfo {
            client_id: "c".into(),
            username: Some(user.into()),
            peer: ([127, 0, 0, 1], 1).into(),
        };
        // Listed: the file decides, both ways.
        assert_eq!(
            chain.authenticate(&who("prof"), Some(b"isimaProf")),
            ConnectDecision::Accept
        );
        assert_eq!(
            chain.authenticate(&who("prof"), Some(b"wrong")),
            ConnectDecision::Refuse(ConnectRefusal::BadCredentials)
        );
        // Not listed: the plugin decides.
        assert_eq!(
            chain.authenticate(&who("G1"), Some(b"x")),
            ConnectDecision::Accept
        );
        assert_eq!(
            chain.authenticate(&who("G2"), Some(b"x")),
            ConnectDecision::Refuse(ConnectRefusal::BadCredentials)
        );
        // The ACL grants what it lists; the plugin has the last word on the rest.
        assert_eq!(
            chain.authorize(&who("prof"), Action::Publish, "isima/G7"),
            AclDecision::Allow
        );
        assert_eq!(
            chain.authorize(&who("G1"), Action::Publish, "isima/G1"),
            AclDecision::Allow
        );
        assert_eq!(
            chain.authorize(&who("G1"), Action::Publish, "isima/G2"),
            AclDecision::Deny
        );
        // Last in the chain (the default) it never defers.
        let alone = FileAuth::from_parts(false, None, Some(Acl::parse("", "t").unwrap()));
        assert_eq!(
            alone.authenticate(&who("G1"), Some(b"x")),
            ConnectDecision::Refuse(ConnectRefusal::NotAuthorized)
        );
        assert_eq!(
            alone.authorize(&who("G1"), Action::Publish, "t"),
            AclDecision::Deny
        );
    }
}
