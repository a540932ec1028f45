//! `capteurs-gateway`: runs the gateway, checks configurations, manages the
//! password file.

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context};
use capteurs_gateway::broker::auth::passwd;
use capteurs_gateway::config::GatewayConfig;
use capteurs_gateway::plugins::transform::Output;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "capteurs-gateway",
    version,
    about = "Capteurs edge IoT gateway: embedded MQTT broker, sensor sources, store-and-forward upstream",
    long_about = "Runs the gateway. With no --config, runs on the embedded default configuration \
                  (configs/gateway.toml): MQTT broker on 127.0.0.1:1883, anonymous clients allowed, \
                  state in ./capteurs-data/."
)]
struct Cli {
    /// Configuration file (TOML). Default: the embedded configs/gateway.toml.
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    /// Override broker.listen (e.g. 127.0.0.1:0 for a free port).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Override gateway.data_dir.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Override http.listen (127.0.0.1:0 for a free port, "" for none).
    #[arg(long, value_name = "ADDR")]
    http_listen: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default when no command is given).
    Run,
    /// Check a configuration file and report every problem with its key and line.
    CheckConfig {
        /// The file to check (default: the --config file).
        file: Option<PathBuf>,
    },
    /// Set (or delete) a user's password in a mosquitto-compatible password file.
    Passwd {
        /// Password file; created if missing.
        file: PathBuf,
        /// User name.
        user: String,
        /// The password. Without it, it is read from the first line of standard input.
        #[arg(long, short = 'p')]
        password: Option<String>,
        /// Remove the user instead.
        #[arg(long, short = 'D')]
        delete: bool,
    },
    /// Print the running gateway's summary (from its [http] listener):
    /// health, broker, cloud link, buffer, sensors, plugins. Exit 1 when a
    /// stage is stuck.
    Status {
        /// The gateway's HTTP listener (host:port or http://host:port).
        /// Default: [http] listen of the --config file.
        #[arg(long)]
        url: Option<String>,
        /// Print the JSON summary as it comes instead.
        #[arg(long)]
        json: bool,
    },
    /// Try a WebAssembly plugin without a broker.
    Plugin {
        #[command(subcommand)]
        command: PluginCommand,
    },
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Which world the component implements, its exports, and whether it
    /// starts (init) with the given parameters.
    Check {
        file: PathBuf,
        /// Plugin parameter (repeatable).
        #[arg(long = "param", value_name = "KEY=VALUE")]
        params: Vec<String>,
    },
    /// Feed one message to a transform plugin and print what comes out, or
    /// ask an auth plugin (with --username/--password and/or --action).
    Run {
        file: PathBuf,
        #[arg(
            long,
            default_value = "capteurs/temperature/fr/aubiere/rue_de_la_chebarde"
        )]
        topic: String,
        #[arg(long, default_value = "")]
        payload: String,
        #[arg(long, default_value_t = 0)]
        qos: u8,
        #[arg(long)]
        retain: bool,
        /// The message's origin: client:<id>, sensor:<id>, upstream, broker.
        #[arg(long, default_value = "client:plugin-run")]
        origin: String,
        #[arg(long = "param", value_name = "KEY=VALUE")]
        params: Vec<String>,
        /// Auth: the user name (and --password) to authenticate.
        #[arg(long)]
        username: Option<String>,
        #[arg(long)]
        password: Option<String>,
        /// Auth: publish or subscribe on --topic.
        #[arg(long)]
        action: Option<String>,
    },
    /// Time a plugin: the median cost of one call (transform: process on
    /// --payload; auth: authorize --action on --topic, cached and not).
    Bench {
        file: PathBuf,
        #[arg(
            long,
            default_value = "capteurs/temperature/fr/aubiere/rue_de_la_chebarde"
        )]
        topic: String,
        #[arg(long, default_value = "21.37")]
        payload: String,
        #[arg(long = "param", value_name = "KEY=VALUE")]
        params: Vec<String>,
        #[arg(long)]
        username: Option<String>,
        #[arg(long, default_value = "publish")]
        action: String,
        /// Calls per sample (the median of 21 samples is reported).
        #[arg(long, default_value_t = 20_000)]
        calls: u32,
        /// Transform taking batches: messages per `process-batch` call.
        #[arg(long, default_value_t = 32)]
        batch: usize,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match real_main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("capteurs-gateway: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Some(Command::CheckConfig { file }) => {
            let Some(file) = file.or(cli.config) else {
                bail!(
                    "check-config needs a file: check-config FILE, or --config FILE check-config"
                );
            };
            GatewayConfig::load(&file)?;
            println!("{}: OK", file.display());
            Ok(())
        }
        Some(Command::Passwd {
            file,
            user,
            password,
            delete,
        }) => {
            if delete {
                passwd::delete_user(&file, &user)?;
                return Ok(());
            }
            let password = match password {
                Some(p) => p,
                None => {
                    eprint!("Password for {user}: ");
                    let mut line = String::new();
                    std::io::stdin()
                        .lock()
                        .read_line(&mut line)
                        .context("reading the password")?;
                    line.trim_end_matches(['\r', '\n']).to_owned()
                }
            };
            if password.is_empty() {
                bail!("empty password refused");
            }
            passwd::set_password(&file, &user, &password)?;
            Ok(())
        }
        Some(Command::Plugin { command }) => plugin_command(command),
        Some(Command::Status { url, json }) => status_command(cli.config.as_deref(), url, json),
        Some(Command::Run) | None => {
            let mut cfg = match &cli.config {
                Some(path) => GatewayConfig::load(path)?,
                None => GatewayConfig::embedded_default()?,
            };
            if let Some(listen) = cli.listen {
                cfg.broker.listen = listen.to_string();
            }
            if let Some(dir) = cli.data_dir {
                cfg.gateway.data_dir = std::env::current_dir()?.join(dir);
            }
            if let Some(http) = cli.http_listen {
                if !http.is_empty() {
                    http.parse::<SocketAddr>().with_context(|| {
                        format!("--http-listen {http:?}: expected address:port")
                    })?;
                }
                cfg.http.listen = http;
            }
            capteurs_gateway::logging::init(&cfg.log.level);
            // Blocking work (password hashing, SQLite, plugin reloads) gets a
            // bounded pool: a flood of CONNECTs queues there instead of
            // spawning threads up to the unit's TasksMax.
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .max_blocking_threads(64)
                .build()
                .context("starting the tokio runtime")?;
            runtime.block_on(async move {
                let shutdown = shutdown_signal()?;
                capteurs_gateway::gateway::run(cfg, shutdown).await?;
                anyhow::Ok(())
            })
        }
    }
}

