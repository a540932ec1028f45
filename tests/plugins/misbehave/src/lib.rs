//! A plugin that misbehaves on demand, to prove the gateway's limits: the
//! payload says what to do. `loop`: spins forever; `oom`: allocates until
//! memory runs out; `trap`: hits unreachable; `garbage`: returns a message
//! on an invalid topic; `error`: returns an error; `slow:N`: spins N ms.
//! Anything else passes unchanged.

wit_bindgen::generate!({ world: "transform-plugin", path: "../../../wit" });

use exports::capteurs::plugins::transform::{Guest, Message, Param, Verdict};

struct Plugin;

impl Guest for Plugin {
    fn init(_: Vec<Param>) -> Result<(), String> {
        Ok(())
    }

    fn process(mut msg: Message) -> Result<Verdict, String> {
        let what = String::from_utf8_lossy(&msg.payload).into_owned();
        match what.as_str() {
            "loop" => {
                let mut n: u64 = 0;
                loop {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            }
            "oom" => {
                let mut hog: Vec<Vec<u8>> = Vec::new();
                loop {
                    hog.push(vec![1u8; 1 << 20]);
                    std::hint::black_box(&hog);
                }
            }
            "trap" => {
                #[cfg(target_arch = "wasm32")]
                core::arch::wasm32::unreachable();
                #[cfg(not(target_arch = "wasm32"))]
                unreachable!()
            }
            "garbage" => {
                msg.topic = "a/#/b".into();
                Ok(Verdict::Replace(vec![msg]))
            }
            "error" => Err("asked to fail".into()),
            w if w.starts_with("slow:") => {
                let ms: u64 = w[5..].parse().unwrap_or(1);
                let start = capteurs::plugins::host::monotonic_ns();
                while capteurs::plugins::host::monotonic_ns() - start < ms * 1_000_000 {}
                Ok(Verdict::Keep)
            }
            _ => Ok(Verdict::Keep),
        }
    }
}

#[cfg(target_arch = "wasm32")]
export!(Plugin);
