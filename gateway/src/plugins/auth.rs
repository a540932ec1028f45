//! Auth plugins behind the broker's [`Authenticator`] trait, chained with
//! the built-in password file and ACL (first definite answer wins).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use wasmtime::component::Component;
use wasmtime::Engine;

use super::runtime::{GuardSettings, Guarded, HostState, PluginError, PluginStats};
use super::wit::auth_bindings::exports::capteurs::plugins::auth as wit;
use super::wit::auth_bindings::{AuthPlugin as World, AuthPluginPre};
use crate::broker::auth::{
    AclDecision, Action, Authenticator, ClientInfo, ConnectDecision, ConnectRefusal,
};

/// At most this many cached authorisation decisions (then the cache starts
/// over).
const CACHE_MAX: usize = 10_000;

type CacheKey = (String, Option<String>, bool, String);

pub struct AuthPlugin {
    pub name: Arc<str>,
    guarded: Guarded<World>,
    /// On a fault: abstain (the next authenticator decides) or refuse.
    fail_open: bool,
    cache: Option<Mutex<HashMap<CacheKey, AclDecision>>>,
}

impl AuthPlugin {
    /// `cache`: remember `authorize` answers per (client, user, action,
    /// topic) — right for plugins whose answer depends on nothing else.
    pub fn new(
        engine: &Engine,
        component: &Component,
        guard: GuardSettings,
        fail_open: bool,
        cache: bool,
    ) -> Result<AuthPlugin, PluginError> {
        let guarded = super::runtime::guarded_world!(
            engine,
            component,
            guard,
            World,
            AuthPluginPre<HostState>,
            capteurs_plugins_auth
        )?;
        Ok(AuthPlugin {
            name: guarded.name.clone(),
            guarded,
            fail_open,
            cache: cache.then(|| Mutex::new(HashMap::new())),
        })
    }

    pub fn stats(&self) -> &Arc<PluginStats> {
        &self.guarded.stats
    }
}

impl Authenticator for AuthPlugin {
    fn authenticate(&self, client: &ClientInfo, password: Option<&[u8]>) -> ConnectDecision {
        if self.guarded.disabled() {
            return self.on_fault_connect();
        }
        let peer = client.peer.to_string();
        let info = wit::ConnectInfo {
            client_id: &client.client_id,
            username: client.username.as_deref(),
            password,
            peer: &peer,
            cert_subject: None,
        };
        match self
            .guarded
            .call(|p, s| p.capteurs_plugins_auth().call_authenticate(s, info))
        {
            Ok(d) => {
                self.guarded.succeeded(0);
                match d {
                    wit::ConnectDecision::Accept => ConnectDecision::Accept,
                    wit::ConnectDecision::BadCredentials => {
                        ConnectDecision::Refuse(ConnectRefusal::BadCredentials)
                    }
                    wit::ConnectDecision::NotAuthorized => {
                        ConnectDecision::Refuse(ConnectRefusal::NotAuthorized)
                    }
                    wit::ConnectDecision::Abstain => ConnectDecision::Abstain,
                }
            }
            Err(_) => self.on_fault_connect(),
        }
    }

    fn authorize(&self, client: &ClientInfo, action: Action, topic: &str) -> AclDecision {
        if self.guarded.disabled() {
            return self.on_fault_acl();
        }
        let key = self.cache.as_ref().map(|_| {
            (
                client.client_id.clone(),
                client.username.clone(),
                action == Action::Publish,
                topic.to_owned(),
            )
        });
        if let (Some(cache), Some(key)) = (&self.cache, &key) {
            if let Some(d) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(key) {
                return *d;
            }
        }
        let a = match action {
            Action::Publish => wit::Action::Publish,
            // The WIT has two actions: receiving a topic name is asked as
            // subscribing to exactly that name (a filter without wildcards),
            // so plugins built before receive checks keep working.
            Action::Subscribe | Action::Receive => wit::Action::Subscribe,
        };
        let d = match self.guarded.call(|p, s| {
            p.capteurs_plugins_auth().call_authorize(
                s,
                &client.client_id,
                client.username.as_deref(),
                a,
                topic,
            )
        }) {
            Ok(d) => {
                self.guarded.succeeded(0);
                match d {
                    wit::Decision::Allow => AclDecision::Allow,
                    wit::Decision::Deny => AclDecision::Deny,
                    wit::Decision::Abstain => AclDecision::Abstain,
                }
            }
            // A fault is never cached.
            Err(_) => return self.on_fault_acl(),
        };
        if let (Some(cache), Some(key)) = (&self.cache, key) {
            let mut c = cache.lock().unwrap_or_else(|e| e.into_inner());
            if c.len() >= CACHE_MAX {
                c.clear();
            }
            c.insert(key, d);
        }
        d
    }
}

impl AuthPlugin {
    fn on_fault_connect(&self) -> ConnectDecision {
        if self.fail_open {
            ConnectDecision::Abstain
        } else {
            ConnectDecision::Refuse(ConnectRefusal::NotAuthorized)
        }
    }

    fn on_fault_acl(&self) -> AclDecision {
        if self.fail_open {
            AclDecision::Abstain
        } else {
            AclDecision::Deny
        }
    }
}