/// Installs the SIGINT/SIGTERM handlers now (before the broker announces
/// itself), and returns a future that resolves on either.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => tracing::info!("SIGINT received"),
            _ = term.recv() => tracing::info!("SIGTERM received"),
        }
    })
}

/// `capteurs-gateway status`.
fn status_command(
    config: Option<&std::path::Path>,
    url: Option<String>,
    json: bool,
) -> anyhow::Result<()> {
    use capteurs_gateway::ops::Status;
    let addr = match url {
        Some(u) => u,
        None => {
            let cfg = match config {
                Some(path) => GatewayConfig::load(path)?,
                None => GatewayConfig::embedded_default()?,
            };
            if cfg.http.listen.is_empty() {
                bail!(
                    "the gateway's HTTP listener is off in {} ([http] listen is empty): set it, or pass --url HOST:PORT",
                    config.map_or("the embedded default configuration".to_owned(), |p| p.display().to_string())
                );
            }
            cfg.http.listen
        }
    };
    let host = addr.trim_start_matches("http://").trim_end_matches('/');
    let sock: SocketAddr = std::net::ToSocketAddrs::to_socket_addrs(host)
        .with_context(|| format!("{host:?} is not host:port"))?
        .next()
        .with_context(|| format!("{host:?} resolves to no address"))?;
    let (code, body) = capteurs_gateway::ops::http::get(sock, "/status.json")
        .context("is the gateway running with its [http] listener on?")?;
    if code != 200 {
        bail!("http://{sock}/status.json answered {code}: {body}");
    }
    if json {
        println!("{body}");
    }
    let s: Status = serde_json::from_str(&body).context("reading /status.json")?;
    if !json {
        print!("{}", status_text(&s));
    }
    if !s.healthy {
        bail!("a stage is stuck");
    }
    Ok(())
}

