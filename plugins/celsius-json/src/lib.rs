//! `celsius-json`: a plain number (what the course's sensors publish, in
//! °C) becomes JSON with its unit, the sensor (or client) it came from and
//! an ISO 8601 timestamp: `21.37` → `{"value":21.37,"unit":"°C",
//! "sensor":"cuisine","ts":"2026-11-25T10:37:34.120Z"}`. With `unit = "F"`
//! the value is converted to Fahrenheit. Anything else passes unchanged.
//!
//! Parameters: `unit` ("C" or "F", default "C"), `decimals` (default 2).

use std::cell::Cell;

wit_bindgen::generate!({ world: "transform-plugin", path: "../../wit" });

use capteurs::plugins::types::Origin;
use exports::capteurs::plugins::transform::{Guest, Message, Param, Verdict};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    pub fahrenheit: bool,
    pub decimals: u32,
}

impl Settings {
    pub fn parse(params: &[(String, String)]) -> Result<Self, String> {
        let mut s = Settings {
            fahrenheit: false,
            decimals: 2,
        };
        for (k, v) in params {
            match (k.as_str(), v.as_str()) {
                ("unit", "C" | "c" | "°C") => s.fahrenheit = false,
                ("unit", "F" | "f" | "°F") => s.fahrenheit = true,
                ("unit", other) => return Err(format!("unit = {other:?}: \"C\" or \"F\"")),
                ("decimals", d) => {
                    s.decimals = d.parse().ok().filter(|d| *d <= 6).ok_or("decimals: 0..6")?
                }
                (k, _) => return Err(format!("unknown parameter {k:?} (unit, decimals)")),
            }
        }
        Ok(s)
    }

    /// The JSON for a plain number, or None if the payload is not one.
    pub fn convert(&self, payload: &[u8], sensor: &str, received_ms: u64) -> Option<String> {
        let c: f64 = std::str::from_utf8(payload).ok()?.trim().parse().ok()?;
        if !c.is_finite() {
            return None;
        }
        let (v, unit) = if self.fahrenheit {
            (c * 9.0 / 5.0 + 32.0, "°F")
        } else {
            (c, "°C")
        };
        let scale = 10f64.powi(self.decimals as i32);
        let v = (v * scale).round() / scale;
        let sensor = sensor.replace('\\', "\\\\").replace('"', "\\\"");
        Some(format!(
            "{{\"value\":{v},\"unit\":\"{unit}\",\"sensor\":\"{sensor}\",\"ts\":\"{}\"}}",
            iso8601(received_ms)
        ))
    }
}

/// `2026-11-25T10:37:34.120Z` from ms since the epoch (proleptic Gregorian).
pub fn iso8601(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

thread_local! {
    static SETTINGS: Cell<Settings> = const { Cell::new(Settings { fahrenheit: false, decimals: 2 }) };
}

struct Plugin;

impl Guest for Plugin {
    fn init(params: Vec<Param>) -> Result<(), String> {
        let p: Vec<(String, String)> = params.into_iter().map(|p| (p.key, p.value)).collect();
        let settings = Settings::parse(&p)?;
        SETTINGS.with(|s| s.set(settings));
        Ok(())
    }

    fn process(mut msg: Message) -> Result<Verdict, String> {
        let sensor = match &msg.origin {
            Origin::Sensor(id) | Origin::Client(id) => id.clone(),
            Origin::Upstream => "upstream".into(),
            Origin::Broker => "broker".into(),
        };
        if let Some(json) =
            SETTINGS
                .with(|s| s.get())
                .convert(&msg.payload, &sensor, msg.received_ms)
        {
            msg.payload = json.into_bytes();
            return Ok(Verdict::Replace(vec![msg]));
        }
        Ok(Verdict::Keep)
    }
}

// Exported for wasm only: a native build (the unit tests) has no use for
// the component exports, whose names its linker refuses.
#[cfg(target_arch = "wasm32")]
export!(Plugin);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_numbers_become_json() {
        let s = Settings::parse(&[]).unwrap();
        assert_eq!(
            s.convert(b"21.374", "cuisine", 1_764_067_054_120).unwrap(),
            r#"{"value":21.37,"unit":"°C","sensor":"cuisine","ts":"2025-11-25T10:37:34.120Z"}"#
        );
        let f = Settings::parse(&[("unit".into(), "F".into())]).unwrap();
        assert!(f
            .convert(b"100", "x", 0)
            .unwrap()
            .starts_with(r#"{"value":212,"unit":"°F""#));
        assert_eq!(s.convert(b"{\"value\":1}", "x", 0), None);
        assert!(Settings::parse(&[("unit".into(), "K".into())]).is_err());
    }

    #[test]
    fn dates() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(iso8601(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }
}
