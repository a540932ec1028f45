//! BTHome v2 (service data UUID 0xFCD2), plain and AES-CCM encrypted.
//! <https://bthome.io/format/>

use aes::Aes128;
use ccm::aead::{Aead, KeyInit};
use ccm::consts::{U13, U4};
use ccm::Ccm;

use super::{DecodeError, Decoded};

pub const UUID: u16 = 0xFCD2;

type BthomeCcm = Ccm<Aes128, U4, U13>;

/// Decodes one BTHome v2 service-data payload. `mac` is the advertiser's
/// address (as printed, most significant byte first); `key` the device's
/// bindkey when it encrypts.
pub fn decode(data: &[u8], mac: [u8; 6], key: Option<&[u8; 16]>) -> Result<Decoded, DecodeError> {
    let (&info, rest) = data.split_first().ok_or(DecodeError::TooShort("bthome"))?;
    let version = info >> 5;
    if version != 2 {
        return Err(DecodeError::Unsupported(format!(
            "BTHome version {version}"
        )));
    }
    let mut out = Decoded::new("bthome");
    if info & 0x01 == 0 {
        objects(rest, &mut out)?;
        return Ok(out);
    }
    // Encrypted: ciphertext, 4-byte counter, 4-byte MIC.
    let key = key.ok_or(DecodeError::NoKey)?;
    if rest.len() < 8 {
        return Err(DecodeError::TooShort("bthome encrypted"));
    }
    let (body, tail) = rest.split_at(rest.len() - 8);
    let (counter, mic) = tail.split_at(4);
    let mut nonce = [0u8; 13];
    nonce[..6].copy_from_slice(&mac);
    nonce[6..8].copy_from_slice(&UUID.to_le_bytes());
    nonce[8] = info;
    nonce[9..].copy_from_slice(counter);
    let cipher = BthomeCcm::new_from_slice(key).map_err(|_| DecodeError::NoKey)?;
    let mut sealed = body.to_vec();
    sealed.extend_from_slice(mic);
    let plain = cipher
        .decrypt(&nonce.into(), sealed.as_slice())
        .map_err(|_| DecodeError::Decrypt)?;
    out.counter = Some(u32::from_le_bytes([
        counter[0], counter[1], counter[2], counter[3],
    ]));
    out.encrypted = true;
    objects(&plain, &mut out)?;
    Ok(out)
}

/// The measurement objects: id, then a little-endian value whose size and
/// scale the id fixes. Unknown ids end the decoding (their size is unknown):
/// what came before is kept.
fn objects(mut data: &[u8], out: &mut Decoded) -> Result<(), DecodeError> {
    while let Some((&id, rest)) = data.split_first() {
        let Some((size, signed, scale, what)) = object(id) else {
            if out.values.is_empty() {
                return Err(DecodeError::Unsupported(format!(
                    "BTHome object 0x{id:02x}"
                )));
            }
            out.truncated = true;
            return Ok(());
        };
        let size = match size {
            0 => 1 + usize::from(*rest.first().ok_or(DecodeError::TooShort("bthome"))?),
            n => n,
        };
        if rest.len() < size {
            return Err(DecodeError::TooShort("bthome object"));
        }
        let (raw, next) = rest.split_at(size);
        data = next;
        let Some(what) = what else { continue };
        let v = le(raw, signed) as f64 * scale;
        match what {
            Field::Value(grandeur) => out.push(grandeur, v),
            Field::Battery => out.battery = Some(super::round6(v)),
            Field::Voltage => out.voltage = Some(super::round6(v)),
            Field::Packet => out.counter = Some(v as u32),
        }
    }
    Ok(())
}