/// The terminal form of the status page.
fn status_text(s: &capteurs_gateway::ops::Status) -> String {
    use capteurs_gateway::ops::page::{age, bytes, value};
    use std::fmt::Write;
    let mut o = String::new();
    let health = if s.healthy {
        "healthy".to_owned()
    } else {
        let what: Vec<String> = s
            .stuck
            .iter()
            .map(|(n, a)| format!("{n} silent for {a:.1} s"))
            .collect();
        format!("STUCK: {}", what.join(", "))
    };
    let _ = writeln!(
        o,
        "capteurs-gateway {} \"{}\", up {}: {health}",
        s.version,
        s.gateway,
        age(s.uptime_secs as f64)
    );
    let b = &s.broker;
    let _ = writeln!(
        o,
        "broker    {}: {} clients, {} sessions, {} subscriptions, {} retained; {} received, {} sent, {} dropped",
        b.listen, b.clients.len(), b.sessions, b.subscriptions, b.retained, b.messages_received, b.messages_sent, b.dropped
    );
    match &s.upstream {
        Some(u) if u.connected => {
            let _ = writeln!(
                o,
                "upstream  connected: {} forwarded, {} in flight, {:.1} msg/s, {} connects",
                u.acknowledged, u.inflight, u.drain_rate, u.connects
            );
        }
        Some(u) => {
            let _ = writeln!(
                o,
                "upstream  DISCONNECTED ({}), {} failed attempts",
                u.last_error.as_deref().unwrap_or("not connected yet"),
                u.connect_failures
            );
        }
        None => {
            let _ = writeln!(o, "upstream  off");
        }
    }
    if let Some(buf) = &s.buffer {
        let dropped: Vec<String> = buf
            .dropped
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        let _ = writeln!(
            o,
            "buffer    {} messages, {} of {}, oldest {}, dropped: {}",
            buf.messages,
            bytes(buf.bytes),
            bytes(buf.max_bytes),
            buf.oldest_age_secs.map_or("-".to_owned(), age),
            if dropped.is_empty() {
                "none".to_owned()
            } else {
                dropped.join(", ")
            }
        );
    }
    let _ = writeln!(o, "sensors   {}", s.sensors.len());
    for sensor in &s.sensors {
        for r in &sensor.readings {
            let v = r
                .value
                .map_or("-".to_owned(), |v| format!("{} {}", value(v), r.unit));
            let a = r
                .age_secs
                .map_or("never".to_owned(), |a| format!("{} ago", age(a)));
            let _ = writeln!(
                o,
                "  {:<16} {:<12} {:>12}  {:<10} {}{}",
                sensor.id,
                r.grandeur,
                v,
                a,
                r.topic,
                if sensor.silent { "  (silent)" } else { "" }
            );
        }
    }
    let dropped: Vec<String> = s
        .dropped_input
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    if !dropped.is_empty() {
        let _ = writeln!(o, "  input dropped: {}", dropped.join(", "));
    }
    let _ = writeln!(o, "plugins   {}", s.plugins.len());
    for p in &s.plugins {
        let _ = writeln!(
            o,
            "  {:<16} {:<9} {} calls, {} faults, {} restarts{}",
            p.name,
            p.kind,
            p.calls,
            p.faults,
            p.restarts,
            if p.disabled { ", DISABLED" } else { "" }
        );
        if let Some(f) = &p.last_fault {
            let _ = writeln!(o, "  {:<16} last fault: {f}", "");
        }
    }
    let _ = writeln!(
        o,
        "clients   {}",
        if b.clients.is_empty() {
            "none".to_owned()
        } else {
            b.clients.join(" ")
        }
    );
    o
}

fn parse_params(params: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    params
        .iter()
        .map(|p| {
            p.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .with_context(|| format!("--param {p:?}: expected KEY=VALUE"))
        })
        .collect()
}

