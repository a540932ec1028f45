//! Who may connect, publish and subscribe.
//!
//! The broker asks one [`Authenticator`] at CONNECT and on every PUBLISH and
//! SUBSCRIBE. The built-in one ([`FileAuth`]) reads a mosquitto-style password
//! file and ACL file; WASM auth plugins will implement the same trait and be
//! chained in front of it with [`AuthChain`] (first definite answer wins).

use std::net::SocketAddr;

pub mod acl;
pub mod backoff;
pub mod chain;
pub mod file;
pub mod passwd;

pub use acl::{Acl, AclError};
pub use chain::AuthChain;
pub use file::{AuthError, FileAuth};
pub use passwd::{PasswdError, PasswordFile};

/// What the broker knows about a client when it asks.
#[derive(Debug, Clone)]
pub struct ClientInfo {
    pub client_id: String,
    pub username: Option<String>,
    pub peer: SocketAddr,
}

/// Why a CONNECT is refused: CONNACK return code 4 or 5.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectRefusal {
    /// CONNACK 4: bad user name or password.
    BadCredentials,
    /// CONNACK 5: not authorised.
    NotAuthorized,
}

/// An answer at CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectDecision {
    Accept,
    Refuse(ConnectRefusal),
    /// No opinion: ask the next authenticator in the chain.
    Abstain,
}

/// What a client wants to do with a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// PUBLISH to a topic name (also the will topic, checked at CONNECT).
    Publish,
    /// SUBSCRIBE to a topic filter.
    Subscribe,
    /// Receive a message on a topic name, asked at delivery (a subscription
    /// granted earlier, restored from disk, or wider than what may be read).
    Receive,
}

/// An answer for PUBLISH / SUBSCRIBE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AclDecision {
    Allow,
    Deny,
    Abstain,
}

/// The hook the broker calls. Implementations must be cheap: `authorize`
/// runs on every PUBLISH.
pub trait Authenticator: Send + Sync + 'static {
    fn authenticate(&self, client: &ClientInfo, password: Option<&[u8]>) -> ConnectDecision;
    fn authorize(&self, client: &ClientInfo, action: Action, topic: &str) -> AclDecision;

    /// Can [`Action::Receive`] ever be refused for a topic a granted
    /// subscription matches? When not (no ACL at all), the broker skips the
    /// check at delivery.
    fn checks_receive(&self) -> bool {
        true
    }

    /// Would [`Action::Receive`] be allowed for every topic name `filter`
    /// can match, for this client, now? Then the broker skips the check at
    /// each delivery of that subscription. False (the default) is always
    /// safe: every delivery is asked.
    fn covers_reads(&self, _client: &ClientInfo, _filter: &str) -> bool {
        false
    }

    /// Changes whenever the answers may have changed (plugins reloaded):
    /// the broker then forgets the receive decisions it cached.
    fn generation(&self) -> u64 {
        0
    }
}
