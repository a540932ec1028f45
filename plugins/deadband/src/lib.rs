//! `deadband`: drops a reading unless it moved by more than `threshold`
//! since the last one passed on that topic, or `max_interval_secs` went by
//! (so a steady value is still reported now and then). Saves cloud traffic
//! from sensors that repeat themselves. Payloads that are not numbers (a
//! plain number, or JSON with a numeric "value") pass unchanged.
//!
//! Parameters: `threshold` (default 0.5), `max_interval_secs` (default 300).

use std::cell::RefCell;
use std::collections::HashMap;

wit_bindgen::generate!({ world: "batch-transform-plugin", path: "../../wit" });

use exports::capteurs::plugins::transform::{Guest, Message, Param, Verdict};
use exports::capteurs::plugins::transform_batch::{self, Batch};

/// The filter itself, free of the plugin interface (tested natively).
#[derive(Debug)]
pub struct Deadband {
    threshold: f64,
    max_interval_ms: u64,
    /// topic -> (last value passed, when)
    last: HashMap<String, (f64, u64)>,
}

impl Deadband {
    pub fn new(params: &[(String, String)]) -> Result<Self, String> {
        let mut d = Deadband {
            threshold: 0.5,
            max_interval_ms: 300_000,
            last: HashMap::new(),
        };
        for (k, v) in params {
            let num = |v: &str| {
                v.parse::<f64>()
                    .map_err(|_| format!("{k} = {v:?}: not a number"))
            };
            match k.as_str() {
                "threshold" => d.threshold = num(v)?.abs(),
                "max_interval_secs" => d.max_interval_ms = (num(v)? * 1000.0) as u64,
                _ => {
                    return Err(format!(
                        "unknown parameter {k:?} (threshold, max_interval_secs)"
                    ))
                }
            }
        }
        Ok(d)
    }

    /// Whether this reading goes on.
    pub fn keep(&mut self, topic: &str, value: f64, now_ms: u64) -> bool {
        match self.last.get(topic) {
            Some(&(last, at))
                if (value - last).abs() <= self.threshold
                    && now_ms.saturating_sub(at) < self.max_interval_ms =>
            {
                false
            }
            _ => {
                self.last.insert(topic.to_owned(), (value, now_ms));
                true
            }
        }
    }
}

/// A plain number, or JSON with a numeric "value".
pub fn value_of(payload: &[u8]) -> Option<f64> {
    let text = std::str::from_utf8(payload).ok()?.trim();
    if let Ok(v) = text.parse::<f64>() {
        return v.is_finite().then_some(v);
    }
    let rest = text
        .split("\"value\"")
        .nth(1)?
        .trim_start()
        .strip_prefix(':')?
        .trim_start();
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || matches!(c, '-' | '+' | '.' | 'e' | 'E')))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

thread_local! {
    static STATE: RefCell<Option<Deadband>> = const { RefCell::new(None) };
}

struct Plugin;

impl Guest for Plugin {
    fn init(params: Vec<Param>) -> Result<(), String> {
        let p: Vec<(String, String)> = params.into_iter().map(|p| (p.key, p.value)).collect();
        let d = Deadband::new(&p)?;
        STATE.with(|s| *s.borrow_mut() = Some(d));
        Ok(())
    }

    fn process(msg: Message) -> Result<Verdict, String> {
        let now = capteurs::plugins::host::wall_ms();
        Ok(STATE.with(|s| verdict(s.borrow_mut().as_mut(), &msg.topic, &msg.payload, now)))
    }
}

/// Every message of a batch in one call, the clock read once (the gateway
/// hands over what one client sent at once).
impl transform_batch::Guest for Plugin {
    fn process_batch(b: Batch) -> Vec<Result<Verdict, String>> {
        let now = capteurs::plugins::host::wall_ms();
        let mut rest = &b.data[..];
        STATE.with(|s| {
            let mut state = s.borrow_mut();
            b.lengths
                .chunks_exact(2)
                .map(|len| {
                    let (topic, r) = rest.split_at(len[0] as usize);
                    let (payload, r) = r.split_at(len[1] as usize);
                    rest = r;
                    let topic = std::str::from_utf8(topic).unwrap_or_default();
                    Ok(verdict(state.as_mut(), topic, payload, now))
                })
                .collect()
        })
    }
}

fn verdict(d: Option<&mut Deadband>, topic: &str, payload: &[u8], now: u64) -> Verdict {
    let keep = match (d, value_of(payload)) {
        (Some(d), Some(value)) => d.keep(topic, value, now),
        _ => true,
    };
    if keep {
        Verdict::Keep
    } else {
        Verdict::Drop
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
    fn drops_small_changes_until_the_interval() {
        let mut d = Deadband::new(&[
            ("threshold".into(), "0.5".into()),
            ("max_interval_secs".into(), "60".into()),
        ])
        .unwrap();
        assert!(d.keep("t", 20.0, 0));
        assert!(!d.keep("t", 20.4, 1000));
        assert!(d.keep("t", 20.6, 2000), "moved by more than the threshold");
        assert!(d.keep("u", 20.6, 2000), "topics are apart");
        assert!(!d.keep("t", 20.7, 30_000));
        assert!(d.keep("t", 20.7, 62_000), "the interval went by");
    }

    #[test]
    fn values_and_parameters() {
        assert_eq!(value_of(b"21.37"), Some(21.37));
        assert_eq!(value_of(br#"{"value": -3.5, "unit":"C"}"#), Some(-3.5));
        assert_eq!(value_of(b"on"), None);
        assert!(Deadband::new(&[("threshold".into(), "x".into())]).is_err());
        assert!(Deadband::new(&[("nope".into(), "1".into())]).is_err());
    }
}
