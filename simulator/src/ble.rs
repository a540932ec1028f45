//! `capteurs-sim ble`: the fleet's readings as BLE advertisements in the
//! formats the gateway decodes, written as replay lines (the gateway's
//! `[ble] replay`) to stdout, a file or a pseudo-terminal:
//! `A4:C1:38:CA:00:00 rssi=-64 svc=181A:A4C138CA0000…`.
//!
//! Sensor `i` of the fleet has the address `<mac-prefix>:HH:LL` (i in two
//! bytes); the mapping is printed on stderr at start. Each reading is one
//! frame (temperature from the fleet's value model, humidity and battery
//! drifting slowly), sent `--repeat` times as a radio does.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aes::Aes128;
use anyhow::{bail, Context};
use ccm::aead::{Aead, KeyInit};
use ccm::consts::{U13, U4};
use ccm::Ccm;
use clap::Args;

use crate::fleet::generator::Generator;
use crate::fleet::FleetArgs;

#[derive(Args, Debug)]
pub struct BleArgs {
    /// Advertisement format
    #[arg(long, value_enum, default_value = "atc1441")]
    advert: BleFormat,
    /// BTHome bindkey (32 hex digits) for --advert bthome-encrypted
    #[arg(long, default_value = "231d39c1d7cc1ab1aee224cd096db932")]
    key: String,
    /// First four bytes of the sensors' addresses
    #[arg(long, default_value = "A4:C1:38:CA")]
    mac_prefix: String,
    /// Each frame is sent this many times (duplicate adverts)
    #[arg(long, default_value_t = 1)]
    repeat: u32,
    /// Write to this file instead of stdout
    #[arg(long, conflicts_with = "pty")]
    output: Option<PathBuf>,
    /// Create a pseudo-terminal, print its path on the first stdout line
    /// (`pty: /dev/pts/N`) and write there
    #[arg(long)]
    pty: bool,
    /// Stop after this many frames (0 = the scenario's duration)
    #[arg(long, default_value_t = 0)]
    count: u64,
    /// The sensors (same flags and scenario files as `fleet`)
    #[command(flatten)]
    fleet: FleetArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BleFormat {
    Bthome,
    BthomeEncrypted,
    Atc1441,
    Pvvx,
    Ruuvi,
    Govee,
}

/// One frame's content.
pub struct Frame {
    pub mac: [u8; 6],
    pub temperature: f64,
    pub humidity: f64,
    pub battery: u8,
    pub millivolts: u16,
    pub counter: u32,
}

/// The replay line of one frame in `format`.
pub fn advert(format: BleFormat, f: &Frame, key: &[u8; 16], rssi: i16) -> String {
    let mac = f.mac;
    let t100 = (f.temperature * 100.0).round() as i16;
    let h100 = (f.humidity * 100.0).round() as u16;
    let (kind, id, data): (&str, u16, Vec<u8>) = match format {
        BleFormat::Atc1441 => {
            let mut d = mac.to_vec();
            d.extend(((f.temperature * 10.0).round() as i16).to_be_bytes());
            d.push(f.humidity.round() as u8);
            d.push(f.battery);
            d.extend(f.millivolts.to_be_bytes());
            d.push(f.counter as u8);
            ("svc", 0x181A, d)
        }
        BleFormat::Pvvx => {
            let mut d: Vec<u8> = mac.iter().rev().copied().collect();
            d.extend(t100.to_le_bytes());
            d.extend(h100.to_le_bytes());
            d.extend(f.millivolts.to_le_bytes());
            d.push(f.battery);
            d.push(f.counter as u8);
            d.push(0x04);
            ("svc", 0x181A, d)
        }
        BleFormat::Bthome | BleFormat::BthomeEncrypted => {
            let mut objects = vec![0x00, f.counter as u8, 0x01, f.battery, 0x02];
            objects.extend(t100.to_le_bytes());
            objects.push(0x03);
            objects.extend(h100.to_le_bytes());
            if format == BleFormat::Bthome {
                let mut d = vec![0x40];
                d.extend(objects);
                ("svc", 0xFCD2, d)
            } else {
                ("svc", 0xFCD2, bthome_encrypt(&objects, mac, key, f.counter))
            }
        }
        BleFormat::Ruuvi => {
            let mut d = vec![5];
            d.extend(((f.temperature / 0.005).round() as i16).to_be_bytes());
            d.extend(((f.humidity / 0.0025).round() as u16).to_be_bytes());
            d.extend(((101_325 - 50_000) as u16).to_be_bytes());
            d.extend([0, 0, 0, 0, 0x03, 0xE8]); // 0, 0, 1000 mG
            d.extend((((f.millivolts.saturating_sub(1600)) << 5) | 24).to_be_bytes());
            d.push(0);
            d.extend((f.counter as u16).to_be_bytes());
            d.extend(mac);
            ("mfr", 0x0499, d)
        }
        BleFormat::Govee => {
            let t = (f.temperature * 10.0).round() as i32;
            let h = (f.humidity * 10.0).round() as i32;
            let mut packed = (t.unsigned_abs() * 1000 + h as u32) & 0x7F_FFFF;
            if t < 0 {
                packed |= 0x80_0000;
            }
            let b = packed.to_be_bytes();
            ("mfr", 0xEC88, vec![0, b[1], b[2], b[3], f.battery, 0])
        }
    };
    let mac_text = mac
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":");
    let hex: String = data.iter().map(|b| format!("{b:02X}")).collect();
    format!("{mac_text} rssi={rssi} {kind}={id:04X}:{hex}")
}

