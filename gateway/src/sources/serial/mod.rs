//! Serial ports (`tokio-serial`): one task per port reads lines, parses
//! them ([`lines`]) and hands the readings to [`Sources`]. A port that
//! cannot be opened, or goes away (USB unplugged: read error or end of
//! file), is reopened with exponential backoff; bad lines are counted and
//! logged (rate-limited) and the port keeps reading.

pub mod lines;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use tokio::io::AsyncReadExt;
use tokio_serial::SerialPortBuilderExt;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use self::lines::{Checksum, LineFormat, Piece, Splitter};
use super::{Reading, SourceStats, Sources};

/// A serial line's parity (`[[serial]] parity`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Parity {
    #[default]
    None,
    Even,
    Odd,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
/// How lines end (`[[serial]] line_ending`).
pub enum LineEnding {
    #[default]
    Lf,
    Crlf,
    Cr,
}

/// One port, as configured and resolved against the registry.
#[derive(Debug, Clone)]
pub struct PortSettings {
    /// The port: where to open it (a relative path in the file is resolved
    /// against the file's directory at load), and the registry's key.
    pub port: PathBuf,
    pub baud: u32,
    pub data_bits: u8,
    pub parity: Parity,
    pub stop_bits: u8,
    pub line_ending: LineEnding,
    pub format: LineFormat,
    pub checksum: Checksum,
    /// Registry index of the sensor for lines without an id.
    pub default_sensor: Option<usize>,
    /// Quantity of `plain` lines.
    pub default_grandeur: Option<String>,
    /// The decoder plugin that reads this port's lines, by name.
    pub decoder: Option<String>,
    pub max_line_bytes: usize,
    pub reopen_min: Duration,
    pub reopen_max: Duration,
}

enum End {
    Shutdown,
    Lost(String),
}

