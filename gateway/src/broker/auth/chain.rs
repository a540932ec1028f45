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
}