enum Field {
    Value(&'static str),
    Battery,
    Voltage,
    Packet,
}

/// (size in bytes — 0 for length-prefixed —, signed, scale, what it is;
/// None for objects we skip).
fn object(id: u8) -> Option<(usize, bool, f64, Option<Field>)> {
    use Field::*;
    Some(match id {
        0x00 => (1, false, 1.0, Some(Packet)),
        0x01 => (1, false, 1.0, Some(Battery)),
        0x02 => (2, true, 0.01, Some(Value("temperature"))),
        0x03 => (2, false, 0.01, Some(Value("humidite"))),
        0x04 => (3, false, 0.01, Some(Value("pression"))), // hPa
        0x05 => (3, false, 0.01, Some(Value("luminosite"))),
        0x06 | 0x07 => (2, false, 0.01, None),
        0x08 => (2, true, 0.01, Some(Value("point_de_rosee"))),
        0x09 => (1, false, 1.0, None),
        0x0A => (3, false, 0.001, None),
        0x0B => (3, false, 0.01, None),
        0x0C => (2, false, 0.001, Some(Voltage)),
        0x0D => (2, false, 1.0, Some(Value("pm25"))),
        0x0E => (2, false, 1.0, Some(Value("pm10"))),
        0x0F..=0x11 => (1, false, 1.0, None),
        0x12 => (2, false, 1.0, Some(Value("co2"))),
        0x13 => (2, false, 1.0, Some(Value("cov"))),
        0x14 => (2, false, 0.01, Some(Value("humidite_sol"))),
        0x15..=0x2D => (1, false, 1.0, None),
        0x2E => (1, false, 1.0, Some(Value("humidite"))),
        0x2F => (1, false, 1.0, Some(Value("humidite_sol"))),
        0x3A => (1, false, 1.0, None),
        0x3C => (2, false, 1.0, None),
        0x3D => (2, false, 1.0, None),
        0x3E => (4, false, 1.0, None),
        0x3F => (2, true, 0.1, None),
        0x40 | 0x41 | 0x43 | 0x44 | 0x47 | 0x48 | 0x49 | 0x51 | 0x52 | 0x56 | 0x5E | 0x5F => {
            (2, false, 1.0, None)
        }
        0x42 => (3, false, 0.001, None),
        0x45 => (2, true, 0.1, Some(Value("temperature"))),
        0x46 => (1, false, 0.1, Some(Value("uv"))),
        0x4A => (2, false, 0.1, Some(Voltage)),
        0x4B => (3, false, 0.001, None),
        0x4C..=0x50 | 0x55 => (4, false, 1.0, None),
        0x53 | 0x54 => (0, false, 1.0, None),
        0x57 => (1, true, 1.0, Some(Value("temperature"))),
        0x58 => (1, true, 0.35, Some(Value("temperature"))),
        0x59 => (1, true, 1.0, None),
        0x5A | 0x5D => (2, true, 1.0, None),
        0x5B | 0x5C => (4, true, 1.0, None),
        0x60 => (1, false, 1.0, None),
        0xF0 => (2, false, 1.0, None),
        0xF1 => (4, false, 1.0, None),
        0xF2 => (3, false, 1.0, None),
        _ => return None,
    })
}

/// A little-endian integer of 1..=4 bytes.
fn le(raw: &[u8], signed: bool) -> i64 {
    let mut v: u64 = 0;
    for (i, b) in raw.iter().take(8).enumerate() {
        v |= u64::from(*b) << (8 * i);
    }
    let bits = 8 * raw.len().min(8) as u32;
    if signed && bits < 64 && v & (1 << (bits - 1)) != 0 {
        (v as i64) - (1i64 << bits)
    } else {
        v as i64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::ble::hex;

    const MAC: [u8; 6] = [0x54, 0x48, 0xE6, 0x8F, 0x80, 0xA5];

    #[test]
    fn spec_vector_plain() {
        let d = decode(&hex("40 02 CA 09 03 BF 13"), MAC, None).unwrap();
        assert_eq!(d.get("temperature"), Some(25.06));
        assert_eq!(d.get("humidite"), Some(50.55));
    }

    #[test]
    fn spec_vector_encrypted() {
        let key: [u8; 16] = hex("231d39c1d7cc1ab1aee224cd096db932").try_into().unwrap();
        let frame = hex("41 a4 72 66 c9 5f 73 00 11 22 33 78 23 72 14");
        let d = decode(&frame, MAC, Some(&key)).unwrap();
        assert_eq!(d.get("temperature"), Some(25.06));
        assert_eq!(d.get("humidite"), Some(50.55));
        assert_eq!(d.counter, Some(0x3322_1100));
    }

    #[test]
    fn wrong_key_or_no_key_or_tampered_frame_is_refused() {
        let key: [u8; 16] = hex("231d39c1d7cc1ab1aee224cd096db932").try_into().unwrap();
        let mut frame = hex("41 a4 72 66 c9 5f 73 00 11 22 33 78 23 72 14");
        assert!(matches!(decode(&frame, MAC, None), Err(DecodeError::NoKey)));
        let mut other = key;
        other[0] ^= 1;
        assert!(matches!(
            decode(&frame, MAC, Some(&other)),
            Err(DecodeError::Decrypt)
        ));
        frame[2] ^= 0x10;
        assert!(matches!(
            decode(&frame, MAC, Some(&key)),
            Err(DecodeError::Decrypt)
        ));
    }

    #[test]
    fn battery_voltage_packet_and_negative_temperature() {
        // packet 7, battery 93 %, temperature -4.5 °C (0xFE3E), voltage 3.012 V.
        let d = decode(&hex("40 00 07 01 5D 02 3E FE 0C C4 0B"), MAC, None).unwrap();
        assert_eq!(d.counter, Some(7));
        assert_eq!(d.battery, Some(93.0));
        assert_eq!(d.get("temperature"), Some(-4.5));
        assert_eq!(d.voltage, Some(3.012));
    }

    #[test]
    fn bad_frames_are_errors_not_panics() {
        assert!(decode(&[], MAC, None).is_err());
        assert!(decode(&hex("20 02 CA 09"), MAC, None).is_err(), "version 1");
        assert!(decode(&hex("40 02 CA"), MAC, None).is_err(), "cut value");
        assert!(
            decode(&hex("40 FF 01"), MAC, None).is_err(),
            "unknown object only"
        );
        let d = decode(&hex("40 02 CA 09 FF 01"), MAC, None).unwrap();
        assert!(d.truncated && d.get("temperature") == Some(25.06));
        assert!(decode(&hex("41 00 01"), MAC, Some(&[0; 16])).is_err());
    }
}
