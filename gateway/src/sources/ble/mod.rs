//! BLE sensors: advertisements in, decoded readings out.
//!
//! The radio side is a thin layer (`bluez`, behind the `ble` cargo
//! feature): it turns BlueZ's device properties into [`Advert`]s. Everything
//! after that — decoding, registry, topics, broker — is plain code fed by
//! adverts, from the radio or from a replay source (recorded frames, one per
//! line, see [`Advert::parse`]) that tests and `capteurs-sim ble` use.

pub mod bthome;
pub mod govee;
pub mod ruuvi;
pub mod xiaomi;

#[cfg(feature = "ble")]
pub mod bluez;

use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use thiserror::Error;
use tokio::io::AsyncBufReadExt;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{Frame, Reading, SourceStats, Sources};

/// One advertisement as received: who sent it, how loud, and the service
/// and manufacturer data it carried.
#[derive(Debug, Clone, PartialEq)]
pub struct Advert {
    pub mac: [u8; 6],
    pub rssi: Option<i16>,
    pub service_data: Vec<(u16, Vec<u8>)>,
    pub manufacturer_data: Vec<(u16, Vec<u8>)>,
}

#[derive(Debug, Error, PartialEq)]
pub enum DecodeError {
    #[error("{0}: frame too short")]
    TooShort(&'static str),
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("encrypted BTHome frame and no key configured for this sensor")]
    NoKey,
    #[error("BTHome frame does not decrypt with the configured key (wrong key or altered frame)")]
    Decrypt,
}

/// What one advertisement says.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    /// Which decoder read it (`bthome`, `atc1441`, `pvvx`, `ruuvi5`, `govee_h5075`…).
    pub format: &'static str,
    /// Measurements, as (grandeur, value) in the gateway's units: °C, %, hPa.
    pub values: Vec<(&'static str, f64)>,
    /// Battery level in %, and voltage in V, where the frame has them.
    pub battery: Option<f64>,
    pub voltage: Option<f64>,
    /// The device's frame or packet counter: repeated adverts repeat it.
    pub counter: Option<u32>,
    /// The address inside the payload, where the format carries one.
    pub mac: Option<[u8; 6]>,
    /// Decoding stopped at an object it does not know (BTHome).
    pub truncated: bool,
    /// Opened with the sensor's key (encrypted BTHome): authenticated.
    pub encrypted: bool,
}

impl Decoded {
    fn new(format: &'static str) -> Self {
        Decoded {
            format,
            values: Vec::new(),
            battery: None,
            voltage: None,
            counter: None,
            mac: None,
            truncated: false,
            encrypted: false,
        }
    }

    fn push(&mut self, grandeur: &'static str, v: f64) {
        self.values.push((grandeur, round6(v)));
    }

    pub fn get(&self, grandeur: &str) -> Option<f64> {
        self.values
            .iter()
            .find(|(g, _)| *g == grandeur)
            .map(|(_, v)| *v)
    }

    /// Every quantity as (grandeur, value), battery (`batterie`, %) and
    /// voltage (`tension`, V) included.
    pub fn quantities(&self) -> Vec<(&'static str, f64)> {
        let mut q = self.values.clone();
        q.extend(self.battery.map(|b| ("batterie", round6(b))));
        q.extend(self.voltage.map(|v| ("tension", round6(v))));
        q
    }
}

/// Scaled integers (25.060000000000002) back to the decimal they encode.
fn round6(v: f64) -> f64 {
    (v * 1e6).round() / 1e6
}

/// Decodes an advert with every decoder that recognises its data; `None`
/// if none does (not a sensor we know). `key`: the sensor's BTHome key.
pub fn decode(a: &Advert, key: Option<&[u8; 16]>) -> Option<Result<Decoded, DecodeError>> {
    for (uuid, data) in &a.service_data {
        match *uuid {
            bthome::UUID => return Some(bthome::decode(data, a.mac, key)),
            xiaomi::UUID => return Some(xiaomi::decode(data)),
            _ => {}
        }
    }
    for (company, data) in &a.manufacturer_data {
        match *company {
            ruuvi::COMPANY => return Some(ruuvi::decode(data)),
            govee::COMPANY => return Some(govee::decode(data)),
            _ => {}
        }
    }
    None
}

pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<u8> = s
        .split(':')
        .map(|p| {
            (p.len() == 2)
                .then(|| u8::from_str_radix(p, 16).ok())
                .flatten()
        })
        .collect::<Option<_>>()?;
    parts.try_into().ok()
}

