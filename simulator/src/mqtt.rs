//! Small pieces shared by the MQTT modes: QoS parsing and the strings
//! paho-mqtt 1.x prints, so our output reads like the course's.

use rumqttc::{ConnectReturnCode, QoS};

/// `--qos 0|1|2`.
pub fn parse_qos(s: &str) -> Result<QoS, String> {
    match s {
        "0" => Ok(QoS::AtMostOnce),
        "1" => Ok(QoS::AtLeastOnce),
        "2" => Ok(QoS::ExactlyOnce),
        _ => Err(format!("QoS must be 0, 1 or 2, not {s:?}")),
    }
}

/// paho's `mqtt.connack_string(rc)`.
pub fn connack_string(code: ConnectReturnCode) -> &'static str {
    match code {
        ConnectReturnCode::Success => "Connection Accepted.",
        ConnectReturnCode::RefusedProtocolVersion => {
            "Connection Refused: unacceptable protocol version."
        }
        ConnectReturnCode::BadClientId => "Connection Refused: identifier rejected.",
        ConnectReturnCode::ServiceUnavailable => "Connection Refused: broker unavailable.",
        ConnectReturnCode::BadUserNamePassword => "Connection Refused: bad user name or password.",
        ConnectReturnCode::NotAuthorized => "Connection Refused: not authorised.",
    }
}

/// Python's `str(f)` for a float: the shortest text that reads back to the
/// same value, with `.0` on integral values (paho publishes floats as
/// `str(payload)`).
pub fn python_float(v: f64) -> String {
    let s = format!("{v}");
    if s.contains(['.', 'e', 'E', 'n', 'i']) {
        s
    } else {
        format!("{s}.0")
    }
}

/// Python's `str(b)` for bytes: `b'...'`, or `b"..."` when the bytes hold
/// a `'` and no `"`, with Python's escapes.
pub fn python_bytes(b: &[u8]) -> String {
    let quote = if b.contains(&b'\'') && !b.contains(&b'"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(b.len() + 3);
    out.push('b');
    out.push(quote);
    for &c in b {
        match c {
            b'\\' => out.push_str("\\\\"),
            b'\t' => out.push_str("\\t"),
            b'\n' => out.push_str("\\n"),
            b'\r' => out.push_str("\\r"),
            c if c == quote as u8 => {
                out.push('\\');
                out.push(quote);
            }
            0x20..=0x7e => out.push(c as char),
            c => out.push_str(&format!("\\x{c:02x}")),
        }
    }
    out.push(quote);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_print_like_python() {
        assert_eq!(python_float(20.0), "20.0");
        assert_eq!(python_float(17.25), "17.25");
        assert_eq!(python_float(0.1 + 0.2), "0.30000000000000004");
        assert_eq!(python_float(-3.0), "-3.0");
    }

    #[test]
    fn bytes_print_like_python() {
        assert_eq!(
            python_bytes(b"mosquitto version 2.0.11"),
            "b'mosquitto version 2.0.11'"
        );
        assert_eq!(python_bytes(b""), "b''");
        assert_eq!(python_bytes(b"it's"), "b\"it's\"");
        assert_eq!(python_bytes(b"'\""), "b'\\'\"'");
        assert_eq!(python_bytes(b"a\\b\n\x00\xff"), "b'a\\\\b\\n\\x00\\xff'");
    }
}