/// BTHome v2 encryption (AES-CCM, 4-byte MIC; nonce = MAC, UUID, device
/// info, counter), as a device does it.
fn bthome_encrypt(objects: &[u8], mac: [u8; 6], key: &[u8; 16], counter: u32) -> Vec<u8> {
    let info = 0x41u8;
    let mut nonce = [0u8; 13];
    nonce[..6].copy_from_slice(&mac);
    nonce[6..8].copy_from_slice(&0xFCD2u16.to_le_bytes());
    nonce[8] = info;
    nonce[9..].copy_from_slice(&counter.to_le_bytes());
    let cipher = Ccm::<Aes128, U4, U13>::new_from_slice(key).expect("16-byte key");
    let sealed = cipher
        .encrypt(&nonce.into(), objects)
        .expect("CCM encrypts short frames");
    let (body, mic) = sealed.split_at(sealed.len() - 4);
    let mut out = vec![info];
    out.extend_from_slice(body);
    out.extend_from_slice(&counter.to_le_bytes());
    out.extend_from_slice(mic);
    out
}

fn parse_key(s: &str) -> anyhow::Result<[u8; 16]> {
    let bytes: Vec<u8> = (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|p| u8::from_str_radix(p, 16).ok()))
        .collect::<Option<_>>()
        .filter(|b: &Vec<u8>| b.len() == 16)
        .with_context(|| format!("--key {s:?}: expected 32 hex digits"))?;
    Ok(bytes.try_into().expect("16 bytes"))
}

fn parse_prefix(s: &str) -> anyhow::Result<[u8; 4]> {
    let parts: Vec<u8> = s
        .split(':')
        .map(|p| u8::from_str_radix(p, 16).ok())
        .collect::<Option<_>>()
        .with_context(|| format!("--mac-prefix {s:?}: expected four hex bytes AA:BB:CC:DD"))?;
    parts
        .try_into()
        .map_err(|_| anyhow::anyhow!("--mac-prefix {s:?}: expected four bytes"))
}

pub fn run(args: BleArgs) -> anyhow::Result<()> {
    let key = parse_key(&args.key)?;
    let prefix = parse_prefix(&args.mac_prefix)?;
    if args.repeat == 0 {
        bail!("--repeat must be at least 1");
    }
    let scenario = args.fleet.scenario()?;
    let seed = scenario.seed.unwrap_or_else(rand::random);
    let (mut out, _keep): (Box<dyn Write>, _) = if args.pty {
        let (master, slave, path) = crate::serial::open_pty()?;
        println!("pty: {}", path.display());
        std::io::stdout().flush()?;
        (Box::new(File::from(master)), Some(slave))
    } else if let Some(path) = &args.output {
        let f = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
        (Box::new(f), None)
    } else {
        (Box::new(std::io::stdout()), None)
    };
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [libc::SIGINT, libc::SIGTERM] {
        crate::serial::signal_hook_flag(sig, stop.clone())?;
    }
    let mut g = Generator::new(&scenario, seed);
    let n = scenario.sensors().len();
    let mac = |i: usize| {
        [
            prefix[0],
            prefix[1],
            prefix[2],
            prefix[3],
            (i >> 8) as u8,
            i as u8,
        ]
    };
    for i in 0..n.min(1000) {
        let m = mac(i);
        eprintln!(
            "sensor {} = {}",
            g.spec(i).id,
            m.iter()
                .map(|b| format!("{b:02X}"))
                .collect::<Vec<_>>()
                .join(":")
        );
    }
    let start = Instant::now();
    let duration =
        (scenario.duration_secs > 0.0).then(|| Duration::from_secs_f64(scenario.duration_secs));
    let mut frames = 0u64;
    while !stop.load(Ordering::Relaxed) {
        if args.count > 0 && frames >= args.count {
            break;
        }
        let Some(r) = g.next_due(start, duration) else {
            break;
        };
        let frame = Frame {
            mac: mac(r.sensor),
            temperature: r.value,
            humidity: 40.0 + (r.seq % 200) as f64 / 10.0,
            battery: 100 - (r.seq / 100 % 50) as u8,
            millivolts: 3000 - (r.seq / 100 % 50) as u16 * 4,
            counter: r.seq as u32,
        };
        let line = advert(args.advert, &frame, &key, -50 - (r.sensor % 40) as i16);
        for _ in 0..args.repeat {
            writeln!(out, "{line}").context("writing adverts")?;
        }
        out.flush()?;
        frames += 1;
    }
    eprintln!("frames written {frames} (each {} times)", args.repeat);
    if let Some(slave) = &_keep {
        crate::serial::drain_pty(slave);
    }
    Ok(())
}
