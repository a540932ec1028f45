//! Govee H5075 and H5074 thermo-hygrometers, manufacturer data 0xEC88.

use super::{DecodeError, Decoded};

pub const COMPANY: u16 = 0xEC88;

pub fn decode(d: &[u8]) -> Result<Decoded, DecodeError> {
    match d.len() {
        // H5075: 00, temperature and humidity packed in 24 bits (BE), battery %.
        // Negative temperatures set the top bit.
        5 | 6 => {
            let packed = u32::from_be_bytes([0, d[1], d[2], d[3]]);
            let negative = packed & 0x80_0000 != 0;
            let v = packed & 0x7F_FFFF;
            let mut out = Decoded::new("govee_h5075");
            let t = f64::from(v / 1000) / 10.0;
            out.push("temperature", if negative { -t } else { t });
            out.push("humidite", f64::from(v % 1000) / 10.0);
            out.battery = Some(f64::from(d[4]));
            Ok(out)
        }
        // H5074: 00, temperature i16 LE 0.01 °C, humidity u16 LE 0.01 %, battery %.
        7 => {
            let mut out = Decoded::new("govee_h5074");
            out.push(
                "temperature",
                f64::from(i16::from_le_bytes([d[1], d[2]])) / 100.0,
            );
            out.push(
                "humidite",
                f64::from(u16::from_le_bytes([d[3], d[4]])) / 100.0,
            );
            out.battery = Some(f64::from(d[5]));
            Ok(out)
        }
        n => Err(DecodeError::Unsupported(format!(
            "Govee payload of {n} bytes"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::ble::hex;

    #[test]
    fn h5075_vector() {
        let d = decode(&hex("00 0341C2 64 00")).unwrap();
        assert_eq!(d.format, "govee_h5075");
        assert_eq!(d.get("temperature"), Some(21.3));
        assert_eq!(d.get("humidite"), Some(44.2));
        assert_eq!(d.battery, Some(100.0));
    }

    #[test]
    fn h5075_negative_and_h5074() {
        // -2.5 °C, 61.3 %: 25613 with the sign bit.
        let d = decode(&hex("00 80640D 50 00")).unwrap();
        assert_eq!(d.get("temperature"), Some(-2.5));
        assert_eq!(d.get("humidite"), Some(61.3));
        let d = decode(&hex("00 0B09 FD12 64 02")).unwrap();
        assert_eq!(d.format, "govee_h5074");
        assert_eq!(d.get("temperature"), Some(23.15));
        assert_eq!(d.get("humidite"), Some(48.61));
        assert!(decode(&hex("00 01")).is_err());
    }
}
