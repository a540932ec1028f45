//! `capteurs-gateway plugin check|run|bench`: try a WebAssembly plugin
//! without a broker.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use capteurs_gateway::plugins::transform::Output;
use clap::Subcommand;

#[derive(Subcommand)]
pub enum PluginCommand {
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

pub fn run(command: PluginCommand) -> anyhow::Result<()> {
    use capteurs_gateway::broker::auth::{Action, Authenticator, ClientInfo};
    use capteurs_gateway::message::{Message, Origin, QoS};
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
            let qos = QoS::from_u8(qos).with_context(|| format!("--qos {qos}: 0, 1 or 2"))?;
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
                        QoS::AtMostOnce,
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
