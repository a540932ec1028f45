//! The progress line on stderr, once a second unless `--quiet`: phase,
//! messages sent and received so far and per second, duplicates.

use std::io::IsTerminal;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::MissedTickBehavior;

use super::report::group;
use super::{Shared, CONNECTING, MEASURING, WARMUP};

pub async fn progress(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    tick.tick().await;
    let mut last = (shared.total_sent(), shared.received.load(Ordering::Relaxed));
    loop {
        tick.tick().await;
        last = progress_line(&shared, last, false);
    }
}

/// One progress line (rewritten in place on a terminal); returns the totals.
pub fn progress_line(
    shared: &Shared,
    (last_sent, last_rx): (u64, u64),
    last_line: bool,
) -> (u64, u64) {
    let sent = shared.total_sent();
    let rx = shared.received.load(Ordering::Relaxed);
    let dup = shared.duplicated.load(Ordering::Relaxed);
    let tty = std::io::stderr().is_terminal();
    if last_line {
        if tty {
            eprintln!();
        }
        return (sent, rx);
    }
    let phase = match shared.phase.load(Ordering::Relaxed) {
        CONNECTING => "connecting",
        WARMUP => "warm-up",
        MEASURING => "measuring",
        _ => "draining",
    };
    let line = format!(
        "[{:>5.0} s] {phase:<10} sent {:>13} ({:>11}/s)  received {:>13} ({:>11}/s)  duplicated {}",
        shared.origin.elapsed().as_secs_f64(),
        group(sent),
        group(sent - last_sent),
        group(rx),
        group(rx.saturating_sub(last_rx)),
        group(dup),
    );
    if tty {
        eprint!("\r{line}  ");
    } else {
        eprintln!("{line}");
    }
    (sent, rx)
}
