//! Serial line formats, as pure functions: bytes of one line in, the
//! sensor id and the values it carries out, or why not.
//!
//! - `plain`: a number alone, `21.37` (the port says whose and what it is);
//! - `kv`: `key=value` pairs, `id=cuisine t=21.5 h=40` or
//!   `sensor=cuisine grandeur=temperature value=21.5 unit=°C seq=3`;
//! - `json`: one object per line with the same keys.
//!
//! Any format may end with an NMEA-style checksum `*HH`: the XOR of every
//! byte before the `*`, in hex. With `checksum = "xor"` it is required.

use serde::Deserialize;
use thiserror::Error;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LineFormat {
    Plain,
    Kv,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Checksum {
    None,
    Xor,
}

/// What one good line says.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Line {
    /// The sensor id in the line (`id=`, `sensor=`), if any.
    pub sensor: Option<String>,
    /// (grandeur, value); the grandeur is empty for a `plain` line.
    pub values: Vec<(String, f64)>,
    pub rssi: Option<i16>,
}

#[derive(Debug, Clone, PartialEq, Error)]
pub enum LineError {
    #[error("not UTF-8 text (garbage on the line)")]
    Garbage,
    #[error("checksum missing or wrong")]
    Checksum,
    #[error("not a reading: {0}")]
    Unparsable(String),
}

impl LineError {
    /// The counter this error is counted under.
    pub fn cause(&self) -> &'static str {
        match self {
            LineError::Garbage => "garbage",
            LineError::Checksum => "bad_checksum",
            LineError::Unparsable(_) => "unparsable",
        }
    }
}

/// Short names and other spellings people use for the quantities.
pub fn grandeur_alias(key: &str) -> Option<&'static str> {
    Some(match key {
        "t" | "temp" | "temperature" | "température" => "temperature",
        "h" | "hum" | "humidity" | "humidite" | "humidité" => "humidite",
        "p" | "press" | "pressure" | "pression" => "pression",
        "b" | "bat" | "battery" | "batterie" => "batterie",
        "v" | "volt" | "voltage" | "tension" => "tension",
        _ => return None,
    })
}

/// Keys that are never quantities.
fn informational(key: &str) -> bool {
    matches!(
        key,
        "unit" | "unite" | "seq" | "ts" | "time" | "timestamp" | "n"
    )
}

pub fn parse(raw: &[u8], format: LineFormat, checksum: Checksum) -> Result<Line, LineError> {
    let text = std::str::from_utf8(raw).map_err(|_| LineError::Garbage)?;
    let text = strip_checksum(text, checksum)?.trim();
    match format {
        LineFormat::Plain => Ok(Line {
            values: vec![(String::new(), number(text)?)],
            ..Line::default()
        }),
        LineFormat::Kv => {
            let mut fields = Vec::new();
            for pair in text.split_ascii_whitespace() {
                let (k, v) = pair
                    .split_once('=')
                    .ok_or_else(|| LineError::Unparsable(format!("{pair:?} is not key=value")))?;
                fields.push((k.to_ascii_lowercase(), Field::Text(v.to_owned())));
            }
            collect(fields)
        }
        LineFormat::Json => {
            let v: serde_json::Value = serde_json::from_str(text)
                .map_err(|e| LineError::Unparsable(format!("JSON: {e}")))?;
            let obj = v
                .as_object()
                .ok_or_else(|| LineError::Unparsable("JSON line is not an object".into()))?;
            let fields = obj
                .iter()
                .map(|(k, v)| {
                    let f = match v {
                        serde_json::Value::Number(n) => Field::Number(n.as_f64()),
                        serde_json::Value::String(s) => Field::Text(s.clone()),
                        other => Field::Text(other.to_string()),
                    };
                    (k.to_lowercase(), f)
                })
                .collect();
            collect(fields)
        }
    }
}

enum Field {
    Text(String),
    Number(Option<f64>),
}

impl Field {
    fn text(&self) -> String {
        match self {
            Field::Text(s) => s.clone(),
            Field::Number(n) => n.map(|n| n.to_string()).unwrap_or_default(),
        }
    }
    fn number(&self, key: &str) -> Result<f64, LineError> {
        match self {
            Field::Text(s) => number(s),
            Field::Number(Some(n)) if n.is_finite() => Ok(*n),
            Field::Number(_) => Err(LineError::Unparsable(format!("{key}: not a number"))),
        }
    }
}