fn plugin_command(command: PluginCommand) -> anyhow::Result<()> {
    use capteurs_gateway::broker::auth::{Action, Authenticator, ClientInfo};
    use capteurs_gateway::message::{Message, Origin};
    use capteurs_gateway::plugins::runtime::{self, GuardSettings, Limits};
    use capteurs_gateway::plugins::{auth::AuthPlugin, transform};
    use std::time::Duration;
    capteurs_gateway::logging::init("info");
    let engine = runtime::engine(false)?;
    let (file, params) = match &command {
        PluginCommand::Check { file, params }
        | PluginCommand::Run { file, params, .. }
        | PluginCommand::Bench { file, params, .. } => (file.clone(), parse_params(params)?),
    };
    let component = runtime::load(&engine, "plugin", &file, None)?;
    let exports = capteurs_gateway::plugins::world_of(&component, &engine);
    let kind = if exports
        .iter()
        .any(|e| e.starts_with("capteurs:plugins/transform@0.1"))
    {
        "transform"
    } else if exports
        .iter()
        .any(|e| e.starts_with("capteurs:plugins/auth@0.1"))
    {
        "auth"
    } else if exports
        .iter()
        .any(|e| e.starts_with("capteurs:plugins/decoder@0.1"))
    {
        "decoder"
    } else {
        bail!(
            "{}: implements no world of capteurs:plugins@0.1 (exports: {})",
            file.display(),
            if exports.is_empty() {
                "none".into()
            } else {
                exports.join(", ")
            }
        );
    };
    let guard = || GuardSettings {
        name: file
            .file_stem()
            .map_or("plugin".into(), |s| s.to_string_lossy().into_owned()),
        limits: Limits::new(64, Duration::from_millis(1000), 0),
        params: params.clone(),
        env: Vec::new(),
        max_faults: 1,
    };
    let make_transform = || {
        transform::Transform::new(
            &engine,
            &component,
            transform::TransformSettings {
                topics: vec!["#".into()],
                on_error: transform::OnError::Pass,
                guard: guard(),
                instances: 1,
            },
        )
    };
    match (command, kind) {
        (PluginCommand::Check { .. }, _) => {
            let batches = exports
                .iter()
                .any(|e| e.starts_with("capteurs:plugins/transform-batch@0.1"));
            println!(
                "{}: {kind} plugin (capteurs:plugins@0.1{}), exports: {}",
                file.display(),
                if batches { ", takes batches" } else { "" },
                exports.join(", ")
            );
            match kind {
                "transform" => {
                    make_transform()?;
                }
                "auth" => {
                    AuthPlugin::new(&engine, &component, guard(), false, false)?;
                }
                _ => {
                    capteurs_gateway::plugins::decoder::Decoder::new(&engine, &component, guard())?;
                }
            }
            println!("init with {} parameter(s): OK", params.len());
            Ok(())
        }
        (
            PluginCommand::Run {
                topic,
                payload,
                qos,
                retain,
                origin,
                ..
            },
            "transform",
        ) => {
            let t = make_transform()?;
            let origin = match origin.split_once(':') {
                Some(("client", id)) => Origin::Client(id.into()),
                Some(("sensor", id)) => Origin::Sensor(id.into()),
                None if origin == "upstream" => Origin::Upstream,
                None if origin == "broker" => Origin::Broker,
                _ => bail!("--origin {origin:?}: client:<id>, sensor:<id>, upstream or broker"),
            };
            let m = Message::new(topic, payload.into_bytes(), qos, retain, origin);
            let out = match t
                .process(&m)
                .map_err(|e| anyhow::anyhow!("the plugin failed: {e}"))?
            {
                Output::Keep => {
                    println!("(kept unchanged)");
                    vec![m]
                }
                Output::Replace(out) => out,
            };
            if out.is_empty() {
                println!("(filtered out: no message)");
            }
            for o in out {
                println!(
                    "{} qos={} retain={} {}",
                    o.topic,
                    o.qos,
                    o.retain,
                    String::from_utf8_lossy(&o.payload)
                );
            }
            Ok(())
        }
        (
            PluginCommand::Run {
                topic,
                username,
                password,
                action,
                ..
            },
            "auth",
        ) => {
            let a = AuthPlugin::new(&engine, &component, guard(), false, false)?;
            let client = ClientInfo {
                client_id: "plugin-run".into(),
                username: username.clone(),
                peer: ([127, 0, 0, 1], 0).into(),
            };
            if username.is_some() {
                let d = a.authenticate(&client, password.as_deref().map(str::as_bytes));
                println!("authenticate {}: {d:?}", username.as_deref().unwrap_or(""));
            }
            if let Some(action) = action {
                let act = match action.as_str() {
                    "publish" => Action::Publish,
                    "subscribe" => Action::Subscribe,
                    other => bail!("--action {other:?}: publish or subscribe"),
                };
                println!(
                    "authorize {action} {topic}: {:?}",
                    a.authorize(&client, act, &topic)
                );
            }
            Ok(())
        }
        (
            PluginCommand::Bench {
                topic,
                payload,
                username,
                action,
                calls,
                batch,
                ..
            },
            kind,
        ) => {
            let median = |mut f: Box<dyn FnMut()>| {
                let mut samples: Vec<f64> = (0..21)
                    .map(|_| {
                        let t = std::time::Instant::now();
                        for _ in 0..calls {
                            f();
                        }
                        t.elapsed().as_nanos() as f64 / f64::from(calls)
                    })
                    .collect();
                samples.sort_by(f64::total_cmp);
                samples[10]
            };
            match kind {
                "transform" => {
                    let t = make_transform()?;
                    let m = Message::new(
                        topic,
                        payload.into_bytes(),
                        0,
                        false,
                        Origin::Sensor("bench".into()),
                    );
                    let t = Arc::new(t);
                    let (one, m1) = (t.clone(), m.clone());
                    let ns = median(Box::new(move || {
                        std::hint::black_box(one.process(&m1).ok());
                    }));
                    println!("transform process: median {ns:.0} ns per call ({calls} calls x 21 samples)");
                    if t.batches() && batch > 1 {
                        // As the broker hands over what it read from a busy
                        // client at once; the figure is per message.
                        let n = batch;
                        let batch: Vec<Message> = (0..n).map(|_| m.clone()).collect();
                        let mut i = 0;
                        let ns = median(Box::new(move || {
                            if i % n == 0 {
                                let refs: Vec<&Message> = batch.iter().collect();
                                std::hint::black_box(t.process_many(&refs));
                            }
                            i += 1;
                        }));
                        println!("transform process-batch of {n}: median {ns:.0} ns per message");
                    }
                }
                "auth" => {
                    let act = if action == "subscribe" {
                        Action::Subscribe
                    } else {
                        Action::Publish
                    };
                    let client = ClientInfo {
                        client_id: "bench".into(),
                        username,
                        peer: ([127, 0, 0, 1], 0).into(),
                    };
                    for cached in [false, true] {
                        let a = AuthPlugin::new(&engine, &component, guard(), false, cached)?;
                        let (c, t) = (client.clone(), topic.clone());
                        let ns = median(Box::new(move || {
                            std::hint::black_box(a.authorize(&c, act, &t));
                        }));
                        println!(
                            "auth authorize ({}): median {ns:.0} ns per call",
                            if cached { "decision cache" } else { "no cache" }
                        );
                    }
                }
                other => bail!("plugin bench: {other} plugins are not benchmarked"),
            }
            Ok(())
        }
        (PluginCommand::Run { payload, .. }, "decoder") => {
            let d = capteurs_gateway::plugins::decoder::Decoder::new(&engine, &component, guard())?;
            let out = d
                .decode("plugin-run", payload.as_bytes())
                .map_err(|e| anyhow::anyhow!("the plugin failed: {e}"))?;
            for r in out {
                println!(
                    "{} {} = {}",
                    r.sensor.as_deref().unwrap_or("-"),
                    r.grandeur,
                    r.value
                );
            }
            Ok(())
        }
        (_, kind) => bail!("plugin run: {kind} plugins cannot be run by this command"),
    }
}
