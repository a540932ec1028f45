//! `capteurs-sim serial`: the fleet's readings as text lines on a serial
//! port or a pseudo-terminal, in the line formats the gateway's serial
//! source reads, with optional corruption to exercise its error handling.
//!
//! Line formats (one reading per line, `\n`-terminated):
//! - `plain`: the number alone, `17.25` (one sensor per port);
//! - `kv`: `sensor=temperature-1-1 grandeur=temperature value=17.25 unit=°C seq=0`;
//! - `json`: `{"sensor":"temperature-1-1","grandeur":"temperature","value":17.25,"unit":"°C","seq":0,"ts":…}`.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::fleet::generator::{Generator, Reading};
use crate::fleet::FleetArgs;

#[derive(Args, Debug)]
pub struct SerialArgs {
    /// Serial device to write to (e.g. /dev/ttyUSB0)
    #[arg(long, required_unless_present = "pty", conflicts_with = "pty")]
    device: Option<PathBuf>,
    /// Create a pseudo-terminal, print its path on the first stdout line
    /// (`pty: /dev/pts/N`) and write there
    #[arg(long)]
    pty: bool,
    /// Baud rate set on --device
    #[arg(long, default_value_t = 115_200)]
    baud: u32,
    /// Line format
    #[arg(long, value_enum, default_value = "plain")]
    line_format: LineFormat,
    /// Stop after this many lines (0 = run for the scenario's duration)
    #[arg(long, default_value_t = 0)]
    count: u64,
    /// Fraction of lines corrupted (0.0 .. 1.0)
    #[arg(long, default_value_t = 0.0)]
    corrupt_rate: f64,
    /// Kinds of corruption to draw from
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "garbage,cut,overlong"
    )]
    corrupt: Vec<Corruption>,
    /// The sensors (same flags and scenario files as `fleet`; the MQTT
    /// settings are ignored)
    #[command(flatten)]
    fleet: FleetArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LineFormat {
    Plain,
    Kv,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Corruption {
    /// Random non-UTF-8 bytes in place of the line
    Garbage,
    /// The line cut in the middle (no newline: it runs into the next one)
    Cut,
    /// A line of 8 KiB without a newline, then the real line
    Overlong,
}

/// Lines over this many bytes are "overlong" for the gateway.
pub const OVERLONG: usize = 8192;

pub fn run(args: SerialArgs) -> anyhow::Result<()> {
    if !(0.0..=1.0).contains(&args.corrupt_rate) {
        bail!("--corrupt-rate must be between 0 and 1");
    }
    if args.corrupt_rate > 0.0 && args.corrupt.is_empty() {
        bail!("--corrupt needs at least one kind");
    }
    let scenario = args.fleet.scenario()?;
    let seed = scenario.seed.unwrap_or_else(rand::random);
    let (mut out, _keep) = if args.pty {
        let (master, slave, path) = open_pty()?;
        println!("pty: {}", path.display());
        std::io::stdout().flush()?;
        (File::from(master), Some(slave))
    } else {
        let path = args.device.clone().expect("clap: --device or --pty");
        let f = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open(&path)
            .with_context(|| format!("cannot open serial device {}", path.display()))?;
        if unsafe { libc::isatty(f.as_raw_fd()) } == 1 {
            set_raw(f.as_raw_fd(), Some(args.baud))
                .with_context(|| format!("cannot configure {}", path.display()))?;
        }
        (f, None)
    };
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [libc::SIGINT, libc::SIGTERM] {
        signal_hook_flag(sig, stop.clone())?;
    }
    let mut g = Generator::new(&scenario, seed);
    let mut corrupt_rng = ChaCha8Rng::seed_from_u64(seed ^ 0x005e_71a1);
    let start = Instant::now();
    let duration =
        (scenario.duration_secs > 0.0).then(|| Duration::from_secs_f64(scenario.duration_secs));
    let mut stats = [0u64; 4]; // good, garbage, cut, overlong
    let mut written = 0u64;
    let mut last_progress = (Instant::now(), 0u64);
    while !stop.load(Ordering::Relaxed) {
        if !args.fleet.quiet && last_progress.0.elapsed() >= Duration::from_secs(1) {
            let rate = (written - last_progress.1) as f64 / last_progress.0.elapsed().as_secs_f64();
            eprint!(
                "\r  {:>6.1} s  lines {written:>10}  {rate:>8.0} lines/s  corrupted {}  ",
                start.elapsed().as_secs_f64(),
                stats[1] + stats[2] + stats[3]
            );
            last_progress = (Instant::now(), written);
        }
        if args.count > 0 && written >= args.count {
            break;
        }
        let Some(r) = g.next_due(start, duration) else {
            break;
        };
        let spec = g.spec(r.sensor).clone();
        let group = &scenario.groups[spec.group];
        let line = line(args.line_format, &spec.id, &group.grandeur, &group.unit, &r);
        let bytes = if corrupt_rng.random_bool(args.corrupt_rate) {
            let kind = args.corrupt[corrupt_rng.random_range(0..args.corrupt.len())];
            stats[1 + kind as usize] += 1;
            corrupted(kind, &line, &mut corrupt_rng)
        } else {
            stats[0] += 1;
            line.into_bytes()
        };
        out.write_all(&bytes)
            .context("writing to the serial port")?;
        written += 1;
    }
    out.flush()?;
    if !args.fleet.quiet && written > 0 && start.elapsed() >= Duration::from_secs(1) {
        eprintln!();
    }
    eprintln!(
        "lines written {written}: good {}, garbage {}, cut {}, overlong {}",
        stats[0], stats[1], stats[2], stats[3]
    );
    // A reader reads what is in the pty before it goes away.
    if let Some(slave) = &_keep {
        drain_pty(slave);
    }
    Ok(())
}

/// Waits until a reader has taken everything written to the pty (its
/// slave's input queue stays empty), at most 10 s: closing the master
/// throws away what is left. (A fixed 200 ms, which a loaded machine
/// exceeded, lost the last lines.)
pub(crate) fn drain_pty(slave: &OwnedFd) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    // Empty for half a second: what the writer put in the pty can sit in
    // the kernel's flip buffer, not yet counted, while a loaded machine's
    // worker gets to it.
    let mut empty_polls = 0;
    while empty_polls < 25 && std::time::Instant::now() < deadline {
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int.
        let rc = unsafe { libc::ioctl(slave.as_raw_fd(), libc::FIONREAD, &mut n) };
        if rc != 0 {
            return;
        }
        empty_polls = if n == 0 { empty_polls + 1 } else { 0 };
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One reading as a line in `format`, newline included.
pub fn line(format: LineFormat, sensor: &str, grandeur: &str, unit: &str, r: &Reading) -> String {
    let v = crate::mqtt::python_float(r.value);
    match format {
        LineFormat::Plain => format!("{v}\n"),
        LineFormat::Kv => {
            format!(
                "sensor={sensor} grandeur={grandeur} value={v} unit={unit} seq={}\n",
                r.seq
            )
        }
        LineFormat::Json => {
            let ts = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0);
            let j = serde_json::json!({
                "sensor": sensor, "grandeur": grandeur, "value": r.value,
                "unit": unit, "seq": r.seq, "ts": ts,
            });
            format!("{j}\n")
        }
    }
}

fn corrupted(kind: Corruption, line: &str, rng: &mut ChaCha8Rng) -> Vec<u8> {
    match kind {
        Corruption::Garbage => {
            let n = rng.random_range(4..32);
            let mut b: Vec<u8> = (0..n).map(|_| rng.random_range(0x80..=0xff)).collect();
            b.push(b'\n');
            b
        }
        Corruption::Cut => {
            // Cut at a character boundary: the text is truncated, not mangled.
            let mut keep = rng.random_range(1..line.len().max(2));
            while !line.is_char_boundary(keep) {
                keep -= 1;
            }
            line.as_bytes()[..keep.max(1)].to_vec()
        }
        Corruption::Overlong => {
            let mut b = vec![b'9'; OVERLONG + 16];
            b.extend_from_slice(line.as_bytes());
            b
        }
    }
}

/// Opens a pseudo-terminal in raw mode; returns (master, slave, slave path).
/// The slave stays open here so the pty survives readers coming and going.
pub(crate) fn open_pty() -> anyhow::Result<(OwnedFd, OwnedFd, PathBuf)> {
    let mut master = -1;
    let mut slave = -1;
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: openpty writes two fds and a NUL-terminated name into the
    // buffers given (128 bytes is more than glibc's limit for pty names).
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            name.as_mut_ptr(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("openpty");
    }
    // SAFETY: openpty succeeded, both fds are ours.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    // SAFETY: name is NUL-terminated by openpty.
    let path = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    set_raw(slave.as_raw_fd(), None)?;
    Ok((master, slave, PathBuf::from(path)))
}

/// Raw mode (no echo, no line editing, no CR/LF translation), optionally
/// at a baud rate.
fn set_raw(fd: i32, baud: Option<u32>) -> anyhow::Result<()> {
    // SAFETY: termios is plain data; tcgetattr fills it.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    if unsafe { libc::tcgetattr(fd, &mut t) } != 0 {
        return Err(std::io::Error::last_os_error()).context("tcgetattr");
    }
    unsafe { libc::cfmakeraw(&mut t) };
    if let Some(baud) = baud {
        let speed = match baud {
            9600 => libc::B9600,
            19200 => libc::B19200,
            38400 => libc::B38400,
            57600 => libc::B57600,
            115_200 => libc::B115200,
            230_400 => libc::B230400,
            460_800 => libc::B460800,
            921_600 => libc::B921600,
            _ => bail!("unsupported baud rate {baud} (9600 … 921600)"),
        };
        unsafe {
            libc::cfsetispeed(&mut t, speed);
            libc::cfsetospeed(&mut t, speed);
        }
    }
    if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &t) } != 0 {
        return Err(std::io::Error::last_os_error()).context("tcsetattr");
    }
    Ok(())
}

/// Sets `flag` when `sig` arrives (a plain handler storing to a static).
pub(crate) fn signal_hook_flag(sig: i32, flag: Arc<AtomicBool>) -> anyhow::Result<()> {
    static FLAG: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();
    let _ = FLAG.set(flag);
    extern "C" fn on_signal(_: i32) {
        if let Some(f) = FLAG.get() {
            f.store(true, Ordering::Relaxed);
        }
    }
    // SAFETY: the handler only does an atomic store (async-signal-safe).
    let prev = unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    if prev == libc::SIG_ERR {
        return Err(std::io::Error::last_os_error()).context("installing a signal handler");
    }
    Ok(())
}