fn collect(fields: Vec<(String, Field)>) -> Result<Line, LineError> {
    let mut line = Line::default();
    let mut grandeur = None;
    let mut value = None;
    for (k, f) in &fields {
        match k.as_str() {
            "id" | "sensor" | "capteur" => line.sensor = Some(f.text()),
            "grandeur" | "quantity" => grandeur = Some(f.text()),
            "value" | "valeur" => value = Some(f.number(k)?),
            "rssi" => line.rssi = f.number(k).ok().map(|r| r as i16),
            k if informational(k) => {}
            k => match grandeur_alias(k) {
                Some(g) => line.values.push((g.to_owned(), f.number(k)?)),
                // Other numeric keys may be quantities a sensor lists
                // (`co2=415`); text values there are ignored.
                None => {
                    if let Ok(v) = f.number(k) {
                        line.values.push((k.to_owned(), v));
                    }
                }
            },
        }
    }
    match (grandeur, value) {
        (Some(g), Some(v)) => {
            let g = grandeur_alias(&g.to_lowercase()).map_or(g, str::to_owned);
            line.values.push((g, v));
        }
        (None, Some(_)) => return Err(LineError::Unparsable("value= without grandeur=".into())),
        (Some(_), None) => return Err(LineError::Unparsable("grandeur= without value=".into())),
        (None, None) => {}
    }
    if line.values.is_empty() {
        return Err(LineError::Unparsable("no value in the line".into()));
    }
    Ok(line)
}

fn number(s: &str) -> Result<f64, LineError> {
    let s = s.trim();
    match s.replace(',', ".").parse::<f64>() {
        Ok(v) if v.is_finite() && !s.is_empty() => Ok(v),
        _ => Err(LineError::Unparsable(format!(
            "{:?} is not a number",
            clip(s)
        ))),
    }
}

