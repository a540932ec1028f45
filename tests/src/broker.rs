//! The broker alone, in this process: a [`TestBroker`] on a loopback port
//! 0 listener with the defaults, and the authenticators the tests use.

use std::net::SocketAddr;
use std::sync::Arc;

use capteurs_gateway::broker::auth::{Authenticator, FileAuth};
use capteurs_gateway::broker::{Broker, BrokerHandle, BrokerSettings};

use crate::workspace;

/// Every client allowed, no passwords.
pub fn open_auth() -> Arc<dyn Authenticator> {
    Arc::new(FileAuth::new(true, None, None).expect("open auth"))
}

/// The course's classroom: G1..G16 / isimaGX, prof / isimaProf, per-group ACL.
pub fn classroom_auth() -> Arc<dyn Authenticator> {
    let c = workspace().join("configs");
    Arc::new(
        FileAuth::new(
            false,
            Some(&c.join("classroom.passwd")),
            Some(&c.join("classroom.acl")),
        )
        .expect("classroom auth"),
    )
}

/// A broker running in this process on 127.0.0.1:<free port>.
pub struct TestBroker {
    pub handle: Option<BrokerHandle>,
    pub addr: SocketAddr,
    pub settings: BrokerSettings,
}

impl TestBroker {
    pub async fn start(
        auth: Arc<dyn Authenticator>,
        tweak: impl FnOnce(&mut BrokerSettings),
    ) -> TestBroker {
        let mut settings = BrokerSettings::ephemeral();
        tweak(&mut settings);
        let handle = Broker::start(settings.clone(), auth)
            .await
            .expect("broker starts");
        let addr = handle.local_addr();
        TestBroker {
            handle: Some(handle),
            addr,
            settings,
        }
    }

    pub async fn open() -> TestBroker {
        Self::start(open_auth(), |_| {}).await
    }

    pub fn handle(&self) -> &BrokerHandle {
        self.handle.as_ref().expect("broker running")
    }

    pub async fn stop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.shutdown().await;
        }
    }
}
