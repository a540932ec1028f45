//! `capteurs-sim fleet`: N sensors on `capteurs/<grandeur>/<pays>/<ville>/<rue>`
//! topics over M MQTT connections (rumqttc), with faults on demand.

pub mod generator;
pub mod scenario;

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::Args;
use rumqttc::{
    AsyncClient, ConnectionError, Event, Incoming, LastWill, MqttOptions, Outgoing, QoS,
};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::mqtt::connack_string;
use generator::{payload, Generator};
use scenario::{Fault, FaultKind, Format, Model, MqttSection, Scenario, SensorGroup};

#[derive(Args, Debug)]
pub struct FleetArgs {
    /// Scenario file (TOML; see configs/fleet-*.toml). Flags below override
    /// its [mqtt] section, seed and duration; without it, the flags build a
    /// one-group fleet.
    #[arg(long)]
    scenario: Option<PathBuf>,
    #[arg(long)]
    host: Option<String>,
    #[arg(short, long)]
    port: Option<u16>,
    #[arg(short, long)]
    username: Option<String>,
    #[arg(short = 'P', long, requires = "username")]
    password: Option<String>,
    /// MQTT connections the sensors are spread over
    #[arg(long)]
    connections: Option<usize>,
    /// Seed: the same seed gives the same values in the same order
    #[arg(long)]
    seed: Option<u64>,
    /// Seconds to run (0 = until Ctrl-C)
    #[arg(long)]
    duration: Option<f64>,
    /// Without --scenario: number of sensors
    #[arg(long, default_value_t = 10)]
    sensors: usize,
    /// Without --scenario: what they measure
    #[arg(long, default_value = "temperature")]
    grandeur: String,
    /// Without --scenario: the town (topic level <ville>)
    #[arg(long, default_value = "clermont")]
    ville: String,
    /// Without --scenario: ms between two readings of a sensor
    #[arg(long, default_value_t = 3000)]
    period_ms: u64,
    /// Without --scenario: value model
    #[arg(long, value_enum, default_value = "uniform")]
    model: ModelArg,
    /// Without --scenario: QoS of the publications
    #[arg(long, default_value_t = 0)]
    qos: u8,
    /// Without --scenario: publish as retained messages
    #[arg(long)]
    retain: bool,
    /// Without --scenario: payload format
    #[arg(long, value_enum, default_value = "plain")]
    format: Format,
    /// Print the first N readings (virtual time, topic, payload) and exit,
    /// without a broker: shows what a seed produces
    #[arg(long, value_name = "N")]
    dry_run: Option<usize>,
    /// No progress line on stderr
    #[arg(short, long)]
    pub quiet: bool,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum ModelArg {
    Uniform,
    RandomWalk,
    Sine,
}

impl FleetArgs {
    /// The scenario from the file or the flags, with flag overrides.
    pub fn scenario(&self) -> anyhow::Result<Scenario> {
        let mut s = match &self.scenario {
            Some(path) => Scenario::from_file(path)?,
            None => Scenario {
                seed: None,
                duration_secs: 0.0,
                mqtt: MqttSection::default(),
                groups: vec![SensorGroup {
                    grandeur: self.grandeur.clone(),
                    unit: if self.grandeur == "temperature" {
                        "°C".into()
                    } else {
                        String::new()
                    },
                    pays: "france".into(),
                    ville: self.ville.clone(),
                    rues: Vec::new(),
                    count: self.sensors,
                    topics: Vec::new(),
                    period_ms: self.period_ms,
                    model: match self.model {
                        ModelArg::Uniform => Model::default(),
                        ModelArg::RandomWalk => Model::RandomWalk {
                            start: 15.0,
                            step: 0.5,
                            min: -40.0,
                            max: 60.0,
                        },
                        ModelArg::Sine => Model::Sine {
                            mean: 15.0,
                            amplitude: 8.0,
                            period_secs: 86_400.0,
                            noise: 0.3,
                            phase_spread: 0.5,
                        },
                    },
                    qos: self.qos,
                    retain: self.retain,
                    format: self.format,
                }],
                faults: Vec::new(),
            },
        };
        let m = &mut s.mqtt;
        if let Some(h) = &self.host {
            m.host = h.clone();
        }
        if let Some(p) = self.port {
            m.port = p;
        }
        if let Some(u) = &self.username {
            m.username = Some(u.clone());
            m.password = self.password.clone();
        }
        if let Some(c) = self.connections {
            m.connections = c;
        }
        if let Some(seed) = self.seed {
            s.seed = Some(seed);
        }
        if let Some(d) = self.duration {
            s.duration_secs = d;
        }
        s.validate()?;
        Ok(s)
    }
}

pub fn run(args: FleetArgs) -> anyhow::Result<()> {
    let scenario = args.scenario()?;
    let seed = scenario.seed.unwrap_or_else(rand::random);
    if let Some(n) = args.dry_run {
        dry_run(&scenario, seed, n);
        return Ok(());
    }
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(Fleet::new(scenario, seed, args.quiet).run())
}

fn dry_run(scenario: &Scenario, seed: u64, n: usize) {
    let mut g = Generator::new(scenario, seed);
    for _ in 0..n {
        let Some(r) = g.next_reading() else { break };
        let spec = g.spec(r.sensor).clone();
        let group = &scenario.groups[spec.group];
        println!(
            "{:>8} ms  {}  {}",
            r.at_ms,
            spec.topic,
            payload(group.format, &spec, &group.unit, &r, r.at_ms)
        );
    }
}

fn qos(n: u8) -> QoS {
    match n {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What connection tasks report to the fleet.
enum Report {
    Connected(usize),
    /// Fatal: the broker refused the login or cannot be reached at start.
    Failed(usize, String),
    Lost(usize, String),
}

/// One MQTT connection of the fleet and its event-loop task.
struct Connection {
    client_id: String,
    options: MqttOptions,
    client: AsyncClient,
    /// Where the will says "offline" and a connect "online".
    status: Option<String>,
    task: Option<JoinHandle<()>>,
    /// Cut by a drop fault until then.
    down_until: Option<Instant>,
}

impl Connection {
    fn open(&mut self, index: usize, reports: mpsc::UnboundedSender<Report>) {
        let (client, mut events) = AsyncClient::new(self.options.clone(), 1024);
        self.client = client.clone();
        let status = self.status.clone();
        self.task = Some(tokio::spawn(async move {
            let mut ever_connected = false;
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                        ever_connected = true;
                        if let Some(t) = &status {
                            let _ = client.try_publish(t, QoS::AtLeastOnce, true, "online");
                        }
                        let _ = reports.send(Report::Connected(index));
                    }
                    Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
                    Ok(_) => {}
                    Err(ConnectionError::ConnectionRefused(code)) => {
                        let _ = reports.send(Report::Failed(
                            index,
                            format!(
                                "the broker refused the connection: {}",
                                connack_string(code)
                            ),
                        ));
                        return;
                    }
                    Err(e) if !ever_connected => {
                        let _ = reports.send(Report::Failed(index, format!("cannot connect: {e}")));
                        return;
                    }
                    Err(e) => {
                        let _ = reports.send(Report::Lost(index, e.to_string()));
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        }));
    }

    /// Cuts the TCP connection without DISCONNECT: the broker publishes the
    /// will.
    fn cut(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

#[derive(Default)]
struct Counters {
    published: u64,
    skipped_offline: u64,
    burst: u64,
    silenced: u64,
    drops: u64,
    reconnects: u64,
}

struct Fleet {
    scenario: Scenario,
    generator: Generator,
    quiet: bool,
}

impl Fleet {
    fn new(scenario: Scenario, seed: u64, quiet: bool) -> Fleet {
        let generator = Generator::new(&scenario, seed);
        if !quiet {
            eprintln!(
                "capteurs-sim fleet: {} sensors over {} connection(s) to {}:{}, seed {seed}",
                generator.sensor_count(),
                scenario.mqtt.connections,
                scenario.mqtt.host,
                scenario.mqtt.port
            );
        }
        Fleet {
            scenario,
            generator,
            quiet,
        }
    }

    fn connections(&self) -> Vec<Connection> {
        let m = &self.scenario.mqtt;
        (0..m.connections)
            .map(|i| {
                let client_id = format!("{}{i}", m.client_id_prefix);
                let mut o = MqttOptions::new(&client_id, &m.host, m.port);
                o.set_clean_session(!m.persistent)
                    .set_keep_alive(Duration::from_secs(m.keep_alive_secs.max(1)))
                    .set_inflight(100);
                if !m.will_topic_prefix.is_empty() {
                    o.set_last_will(LastWill::new(
                        format!("{}{client_id}", m.will_topic_prefix),
                        "offline",
                        QoS::AtLeastOnce,
                        true,
                    ));
                }
                if let Some(u) = &m.username {
                    o.set_credentials(u, m.password.clone().unwrap_or_default());
                }
                let (client, _) = AsyncClient::new(o.clone(), 1);
                Connection {
                    status: (!m.will_topic_prefix.is_empty())
                        .then(|| format!("{}{client_id}", m.will_topic_prefix)),
                    client_id,
                    options: o,
                    client,
                    task: None,
                    down_until: None,
                }
            })
            .collect()
    }

    async fn run(mut self) -> anyhow::Result<()> {
        let (tx, mut reports) = mpsc::unbounded_channel();
        let mut conns = self.connections();
        for (i, c) in conns.iter_mut().enumerate() {
            c.open(i, tx.clone());
        }
        // Every connection up before the first reading (or a clear error).
        let mut up = 0;
        while up < conns.len() {
            match reports.recv().await {
                Some(Report::Connected(_)) => up += 1,
                Some(Report::Failed(i, e)) => bail!(
                    "{} ({}:{}): {e}",
                    conns[i].client_id,
                    self.scenario.mqtt.host,
                    self.scenario.mqtt.port
                ),
                Some(Report::Lost(..)) => {}
                None => bail!("connection tasks ended"),
            }
        }
        let duration_ms = (self.scenario.duration_secs * 1000.0) as u64;
        let until_ms = if duration_ms == 0 {
            u64::MAX
        } else {
            duration_ms
        };
        // Next occurrence of each fault (virtual ms), None when done.
        let mut fault_next: Vec<Option<u64>> = self
            .scenario
            .faults
            .iter()
            .map(|f| Some((f.at_secs * 1000.0) as u64))
            .collect();
        let mut silent_until: Vec<u64> = vec![0; self.generator.sensor_count()];
        let mut counters = Counters::default();
        let start = Instant::now();
        let mut progress = tokio::time::interval(Duration::from_secs(1));
        let mut sigint = signal(SignalKind::interrupt())?;
        let mut sigterm = signal(SignalKind::terminate())?;
        let mut last_published = 0u64;
        let stop_at = (duration_ms > 0).then(|| start + Duration::from_millis(duration_ms));
        const FAR_MS: u64 = 10 * 365 * 86_400_000;
        loop {
            let next_reading = self.generator.peek_due().unwrap_or(FAR_MS);
            let next_fault_ms = fault_next.iter().flatten().min().copied().unwrap_or(FAR_MS);
            let mut wake =
                start + Duration::from_millis(next_reading.min(next_fault_ms).min(FAR_MS));
            if let Some(s) = stop_at {
                wake = wake.min(s);
            }
            if let Some(r) = conns.iter().filter_map(|c| c.down_until).min() {
                wake = wake.min(r);
            }
            tokio::select! {
                _ = tokio::time::sleep_until(wake) => {}
                _ = progress.tick(), if !self.quiet => {
                    eprint!(
                        "\r  {:>6.1} s  published {:>10}  {:>8} msg/s  skipped (offline) {}  ",
                        start.elapsed().as_secs_f64(),
                        counters.published,
                        counters.published - last_published,
                        counters.skipped_offline
                    );
                    last_published = counters.published;
                    continue;
                }
                r = reports.recv() => {
                    match r {
                        Some(Report::Failed(i, e)) => bail!("{}: {e}", conns[i].client_id),
                        Some(Report::Lost(i, e)) if !self.quiet => {
                            eprintln!("\n{}: connection lost ({e}); reconnecting", conns[i].client_id);
                        }
                        Some(Report::Connected(i)) if !self.quiet => {
                            eprintln!("\n{}: connected again", conns[i].client_id);
                        }
                        _ => {}
                    }
                    continue;
                }
                _ = sigint.recv() => break,
                _ = sigterm.recv() => break,
            }
            let now = Instant::now();
            for (i, c) in conns.iter_mut().enumerate() {
                if c.down_until.is_some_and(|t| t <= now) {
                    c.down_until = None;
                    c.open(i, tx.clone());
                    counters.reconnects += 1;
                }
            }
            let elapsed_ms = start.elapsed().as_millis() as u64;
            // Faults due now.
            for (i, next) in fault_next.iter_mut().enumerate() {
                let Some(at_ms) = next.filter(|t| *t <= elapsed_ms) else {
                    continue;
                };
                let fault = self.scenario.faults[i].clone();
                *next = fault
                    .every_secs
                    .map(|e| at_ms + ((e * 1000.0) as u64).max(1));
                self.inject(&fault, at_ms, &mut conns, &mut silent_until, &mut counters)
                    .await?;
            }
            // Readings due now.
            while self
                .generator
                .peek_due()
                .is_some_and(|t| t <= elapsed_ms && t < until_ms)
            {
                let Some(r) = self.generator.next_reading() else {
                    break;
                };
                if silent_until[r.sensor] > r.at_ms {
                    counters.silenced += 1;
                    continue;
                }
                self.publish(&r, &mut conns, &mut counters).await?;
            }
            // Every reading due before the end is out: stop.
            if stop_at.is_some_and(|s| now >= s) {
                break;
            }
        }
        if !self.quiet {
            eprintln!();
        }
        // A clean stop: "offline" where the will would have said it, then
        // DISCONNECT (no will).
        for c in &mut conns {
            if c.task.is_some() {
                if let Some(t) = &c.status {
                    let _ = c.client.publish(t, QoS::AtLeastOnce, true, "offline").await;
                }
                let _ = c.client.disconnect().await;
            }
        }
        for c in &mut conns {
            if let Some(t) = c.task.take() {
                let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
            }
        }
        if !self.quiet {
            eprintln!(
                "published {}  skipped while offline {}  burst {}  silenced {}  drops {}  reconnects {}",
                counters.published,
                counters.skipped_offline,
                counters.burst,
                counters.silenced,
                counters.drops,
                counters.reconnects
            );
        }
        Ok(())
    }

    async fn publish(
        &self,
        r: &generator::Reading,
        conns: &mut [Connection],
        counters: &mut Counters,
    ) -> anyhow::Result<()> {
        let spec = self.generator.spec(r.sensor);
        let group = &self.scenario.groups[spec.group];
        let c = &mut conns[r.sensor % conns.len()];
        if c.task.is_none() {
            counters.skipped_offline += 1;
            return Ok(());
        }
        let body = payload(group.format, spec, &group.unit, r, now_ms());
        c.client
            .publish(&spec.topic, qos(group.qos), group.retain, body)
            .await
            .with_context(|| format!("{}: publish on {}", c.client_id, spec.topic))?;
        counters.published += 1;
        Ok(())
    }

    async fn inject(
        &mut self,
        fault: &Fault,
        at_ms: u64,
        conns: &mut [Connection],
        silent_until: &mut [u64],
        counters: &mut Counters,
    ) -> anyhow::Result<()> {
        let sensors = self.generator.sensor_count();
        match fault.kind {
            FaultKind::Drop => {
                let down = Duration::from_secs_f64(fault.duration_secs.max(0.0));
                for (i, c) in conns.iter_mut().enumerate() {
                    if fault.target.is_none_or(|t| t == i) && c.task.is_some() {
                        c.cut();
                        c.down_until = Some(Instant::now() + down);
                        counters.drops += 1;
                    }
                }
            }
            FaultKind::Silence => {
                let until = at_ms + (fault.duration_secs * 1000.0) as u64;
                for (i, s) in silent_until.iter_mut().enumerate() {
                    if fault.target.is_none_or(|t| t == i) {
                        *s = until;
                    }
                }
            }
            FaultKind::Burst => {
                for i in 0..sensors {
                    if fault.target.is_some_and(|t| t != i) {
                        continue;
                    }
                    for _ in 0..fault.count {
                        let r = self.generator.read(i, at_ms);
                        self.publish(&r, conns, counters).await?;
                        counters.burst += 1;
                    }
                }
            }
        }
        Ok(())
    }
}
