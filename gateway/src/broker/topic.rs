//! Topic names and topic filters (MQTT 3.1.1 §4.7).
//!
//! Names are what PUBLISH carries (`capteurs/temperature/fr/aubiere/rue_chebarde`),
//! filters are what SUBSCRIBE carries (`capteurs/+/fr/#`). Both are checked here
//! once, at the edge, so every later stage can trust them.

use thiserror::Error;

/// Why a topic name or filter was refused.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum TopicError {
    #[error("topic is empty")]
    Empty,
    #[error("topic is longer than 65535 bytes")]
    TooLong,
    #[error("topic contains a NUL character")]
    Nul,
    #[error("topic name contains a wildcard ('+' or '#')")]
    WildcardInName,
    #[error("'#' must be the last level of a filter and stand alone in its level")]
    MisplacedHash,
    #[error("'+' must stand alone in its level")]
    MisplacedPlus,
    #[error("topic has {levels} levels, more than the {max} allowed (broker.max_topic_levels)")]
    TooDeep { levels: usize, max: usize },
}

/// Refuses a topic name or filter with more than `max` levels: every later
/// stage (the subscription tree, ACL checks, the stores) then works on a
/// depth the configuration bounds, not one the client chose.
pub fn check_levels(s: &str, max: usize) -> Result<(), TopicError> {
    let levels = s.bytes().filter(|&b| b == b'/').count() + 1;
    if levels > max {
        return Err(TopicError::TooDeep { levels, max });
    }
    Ok(())
}

/// A topic name a client or the gateway may publish to here:
/// [`validate_name`] and at most `max_levels` levels ([`check_levels`]).
pub fn validate_name_within(name: &str, max_levels: usize) -> Result<(), TopicError> {
    validate_name(name)?;
    check_levels(name, max_levels)
}

fn check_common(s: &str) -> Result<(), TopicError> {
    if s.is_empty() {
        return Err(TopicError::Empty);
    }
    if s.len() > u16::MAX as usize {
        return Err(TopicError::TooLong);
    }
    if s.as_bytes().contains(&0) {
        return Err(TopicError::Nul);
    }
    Ok(())
}

/// Checks a topic name (PUBLISH, will topic): non-empty, no NUL, no wildcard.
pub fn validate_name(name: &str) -> Result<(), TopicError> {
    check_common(name)?;
    if name.bytes().any(|b| b == b'+' || b == b'#') {
        return Err(TopicError::WildcardInName);
    }
    Ok(())
}

/// Checks a topic filter (SUBSCRIBE, UNSUBSCRIBE, ACL rules).
pub fn validate_filter(filter: &str) -> Result<(), TopicError> {
    check_common(filter)?;
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        if level.contains('#') {
            if level != "#" || levels.peek().is_some() {
                return Err(TopicError::MisplacedHash);
            }
        } else if level.contains('+') && level != "+" {
            return Err(TopicError::MisplacedPlus);
        }
    }
    Ok(())
}

