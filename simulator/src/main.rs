//! `capteurs-sim`: the course's publishers, sensor fleets and the benchmark
//! load generator. The subcommands arrive with the simulator issue; this
//! binary already exists so the workspace layout is the product's.

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "capteurs-sim",
    version,
    about = "Capteurs simulator (course replay, fleets, bench)"
)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    anyhow::bail!(
        "no subcommand yet: course, fleet, serial and bench come with the simulator issue"
    )
}