/// Hex digits to bytes, spaces allowed; `None` on anything else.
pub fn parse_hex(s: &str) -> Option<Vec<u8>> {
    let digits: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    if !digits.len().is_multiple_of(2) {
        return None;
    }
    digits
        .chunks(2)
        .map(|p| u8::from_str_radix(std::str::from_utf8(p).ok()?, 16).ok())
        .collect()
}

#[cfg(test)]
pub(crate) fn hex(s: &str) -> Vec<u8> {
    parse_hex(s).expect("test hex")
}

impl Advert {
    /// Every data block, ids included: what identifies an advert among its
    /// repeats when its format has no counter.
    pub fn data_bytes(&self) -> Vec<u8> {
        self.service_data
            .iter()
            .chain(&self.manufacturer_data)
            .flat_map(|(id, d)| id.to_be_bytes().into_iter().chain(d.iter().copied()))
            .collect()
    }

    /// Reads the replay line format:
    /// `A4:C1:38:02:83:F4 rssi=-60 svc=181A:A4C1380283F4… mfr=0499:0512FC…`
    /// (any number of `svc=` and `mfr=` fields, hex ids and data).
    pub fn parse(line: &str) -> Result<Advert, String> {
        let mut fields = line.split_ascii_whitespace();
        let mac = fields.next().ok_or("empty line")?;
        let mac = parse_mac(mac).ok_or_else(|| format!("{mac:?} is not a MAC address"))?;
        let mut a = Advert {
            mac,
            rssi: None,
            service_data: Vec::new(),
            manufacturer_data: Vec::new(),
        };
        for f in fields {
            let (k, v) = f
                .split_once('=')
                .ok_or_else(|| format!("{f:?}: expected key=value"))?;
            match k {
                "rssi" => a.rssi = Some(v.parse().map_err(|_| format!("rssi {v:?}"))?),
                "svc" | "mfr" => {
                    let (id, data) = v
                        .split_once(':')
                        .ok_or_else(|| format!("{f:?}: expected ID:HEX"))?;
                    let id = u16::from_str_radix(id, 16).map_err(|_| format!("{f:?}: bad id"))?;
                    let data = parse_hex(data).ok_or_else(|| format!("{f:?}: bad hex"))?;
                    if k == "svc" {
                        a.service_data.push((id, data));
                    } else {
                        a.manufacturer_data.push((id, data));
                    }
                }
                _ => return Err(format!("unknown field {k:?}")),
            }
        }
        Ok(a)
    }
}

impl fmt::Display for Advert {
    /// The replay line format ([`Advert::parse`] reads it back).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", format_mac(&self.mac))?;
        if let Some(r) = self.rssi {
            write!(f, " rssi={r}")?;
        }
        let hex = |d: &[u8]| d.iter().map(|b| format!("{b:02X}")).collect::<String>();
        for (id, d) in &self.service_data {
            write!(f, " svc={id:04X}:{}", hex(d))?;
        }
        for (id, d) in &self.manufacturer_data {
            write!(f, " mfr={id:04X}:{}", hex(d))?;
        }
        Ok(())
    }
}

/// Passive scanning settings.
#[derive(Debug, Clone)]
pub struct ScanSettings {
    pub adapter: Option<String>,
}