/// Does `filter` match `name`? Both must already be valid.
///
/// Names starting with `$` (such as `$SYS/...`) are not matched by a filter
/// whose first level is a wildcard (MQTT-4.7.2-1). `a/#` matches `a` itself.
pub fn matches(filter: &str, name: &str) -> bool {
    if name.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut n = name.split('/');
    loop {
        match (f.next(), n.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(fl), Some(nl)) if fl == nl => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_name("capteurs/temperature/fr/aubiere/rue_chebarde").is_ok());
        assert!(validate_name("/").is_ok());
        assert!(validate_name("a//b").is_ok());
        assert_eq!(validate_name(""), Err(TopicError::Empty));
        assert_eq!(validate_name("a/+"), Err(TopicError::WildcardInName));
        assert_eq!(validate_name("a/#"), Err(TopicError::WildcardInName));
        assert_eq!(validate_name("a\0b"), Err(TopicError::Nul));
        assert!(check_levels("a/b/c", 3).is_ok());
        assert_eq!(
            check_levels("a/b/c/", 3),
            Err(TopicError::TooDeep { levels: 4, max: 3 })
        );
        assert!(check_levels(&"/".repeat(199), 200).is_ok());
        assert!(check_levels(&"/".repeat(200), 200).is_err());
    }

    #[test]
    fn filters() {
        for ok in [
            "#",
            "+",
            "a/#",
            "a/+/b",
            "+/+",
            "/+",
            "a//#",
            "$SYS/#",
            "isima/G1/#",
        ] {
            assert!(validate_filter(ok).is_ok(), "{ok}");
        }
        assert_eq!(validate_filter("a/#/b"), Err(TopicError::MisplacedHash));
        assert_eq!(validate_filter("a#"), Err(TopicError::MisplacedHash));
        assert_eq!(validate_filter("a/b#"), Err(TopicError::MisplacedHash));
        assert_eq!(validate_filter("a+/b"), Err(TopicError::MisplacedPlus));
        assert_eq!(validate_filter(""), Err(TopicError::Empty));
    }

    #[test]
    fn matching() {
        assert!(matches("a/#", "a"));
        assert!(matches("a/#", "a/b/c"));
        assert!(matches("#", "a/b"));
        assert!(matches("+/b", "a/b"));
        assert!(matches("+", "a"));
        assert!(!matches("+", "a/b"));
        assert!(matches("+/+", "/b"));
        assert!(matches("a/+", "a/"));
        assert!(!matches("a/+", "a"));
        assert!(!matches("a/b", "a/b/c"));
        assert!(!matches("#", "$SYS/broker/version"));
        assert!(!matches("+/broker/version", "$SYS/broker/version"));
        assert!(matches("$SYS/#", "$SYS/broker/version"));
        assert!(matches("$SYS/broker/+", "$SYS/broker/version"));
        assert!(matches(
            "capteurs/+/fr/aubiere/rue_chebarde",
            "capteurs/temperature/fr/aubiere/rue_chebarde"
        ));
    }
}

/// Does every topic name matched by `filter` also match `rule`?
///
/// This is how a SUBSCRIBE is checked against an ACL `read` rule: `isima/G1`
/// and `isima/#` are covered by `isima/#`, `#` is not. Both must be valid.
pub fn covers(rule: &str, filter: &str) -> bool {
    // A rule with a leading wildcard never reaches `$` topics (MQTT-4.7.2-1).
    if filter.starts_with('$') && (rule.starts_with('+') || rule.starts_with('#')) {
        return false;
    }
    let mut r = rule.split('/');
    let mut f = filter.split('/');
    loop {
        match (r.next(), f.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(fl)) if fl != "#" => {}
            (Some(rl), Some(fl)) if rl == fl && rl != "+" => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod cover_tests {
    use super::covers;

    #[test]
    fn rule_covers_filter() {
        assert!(covers("isima/#", "isima/G1"));
        assert!(covers("isima/#", "isima/#"));
        assert!(covers("isima/#", "isima/+/x"));
        assert!(covers("isima/#", "isima"));
        assert!(!covers("isima/#", "#"));
        assert!(!covers("isima/#", "+/G1"));
        assert!(covers("isima/+", "isima/G2"));
        assert!(covers("isima/+", "isima/+"));
        assert!(!covers("isima/+", "isima/#"));
        assert!(!covers("isima/G1", "isima/+"));
        assert!(!covers("#", "$SYS/broker/version"));
        assert!(covers("$SYS/#", "$SYS/broker/version"));
        assert!(covers("#", "a/b/#"));
    }
}

/// Could some topic name match both filters? (A `deny` rule and a
/// subscription: if they overlap, the subscription's deliveries must be
/// checked one by one.)
pub fn overlaps(a: &str, b: &str) -> bool {
    let wild = |s: &str| s.starts_with('+') || s.starts_with('#');
    if (a.starts_with('$') && wild(b)) || (b.starts_with('$') && wild(a)) {
        return false;
    }
    let mut x = a.split('/');
    let mut y = b.split('/');
    loop {
        match (x.next(), y.next()) {
            (Some("#"), _) | (_, Some("#")) => return true,
            (None, None) => return true,
            (Some("+"), Some(_)) | (Some(_), Some("+")) => {}
            (Some(l), Some(r)) if l == r => {}
            _ => return false,
        }
    }
}

#[cfg(test)]
mod overlap_tests {
    use super::overlaps;

    #[test]
    fn overlapping_filters() {
        assert!(overlaps("isima/#", "isima/secret"));
        assert!(overlaps("#", "isima/secret"));
        assert!(overlaps("a/+/c", "a/b/+"));
        assert!(overlaps("a/#", "a"));
        assert!(!overlaps("a/b", "a/c"));
        assert!(!overlaps("a/+", "a/b/c"));
        assert!(!overlaps("#", "$SYS/x"));
        assert!(overlaps("$SYS/#", "$SYS/x"));
    }
}
