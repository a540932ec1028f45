//! `capteurs-sim course`: the teacher's publisher of part IV.G of the MQTT
//! course, line for line. Client id `prof_ISIMA`, clean session, Last Will
//! `isima/LWT` = `Lost Connection`; subscribes to `$SYS/broker/version`,
//! clears the retained messages of `isima/G1`…`isima/G4`, then every 3 s
//! publishes `15 + uniform(-10, 10)` to each as a retained QoS 0 message,
//! printing what paho-mqtt's callbacks print in the course.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{ArgAction, Args};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, Incoming, LastWill,
    MqttOptions, Outgoing, QoS,
};
use tokio::signal::unix::{signal, SignalKind};

use crate::mqtt::{connack_string, parse_qos, python_bytes, python_float};

#[derive(Args, Debug)]
pub struct CourseArgs {
    /// Broker host
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Broker port
    #[arg(short, long, default_value_t = 1883)]
    port: u16,
    /// User name (the course uses the teacher's login)
    #[arg(short, long)]
    username: Option<String>,
    /// Password (with --username)
    #[arg(short = 'P', long, requires = "username")]
    password: Option<String>,
    /// Client id
    #[arg(long, default_value = "prof_ISIMA")]
    client_id: String,
    /// Number of groups: topics <topic-prefix>1 … <topic-prefix>N
    #[arg(long, default_value_t = 4)]
    groups: u32,
    /// Topic prefix of the group topics
    #[arg(long, default_value = "isima/G")]
    topic_prefix: String,
    /// Seconds between two rounds of publications
    #[arg(long, default_value_t = 3.0)]
    period: f64,
    /// QoS of the publications (the course: 0)
    #[arg(long, default_value = "0", value_parser = parse_qos)]
    qos: QoS,
    /// Publish as retained messages (the course: true)
    #[arg(long, default_value_t = true, action = ArgAction::Set)]
    retain: bool,
    /// Clear the group topics' retained messages at start (the course: true)
    #[arg(long, default_value_t = true, action = ArgAction::Set)]
    clear_retained: bool,
    /// Last Will topic
    #[arg(long, default_value = "isima/LWT")]
    will_topic: String,
    /// Last Will message
    #[arg(long, default_value = "Lost Connection")]
    will_message: String,
    /// Stop (disconnecting cleanly) after this many rounds; 0 = run until
    /// Ctrl-C like the course
    #[arg(long, default_value_t = 0)]
    rounds: u64,
    /// Seed of the random temperatures (default: a random seed)
    #[arg(long)]
    seed: Option<u64>,
    /// Keep-alive in seconds (paho's default: 60)
    #[arg(long, default_value_t = 60)]
    keep_alive: u64,
}

pub fn run(args: CourseArgs) -> anyhow::Result<()> {
    if args.period.is_nan() || args.period < 0.0 {
        bail!("--period must be a number of seconds >= 0");
    }
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(course(args))
}

/// paho's message ids: one counter for SUBSCRIBE and PUBLISH, from 1.
struct Mids {
    next: u16,
    /// Publishes sent to the event loop, waiting for their Outgoing event.
    written: VecDeque<u16>,
    /// QoS 1/2 publishes by packet id, waiting for PUBACK / PUBCOMP.
    acked: HashMap<u16, u16>,
}

impl Mids {
    fn take(&mut self) -> u16 {
        self.next = self.next.wrapping_add(1).max(1);
        self.next
    }
}

