//! Place names to topic levels: `Aubière` → `aubiere`, `Rue de la
//! Chébarde` → `rue_de_la_chebarde`. Lower case, accents folded, spaces to
//! `_`; characters that would change the topic's meaning (`/`, `+`, `#`),
//! NUL and control characters are refused, not replaced, so a typo in the
//! configuration is reported instead of publishing under a made-up name.

use thiserror::Error;
use unicode_normalization::UnicodeNormalization;

/// Why a name cannot be a topic level.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LevelError {
    #[error("is empty")]
    Empty,
    #[error("contains {0:?}, which cannot be part of a topic level")]
    Forbidden(char),
    #[error("has nothing left once folded")]
    NothingLeft,
}

/// The topic level for a place name or quantity, or why it cannot be one.
pub fn topic_level(name: &str) -> Result<String, LevelError> {
    let trimmed = name.trim();
    if trimmed.is_empty() {
        return Err(LevelError::Empty);
    }
    if let Some(c) = trimmed
        .chars()
        .find(|c| matches!(c, '/' | '+' | '#') || c.is_control())
    {
        return Err(LevelError::Forbidden(c));
    }
    let mut out = String::with_capacity(trimmed.len());
    for c in trimmed.nfd() {
        match c {
            // Combining marks left by the decomposition: the accents.
            '\u{0300}'..='\u{036f}' => {}
            'œ' | 'Œ' => out.push_str("oe"),
            'æ' | 'Æ' => out.push_str("ae"),
            'ß' => out.push_str("ss"),
            '’' | '\'' | '`' => out.push('_'),
            c if c.is_whitespace() => out.push('_'),
            c => out.extend(c.to_lowercase()),
        }
    }
    // Runs of `_` (from "Rue  de l'Église") collapse to one.
    let mut level = String::with_capacity(out.len());
    for c in out.chars() {
        if c == '_' && level.ends_with('_') {
            continue;
        }
        level.push(c);
    }
    let level = level.trim_matches('_').to_owned();
    if level.is_empty() {
        return Err(LevelError::NothingLeft);
    }
    Ok(level)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folds_accents_case_and_spaces() {
        assert_eq!(topic_level("Aubière").unwrap(), "aubiere");
        assert_eq!(
            topic_level("Rue de la Chebarde").unwrap(),
            "rue_de_la_chebarde"
        );
        assert_eq!(
            topic_level("  Rue  de l'Église ").unwrap(),
            "rue_de_l_eglise"
        );
        assert_eq!(topic_level("Clermont-Ferrand").unwrap(), "clermont-ferrand");
        assert_eq!(topic_level("Œuvre Straße").unwrap(), "oeuvre_strasse");
        assert_eq!(topic_level("FR").unwrap(), "fr");
        assert_eq!(topic_level("température").unwrap(), "temperature");
        assert_eq!(topic_level("humidité").unwrap(), "humidite");
    }

    #[test]
    fn refuses_what_would_change_the_topic() {
        for bad in ["a/b", "a+b", "#", "a\0b", "a\nb", "", "   ", "''"] {
            assert!(topic_level(bad).is_err(), "{bad:?}");
        }
    }
}
