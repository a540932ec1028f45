//! Helpers shared by the end-to-end tests, one module per fixture:
//! - [`broker`]: the broker alone in this process, and the authenticators;
//! - [`client`]: a raw MQTT client that sends and checks exact packets;
//! - [`gateway`]: the whole gateway, in this process or as its binary;
//! - [`mosquitto`]: Debian's mosquitto, the cloud stand-in;
//! - [`net`]: loopback ports for servers that are not ours;
//! - [`sim`]: the simulator behind pseudo-terminals;
//! - [`pty`]: a pseudo-terminal the test writes into;
//! - [`tools`]: Python with paho-mqtt, the wasm plugins.

pub mod broker;
pub mod client;
pub mod gateway;
pub mod mosquitto;
pub mod net;
pub mod pty;
pub mod sim;
pub mod tools;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use broker::*;
pub use client::*;
pub use gateway::*;
pub use mosquitto::*;
pub use net::*;
pub use pty::*;
pub use rmqtt_codec::types::QoS;
pub use rmqtt_codec::v3::{
    Codec, Connect, ConnectAck, ConnectAckReason, LastWill, Packet, SubscribeReturnCode,
};
pub use sim::*;
pub use tools::*;

/// How long a test waits for something that must happen: a ceiling, not a
/// pace (every wait ends as soon as the event comes). It was 5 s, which a
/// debug build on two cores busy with the rest of the suite exceeded:
/// reloading a plugin compiles it with a debug build of Cranelift (about
/// 2.2 s of CPU for celsius-json on an idle machine) after up to 2 s for
/// the file watcher's tick, and `sighup_and_a_replaced_file_...` failed.
pub const WAIT: Duration = Duration::from_secs(20);
/// How long a test waits to be sure something does NOT happen.
pub const QUIET: Duration = Duration::from_millis(300);

/// Waits (polling every 10 ms, up to [`WAIT`]) until `ready` holds, for
/// state that has no event to await (counters, files written by the broker).
pub async fn eventually(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !ready() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The workspace root (for configs/ and the course scripts).
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

/// The numbers in `s`, in order.
pub fn numbers(s: &str) -> Vec<u64> {
    s.split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap())
        .collect()
}
