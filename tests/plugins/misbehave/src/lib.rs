//! A plugin that misbehaves on demand, to prove the gateway's limits: the
//! payload says what to do. `loop`: spins forever; `oom`: allocates until
//! memory runs out; `trap`: hits unreachable; `garbage`: returns a message
//! on an invalid topic; `error`: returns an error; `slow:N`: spins N ms;
//! `file`, `net`: reads a file, opens a socket (the sandbox refuses both);
//! `env:NAME`: answers with that environment variable's value, or `(unset)`.
//! Anything else passes unchanged.
//!
//! Its `init` spins for the `init_spin_ms` parameter's milliseconds (0 by
//! default): a plugin slow to start.

//! In a batch (`transform-batch`), `short-batch` makes the whole answer one
//! verdict short (garbage for the host to catch).

wit_bindgen::generate!({ world: "batch-transform-plugin", path: "../../../wit" });

use exports::capteurs::plugins::transform::{Guest, Message, Param, Verdict};
use exports::capteurs::plugins::transform_batch::{self, Batch};

struct Plugin;

/// Busy for `ms` milliseconds of the host's clock.
fn spin(ms: u64) {
    let start = capteurs::plugins::host::monotonic_ns();
    while capteurs::plugins::host::monotonic_ns() - start < ms * 1_000_000 {}
}

/// What the payload asks for; `msg` makes the message to mangle. The
/// payload is compared as bytes: an ordinary (even binary) payload costs
/// next to nothing, as a trivial filter's should.
fn act(payload: &[u8], msg: impl FnOnce() -> Message) -> Result<Verdict, String> {
    match payload {
        b"loop" => {
            let mut n: u64 = 0;
            loop {
                n = std::hint::black_box(n.wrapping_add(1));
            }
        }
        b"oom" => {
            let mut hog: Vec<Vec<u8>> = Vec::new();
            loop {
                hog.push(vec![1u8; 1 << 20]);
                std::hint::black_box(&hog);
            }
        }
        b"trap" => {
            #[cfg(target_arch = "wasm32")]
            core::arch::wasm32::unreachable();
            #[cfg(not(target_arch = "wasm32"))]
            unreachable!()
        }
        b"garbage" => {
            let mut m = msg();
            m.topic = "a/#/b".into();
            Ok(Verdict::Replace(vec![m]))
        }
        b"error" => Err("asked to fail".into()),
        b"file" => match std::fs::read("/etc/hostname") {
            Ok(_) => Err("read a file: the sandbox let it".into()),
            Err(e) => Err(format!("no file: {e}")),
        },
        b"net" => match std::net::TcpStream::connect("127.0.0.1:1883") {
            Ok(_) => Err("opened a socket: the sandbox let it".into()),
            Err(e) => Err(format!("no socket: {e}")),
        },
        p if p.starts_with(b"env:") => {
            let name = String::from_utf8_lossy(&p[4..]).into_owned();
            let mut m = msg();
            m.payload = std::env::var(name)
                .unwrap_or_else(|_| "(unset)".into())
                .into_bytes();
            Ok(Verdict::Replace(vec![m]))
        }
        p if p.starts_with(b"slow:") => {
            let ms: u64 = std::str::from_utf8(&p[5..])
                .ok()
                .and_then(|n| n.parse().ok())
                .unwrap_or(1);
            spin(ms);
            Ok(Verdict::Keep)
        }
        _ => Ok(Verdict::Keep),
    }
}

impl Guest for Plugin {
    fn init(params: Vec<Param>) -> Result<(), String> {
        let ms: u64 = params
            .iter()
            .find(|p| p.key == "init_spin_ms")
            .and_then(|p| p.value.parse().ok())
            .unwrap_or(0);
        spin(ms);
        Ok(())
    }

    fn process(msg: Message) -> Result<Verdict, String> {
        act(&msg.payload, || msg.clone())
    }
}

impl transform_batch::Guest for Plugin {
    fn process_batch(b: Batch) -> Vec<Result<Verdict, String>> {
        let mut rest = &b.data[..];
        let mut short = false;
        let mut out: Vec<Result<Verdict, String>> = b
            .lengths
            .chunks_exact(2)
            .map(|len| {
                let (topic, r) = rest.split_at(len[0] as usize);
                let (payload, r) = r.split_at(len[1] as usize);
                rest = r;
                short |= payload == b"short-batch";
                act(payload, || Message {
                    topic: String::from_utf8_lossy(topic).into_owned(),
                    payload: payload.to_vec(),
                    qos: b.qos,
                    retain: b.retain,
                    origin: b.origin.clone(),
                    received_ms: b.received_ms,
                })
            })
            .collect();
        if short {
            out.pop();
        }
        out
    }
}

#[cfg(target_arch = "wasm32")]
export!(Plugin);
