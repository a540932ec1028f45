//! Configuration problems, collected rather than returned one at a time:
//! a user fixing a file wants every mistake at once, each named by its key.
//!
//! Every stage checks its own part of the file while it builds its runtime
//! settings, and records what is wrong here under the key's full path
//! (`broker.listen`, `sensors[3].ville`, `upstream.rules[0].qos`). The
//! configuration loader then finds each key's line in the file. This module
//! depends on nothing else in the crate, so any stage can use it without
//! importing the configuration tree.

use std::fmt;

/// One problem: the key it is about and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The key's full path: `table.key`, `array[index].key`.
    pub key: String,
    pub what: String,
}

/// The problems found so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Problems(Vec<Problem>);

impl Problems {
    pub fn new() -> Problems {
        Problems::default()
    }

    /// Records that `key` is wrong, and why.
    pub fn add(&mut self, key: impl Into<String>, what: impl fmt::Display) {
        self.0.push(Problem {
            key: key.into(),
            what: what.to_string(),
        });
    }

    /// The value of a check, or `None` with its error recorded under `key`.
    pub fn check<T, E: fmt::Display>(&mut self, key: &str, result: Result<T, E>) -> Option<T> {
        match result {
            Ok(v) => Some(v),
            Err(e) => {
                self.add(key, e);
                None
            }
        }
    }

    /// Records the problems of a part checked on its own.
    pub fn merge(&mut self, other: Problems) {
        self.0.extend(other.0);
    }

    /// Records `result`'s problems, if any, and returns its value.
    pub fn take<T>(&mut self, result: Result<T, Problems>) -> Option<T> {
        match result {
            Ok(v) => Some(v),
            Err(p) => {
                self.merge(p);
                None
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn iter(&self) -> std::slice::Iter<'_, Problem> {
        self.0.iter()
    }

    /// `Ok(value)` when nothing was found, the problems otherwise.
    pub fn or<T>(self, value: impl FnOnce() -> T) -> Result<T, Problems> {
        if self.0.is_empty() {
            Ok(value())
        } else {
            Err(self)
        }
    }
}

impl IntoIterator for Problems {
    type Item = Problem;
    type IntoIter = std::vec::IntoIter<Problem>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.what)
    }
}

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Problems {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_collect_and_keep_order() {
        let mut p = Problems::new();
        assert_eq!(p.check("a.b", Ok::<_, String>(3)), Some(3));
        assert_eq!(p.check::<u8, _>("a.c", Err("no")), None);
        p.add("d[0].e", "bad");
        assert_eq!(p.len(), 2);
        assert_eq!(p.to_string(), "a.c: no; d[0].e: bad");
        assert!(p.clone().or(|| ()).is_err());
        assert_eq!(Problems::new().or(|| 5), Ok(5));
    }
}
