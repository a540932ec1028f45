//! `capteurs-sim`: the course's publishers, sensor fleets and the benchmark
//! load generator. `bench` is here; `course`, `fleet` and `serial` come
//! with the simulator issue.

mod bench;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "capteurs-sim",
    version,
    about = "Capteurs simulator: course replay, sensor fleets, MQTT load generator"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// MQTT load generator: publishers × subscribers × QoS × payload × rate;
    /// reports publish and delivery rates, lost and duplicated messages and
    /// publish→deliver latency (run it against ours and mosquitto alike).
    Bench(bench::BenchArgs),
    // Course(course::CourseArgs), Fleet(fleet::FleetArgs), Serial(serial::SerialArgs):
    // with the simulator issue.
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Bench(args) => bench::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` gives the whole chain ("cannot connect …: Connection
            // refused"), without the backtrace anyhow adds under RUST_BACKTRACE.
            eprintln!("capteurs-sim: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