/// One advert, from the radio or a replay: decoded with its sensor's key,
/// checked against the registry, published.
pub fn advert(sources: &Sources, a: &Advert) {
    let stats = &sources.stats;
    SourceStats::add(&stats.adverts);
    let known = sources.registry.ble(&a.mac);
    let key = known.and_then(|i| sources.registry.sensors[i].key.as_ref());
    let source = format!("ble:{}", format_mac(&a.mac));
    let d = match decode(a, key) {
        None => {
            // Not a built-in format: the decoder plugin may know it.
            if let Some(name) = sources.ble_decoder.clone() {
                plugin_advert(sources, &name, a, known);
            }
            return; // otherwise not a sensor: phones, beacons...
        }
        Some(Ok(d)) => d,
        Some(Err(e @ (DecodeError::NoKey | DecodeError::Decrypt))) if known.is_some() => {
            sources.dropped(
                &stats.decrypt_failed,
                &source,
                "decrypt_failed",
                &e.to_string(),
            );
            return;
        }
        Some(Err(e)) if known.is_some() => {
            sources.dropped(&stats.undecodable, &source, "undecodable", &e.to_string());
            return;
        }
        // An unknown device whose frame we cannot read either.
        Some(Err(_)) => {
            sources.unknown(
                "ble",
                &format_mac(&a.mac),
                serde_json::json!({ "rssi": a.rssi, "advert": a.to_string() }),
            );
            return;
        }
    };
    // A sensor with a key is heard only through encrypted BTHome from its
    // own address, with a counter that increases: anything else (a
    // plaintext frame, a custom-firmware frame naming its address) anyone
    // could forge.
    if let Some(i) = known.filter(|&i| sources.registry.sensors[i].key.is_some()) {
        if !d.encrypted {
            let why = format!(
                "{} frame refused: this sensor has a key, only encrypted BTHome is accepted",
                d.format
            );
            sources.dropped(&stats.unauthenticated, &source, "unauthenticated", &why);
            return;
        }
        let counter = d.counter.unwrap_or_default();
        match sources.fresh_counter(i, counter) {
            crate::sources::Freshness::New => {}
            crate::sources::Freshness::Repeat => return,
            crate::sources::Freshness::Replayed => {
                let why =
                    format!("frame counter {counter} is not newer than the last one accepted");
                sources.dropped(&stats.replayed, &source, "replayed", &why);
                return;
            }
        }
        publish_decoded(sources, i, a, &d);
        return;
    }
    // Custom firmware carries the real address in the payload.
    let index = known.or_else(|| d.mac.and_then(|m| sources.registry.ble(&m)));
    let Some(index) = index else {
        let values: serde_json::Map<String, serde_json::Value> = d
            .quantities()
            .into_iter()
            .map(|(g, v)| (g.to_owned(), v.into()))
            .collect();
        sources.unknown(
            "ble",
            &format_mac(&d.mac.unwrap_or(a.mac)),
            serde_json::json!({ "format": d.format, "rssi": a.rssi, "values": values }),
        );
        return;
    };
    if known.is_none() && sources.registry.sensors[index].key.is_some() {
        let why = format!(
            "{} frame from another address naming this sensor, which has a key",
            d.format
        );
        sources.dropped(&stats.unauthenticated, &source, "unauthenticated", &why);
        return;
    }
    let frame = match d.counter {
        Some(c) => Frame::Counter(c),
        None => Frame::Bytes(a.data_bytes()),
    };
    if !sources.new_frame(index, frame) {
        return;
    }
    publish_decoded(sources, index, a, &d);
}

/// The readings of a decoded advert, for the sensor at `index`.
fn publish_decoded(sources: &Sources, index: usize, a: &Advert, d: &Decoded) {
    let at = SystemTime::now();
    let listed = |g: &str| sources.registry.sensors[index].quantity(g).is_some();
    for (grandeur, value) in d.quantities() {
        // Battery and voltage ride along in every advert: published only
        // when the sensor lists them, never counted as unexpected.
        if matches!(grandeur, "batterie" | "tension") && !listed(grandeur) {
            continue;
        }
        sources.reading(
            index,
            Reading {
                grandeur: grandeur.to_owned(),
                value,
                rssi: a.rssi,
                battery: d.battery,
                at,
            },
        );
    }
}

/// An advert read by the decoder plugin: each service and manufacturer
/// data block in turn, as `ble:<MAC>/svc:<UUID>` or `ble:<MAC>/mfr:<id>`.
fn plugin_advert(sources: &Sources, name: &str, a: &Advert, known: Option<usize>) {
    let mac = format_mac(&a.mac);
    let blocks = a
        .service_data
        .iter()
        .map(|(id, d)| (format!("ble:{mac}/svc:{id:04X}"), d))
        .chain(
            a.manufacturer_data
                .iter()
                .map(|(id, d)| (format!("ble:{mac}/mfr:{id:04X}"), d)),
        );
    let mut readings = Vec::new();
    for (source, data) in blocks {
        match sources.decode(name, &source, data) {
            Ok(r) => readings.extend(r),
            Err(e) => sources.dropped(&sources.stats.decoder_failed, &source, "decoder_failed", &e),
        }
    }
    if readings.is_empty() {
        return;
    }
    let Some(index) = known else {
        sources.unknown(
            "ble",
            &mac,
            serde_json::json!({ "decoder": name, "rssi": a.rssi }),
        );
        return;
    };
    let frame = Frame::Bytes(a.data_bytes());
    if !sources.new_frame(index, frame) {
        return;
    }
    let at = SystemTime::now();
    for r in readings {
        sources.reading(
            index,
            Reading {
                grandeur: r.grandeur,
                value: r.value,
                rssi: a.rssi,
                battery: None,
                at,
            },
        );
    }
}

