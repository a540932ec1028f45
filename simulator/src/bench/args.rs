//! The command line of `capteurs-sim bench` (`BenchArgs`), and `validate`:
//! the checks of its values that clap's parsers do not make.

use anyhow::bail;

use super::stats;

#[derive(clap::Args, Debug, Clone)]
#[command(after_help = "Example, against a broker on 127.0.0.1:1884:\n  \
    capteurs-sim bench --port 1884 --publishers 10 --subscribers 1 --fan-in --qos 1 --duration 10")]
pub struct BenchArgs {
    /// Broker host.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Broker port.
    #[arg(long, short, default_value_t = 1883)]
    pub port: u16,
    /// User name for CONNECT.
    #[arg(long, short)]
    pub username: Option<String>,
    /// Password for CONNECT (with --username).
    #[arg(long, short = 'P', requires = "username")]
    pub password: Option<String>,
    /// Publishing connections.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub publishers: u32,
    /// Subscribing connections, each subscribed to `<topic>/#` (0: publish only).
    #[arg(long, default_value_t = 1)]
    pub subscribers: u32,
    /// QoS of the publications and of the subscriptions.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=2))]
    pub qos: u8,
    /// Payload bytes; the first 20 carry publisher, sequence and send time.
    #[arg(long, default_value_t = 64)]
    pub payload_size: usize,
    /// Messages per second in total across publishers; 0 = flat out.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Seconds of measured publishing.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Seconds of publishing before the measurement starts (not counted in
    /// rates, CPU or latency; still checked for loss and duplicates).
    #[arg(long, default_value_t = 0.0)]
    pub warmup: f64,
    /// Topic prefix: publishers publish under it, subscribers subscribe to `<topic>/#`.
    #[arg(long, default_value = "bench")]
    pub topic: String,
    /// All publishers publish to one topic, `<topic>/all` (default: `<topic>/<i>` each).
    #[arg(long)]
    pub fan_in: bool,
    /// Unacknowledged QoS 1/2 messages a publisher may have in flight.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u16).range(1..=32768))]
    pub window: u16,
    /// Runtime threads: 1 = a current-thread runtime (leaves a core to the
    /// broker on a 2-core machine), N > 1 = N tokio worker threads.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub threads: u16,
    /// Publishers' socket send buffer (SO_SNDBUF) in bytes. Small, so that
    /// flat-out QoS 0 messages count as published about when the broker
    /// reads them; 0 = the system's autotuning, which queues megabytes per
    /// connection in the kernel.
    #[arg(long, default_value_t = 64 * 1024)]
    pub sndbuf: u32,
    /// PUBLISH packets per write when flat out (0 = about 16 KiB worth).
    #[arg(long, default_value_t = 0)]
    pub batch: usize,
    /// Also report the CPU use of this process id (the broker's) over the measurement.
    #[arg(long)]
    pub broker_pid: Option<u32>,
    /// Print the report as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
    /// No progress line on stderr.
    #[arg(long, short)]
    pub quiet: bool,
}

pub fn validate(a: &BenchArgs) -> anyhow::Result<()> {
    if a.payload_size < stats::HEADER {
        bail!(
            "--payload-size must be at least {} bytes (publisher u32, sequence u64, send time u64)",
            stats::HEADER
        );
    }
    if a.payload_size > 64 * 1024 * 1024 {
        bail!("--payload-size is at most 64 MiB");
    }
    if a.topic.is_empty() || a.topic.contains(['+', '#', '\0']) || a.topic.len() > 1024 {
        bail!("--topic must be a non-empty topic name without wildcards");
    }
    if !(a.duration > 0.0 && a.duration.is_finite()) {
        bail!("--duration must be a positive number of seconds");
    }
    if !(a.warmup >= 0.0 && a.warmup.is_finite()) {
        bail!("--warmup must be zero or a positive number of seconds");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_arguments() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            bench: BenchArgs,
        }
        let parse =
            |extra: &[&str]| Cli::try_parse_from([&["bench"], extra].concat()).map(|c| c.bench);
        assert!(validate(&parse(&[]).unwrap()).is_ok());
        assert!(validate(&parse(&["--payload-size", "19"]).unwrap()).is_err());
        assert!(validate(&parse(&["--topic", "a/+"]).unwrap()).is_err());
        assert!(validate(&parse(&["--duration", "0"]).unwrap()).is_err());
        assert!(parse(&["--qos", "3"]).is_err());
        assert!(parse(&["--publishers", "0"]).is_err());
        assert!(
            parse(&["--password", "x"]).is_err(),
            "a password needs a user name"
        );
        let a = parse(&[
            "--fan-in", "--rate", "2000", "--warmup", "1.5", "-u", "u", "-P", "p",
        ])
        .unwrap();
        assert!(
            a.fan_in && a.rate == 2000 && a.warmup == 1.5 && a.password.as_deref() == Some("p")
        );
    }
}
