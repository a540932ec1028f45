//! `downsample`: one averaged message per `window_secs` per topic. Readings
//! are summed while the window is open; the first reading after it closes
//! emits the average of the closed window (on the same topic, with the
//! window's last message's flags) and opens the next one. Non-numeric
//! payloads pass unchanged.
//!
//! Parameters: `window_secs` (default 60), `decimals` (default 3).

use std::cell::RefCell;
use std::collections::HashMap;

wit_bindgen::generate!({ world: "transform-plugin", path: "../../wit" });

use exports::capteurs::plugins::transform::{Guest, Message, Param, Verdict};

#[derive(Debug)]
pub struct Downsampler {
    window_ms: u64,
    decimals: i32,
    open: HashMap<String, Window>,
}

#[derive(Debug)]
struct Window {
    started_ms: u64,
    sum: f64,
    count: u32,
}

impl Downsampler {
    pub fn new(params: &[(String, String)]) -> Result<Self, String> {
        let mut d = Downsampler {
            window_ms: 60_000,
            decimals: 3,
            open: HashMap::new(),
        };
        for (k, v) in params {
            let num = || {
                v.parse::<f64>()
                    .map_err(|_| format!("{k} = {v:?}: not a number"))
            };
            match k.as_str() {
                "window_secs" => d.window_ms = (num()? * 1000.0).max(1.0) as u64,
                "decimals" => d.decimals = num()?.clamp(0.0, 9.0) as i32,
                _ => return Err(format!("unknown parameter {k:?} (window_secs, decimals)")),
            }
        }
        Ok(d)
    }

    /// Adds a reading; returns the closed window's average when this reading
    /// opened a new one.
    pub fn add(&mut self, topic: &str, v: f64, now_ms: u64) -> Option<f64> {
        let scale = 10f64.powi(self.decimals);
        match self.open.get_mut(topic) {
            Some(w) if now_ms.saturating_sub(w.started_ms) < self.window_ms => {
                w.sum += v;
                w.count += 1;
                None
            }
            Some(w) => {
                let avg = (w.sum / f64::from(w.count) * scale).round() / scale;
                *w = Window {
                    started_ms: now_ms,
                    sum: v,
                    count: 1,
                };
                Some(avg)
            }
            None => {
                self.open.insert(
                    topic.to_owned(),
                    Window {
                        started_ms: now_ms,
                        sum: v,
                        count: 1,
                    },
                );
                None
            }
        }
    }
}

thread_local! {
    static STATE: RefCell<Option<Downsampler>> = const { RefCell::new(None) };
}

struct Plugin;

impl Guest for Plugin {
    fn init(params: Vec<Param>) -> Result<(), String> {
        let p: Vec<(String, String)> = params.into_iter().map(|p| (p.key, p.value)).collect();
        let d = Downsampler::new(&p)?;
        STATE.with(|s| *s.borrow_mut() = Some(d));
        Ok(())
    }

    fn process(mut msg: Message) -> Result<Verdict, String> {
        let Some(v) = std::str::from_utf8(&msg.payload)
            .ok()
            .and_then(|t| t.trim().parse::<f64>().ok())
        else {
            return Ok(Verdict::Keep);
        };
        let now = capteurs::plugins::host::wall_ms();
        let avg = STATE.with(|s| {
            s.borrow_mut()
                .as_mut()
                .and_then(|d| d.add(&msg.topic, v, now))
        });
        Ok(match avg {
            Some(a) => {
                msg.payload = format!("{a}").into_bytes();
                Verdict::Replace(vec![msg])
            }
            None => Verdict::Drop,
        })
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
    fn one_average_per_window() {
        let mut d = Downsampler::new(&[("window_secs".into(), "10".into())]).unwrap();
        assert_eq!(d.add("t", 20.0, 0), None);
        assert_eq!(d.add("t", 22.0, 5_000), None);
        assert_eq!(d.add("u", 1.0, 5_000), None);
        assert_eq!(d.add("t", 30.0, 10_000), Some(21.0));
        assert_eq!(d.add("t", 40.0, 21_000), Some(30.0));
    }
}
