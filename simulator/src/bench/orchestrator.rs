//! One run, phase by phase: the subscribers connect (each with its SUBACK),
//! then the publishers; warm-up, measurement, stop; the drain; everyone
//! DISCONNECTs; the subscribers' tallies merge into the `Report`.

use std::net::ToSocketAddrs;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::watch;

use super::args::BenchArgs;
use super::client::Conn;
use super::cpu::{self, cpu_ticks};
use super::progress::{progress, progress_line};
use super::publisher::publisher;
use super::report::{Cpu, Latency, Report};
use super::stats::Tally;
use super::subscriber::subscriber;
use super::{
    Plan, Shared, AUTO_BATCH_BYTES, CONNECTING, DRAINING, KEEP_ALIVE_S, MEASURING, WARMUP,
};

/// The drain ends after this long without a new delivery.
const DRAIN_QUIET: Duration = Duration::from_secs(2);
/// …and in any case after this long.
const DRAIN_MAX: Duration = Duration::from_secs(60);

pub async fn bench(args: &BenchArgs) -> anyhow::Result<Report> {
    let addr = (args.host.as_str(), args.port)
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve {}", args.host))?
        .next()
        .with_context(|| format!("no address for {}", args.host))?;
    let message_len = 5 + 2 + args.topic.len() + 4 + 2 + args.payload_size;
    let plan = Arc::new(Plan {
        login: args
            .username
            .clone()
            .map(|u| (u, args.password.clone().unwrap_or_default())),
        publishers: args.publishers,
        qos: args.qos,
        payload_size: args.payload_size,
        rate_per_publisher: args.rate as f64 / f64::from(args.publishers),
        fan_in: args.fan_in,
        topic: args.topic.clone(),
        window: args.window.into(),
        batch: if args.batch > 0 {
            args.batch
        } else {
            (AUTO_BATCH_BYTES / message_len).clamp(1, 512)
        },
        run_id: std::process::id(),
    });
    let shared = Arc::new(Shared {
        origin: Instant::now(),
        phase: AtomicU8::new(CONNECTING),
        stop: AtomicBool::new(false),
        sent: (0..args.publishers).map(|_| AtomicU64::new(0)).collect(),
        received: AtomicU64::new(0),
        duplicated: AtomicU64::new(0),
        last_receive_ns: AtomicU64::new(0),
        measure_from_ns: AtomicU64::new(u64::MAX),
    });
    let progress = (!args.quiet).then(|| tokio::spawn(progress(shared.clone())));

    // Subscribers first, each with its SUBACK.
    let filter = format!("{}/#", args.topic);
    let (stop_subscribers, stop_rx) = watch::channel(false);
    let mut subscribers = Vec::new();
    let mut granted_qos: Option<u8> = None;
    for i in 0..args.subscribers {
        let mut conn = Conn::open(
            addr,
            &format!("capteurs-bench-{}-s{i}", plan.run_id),
            KEEP_ALIVE_S,
            plan.login(),
            None,
        )
        .await?;
        let granted = conn
            .subscribe(&filter, args.qos)
            .await
            .with_context(|| format!("subscriber {i}"))?;
        granted_qos = Some(granted_qos.map_or(granted, |g| g.min(granted)));
        subscribers.push(tokio::spawn(subscriber(
            conn,
            plan.clone(),
            shared.clone(),
            stop_rx.clone(),
        )));
    }

    // Then the publishers, all connected before any starts.
    let mut conns = Vec::new();
    for i in 0..args.publishers {
        conns.push(
            Conn::open(
                addr,
                &format!("capteurs-bench-{}-p{i}", plan.run_id),
                KEEP_ALIVE_S,
                plan.login(),
                (args.sndbuf > 0).then_some(args.sndbuf),
            )
            .await?,
        );
    }
    let start_ns = shared.now_ns();
    let warmup_end_ns = start_ns + (args.warmup * 1e9) as u64;
    shared
        .measure_from_ns
        .store(warmup_end_ns, Ordering::Release);
    shared.phase.store(
        if args.warmup > 0.0 { WARMUP } else { MEASURING },
        Ordering::Release,
    );
    // What the measurement starts from: taken before the publishers start
    // without warm-up, at its end otherwise.
    let snapshot = || {
        let cpu = (
            cpu_ticks(None),
            args.broker_pid.and_then(|pid| cpu_ticks(Some(pid))),
        );
        let received = shared.received.load(Ordering::Acquire);
        (shared.total_sent(), received, cpu, shared.now_ns())
    };
    let mut at_measure = (args.warmup == 0.0).then(snapshot);
    let publishers: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, conn)| tokio::spawn(publisher(i as u32, conn, plan.clone(), shared.clone())))
        .collect();

    // Warm-up, then the measurement.
    let deadline =
        |ns: u64| tokio::time::Instant::from_std(shared.origin + Duration::from_nanos(ns));
    tokio::time::sleep_until(deadline(warmup_end_ns)).await;
    shared.phase.store(MEASURING, Ordering::Release);
    let (sent_at_measure, received_at_measure, cpu_at_measure, measure_ns) =
        *at_measure.get_or_insert_with(snapshot);
    tokio::time::sleep_until(deadline(warmup_end_ns + (args.duration * 1e9) as u64)).await;
    shared.stop.store(true, Ordering::Release);
    let stop_ns = shared.now_ns();
    let sent_at_stop = shared.total_sent();
    let cpu_at_stop = (
        cpu_ticks(None),
        args.broker_pid.and_then(|pid| cpu_ticks(Some(pid))),
    );
    shared.phase.store(DRAINING, Ordering::Release);

    let mut publisher_conns = Vec::new();
    let mut unacked = 0u64;
    for p in publishers {
        let (conn, left) = p.await.context("publisher task")??;
        publisher_conns.push(conn);
        unacked += left as u64;
    }
    let sent: Vec<u64> = shared
        .sent
        .iter()
        .map(|s| s.load(Ordering::Acquire))
        .collect();
    let total_sent: u64 = sent.iter().sum();
    let expected = total_sent * u64::from(args.subscribers);

    // Drain: until every expected delivery arrived, or nothing new for 2 s.
    let drain_start = Instant::now();
    let mut last = shared.received.load(Ordering::Acquire);
    let mut quiet_since = Instant::now();
    while last < expected
        && quiet_since.elapsed() < DRAIN_QUIET
        && drain_start.elapsed() < DRAIN_MAX
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let now = shared.received.load(Ordering::Acquire);
        if now != last {
            (last, quiet_since) = (now, Instant::now());
        }
    }
    let drain_seconds = (shared.now_ns() - stop_ns) as f64 / 1e9;

    // Everyone DISCONNECTs.
    let _ = stop_subscribers.send(true);
    let mut tally = Tally::new(0);
    let mut lost = 0;
    let mut subscribers_dropped = 0;
    let mut closing = Vec::new();
    for (i, s) in subscribers.into_iter().enumerate() {
        let (conn, t, dropped) = s.await.context("subscriber task")??;
        if let Some(why) = dropped {
            subscribers_dropped += 1;
            eprintln!("capteurs-sim bench: subscriber {i}: {why}");
        }
        lost += t.lost(&sent);
        tally.received += t.received;
        tally.duplicated += t.duplicated;
        tally.malformed += t.malformed;
        tally
            .latency_us
            .add(&t.latency_us)
            .context("merging latency histograms")?;
        closing.extend(conn);
    }
    closing.extend(publisher_conns);
    for conn in closing {
        conn.disconnect().await;
    }
    if let Some(p) = progress {
        p.abort();
        let _ = p.await;
        progress_line(&shared, (0, 0), true);
    }

    let publish_seconds = (stop_ns - measure_ns) as f64 / 1e9;
    let sent_measured = sent_at_stop - sent_at_measure;
    let delivered_measured = tally.received.saturating_sub(received_at_measure);
    let last_rx_ns = shared.last_receive_ns.load(Ordering::Acquire);
    let delivery_seconds = last_rx_ns.saturating_sub(measure_ns) as f64 / 1e9;
    Ok(Report {
        broker: addr.to_string(),
        publishers: args.publishers,
        subscribers: args.subscribers,
        qos: args.qos,
        granted_qos,
        payload_size: args.payload_size,
        target_rate: args.rate,
        fan_in: args.fan_in,
        window: args.window,
        threads: args.threads,
        warmup_s: args.warmup,
        sent: total_sent,
        sent_measured,
        publish_seconds,
        publish_rate: sent_measured as f64 / publish_seconds,
        unacked,
        expected_deliveries: expected,
        received: tally.received,
        delivered_measured,
        delivery_seconds,
        delivery_rate: if delivery_seconds > 0.0 {
            delivered_measured as f64 / delivery_seconds
        } else {
            0.0
        },
        lost,
        duplicated: tally.duplicated,
        malformed: tally.malformed,
        subscribers_dropped,
        drain_seconds,
        latency_us: Latency::of(&tally.latency_us),
        cpu: Cpu {
            bench_percent: cpu::percent((cpu_at_measure.0, cpu_at_stop.0), publish_seconds),
            broker_pid: args.broker_pid,
            broker_percent: cpu::percent((cpu_at_measure.1, cpu_at_stop.1), publish_seconds),
        },
    })
}
