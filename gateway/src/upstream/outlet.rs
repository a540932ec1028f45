//! The broker's side of the upstream: which local messages go out, and
//! into the buffer with them.

use std::sync::Arc;

use tokio::sync::watch;

use super::Rules;
use crate::broker::Outbox;
use crate::buffer::Buffer;
use crate::message::{Durability, Message, Origin, Seq};

/// The broker's side of the upstream: decides which messages go out and
/// appends them to the buffer.
pub struct Outlet {
    rules: Arc<Rules>,
    buffer: Buffer,
    /// The gateway's status topic: the forwarder publishes it upstream
    /// itself (birth, will); the local copy must not follow it out late.
    status_topic: String,
}

impl Outlet {
    pub fn new(rules: Arc<Rules>, buffer: Buffer, status_topic: String) -> Outlet {
        Outlet {
            rules,
            buffer,
            status_topic,
        }
    }
}

impl Outbox for Outlet {
    fn offer(&self, m: &Arc<Message>, durability: Durability) -> Option<Seq> {
        // The router offers only what may go up (`Origin::policy`). The
        // gateway's status is published upstream by the forwarder itself
        // (birth, will): the local copy must not follow it out late.
        if m.origin == Origin::Broker && m.topic == self.status_topic {
            return None;
        }
        let (remote, qos) = self.rules.outbound(&m.topic)?;
        let out = Message {
            topic: remote.into(),
            qos,
            ..Message::clone(m)
        };
        Some(self.buffer.append(out, durability))
    }

    fn settled(&self) -> watch::Receiver<Seq> {
        self.buffer.settled()
    }
}