/// Reads recorded adverts (one per line, [`Advert::parse`]) from a file,
/// FIFO or pty. A regular file is read once; anything else is reopened
/// when it ends, like a serial port (every 200 ms while it is missing: a
/// replay input is a test or a demo, not a radio to spare).
pub async fn replay(path: PathBuf, sources: Arc<Sources>, shutdown: CancellationToken) {
    let name = path.display().to_string();
    let source = format!("ble-replay:{name}");
    let delay = Duration::from_millis(200);
    loop {
        match open_replay(&path).await {
            Ok((f, regular)) => {
                sources.stats.port_opens.fetch_add(1, Ordering::Relaxed);
                info!(path = %name, "BLE replay input open");
                let mut lines = tokio::io::BufReader::new(f).lines();
                loop {
                    let line = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        l = lines.next_line() => l,
                    };
                    match line {
                        Ok(Some(l)) if l.trim().is_empty() || l.starts_with('#') => {}
                        Ok(Some(l)) => match Advert::parse(&l) {
                            Ok(a) => advert(&sources, &a),
                            Err(e) => sources.dropped(
                                &sources.stats.unparsable,
                                &source,
                                "unparsable",
                                &e,
                            ),
                        },
                        Ok(None) if regular => {
                            info!(path = %name, "BLE replay file read to its end");
                            return;
                        }
                        Ok(None) => break,
                        Err(e) => {
                            warn!(path = %name, error = %e, "BLE replay input lost; reopening");
                            break;
                        }
                    }
                }
            }
            Err(e) => {
                sources.stats.port_errors.fetch_add(1, Ordering::Relaxed);
                sources.log.log(&format!("{source}/open"), |suppressed| {
                    warn!(path = %name, error = %e, suppressed, "cannot open BLE replay input");
                });
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Opens a replay input; true when it is a regular file (read once).
///
/// A FIFO is opened read-write and non-blocking, and read through the
/// runtime's reactor: a plain open(2) of a FIFO blocks until a writer comes,
/// outside any `select!`, and held shutdown for as long as nobody wrote.
/// Holding a write end also means a writer that goes away is not an end of
/// input: the next writer's lines are read on the same descriptor.
async fn open_replay(
    path: &std::path::Path,
) -> std::io::Result<(std::pin::Pin<Box<dyn tokio::io::AsyncRead + Send>>, bool)> {
    use std::os::unix::fs::FileTypeExt;
    let kind = tokio::fs::metadata(path).await?.file_type();
    if kind.is_fifo() {
        let rx = tokio::net::unix::pipe::OpenOptions::new()
            .read_write(true)
            .open_receiver(path)?;
        return Ok((Box::pin(rx), false));
    }
    // O_NOCTTY: a pty must never become the gateway's controlling terminal.
    let f = tokio::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOCTTY)
        .open(path)
        .await?;
    Ok((Box::pin(f), kind.is_file()))
}

/// Passive scanning through BlueZ.
#[cfg(feature = "ble")]
pub async fn scan(settings: ScanSettings, sources: Arc<Sources>, shutdown: CancellationToken) {
    bluez::scan(settings, sources, shutdown).await
}

/// Built without the `ble` feature: the configuration asked for scanning,
/// which this build cannot do (the config check refuses it first).
#[cfg(not(feature = "ble"))]
pub async fn scan(_: ScanSettings, _: Arc<Sources>, _: CancellationToken) {
    tracing::error!("[ble] scan = true, but this build has no BLE support (cargo feature `ble`)");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_lines_round_trip_and_dispatch() {
        let line = "A4:C1:38:02:83:F4 rssi=-61 svc=181A:A4C1380283F400A22F5F0BF819";
        let a = Advert::parse(line).unwrap();
        assert_eq!(a.to_string(), line);
        let d = decode(&a, None).unwrap().unwrap();
        assert_eq!(d.format, "atc1441");
        assert_eq!(
            d.quantities(),
            [
                ("temperature", 16.2),
                ("humidite", 47.0),
                ("batterie", 95.0),
                ("tension", 3.064)
            ]
        );
        let a = Advert::parse(
            "CB:B8:33:4C:88:4F mfr=0499:0512FC5394C37C0004FFFC040CAC364200CDCBB8334C884F",
        )
        .unwrap();
        assert_eq!(decode(&a, None).unwrap().unwrap().format, "ruuvi5");
        let a = Advert::parse("11:22:33:44:55:66 mfr=004C:0215").unwrap();
        assert!(decode(&a, None).is_none(), "an iBeacon is not a sensor");
        for bad in [
            "",
            "nope",
            "11:22:33:44:55:66 svc=xyz",
            "11:22:33:44:55:66 rssi=a",
            "11:22:33:44:55:66 mfr=0499:0G",
        ] {
            assert!(Advert::parse(bad).is_err(), "{bad:?}");
        }
    }
}