/// Runs one port until shutdown.
pub async fn run(p: PortSettings, sources: Arc<Sources>, shutdown: CancellationToken) {
    let name = p.port.display().to_string();
    let mut delay = p.reopen_min;
    loop {
        match open(&p) {
            Ok(stream) => {
                sources.stats.port_opens.fetch_add(1, Ordering::Relaxed);
                info!(port = %name, baud = p.baud, format = ?p.format, "serial port open");
                delay = p.reopen_min;
                match read(stream, &p, &sources, &shutdown).await {
                    End::Shutdown => return,
                    End::Lost(error) => {
                        sources.stats.port_errors.fetch_add(1, Ordering::Relaxed);
                        warn!(port = %name, error, "serial port lost; reopening");
                    }
                }
            }
            Err(e) => {
                sources.stats.port_errors.fetch_add(1, Ordering::Relaxed);
                sources.log.log(&format!("{name}/open"), |suppressed| {
                    warn!(port = %name, error = %e, retry_ms = delay.as_millis() as u64, suppressed, "cannot open serial port");
                });
                delay = (delay * 2).min(p.reopen_max);
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

fn open(p: &PortSettings) -> Result<tokio_serial::SerialStream, tokio_serial::Error> {
    let data_bits = match p.data_bits {
        5 => tokio_serial::DataBits::Five,
        6 => tokio_serial::DataBits::Six,
        7 => tokio_serial::DataBits::Seven,
        _ => tokio_serial::DataBits::Eight,
    };
    let parity = match p.parity {
        Parity::None => tokio_serial::Parity::None,
        Parity::Even => tokio_serial::Parity::Even,
        Parity::Odd => tokio_serial::Parity::Odd,
    };
    let stop_bits = match p.stop_bits {
        2 => tokio_serial::StopBits::Two,
        _ => tokio_serial::StopBits::One,
    };
    tokio_serial::new(p.port.to_string_lossy(), p.baud)
        .data_bits(data_bits)
        .parity(parity)
        .stop_bits(stop_bits)
        .flow_control(tokio_serial::FlowControl::None)
        .open_native_async()
}

async fn read(
    mut stream: tokio_serial::SerialStream,
    p: &PortSettings,
    sources: &Sources,
    shutdown: &CancellationToken,
) -> End {
    let mut buf = vec![0u8; 4096];
    let mut splitter = Splitter::new(p.max_line_bytes, p.line_ending == LineEnding::Cr);
    let source = format!("serial:{}", p.port.display());
    loop {
        let n = tokio::select! {
            _ = shutdown.cancelled() => return End::Shutdown,
            r = stream.read(&mut buf) => match r {
                Ok(0) => return End::Lost("end of file (device gone)".into()),
                Ok(n) => n,
                Err(e) => return End::Lost(e.to_string()),
            },
        };
        let at = SystemTime::now();
        splitter.feed(&buf[..n], |piece| match piece {
            Piece::Overlong => sources.dropped(
                &sources.stats.overlong,
                &source,
                "overlong",
                &format!("line over {} bytes", p.max_line_bytes),
            ),
            Piece::Line(raw) => line(raw, at, p, sources, &source),
        });
    }
}

/// One complete line from the port.
fn line(raw: &[u8], at: SystemTime, p: &PortSettings, sources: &Sources, source: &str) {
    let stats = &sources.stats;
    SourceStats::add(&stats.lines);
    if let Some(name) = &p.decoder {
        plugin_line(name, raw, at, p, sources, source);
        return;
    }
    let parsed = match lines::parse(raw, p.format, p.checksum) {
        Ok(l) => l,
        Err(e) => {
            let counter = match e {
                lines::LineError::Garbage => &stats.garbage,
                lines::LineError::Checksum => &stats.bad_checksum,
                lines::LineError::Unparsable(_) => &stats.unparsable,
            };
            let text = lines::clip(&String::from_utf8_lossy(raw));
            sources.dropped(counter, source, e.cause(), &format!("{e}: {text:?}"));
            return;
        }
    };
    let index = match &parsed.sensor {
        Some(id) => sources.registry.serial(&p.port, id),
        None => p.default_sensor,
    };
    let Some(index) = index else {
        let id = parsed.sensor.clone().unwrap_or_default();
        sources.unknown(
            "serial",
            if id.is_empty() { source } else { &id },
            serde_json::json!({
                "port": p.port.display().to_string(),
                "line": lines::clip(&String::from_utf8_lossy(raw)),
            }),
        );
        return;
    };
    for (grandeur, value) in parsed.values {
        let grandeur = if grandeur.is_empty() {
            match &p.default_grandeur {
                Some(g) => g.clone(),
                None => continue,
            }
        } else {
            grandeur
        };
        sources.reading(
            index,
            Reading {
                grandeur,
                value,
                rssi: parsed.rssi,
                battery: None,
                at,
            },
        );
    }
}

/// A line read by a decoder plugin.
fn plugin_line(
    name: &str,
    raw: &[u8],
    at: SystemTime,
    p: &PortSettings,
    sources: &Sources,
    source: &str,
) {
    let readings = match sources.decode(name, source, raw) {
        Ok(r) => r,
        Err(e) => {
            let text = lines::clip(&String::from_utf8_lossy(raw));
            sources.dropped(
                &sources.stats.decoder_failed,
                source,
                "decoder_failed",
                &format!("{e}: {text:?}"),
            );
            return;
        }
    };
    for r in readings {
        let index = match &r.sensor {
            Some(id) => sources.registry.serial(&p.port, id),
            None => p.default_sensor,
        };
        let Some(index) = index else {
            let id = r.sensor.clone().unwrap_or_else(|| source.to_owned());
            sources.unknown(
                "serial",
                &id,
                serde_json::json!({ "port": p.port.display().to_string(), "decoder": name }),
            );
            continue;
        };
        sources.reading(
            index,
            Reading {
                grandeur: r.grandeur,
                value: r.value,
                rssi: None,
                battery: None,
                at,
            },
        );
    }
}
