//! RuuviTag data format 5 (RAWv2), manufacturer data 0x0499.
//! <https://docs.ruuvi.com/communication/bluetooth-advertisements/data-format-5-rawv2>

use super::{DecodeError, Decoded};

pub const COMPANY: u16 = 0x0499;

pub fn decode(d: &[u8]) -> Result<Decoded, DecodeError> {
    if d.first() != Some(&5) {
        return Err(DecodeError::Unsupported(format!(
            "Ruuvi data format {:?}",
            d.first()
        )));
    }
    if d.len() < 24 {
        return Err(DecodeError::TooShort("ruuvi 5"));
    }
    let be = |i: usize| u16::from_be_bytes([d[i], d[i + 1]]);
    let mut out = Decoded::new("ruuvi5");
    // 0x8000 / 0xFFFF mean "not available".
    let t = i16::from_be_bytes([d[1], d[2]]);
    if t != i16::MIN {
        out.push("temperature", f64::from(t) * 5.0 / 1000.0);
    }
    if be(3) != 0xFFFF {
        out.push("humidite", f64::from(be(3)) * 25.0 / 10_000.0);
    }
    if be(5) != 0xFFFF {
        // Pa + 50,000, published in hPa.
        out.push("pression", (f64::from(be(5)) + 50_000.0) / 100.0);
    }
    let power = be(13);
    if power >> 5 != 0x7FF {
        out.voltage = Some(f64::from((power >> 5) + 1600) / 1000.0);
    }
    out.counter = Some(u32::from(be(16)));
    out.mac = Some([d[18], d[19], d[20], d[21], d[22], d[23]]);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::ble::hex;

    #[test]
    fn spec_vector() {
        let d = decode(&hex("0512FC5394C37C0004FFFC040CAC364200CDCBB8334C884F")).unwrap();
        assert_eq!(d.get("temperature"), Some(24.3));
        assert_eq!(d.get("humidite"), Some(53.49));
        assert_eq!(d.get("pression"), Some(1000.44));
        assert_eq!(d.voltage, Some(2.977));
        assert_eq!(d.counter, Some(205));
        assert_eq!(d.mac, Some([0xCB, 0xB8, 0x33, 0x4C, 0x88, 0x4F]));
    }

    #[test]
    fn spec_minimum_and_invalid_vectors() {
        // The spec's "minimum values" vector: -163.835 °C, 0 %, 500 hPa, 1.6 V.
        let d = decode(&hex("058001000000008001800180010000000000CBB8334C884F")).unwrap();
        assert_eq!(d.get("temperature"), Some(-163.835));
        assert_eq!(d.get("humidite"), Some(0.0));
        assert_eq!(d.get("pression"), Some(500.0));
        assert_eq!(d.voltage, Some(1.6));
        // "Invalid values": nothing measured.
        let d = decode(&hex("058000FFFFFFFF800080008000FFFFFFFFFFFFFFFFFFFFFF")).unwrap();
        assert!(d.values.is_empty() && d.voltage.is_none());
        assert!(decode(&hex("0512FC")).is_err());
        assert!(decode(&hex("0312FC5394C37C0004FFFC040CAC364200CDCBB8334C884F")).is_err());
    }
}
