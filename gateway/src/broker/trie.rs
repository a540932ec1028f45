//! The subscription tree: topic filters split into levels, so that routing a
//! PUBLISH walks only the branches that can match its topic name.
//!
//! `+` and `#` are children like any other level; `#` at a node also matches
//! the node itself (`a/#` matches `a`). A name starting with `$` never enters
//! a wildcard branch at the root (MQTT-4.7.2-1).

use std::collections::HashMap;
use std::sync::Arc;

/// A subscriber stored in the tree, identified by pointer.
pub struct Entry<S> {
    pub subscriber: Arc<S>,
    pub qos: u8,
}

struct Node<S> {
    children: HashMap<Box<str>, Node<S>>,
    entries: Vec<Entry<S>>,
}

impl<S> Default for Node<S> {
    fn default() -> Self {
        Node {
            children: HashMap::new(),
            entries: Vec::new(),
        }
    }
}

impl<S> Node<S> {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.entries.is_empty()
    }
}

pub struct SubscriptionTree<S> {
    root: Node<S>,
    count: usize,
}

impl<S> Default for SubscriptionTree<S> {
    fn default() -> Self {
        SubscriptionTree {
            root: Node::default(),
            count: 0,
        }
    }
}

impl<S> SubscriptionTree<S> {
    /// Number of (subscriber, filter) pairs.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Adds or updates (same subscriber, same filter → new QoS) a subscription.
    /// Returns true when it was new.
    pub fn insert(&mut self, filter: &str, subscriber: &Arc<S>, qos: u8) -> bool {
        let mut node = &mut self.root;
        for level in filter.split('/') {
            node = node.children.entry(level.into()).or_default();
        }
        if let Some(e) = node
            .entries
            .iter_mut()
            .find(|e| Arc::ptr_eq(&e.subscriber, subscriber))
        {
            e.qos = qos;
            false
        } else {
            node.entries.push(Entry {
                subscriber: subscriber.clone(),
                qos,
            });
            self.count += 1;
            true
        }
    }

    /// Removes one subscription; true if it existed. Empty branches are pruned.
    pub fn remove(&mut self, filter: &str, subscriber: &Arc<S>) -> bool {
        let levels: Vec<&str> = filter.split('/').collect();
        let removed = remove_rec(&mut self.root, &levels, subscriber);
        if removed {
            self.count -= 1;
        }
        removed
    }

    /// Calls `f(subscriber, granted_qos)` for every subscription matching
    /// `name`. A subscriber with several matching filters is reported once
    /// per filter; the caller keeps the highest QoS.
    pub fn for_each_match(&self, name: &str, mut f: impl FnMut(&Arc<S>, u8)) {
        let levels: Vec<&str> = name.split('/').collect();
        let dollar = name.starts_with('$');
        match_rec(&self.root, &levels, dollar, &mut f);
    }
}

fn remove_rec<S>(node: &mut Node<S>, levels: &[&str], subscriber: &Arc<S>) -> bool {
    match levels.split_first() {
        None => {
            let before = node.entries.len();
            node.entries
                .retain(|e| !Arc::ptr_eq(&e.subscriber, subscriber));
            node.entries.len() != before
        }
        Some((level, rest)) => {
            let Some(child) = node.children.get_mut(*level) else {
                return false;
            };
            let removed = remove_rec(child, rest, subscriber);
            if child.is_empty() {
                node.children.remove(*level);
            }
            removed
        }
    }
}

fn match_rec<S>(
    node: &Node<S>,
    levels: &[&str],
    dollar_root: bool,
    f: &mut impl FnMut(&Arc<S>, u8),
) {
    // `#` here matches the rest, including nothing (parent level).
    if !dollar_root {
        if let Some(hash) = node.children.get("#") {
            for e in &hash.entries {
                f(&e.subscriber, e.qos);
            }
        }
    }
    let Some((level, rest)) = levels.split_first() else {
        for e in &node.entries {
            f(&e.subscriber, e.qos);
        }
        return;
    };
    if !dollar_root {
        if let Some(plus) = node.children.get("+") {
            match_rec(plus, rest, false, f);
        }
    }
    if let Some(child) = node.children.get(*level) {
        match_rec(child, rest, false, f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::topic::matches;

    fn matched(tree: &SubscriptionTree<String>, name: &str) -> Vec<(String, u8)> {
        let mut v = Vec::new();
        tree.for_each_match(name, |s, q| v.push(((**s).clone(), q)));
        v.sort();
        v
    }

    #[test]
    fn wildcards_and_dollar() {
        let mut t = SubscriptionTree::default();
        let a = Arc::new("a".to_string());
        let b = Arc::new("b".to_string());
        t.insert("capteurs/+/fr/#", &a, 1);
        t.insert("#", &b, 0);
        t.insert("$SYS/broker/version", &b, 2);
        assert_eq!(
            matched(&t, "capteurs/temperature/fr/aubiere/x"),
            vec![("a".into(), 1), ("b".into(), 0)]
        );
        assert_eq!(
            matched(&t, "capteurs/temperature/fr"),
            vec![("a".into(), 1), ("b".into(), 0)]
        );
        assert_eq!(matched(&t, "$SYS/broker/version"), vec![("b".into(), 2)]);
        assert_eq!(matched(&t, "$SYS/broker/uptime"), vec![]);
        assert_eq!(t.len(), 3);
        assert!(t.remove("#", &b));
        assert!(!t.remove("#", &b));
        assert_eq!(matched(&t, "other"), vec![]);
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn update_keeps_one_entry() {
        let mut t = SubscriptionTree::default();
        let a = Arc::new("a".to_string());
        assert!(t.insert("x/y", &a, 0));
        assert!(!t.insert("x/y", &a, 2));
        assert_eq!(matched(&t, "x/y"), vec![("a".into(), 2)]);
        assert_eq!(t.len(), 1);
    }

    /// The tree agrees with the reference `matches` on a grid of cases.
    #[test]
    fn agrees_with_matches() {
        let filters = [
            "#", "+", "a", "a/#", "a/+", "+/b", "a/b", "a/+/c", "+/+", "/+", "$SYS/#", "+/#",
            "a//b", "a/b/#",
        ];
        let names = [
            "a", "a/b", "a/b/c", "/b", "b", "a//b", "$SYS/x", "$SYS", "a/", "/", "x/b",
        ];
        let mut t = SubscriptionTree::default();
        let subs: Vec<Arc<String>> = filters.iter().map(|f| Arc::new(f.to_string())).collect();
        for s in &subs {
            t.insert(s, s, 0);
        }
        for name in names {
            let got: Vec<String> = matched(&t, name).into_iter().map(|(s, _)| s).collect();
            let mut want: Vec<String> = filters
                .iter()
                .filter(|f| matches(f, name))
                .map(|f| f.to_string())
                .collect();
            want.sort();
            assert_eq!(got, want, "name {name}");
        }
    }
}
