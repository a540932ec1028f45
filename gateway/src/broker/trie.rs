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

    /// Removes one subscription; true if it existed. Empty branches are
    /// pruned. Iterative: a filter's depth is the client's to choose, and
    /// must never become the broker's stack depth.
    pub fn remove(&mut self, filter: &str, subscriber: &Arc<S>) -> bool {
        // First pass, read-only: find the node, and the deepest node on the
        // path that stays non-empty once the entry is gone (where the dead
        // branch is cut off).
        let mut node = &self.root;
        let mut cut = 0usize; // depth of the node whose child is removed
        let mut depth = 0usize;
        for level in filter.split('/') {
            let Some(child) = node.children.get(level) else {
                return false;
            };
            if depth == 0 || node.children.len() > 1 || !node.entries.is_empty() {
                cut = depth;
            }
            node = child;
            depth += 1;
        }
        let Some(pos) = node
            .entries
            .iter()
            .position(|e| Arc::ptr_eq(&e.subscriber, subscriber))
        else {
            return false;
        };
        let leaf_dies = node.entries.len() == 1 && node.children.is_empty();
        self.count -= 1;
        if !leaf_dies {
            let mut node = &mut self.root;
            for level in filter.split('/') {
                node = node.children.get_mut(level).expect("path checked");
            }
            node.entries.swap_remove(pos);
            return true;
        }
        // Second pass: walk to the cut point and detach the dead branch;
        // dropping it is iterative too (Node's Drop).
        let mut node = &mut self.root;
        let mut levels = filter.split('/');
        for _ in 0..cut {
            let level = levels.next().expect("path checked");
            node = node.children.get_mut(level).expect("path checked");
        }
        let level = levels.next().expect("path checked");
        node.children.remove(level);
        true
    }

    /// Calls `f(subscriber, granted_qos)` for every subscription matching
    /// `name`. A subscriber with several matching filters is reported once
    /// per filter; the caller keeps the highest QoS.
    pub fn for_each_match(&self, name: &str, mut f: impl FnMut(&Arc<S>, u8)) {
        let levels: Vec<&str> = name.split('/').collect();
        let dollar = name.starts_with('$');
        match_iter(&self.root, &levels, dollar, &mut f);
    }
}

/// Dropping a deep branch would recurse once per level: children are moved
/// onto a heap stack and dropped one by one instead.
impl<S> Drop for Node<S> {
    fn drop(&mut self) {
        if self.children.is_empty() {
            return;
        }
        let mut stack: Vec<Node<S>> = self.children.drain().map(|(_, n)| n).collect();
        while let Some(mut n) = stack.pop() {
            stack.extend(n.children.drain().map(|(_, c)| c));
        }
    }
}

/// Walks the branches that can match `levels`, with a heap stack: a topic's
/// depth never becomes the broker's stack depth.
fn match_iter<S>(root: &Node<S>, levels: &[&str], dollar: bool, f: &mut impl FnMut(&Arc<S>, u8)) {
    let mut stack: Vec<(&Node<S>, usize)> = vec![(root, 0)];
    while let Some((node, i)) = stack.pop() {
        // Wildcards do not match a `$` name's first level (MQTT-4.7.2-1).
        let wild = !(dollar && i == 0);
        // `#` here matches the rest, including nothing (parent level).
        if wild {
            if let Some(hash) = node.children.get("#") {
                for e in &hash.entries {
                    f(&e.subscriber, e.qos);
                }
            }
        }
        let Some(level) = levels.get(i) else {
            for e in &node.entries {
                f(&e.subscriber, e.qos);
            }
            continue;
        };
        if wild {
            if let Some(plus) = node.children.get("+") {
                stack.push((plus, i + 1));
            }
        }
        if let Some(child) = node.children.get(*level) {
            stack.push((child, i + 1));
        }
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

    /// A filter 100,000 levels deep is inserted, matched, removed and
    /// dropped on a thread with a 128 KiB stack: nothing recurses per level
    /// (this aborted the broker with a stack overflow before).
    #[test]
    fn deep_filters_do_not_recurse() {
        std::thread::Builder::new()
            .stack_size(128 * 1024)
            .spawn(|| {
                let deep = "/".repeat(100_000);
                let mut t = SubscriptionTree::default();
                let a = Arc::new("a".to_string());
                let b = Arc::new("b".to_string());
                t.insert(&deep, &a, 1);
                t.insert(&format!("{deep}x"), &b, 0);
                t.insert(&format!("{deep}#"), &b, 0);
                assert_eq!(matched(&t, &deep), vec![("a".into(), 1), ("b".into(), 0)]);
                assert!(t.remove(&deep, &a));
                assert!(!t.remove(&deep, &a));
                assert_eq!(
                    matched(&t, &format!("{deep}x")),
                    vec![("b".into(), 0), ("b".into(), 0)]
                );
                assert!(t.remove(&format!("{deep}x"), &b));
                assert_eq!(t.len(), 1);
                // Dropped with a branch 100,000 levels deep still in it.
                drop(t);
                let mut t = SubscriptionTree::default();
                t.insert(&deep, &a, 0);
                t.insert("x/y", &a, 0);
                assert!(t.remove(&deep, &a));
                assert_eq!(matched(&t, "x/y"), vec![("a".into(), 0)]);
            })
            .unwrap()
            .join()
            .expect("no stack overflow");
    }

    /// Removing prunes exactly the dead branch: siblings and nodes that
    /// still hold entries stay.
    #[test]
    fn remove_prunes_only_dead_branches() {
        let mut t = SubscriptionTree::default();
        let a = Arc::new("a".to_string());
        let b = Arc::new("b".to_string());
        t.insert("a/b/c/d", &a, 0);
        t.insert("a/b", &b, 0);
        t.insert("a/x", &b, 0);
        assert!(t.remove("a/b/c/d", &a));
        assert_eq!(matched(&t, "a/b"), vec![("b".into(), 0)]);
        assert_eq!(matched(&t, "a/x"), vec![("b".into(), 0)]);
        assert!(t.root.children["a"].children["b"].children.is_empty());
        assert!(t.remove("a/b", &b));
        assert!(t.remove("a/x", &b));
        assert!(t.root.children.is_empty());
        assert!(t.is_empty());
    }
}