async fn course(a: CourseArgs) -> anyhow::Result<()> {
    let mut options = MqttOptions::new(&a.client_id, &a.host, a.port);
    options
        .set_clean_session(true)
        .set_keep_alive(Duration::from_secs(a.keep_alive.max(1)))
        .set_last_will(LastWill::new(
            &a.will_topic,
            a.will_message.clone(),
            QoS::AtMostOnce,
            false,
        ));
    if let Some(user) = &a.username {
        options.set_credentials(user, a.password.clone().unwrap_or_default());
    }
    let (client, mut events) = AsyncClient::new(options, 64);
    let mut rng = match a.seed {
        Some(seed) => ChaCha8Rng::seed_from_u64(seed),
        None => ChaCha8Rng::from_rng(&mut rand::rng()),
    };
    let mut mids = Mids {
        next: 0,
        written: VecDeque::new(),
        acked: HashMap::new(),
    };
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let period = Duration::from_secs_f64(a.period);
    let mut tick = tokio::time::interval(period.max(Duration::from_millis(1)));
    let mut connected = false;
    let mut rounds = 0u64;
    let mut stopping = false;
    loop {
        tokio::select! {
            event = events.poll() => match event {
                Ok(Event::Incoming(Incoming::ConnAck(ack))) => {
                    println!("-- on_connect callback -- Connection returned result: {}", connack_string(ack.code));
                    if ack.code != ConnectReturnCode::Success {
                        bail!("the broker refused the connection: {}", connack_string(ack.code));
                    }
                    if !connected {
                        connected = true;
                        start(&a, &client, &mut mids).await?;
                        tick.reset();
                    }
                }
                Ok(Event::Incoming(Incoming::Publish(p))) => {
                    println!(
                        "-- on_message callback -- Received message '{}' on topic '{}' with QoS {}",
                        python_bytes(&p.payload), p.topic, p.qos as u8
                    );
                    if p.retain {
                        println!("This is a retained message");
                    }
                }
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                    if let Some(mid) = mids.written.pop_front() {
                        if pkid == 0 {
                            println!("-- on_publish callback -- mid: {mid}");
                        } else {
                            mids.acked.insert(pkid, mid);
                        }
                    }
                }
                Ok(Event::Incoming(Incoming::PubAck(ack))) => published(&mut mids, ack.pkid),
                Ok(Event::Incoming(Incoming::PubComp(ack))) => published(&mut mids, ack.pkid),
                Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                    if stopping {
                        return Ok(());
                    }
                }
                Ok(_) => {}
                Err(e) => handle_error(e, connected, &a, &mut events).await?,
            },
            _ = tick.tick(), if connected && !stopping => {
                publish_round(&a, &client, &mut mids, &mut rng).await?;
                rounds += 1;
                if a.rounds > 0 && rounds >= a.rounds {
                    stopping = true;
                    client.disconnect().await?;
                }
            }
            _ = sigint.recv() => {
                stopping = true;
                if !disconnect(&client, connected).await { return Ok(()); }
            }
            _ = sigterm.recv() => {
                stopping = true;
                if !disconnect(&client, connected).await { return Ok(()); }
            }
        }
    }
}

/// Sends DISCONNECT (no will). False when there is no connection to close.
async fn disconnect(client: &AsyncClient, connected: bool) -> bool {
    connected && client.disconnect().await.is_ok()
}

fn published(mids: &mut Mids, pkid: u16) {
    if let Some(mid) = mids.acked.remove(&pkid) {
        println!("-- on_publish callback -- mid: {mid}");
    }
}

/// After the first CONNACK: subscribe to `$SYS/broker/version` and clear
/// the group topics' retained messages, as the course does.
async fn start(a: &CourseArgs, client: &AsyncClient, mids: &mut Mids) -> anyhow::Result<()> {
    mids.take(); // paho gives the SUBSCRIBE a mid too
    client
        .subscribe("$SYS/broker/version", QoS::AtMostOnce)
        .await?;
    if a.clear_retained {
        for g in 1..=a.groups {
            let mid = mids.take();
            mids.written.push_back(mid);
            client
                .publish(format!("{}{g}", a.topic_prefix), a.qos, true, Vec::new())
                .await?;
        }
    }
    Ok(())
}

async fn publish_round(
    a: &CourseArgs,
    client: &AsyncClient,
    mids: &mut Mids,
    rng: &mut ChaCha8Rng,
) -> anyhow::Result<()> {
    for g in 1..=a.groups {
        let temp = 15.0 + rng.random_range(-10.0..10.0);
        let mid = mids.take();
        mids.written.push_back(mid);
        client
            .publish(
                format!("{}{g}", a.topic_prefix),
                a.qos,
                a.retain,
                python_float(temp),
            )
            .await?;
        println!("Error return from publish of mid = {mid} : No error.");
    }
    Ok(())
}

/// Connection errors: a refusal or an unreachable broker before the first
/// CONNACK ends the run with the reason; after it, paho's loop reconnects,
/// and so do we.
async fn handle_error(
    e: ConnectionError,
    connected: bool,
    a: &CourseArgs,
    _events: &mut EventLoop,
) -> anyhow::Result<()> {
    match e {
        ConnectionError::ConnectionRefused(code) => {
            println!(
                "-- on_connect callback -- Connection returned result: {}",
                connack_string(code)
            );
            bail!(
                "the broker at {}:{} refused the connection: {}",
                a.host,
                a.port,
                connack_string(code)
            )
        }
        e if !connected => {
            println!("Connection failed");
            Err(e).with_context(|| format!("cannot connect to {}:{}", a.host, a.port))
        }
        e => {
            eprintln!("capteurs-sim: connection lost ({e}); reconnecting");
            tokio::time::sleep(Duration::from_secs(1)).await;
            Ok(())
        }
    }
}
