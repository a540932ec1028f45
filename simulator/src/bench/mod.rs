//! `capteurs-sim bench`: an MQTT 3.1.1 load generator that runs the same load
//! against any broker (ours, Debian's mosquitto) and reports publish and
//! delivery rates, lost and duplicated messages, and publish→deliver latency.
//!
//! Flow: every subscriber connects and subscribes to `<topic>/#` (waiting for
//! its SUBACK); then the publishers connect and publish to `<topic>/<i>` (or
//! all to `<topic>/all` with `--fan-in`) for `--warmup` + `--duration`
//! seconds, flat out or paced at `--rate` messages/s in total; then
//! publishing stops, the subscribers drain (until every expected delivery
//! arrived or nothing came for 2 s), everyone DISCONNECTs, and the report is
//! printed. Payloads carry (publisher, sequence, send time): publishers and
//! subscribers live in this one process, so they share the clock.
//!
//! The hot path is the hand-written client of `client.rs`: PUBLISH packets are
//! encoded in batches into one buffer and written with one `write_all`, QoS
//! 1/2 publishers keep a bounded window of unacknowledged messages, and the
//! default runtime is one thread, leaving the other core of a 2-core machine
//! to the broker.
//!
//! Files: `args.rs` the command line; `orchestrator.rs` one run, phase by
//! phase; `publisher.rs` and `subscriber.rs` the tasks that make the load,
//! over `client.rs`; `stats.rs` what a subscriber saw (loss, duplicates,
//! latency); `cpu.rs` CPU use from /proc; `progress.rs` the progress line;
//! `report.rs` the report, as JSON or a table. Here: the entry point, and
//! what the tasks share.

mod args;
mod client;
mod cpu;
mod orchestrator;
mod progress;
mod publisher;
mod report;
mod stats;
mod subscriber;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::time::Instant;

use args::validate;
use orchestrator::bench;
use report::table;

pub use args::BenchArgs;

/// Keep-alive announced in CONNECT; every connection pings at half of it.
const KEEP_ALIVE_S: u16 = 60;
/// Bytes a flat-out publisher encodes per write when `--batch` is 0.
const AUTO_BATCH_BYTES: usize = 16 * 1024;

/// Run phases, for the progress line.
const CONNECTING: u8 = 0;
const WARMUP: u8 = 1;
const MEASURING: u8 = 2;
const DRAINING: u8 = 3;

/// Counters the tasks share with the orchestrator and the progress line.
struct Shared {
    origin: Instant,
    phase: AtomicU8,
    stop: AtomicBool,
    /// Per publisher: messages written so far (the next sequence number).
    sent: Vec<AtomicU64>,
    /// Distinct deliveries, all subscribers.
    received: AtomicU64,
    duplicated: AtomicU64,
    last_receive_ns: AtomicU64,
    /// Latency counts for messages sent at or after this instant.
    measure_from_ns: AtomicU64,
}

impl Shared {
    fn now_ns(&self) -> u64 {
        self.origin.elapsed().as_nanos() as u64
    }
    fn total_sent(&self) -> u64 {
        self.sent.iter().map(|s| s.load(Ordering::Relaxed)).sum()
    }
}

/// What every task needs to know, immutable.
struct Plan {
    login: Option<(String, String)>,
    publishers: u32,
    qos: u8,
    payload_size: usize,
    /// Per publisher, msg/s; 0 = flat out.
    rate_per_publisher: f64,
    fan_in: bool,
    topic: String,
    window: usize,
    batch: usize,
    run_id: u32,
}

impl Plan {
    fn login(&self) -> Option<(&str, &str)> {
        self.login.as_ref().map(|(u, p)| (u.as_str(), p.as_str()))
    }
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    validate(&args)?;
    let runtime = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads.into())
            .enable_io()
            .enable_time()
            .build()?
    };
    let report = runtime.block_on(bench(&args))?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", table(&report));
    }
    Ok(())
}
