//! The shape of the source tree, checked: the modules' imports form no
//! cycle, no stage reads the configuration tree (each owns its part), and
//! no file grows past 600 lines without saying why at its top.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const SRC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src");
const MAX_LINES: usize = 600;
/// What a long file says at its top to explain its length.
const LONG_BECAUSE: &str = "Longer than 600 lines because";

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The module path of a file: `broker/connection/mod.rs` -> [broker, connection].
fn module_of(file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(SRC).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .iter()
        .map(|c| c.to_string_lossy().into_owned())
        .collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
        parts.pop();
    }
    parts
}

/// The code without comments and tests: what the module really uses.
fn code(text: &str) -> String {
    let text = text.split("#[cfg(test)]").next().unwrap();
    text.lines()
        .map(|l| l.split("//").next().unwrap())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Paths written `crate::a::b` or `super::a` in `text`, as absolute module
/// paths, from the module `me`.
fn references(me: &[String], text: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for (at, _) in text
        .match_indices("crate::")
        .chain(text.match_indices("super::"))
    {
        let before = text[..at].chars().last();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') {
            continue;
        }
        let (base, rest) = text[at..].split_once("::").unwrap();
        let mut path: Vec<String> = if base == "crate" {
            Vec::new()
        } else {
            me[..me.len().saturating_sub(1)].to_vec()
        };
        let mut rest = rest;
        loop {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            if name.is_empty() || name == "super" {
                break;
            }
            rest = &rest[name.len()..];
            path.push(name);
            match rest.strip_prefix("::") {
                Some(r) => rest = r,
                None => break,
            }
        }
        out.push(path);
    }
    out
}

/// The graph between modules of the first two levels (`broker`,
/// `broker::router`), and the files with their module paths.
fn graph() -> (
    BTreeMap<String, BTreeSet<String>>,
    Vec<(PathBuf, Vec<String>)>,
) {
    let mut files = Vec::new();
    rust_files(Path::new(SRC), &mut files);
    // The binary's own modules are not part of the library's graph.
    let files: Vec<(PathBuf, Vec<String>)> = files
        .into_iter()
        .map(|f| {
            let m = module_of(&f);
            (f, m)
        })
        .filter(|(_, m)| !m.is_empty() && m[0] != "main" && m[0] != "cli")
        .collect();
    let nodes: BTreeSet<String> = files.iter().map(|(_, m)| node(m)).collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (f, m) in &files {
        let me = node(m);
        let text = code(&std::fs::read_to_string(f).unwrap());
        for path in references(m, &text) {
            let target = [2, 1]
                .into_iter()
                .map(|k| path[..k.min(path.len())].join("::"))
                .find(|c| nodes.contains(c));
            if let Some(t) = target {
                if t != me {
                    edges.entry(me.clone()).or_default().insert(t);
                }
            }
        }
    }
    (edges, files)
}

fn node(m: &[String]) -> String {
    m[..m.len().min(2)].join("::")
}

/// A cycle through `start`, if the graph has one.
fn cycle_from(edges: &BTreeMap<String, BTreeSet<String>>, start: &str) -> Option<Vec<String>> {
    // Iterative depth-first search with an explicit stack of paths.
    let mut stack = vec![vec![start.to_owned()]];
    let mut seen = BTreeSet::new();
    while let Some(path) = stack.pop() {
        let last = path.last().unwrap();
        for next in edges.get(last).into_iter().flatten() {
            if next == start {
                let mut c = path.clone();
                c.push(next.clone());
                return Some(c);
            }
            if seen.insert(next.clone()) {
                let mut p = path.clone();
                p.push(next.clone());
                stack.push(p);
            }
        }
    }
    None
}

#[test]
fn module_imports_form_no_cycle() {
    let (edges, _) = graph();
    assert!(
        edges.contains_key("gateway"),
        "the graph was read: {edges:?}"
    );
    for start in edges.keys() {
        if let Some(c) = cycle_from(&edges, start) {
            panic!("import cycle: {}", c.join(" -> "));
        }
    }
}

#[test]
fn no_stage_reads_the_configuration_tree() {
    let (edges, _) = graph();
    let readers: Vec<&String> = edges
        .iter()
        .filter(|(from, to)| {
            !from.starts_with("config")
                && *from != "gateway"
                && to
                    .iter()
                    .any(|t| t == "config" || t.starts_with("config::"))
        })
        .map(|(from, _)| from)
        .collect();
    assert!(
        readers.is_empty(),
        "these modules import crate::config: {readers:?}"
    );
}

/// Every Rust file of the workspace (the simulator, the tests, the example
/// plugins too), without build output.
fn workspace_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy();
        if p.is_dir() {
            if name != "target" && !name.starts_with('.') {
                workspace_files(&p, out);
            }
        } else if name.ends_with(".rs") {
            out.push(p);
        }
    }
}

#[test]
fn long_files_say_why() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut all = Vec::new();
    workspace_files(root, &mut all);
    assert!(
        all.len() > 50,
        "the workspace was read: {} files",
        all.len()
    );
    let mut long = Vec::new();
    for f in all {
        let text = std::fs::read_to_string(&f).unwrap();
        let lines = text.lines().count();
        let head: String = text.lines().take(15).collect::<Vec<_>>().join("\n");
        if lines > MAX_LINES && !head.contains(LONG_BECAUSE) {
            long.push(format!("{} ({lines} lines)", f.display()));
        }
    }
    assert!(
        long.is_empty(),
        "split these, or say at their top \"{LONG_BECAUSE} ...\": {long:#?}"
    );
}

#[test]
fn the_checks_see_what_they_look_for() {
    let me = vec!["a".to_owned(), "b".to_owned()];
    let refs = references(
        &me,
        "use crate::x::y::{Z}; f(super::c::d); $crate::q; my_crate::z",
    );
    assert_eq!(
        refs,
        vec![
            vec!["x".to_owned(), "y".to_owned()],
            vec!["a".to_owned(), "c".to_owned(), "d".to_owned()]
        ]
    );
    let mut edges = BTreeMap::new();
    edges.insert("a".to_owned(), BTreeSet::from(["b".to_owned()]));
    edges.insert("b".to_owned(), BTreeSet::from(["a".to_owned()]));
    assert_eq!(
        cycle_from(&edges, "a"),
        Some(vec!["a".into(), "b".into(), "a".into()])
    );
}