/// At most 40 characters of a bad line, for logs.
pub fn clip(s: &str) -> String {
    match s.char_indices().nth(40) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

fn strip_checksum(text: &str, mode: Checksum) -> Result<&str, LineError> {
    let Some((body, sum)) = text.trim_end().rsplit_once('*') else {
        return match mode {
            Checksum::None => Ok(text),
            Checksum::Xor => Err(LineError::Checksum),
        };
    };
    let well_formed = sum.len() == 2 && sum.bytes().all(|b| b.is_ascii_hexdigit());
    match (well_formed, mode) {
        (true, _) => {
            let want = u8::from_str_radix(sum, 16).map_err(|_| LineError::Checksum)?;
            let got = body.bytes().fold(0u8, |a, b| a ^ b);
            if got == want {
                Ok(body)
            } else {
                Err(LineError::Checksum)
            }
        }
        (false, Checksum::Xor) => Err(LineError::Checksum),
        (false, Checksum::None) => Ok(text),
    }
}

/// Appends `*HH` to a line (simulator, tests).
pub fn with_checksum(body: &str) -> String {
    format!("{body}*{:02X}", body.bytes().fold(0u8, |a, b| a ^ b))
}

/// Splits a byte stream into lines, never holding more than `max` bytes:
/// a longer line is reported once and skipped up to its end.
pub struct Splitter {
    buf: Vec<u8>,
    max: usize,
    terminator: u8,
    skipping: bool,
}

pub enum Piece<'a> {
    Line(&'a [u8]),
    Overlong,
}

impl Splitter {
    /// `cr`: lines end in `\r`; otherwise in `\n` with an optional `\r` before.
    pub fn new(max: usize, cr: bool) -> Self {
        Splitter {
            buf: Vec::with_capacity(max.min(4096)),
            max,
            terminator: if cr { b'\r' } else { b'\n' },
            skipping: false,
        }
    }

    /// Feeds bytes; calls `each` for every complete line (without its
    /// terminator) or overlong line.
    pub fn feed(&mut self, mut data: &[u8], mut each: impl FnMut(Piece<'_>)) {
        while !data.is_empty() {
            match data.iter().position(|&b| b == self.terminator) {
                Some(end) => {
                    let (part, rest) = (&data[..end], &data[end + 1..]);
                    data = rest;
                    if self.skipping {
                        self.skipping = false;
                        self.buf.clear();
                        continue;
                    }
                    if self.buf.len() + part.len() > self.max {
                        self.buf.clear();
                        each(Piece::Overlong);
                        continue;
                    }
                    self.buf.extend_from_slice(part);
                    let mut line = &self.buf[..];
                    if self.terminator == b'\n' {
                        line = line.strip_suffix(b"\r").unwrap_or(line);
                    }
                    if !line.iter().all(|b| b.is_ascii_whitespace()) {
                        each(Piece::Line(line));
                    }
                    self.buf.clear();
                }
                None => {
                    if !self.skipping {
                        if self.buf.len() + data.len() > self.max {
                            self.buf.clear();
                            self.skipping = true;
                            each(Piece::Overlong);
                        } else {
                            self.buf.extend_from_slice(data);
                        }
                    }
                    return;
                }
            }
        }
    }

    /// Bytes held of an unfinished line.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use LineFormat::*;

    fn ok(raw: &str, f: LineFormat) -> Line {
        parse(raw.as_bytes(), f, Checksum::None).unwrap_or_else(|e| panic!("{raw:?}: {e}"))
    }

    fn vals(l: &Line) -> Vec<(&str, f64)> {
        l.values.iter().map(|(g, v)| (g.as_str(), *v)).collect()
    }

    #[test]
    fn the_three_formats() {
        assert_eq!(vals(&ok("21.37", Plain)), [("", 21.37)]);
        assert_eq!(vals(&ok(" -3,5 ", Plain)), [("", -3.5)]);
        let l = ok("id=cuisine t=21.5 h=40", Kv);
        assert_eq!(l.sensor.as_deref(), Some("cuisine"));
        assert_eq!(vals(&l), [("temperature", 21.5), ("humidite", 40.0)]);
        let l = ok(
            "sensor=temperature-1-1 grandeur=temperature value=17.25 unit=°C seq=0",
            Kv,
        );
        assert_eq!(l.sensor.as_deref(), Some("temperature-1-1"));
        assert_eq!(vals(&l), [("temperature", 17.25)]);
        let l = ok(
            r#"{"sensor":"s1","grandeur":"humidite","value":55.5,"unit":"%","seq":3,"ts":1}"#,
            Json,
        );
        assert_eq!(vals(&l), [("humidite", 55.5)]);
        let l = ok(
            r#"{"id":"salon","temperature":19.0,"pression":1013.2,"co2":415,"rssi":-70}"#,
            Json,
        );
        assert_eq!(l.rssi, Some(-70));
        assert_eq!(
            vals(&l),
            [("co2", 415.0), ("pression", 1013.2), ("temperature", 19.0)]
        );
    }

    #[test]
    fn bad_lines_say_why() {
        let err = |raw: &[u8], f| parse(raw, f, Checksum::None).unwrap_err().cause();
        assert_eq!(err(b"\xff\xfe12", Plain), "garbage");
        assert_eq!(err(b"12.5.3", Plain), "unparsable");
        assert_eq!(err(b"NaN", Plain), "unparsable");
        assert_eq!(err(b"inf", Plain), "unparsable");
        assert_eq!(err(b"id=x t=chaud", Kv), "unparsable");
        assert_eq!(err(b"id=x", Kv), "unparsable");
        assert_eq!(err(b"id=x value=3", Kv), "unparsable");
        assert_eq!(err(b"t21", Kv), "unparsable");
        assert_eq!(err(b"{\"t\":", Json), "unparsable");
        assert_eq!(err(b"[1,2]", Json), "unparsable");
        assert_eq!(err(b"{\"t\":null}", Json), "unparsable");
    }

    #[test]
    fn checksums() {
        let line = with_checksum("id=cuisine t=21.5");
        assert_eq!(
            vals(&parse(line.as_bytes(), Kv, Checksum::Xor).unwrap()),
            [("temperature", 21.5)]
        );
        // Optional unless required, but checked when present.
        assert!(parse(line.as_bytes(), Kv, Checksum::None).is_ok());
        let bad = line.replace("21.5", "21.6");
        assert_eq!(
            parse(bad.as_bytes(), Kv, Checksum::None).unwrap_err(),
            LineError::Checksum
        );
        assert_eq!(
            parse(b"21.5", Plain, Checksum::Xor).unwrap_err(),
            LineError::Checksum
        );
        assert_eq!(
            parse(b"21.5*Z1", Plain, Checksum::Xor).unwrap_err(),
            LineError::Checksum
        );
    }

    fn split(chunks: &[&[u8]], max: usize, cr: bool) -> Vec<String> {
        let mut s = Splitter::new(max, cr);
        let mut out = Vec::new();
        for c in chunks {
            s.feed(c, |p| {
                out.push(match p {
                    Piece::Line(l) => String::from_utf8_lossy(l).into_owned(),
                    Piece::Overlong => "<overlong>".into(),
                })
            });
        }
        out
    }

    #[test]
    fn splitter_joins_chunks_bounds_lines_and_handles_endings() {
        assert_eq!(
            split(&[b"21.", b"5\n22", b".0\r\n\n  \n"], 64, false),
            ["21.5", "22.0"]
        );
        assert_eq!(split(&[b"1\r2\r"], 64, true), ["1", "2"]);
        // Over 8 bytes: reported once, skipped to its end, then back in step.
        assert_eq!(
            split(&[b"12345", b"67890", b"1234\n5\n"], 8, false),
            ["<overlong>", "5"]
        );
        assert_eq!(split(&[b"1234567890\n3\n"], 8, false), ["<overlong>", "3"]);
        let mut s = Splitter::new(8, false);
        s.feed(&[b'9'; 100], |_| {});
        assert_eq!(s.pending(), 0, "never holds more than max");
    }
}
