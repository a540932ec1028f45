//! Xiaomi LYWSD03MMC thermometers on custom firmware, service data UUID
//! 0x181A: the ATC1441 format (13 bytes, big-endian) and the pvvx format
//! (15 bytes, little-endian). <https://github.com/pvvx/ATC_MiThermometer>

use super::{DecodeError, Decoded};

pub const UUID: u16 = 0x181A;

pub fn decode(d: &[u8]) -> Result<Decoded, DecodeError> {
    match d.len() {
        13 => {
            // MAC (big-endian), temp i16 BE 0.1 °C, humidity %, battery %,
            // battery mV u16 BE, frame counter.
            let mut out = Decoded::new("atc1441");
            out.mac = Some([d[0], d[1], d[2], d[3], d[4], d[5]]);
            out.push(
                "temperature",
                f64::from(i16::from_be_bytes([d[6], d[7]])) / 10.0,
            );
            out.push("humidite", f64::from(d[8]));
            out.battery = Some(f64::from(d[9]));
            out.voltage = Some(f64::from(u16::from_be_bytes([d[10], d[11]])) / 1000.0);
            out.counter = Some(u32::from(d[12]));
            Ok(out)
        }
        15 => {
            // MAC (little-endian), temp i16 LE 0.01 °C, humidity u16 LE
            // 0.01 %, battery mV u16 LE, battery %, counter, flags.
            let mut out = Decoded::new("pvvx");
            out.mac = Some([d[5], d[4], d[3], d[2], d[1], d[0]]);
            out.push(
                "temperature",
                f64::from(i16::from_le_bytes([d[6], d[7]])) / 100.0,
            );
            out.push(
                "humidite",
                f64::from(u16::from_le_bytes([d[8], d[9]])) / 100.0,
            );
            out.voltage = Some(f64::from(u16::from_le_bytes([d[10], d[11]])) / 1000.0);
            out.battery = Some(f64::from(d[12]));
            out.counter = Some(u32::from(d[13]));
            Ok(out)
        }
        n => Err(DecodeError::Unsupported(format!(
            "0x181A payload of {n} bytes"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::ble::hex;

    #[test]
    fn atc1441_spec_vector() {
        let d = decode(&hex("A4C1380283F4 00A2 2F 5F 0BF8 19")).unwrap();
        assert_eq!(d.format, "atc1441");
        assert_eq!(d.get("temperature"), Some(16.2));
        assert_eq!(d.get("humidite"), Some(47.0));
        assert_eq!(d.battery, Some(95.0));
        assert_eq!(d.voltage, Some(3.064));
        assert_eq!(d.mac, Some([0xA4, 0xC1, 0x38, 0x02, 0x83, 0xF4]));
        assert_eq!(d.counter, Some(0x19));
    }

    #[test]
    fn pvvx_spec_vector() {
        let d = decode(&hex("F4830238C1A4 A906 6911 B60B 58 F7 0D")).unwrap();
        assert_eq!(d.format, "pvvx");
        assert_eq!(d.get("temperature"), Some(17.05));
        assert_eq!(d.get("humidite"), Some(44.57));
        assert_eq!(d.voltage, Some(2.998));
        assert_eq!(d.battery, Some(88.0));
        assert_eq!(d.mac, Some([0xA4, 0xC1, 0x38, 0x02, 0x83, 0xF4]));
    }

    #[test]
    fn negative_temperatures_and_other_lengths() {
        // ATC: -5.3 °C = 0xFFCB.
        let d = decode(&hex("A4C1380283F4 FFCB 2F 5F 0BF8 19")).unwrap();
        assert_eq!(d.get("temperature"), Some(-5.3));
        assert!(decode(&hex("A4C1380283F4 00A2")).is_err());
        assert!(decode(&[]).is_err());
    }
}
