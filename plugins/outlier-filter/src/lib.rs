//! `outlier-filter`: drops physically impossible values (outside `min` ..
//! `max`) and spikes (further than `max_jump` from the median of the last
//! `window` values kept on that topic). A spike is not added to the
//! history, so one wild value never shifts the median. Non-numeric payloads
//! pass unchanged.
//!
//! Parameters: `min` (default -80), `max` (default 150), `window`
//! (default 5), `max_jump` (default 5).

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};

wit_bindgen::generate!({ world: "transform-plugin", path: "../../wit" });

use exports::capteurs::plugins::transform::{Guest, Message, Param, Verdict as Outcome};

#[derive(Debug)]
pub struct Filter {
    min: f64,
    max: f64,
    window: usize,
    max_jump: f64,
    history: HashMap<String, VecDeque<f64>>,
}

#[derive(Debug, PartialEq)]
pub enum Verdict {
    Keep,
    Impossible,
    Spike,
}

impl Filter {
    pub fn new(params: &[(String, String)]) -> Result<Self, String> {
        let mut f = Filter {
            min: -80.0,
            max: 150.0,
            window: 5,
            max_jump: 5.0,
            history: HashMap::new(),
        };
        for (k, v) in params {
            let num = || {
                v.parse::<f64>()
                    .map_err(|_| format!("{k} = {v:?}: not a number"))
            };
            match k.as_str() {
                "min" => f.min = num()?,
                "max" => f.max = num()?,
                "window" => f.window = num()?.max(1.0) as usize,
                "max_jump" => f.max_jump = num()?.abs(),
                _ => {
                    return Err(format!(
                        "unknown parameter {k:?} (min, max, window, max_jump)"
                    ))
                }
            }
        }
        if f.min >= f.max {
            return Err(format!("min {} must be below max {}", f.min, f.max));
        }
        Ok(f)
    }

    pub fn check(&mut self, topic: &str, v: f64) -> Verdict {
        if !(self.min..=self.max).contains(&v) {
            return Verdict::Impossible;
        }
        let h = self.history.entry(topic.to_owned()).or_default();
        if h.len() >= 3 {
            let mut sorted: Vec<f64> = h.iter().copied().collect();
            sorted.sort_by(f64::total_cmp);
            let median = sorted[sorted.len() / 2];
            if (v - median).abs() > self.max_jump {
                return Verdict::Spike;
            }
        }
        h.push_back(v);
        while h.len() > self.window {
            h.pop_front();
        }
        Verdict::Keep
    }
}

thread_local! {
    static FILTER: RefCell<Option<Filter>> = const { RefCell::new(None) };
}

struct Plugin;

impl Guest for Plugin {
    fn init(params: Vec<Param>) -> Result<(), String> {
        let p: Vec<(String, String)> = params.into_iter().map(|p| (p.key, p.value)).collect();
        let f = Filter::new(&p)?;
        FILTER.with(|s| *s.borrow_mut() = Some(f));
        Ok(())
    }

    fn process(msg: Message) -> Result<Outcome, String> {
        let Some(v) = std::str::from_utf8(&msg.payload)
            .ok()
            .and_then(|t| t.trim().parse::<f64>().ok())
        else {
            return Ok(Outcome::Keep);
        };
        let verdict = FILTER.with(|f| {
            f.borrow_mut()
                .as_mut()
                .map_or(Verdict::Keep, |f| f.check(&msg.topic, v))
        });
        Ok(if verdict == Verdict::Keep {
            Outcome::Keep
        } else {
            Outcome::Drop
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
    fn impossible_values_and_spikes_go() {
        let mut f = Filter::new(&[]).unwrap();
        assert_eq!(f.check("t", 999.0), Verdict::Impossible);
        for v in [20.0, 20.5, 21.0, 20.8] {
            assert_eq!(f.check("t", v), Verdict::Keep);
        }
        assert_eq!(f.check("t", 45.0), Verdict::Spike);
        assert_eq!(
            f.check("t", 21.2),
            Verdict::Keep,
            "the spike did not move the median"
        );
        assert_eq!(f.check("u", 45.0), Verdict::Keep, "topics are apart");
        assert!(Filter::new(&[("min".into(), "5".into()), ("max".into(), "1".into())]).is_err());
    }
}
