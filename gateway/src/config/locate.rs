//! Finds the line of a key in the configuration file, so a problem can say
//! where to look. Keys are the paths [`crate::problems`] records:
//! `table.key`, `table.sub.key`, `array[index].key`, `table.array[index].key`.

/// Line (1-based) where `path` is set, if the file sets it as `key = …`
/// under its `[table]` or `[[array]]` header.
pub fn line_of(text: &str, path: &str) -> Option<usize> {
    let (table, key) = path.rsplit_once('.')?;
    match table.strip_suffix(']').and_then(|t| t.rsplit_once('[')) {
        Some((array, index)) => array_key_line(text, array, index.parse().ok()?, key),
        None => key_line(text, table, key),
    }
}

/// Line of `key = …` in the `index`-th `[[table]]`.
fn array_key_line(text: &str, table: &str, index: usize, key: &str) -> Option<usize> {
    let header = format!("[[{table}]]");
    let mut seen: Option<usize> = None;
    let mut inside = false;
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.starts_with('[') {
            inside = line == header && {
                seen = Some(seen.map_or(0, |n| n + 1));
                seen == Some(index)
            };
            continue;
        }
        if inside && assigns(line, key) {
            return Some(i + 1);
        }
    }
    None
}

/// Line of `key = …` inside `[table]`.
fn key_line(text: &str, table: &str, key: &str) -> Option<usize> {
    let mut current = String::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if let Some(rest) = line.strip_prefix('[') {
            current = rest.trim_end_matches(']').trim().to_owned();
            continue;
        }
        if current == table && assigns(line, key) {
            return Some(i + 1);
        }
    }
    None
}

fn assigns(line: &str, key: &str) -> bool {
    line.split_once('=').is_some_and(|(k, _)| k.trim() == key)
}

#[cfg(test)]
mod tests {
    use super::line_of;

    const TEXT: &str = "\
[broker]
listen = \"x\"

[[sensors]]
id = \"a\"
[[sensors]]
id = \"b\"

[[upstream.rules]]
qos = 3

[sources.bounds]
temperature = [1, 0]
";

    #[test]
    fn finds_tables_arrays_and_nested_arrays() {
        assert_eq!(line_of(TEXT, "broker.listen"), Some(2));
        assert_eq!(line_of(TEXT, "sensors[0].id"), Some(5));
        assert_eq!(line_of(TEXT, "sensors[1].id"), Some(7));
        assert_eq!(line_of(TEXT, "upstream.rules[0].qos"), Some(10));
        assert_eq!(line_of(TEXT, "sources.bounds.temperature"), Some(13));
        assert_eq!(line_of(TEXT, "broker.max_inflight"), None);
        assert_eq!(line_of(TEXT, "sensors[2].id"), None);
        assert_eq!(line_of(TEXT, "nodot"), None);
    }
}
