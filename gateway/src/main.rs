//! `capteurs-gateway`: runs the gateway, checks configurations, manages the
//! password file.

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use capteurs_gateway::broker::auth::passwd;
use capteurs_gateway::config::GatewayConfig;
use clap::{Parser, Subcommand};

use cli::plugin::PluginCommand;

mod cli;

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
        Some(Command::Plugin { command }) => cli::plugin::run(command),
        Some(Command::Status { url, json }) => cli::status::run(cli.config.as_deref(), url, json),
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
