//! `capteurs-sim`: the course's publisher, sensor fleets over MQTT or
//! serial lines, and the benchmark load generator.

mod bench;
mod ble;
mod course;
mod fleet;
mod mqtt;
mod serial;

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
    /// The course's publisher (part IV.G): prof_ISIMA, will on isima/LWT,
    /// $SYS/broker/version, retained random temperatures on isima/G1..G4
    Course(course::CourseArgs),
    /// Simulated sensor fleets over MQTT: topics, value models, QoS,
    /// formats, faults; deterministic with --seed
    Fleet(fleet::FleetArgs),
    /// The same readings as lines on a serial port or a pseudo-terminal
    Serial(serial::SerialArgs),
    /// The same readings as BLE adverts (BTHome, ATC1441, pvvx, Ruuvi,
    /// Govee) in the gateway's replay format, on stdout, a file or a pty
    Ble(ble::BleArgs),
    /// MQTT load generator: publishers × subscribers × QoS × payload × rate;
    /// reports publish and delivery rates, lost and duplicated messages and
    /// publish→deliver latency (run it against ours and mosquitto alike).
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Course(args) => course::run(args),
        Command::Fleet(args) => fleet::run(args),
        Command::Serial(args) => serial::run(args),
        Command::Ble(args) => ble::run(args),
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
