//! Access control lists in mosquitto's format.
//!
//! ```text
//! # Rules before the first `user` line apply to anonymous clients.
//! topic read $SYS/#
//!
//! user prof
//! topic readwrite isima/#
//!
//! # `pattern` rules apply to every client; %u = user name, %c = client id.
//! pattern read isima/#
//! pattern write isima/%u
//! pattern write isima/%u/#
//! ```
//!
//! `topic [read|write|readwrite|deny] FILTER` (no access word = readwrite);
//! `pattern` takes the same words. After an access word the filter is the
//! rest of the line, so it may contain spaces
//! (`$SYS/broker/retained messages/count`); without one it must be a single
//! word, so that a misspelt access word is reported instead of silently
//! becoming part of a readwrite filter. `#` starts a comment only at the
//! beginning of a line (as in mosquitto); unknown keywords are errors.
//!
//! Decisions: anything not allowed is denied. PUBLISH to a name is allowed by
//! a `write`/`readwrite` rule whose filter matches it. SUBSCRIBE to a filter is
//! allowed by a `read`/`readwrite` rule that covers it entirely (`isima/#`
//! covers `isima/G1` and `isima/+`, not `#`). Receiving a message (asked at
//! every delivery, [`Action::Receive`]) is allowed by a `read`/`readwrite`
//! rule whose filter matches the topic name. A matching `deny` rule wins.
//! Subscribe permission and receive permission are two checks, as in
//! mosquitto: a `deny` refuses a SUBSCRIBE only when it covers the whole
//! filter (`topic deny test/nosubscribe` refuses `test/nosubscribe`); a wider
//! subscription (`#`) is granted and the denied topics are filtered out when
//! delivered.
//!
//! `%u`/`%c` are substituted in `pattern` rules only (in one pass). A rule
//! with `%u` never applies to a client without a user name. A value that
//! would widen the rule (empty, containing `/`, `+` or `#`, or making the
//! filter start with `$`) makes the rule not apply to that client.
//!
//! Only the rules of the client's own `user` block (or the anonymous block,
//! for clients without a user name) and the `pattern` rules are consulted;
//! mosquitto does the same.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

use thiserror::Error;

use super::{Action, ClientInfo};
use crate::broker::topic;

#[derive(Debug, Error)]
pub enum AclError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{origin} line {line}: {what}")]
    Syntax {
        origin: String,
        line: usize,
        what: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Read,
    Write,
    ReadWrite,
    Deny,
}

impl Access {
    fn allows(self, action: Action) -> bool {
        matches!(
            (self, action),
            (Access::ReadWrite, _)
                | (Access::Read, Action::Subscribe | Action::Receive)
                | (Access::Write, Action::Publish)
        )
    }
}

#[derive(Debug, Clone)]
struct Rule {
    access: Access,
    filter: String,
}

impl Rule {
    /// Can this rule decide `action` at all (allow it, or deny it)?
    fn relevant(&self, action: Action) -> bool {
        self.access == Access::Deny || self.access.allows(action)
    }

    /// Does this rule (with `filter`, its filter after substitution) speak
    /// about `topic` for `action`?
    fn applies(&self, filter: &str, action: Action, topic: &str) -> bool {
        match (action, self.access) {
            (Action::Publish | Action::Receive, _) => topic::matches(filter, topic),
            (Action::Subscribe, _) => topic::covers(filter, topic),
        }
    }
}

/// A loaded ACL file.
#[derive(Debug, Clone, Default)]
pub struct Acl {
    /// Rules before the first `user` line: clients without a user name.
    anonymous: Vec<Rule>,
    /// `topic` rules after `user NAME`, per name.
    users: HashMap<String, Vec<Rule>>,
    /// `pattern` rules, for every client.
    patterns: Vec<Rule>,
    /// Whether any `deny` rule exists; if not, the first allow is final.
    has_deny: bool,
}

/// Replaces `%u` and `%c` in one pass (a user name containing `%c` is not
/// substituted again). `None` when the rule cannot apply to this client: `%u`
/// without a user name, or a value that would widen the rule (empty, or
/// containing `/`, `+` or `#`, or turning the filter into a `$` topic).
fn substitute<'a>(filter: &'a str, client: &ClientInfo) -> Option<Cow<'a, str>> {
    if !filter.contains('%') {
        return Some(Cow::Borrowed(filter));
    }
    let safe = |s: &str| !s.is_empty() && !s.contains(['/', '+', '#']);
    let mut out = String::with_capacity(filter.len() + 16);
    let mut rest = filter;
    while let Some(i) = rest.find('%') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let value = match after.as_bytes().first() {
            Some(b'u') => match client.username.as_deref() {
                Some(user) if safe(user) => Some(user),
                _ => return None,
            },
            Some(b'c') if safe(&client.client_id) => Some(client.client_id.as_str()),
            Some(b'c') => return None,
            // A lone `%` (or `%x`) is kept literally.
            _ => None,
        };
        match value {
            Some(v) => {
                out.push_str(v);
                rest = &after[1..];
            }
            None => {
                out.push('%');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    if out.starts_with('$') && !filter.starts_with('$') {
        return None;
    }
    Some(Cow::Owned(out))
}

impl Acl {
    pub fn load(path: &Path) -> Result<Acl, AclError> {
        let text = std::fs::read_to_string(path).map_err(|source| AclError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses file contents; `origin` names the file in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Acl, AclError> {
        let mut acl = Acl::default();
        let mut current_user: Option<String> = None;
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let syntax = |what: String| AclError::Syntax {
                origin: origin.to_owned(),
                line: i + 1,
                what,
            };
            let (keyword, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
            let rest = rest.trim();
            match keyword {
                "user" => {
                    if rest.is_empty() {
                        return Err(syntax("`user` needs a user name".into()));
                    }
                    acl.users.entry(rest.to_owned()).or_default();
                    current_user = Some(rest.to_owned());
                }
                "topic" | "pattern" => {
                    let (first, after) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
                    let (access, filter) = match first {
                        "read" => (Access::Read, after.trim()),
                        "write" => (Access::Write, after.trim()),
                        "readwrite" => (Access::ReadWrite, after.trim()),
                        "deny" => (Access::Deny, after.trim()),
                        // No access word: readwrite, and the filter is one
                        // word, so a misspelt access word is an error rather
                        // than part of a (readwrite!) filter.
                        _ if !after.trim().is_empty() => {
                            return Err(syntax(format!(
                                "unknown access {first:?} (expected read, write, readwrite or deny)"
                            )))
                        }
                        _ => (Access::ReadWrite, rest),
                    };
                    if filter.is_empty() {
                        return Err(syntax(format!("`{keyword}` needs a topic filter")));
                    }
                    topic::validate_filter(filter)
                        .map_err(|e| syntax(format!("invalid topic filter {filter:?}: {e}")))?;
                    if keyword == "topic" && (filter.contains("%u") || filter.contains("%c")) {
                        return Err(syntax(
                            "%u and %c are only substituted in `pattern` rules".into(),
                        ));
                    }
                    acl.has_deny |= access == Access::Deny;
                    let rule = Rule {
                        access,
                        filter: filter.to_owned(),
                    };
                    match (keyword, &current_user) {
                        ("pattern", _) => acl.patterns.push(rule),
                        (_, Some(u)) => acl.users.entry(u.clone()).or_default().push(rule),
                        (_, None) => acl.anonymous.push(rule),
                    }
                }
                other => {
                    return Err(syntax(format!(
                        "unknown keyword {other:?} (expected user, topic or pattern)"
                    )))
                }
            }
        }
        Ok(acl)
    }

    /// May this client do `action` on `topic` (a name for Publish, a filter
    /// for Subscribe)? The client's own rules (or the anonymous ones) and the
    /// pattern rules are all consulted; a `deny` that applies wins.
    pub fn check(&self, client: &ClientInfo, action: Action, topic: &str) -> bool {
        let own: &[Rule] = match &client.username {
            Some(u) => self.users.get(u).map(Vec::as_slice).unwrap_or_default(),
            None => &self.anonymous,
        };
        let mut allowed = false;
        // Own rules first: no substitution, no allocation.
        for rule in own.iter().filter(|r| r.relevant(action)) {
            if rule.applies(&rule.filter, action, topic) {
                if rule.access == Access::Deny {
                    return false;
                }
                if !self.has_deny {
                    return true;
                }
                allowed = true;
            }
        }
        for rule in self.patterns.iter().filter(|r| r.relevant(action)) {
            let Some(filter) = substitute(&rule.filter, client) else {
                continue;
            };
            if rule.applies(&filter, action, topic) {
                if rule.access == Access::Deny {
                    return false;
                }
                if !self.has_deny {
                    return true;
                }
                allowed = true;
            }
        }
        allowed
    }

    /// Is every topic name `filter` can match readable by this client? True
    /// when a read rule covers the whole filter and no deny rule can match
    /// any of those names. The broker then skips the receive check for
    /// that subscription's deliveries (the hot path); anything less and
    /// each delivery is checked.
    pub fn covers_reads(&self, client: &ClientInfo, filter: &str) -> bool {
        let own: &[Rule] = match &client.username {
            Some(u) => self.users.get(u).map(Vec::as_slice).unwrap_or_default(),
            None => &self.anonymous,
        };
        let own = own
            .iter()
            .map(|r| Some((r, Cow::Borrowed(r.filter.as_str()))));
        let patterns = self
            .patterns
            .iter()
            .map(|r| substitute(&r.filter, client).map(|f| (r, f)));
        let mut covered = false;
        for (rule, f) in own.chain(patterns).flatten() {
            match rule.access {
                Access::Deny if topic::overlaps(&f, filter) => return false,
                a if a.allows(Action::Receive) && topic::covers(&f, filter) => covered = true,
                _ => {}
            }
        }
        covered
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    fn client(user: Option<&str>, id: &str) -> ClientInfo {
        ClientInfo {
            client_id: id.into(),
            username: user.map(Into::into),
            peer: SocketAddr::from(([127, 0, 0, 1], 1)),
        }
    }

    fn classroom() -> Acl {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/classroom.acl");
        Acl::load(&p).unwrap()
    }

    #[test]
    fn course_classroom_rules() {
        let acl = classroom();
        let g1 = client(Some("G1"), "anything");
        for ok in ["isima/G1", "isima/G1/sensor1"] {
            assert!(acl.check(&g1, Action::Publish, ok), "{ok}");
        }
        for denied in ["isima/G2", "isima", "my_topic", "isima/G10", "isima/G1x"] {
            assert!(!acl.check(&g1, Action::Publish, denied), "{denied}");
        }
        for ok in [
            "isima/#",
            "isima/G2",
            "isima/+",
            "$SYS/broker/version",
            "$SYS/#",
        ] {
            assert!(acl.check(&g1, Action::Subscribe, ok), "{ok}");
        }
        for denied in ["#", "my_topic", "+/G1"] {
            assert!(!acl.check(&g1, Action::Subscribe, denied), "{denied}");
        }
        let prof = client(Some("prof"), "prof_ISIMA");
        assert!(acl.check(&prof, Action::Publish, "isima/G3"));
        assert!(acl.check(&prof, Action::Publish, "isima/LWT"));
        assert!(acl.check(&prof, Action::Subscribe, "$SYS/broker/version"));
        assert!(!acl.check(&prof, Action::Publish, "my_topic"));
    }

    #[test]
    fn substitution_cannot_widen() {
        let acl = Acl::parse("pattern write isima/%u/#\npattern write dev/%c\n", "t").unwrap();
        assert!(acl.check(&client(Some("G1"), "x"), Action::Publish, "isima/G1/a"));
        let sneaky = client(Some("#"), "x");
        assert!(!acl.check(&sneaky, Action::Publish, "isima/G1/a"));
        let slash = client(Some("G1/.."), "x");
        assert!(!acl.check(&slash, Action::Publish, "isima/G1/../a"));
        assert!(
            !acl.check(&client(None, "x"), Action::Publish, "isima//a"),
            "no user name, no %u rule"
        );
        assert!(acl.check(&client(None, "box7"), Action::Publish, "dev/box7"));
        assert!(!acl.check(&client(None, "+"), Action::Publish, "dev/+"));

        // The classroom's rules with a user name that is itself a filter.
        let acl = classroom();
        let wide = client(Some("a/#"), "x");
        for t in ["isima/a/b", "isima/a", "isima/G2"] {
            assert!(!acl.check(&wide, Action::Publish, t), "{t}");
        }
        assert!(!acl.check(&wide, Action::Subscribe, "#"));
        assert!(!acl.check(&client(Some("+"), "x"), Action::Publish, "isima/G2"));
        assert!(!acl.check(&client(Some(""), "x"), Action::Publish, "isima/"));

        // A user name containing `%c` is not substituted a second time.
        let acl = Acl::parse("pattern write isima/%u\n", "t").unwrap();
        let tricky = client(Some("%c"), "G2");
        assert!(!acl.check(&tricky, Action::Publish, "isima/G2"));
        assert!(acl.check(&tricky, Action::Publish, "isima/%c"));

        // A user name cannot turn a pattern into a `$` topic.
        let acl = Acl::parse("pattern readwrite %u/#\n", "t").unwrap();
        assert!(acl.check(&client(Some("G1"), "x"), Action::Publish, "G1/a"));
        let sys = client(Some("$SYS"), "x");
        assert!(!acl.check(&sys, Action::Publish, "$SYS/broker/version"));
        assert!(!acl.check(&sys, Action::Subscribe, "$SYS/#"));
    }

    #[test]
    fn deny_wins_whatever_the_order() {
        let text = "\
user alice
topic deny isima/secret
topic readwrite isima/#
pattern deny isima/%c/private
";
        let acl = Acl::parse(text, "t").unwrap();
        let alice = client(Some("alice"), "box1");
        assert!(acl.check(&alice, Action::Publish, "isima/G1"));
        assert!(!acl.check(&alice, Action::Publish, "isima/secret"));
        assert!(!acl.check(&alice, Action::Publish, "isima/box1/private"));
        assert!(acl.check(&alice, Action::Publish, "isima/box2/private"));
        // SUBSCRIBE: refused only when everything it could receive is
        // denied; a wider filter is granted and filtered at delivery.
        assert!(acl.check(&alice, Action::Subscribe, "isima/#"));
        assert!(acl.check(&alice, Action::Subscribe, "isima/+"));
        assert!(acl.check(&alice, Action::Subscribe, "isima/+/private"));
        assert!(!acl.check(&alice, Action::Subscribe, "isima/secret"));
        assert!(!acl.check(&alice, Action::Subscribe, "isima/box1/private"));
        assert!(acl.check(&alice, Action::Subscribe, "isima/G1/#"));
        assert!(acl.check(&alice, Action::Subscribe, "isima/box2/private"));
        assert!(acl.check(&alice, Action::Receive, "isima/G1"));
        assert!(!acl.check(&alice, Action::Receive, "isima/secret"));
        assert!(!acl.check(&alice, Action::Receive, "isima/box1/private"));
        assert!(acl.check(&alice, Action::Receive, "isima/box2/private"));
        // Subscriptions whose deliveries need no check: a read rule covers
        // them and no deny rule overlaps them.
        assert!(acl.covers_reads(&alice, "isima/G1/#"));
        assert!(acl.covers_reads(&alice, "isima/box2/private"));
        assert!(
            !acl.covers_reads(&alice, "isima/#"),
            "isima/secret is denied"
        );
        assert!(
            !acl.covers_reads(&alice, "isima/+/private"),
            "box1's is denied"
        );
        assert!(!acl.covers_reads(&alice, "other/#"), "no read rule");
        // A deny never allows anything by itself.
        let only_deny = Acl::parse("topic deny a\n", "t").unwrap();
        assert!(!only_deny.check(&client(None, "x"), Action::Publish, "b"));
    }

    #[test]
    fn users_do_not_get_anonymous_rules() {
        let acl = Acl::parse("topic readwrite open/#\nuser bob\ntopic read bob/#\n", "t").unwrap();
        assert!(acl.check(&client(None, "x"), Action::Publish, "open/1"));
        let bob = client(Some("bob"), "x");
        assert!(!acl.check(&bob, Action::Publish, "open/1"));
        assert!(acl.check(&bob, Action::Subscribe, "bob/+"));
        assert!(!acl.check(&bob, Action::Publish, "bob/1"), "read only");
        // A user listed nowhere only gets the pattern rules (none here).
        assert!(!acl.check(&client(Some("eve"), "x"), Action::Subscribe, "open/1"));
    }

    #[test]
    fn anonymous_rules_and_deny() {
        let text = "topic read public/#\nuser alice\ntopic readwrite #\ntopic deny secret/#\n";
        let acl = Acl::parse(text, "t").unwrap();
        let anon = client(None, "a");
        assert!(acl.check(&anon, Action::Subscribe, "public/x"));
        assert!(!acl.check(&anon, Action::Publish, "public/x"));
        let alice = client(Some("alice"), "a");
        assert!(acl.check(&alice, Action::Publish, "x/y"));
        assert!(!acl.check(&alice, Action::Publish, "secret/plans"));
        assert!(
            acl.check(&alice, Action::Subscribe, "#"),
            "granted; secret/# is filtered at delivery"
        );
        assert!(!acl.check(&alice, Action::Receive, "secret/plans"));
        assert!(acl.check(&alice, Action::Receive, "x/y"));
        assert!(!acl.check(&alice, Action::Subscribe, "secret/#"));
        assert!(!acl.check(&alice, Action::Subscribe, "secret/+/x"));
        assert!(acl.check(&alice, Action::Subscribe, "x/#"));
        assert!(!acl.check(&client(Some("bob"), "b"), Action::Publish, "x"));
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let err = Acl::parse("user a\ntopic read a/#/b\n", "acl")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("acl line 2: invalid topic filter"), "{err}");
        let err = Acl::parse("\nfoo bar\n", "acl").unwrap_err().to_string();
        assert!(
            err.contains("line 2") && err.contains("unknown keyword"),
            "{err}"
        );
        let err = Acl::parse("topic read\n", "acl").unwrap_err().to_string();
        assert!(err.contains("needs a topic filter"), "{err}");
        let err = Acl::parse("topic read isima/%u\n", "acl")
            .unwrap_err()
            .to_string();
        assert!(err.contains("only substituted in `pattern`"), "{err}");
        let err = Acl::parse("# acl\nuser\n", "acl").unwrap_err().to_string();
        assert!(err.starts_with("acl line 2: `user` needs"), "{err}");
        let err = Acl::parse("user a\n\ntopic readwrite isima/G+\n", "classroom.acl")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("classroom.acl line 3:"), "{err}");
        let err = Acl::parse("user G1\ntopic raed isima/#\n", "acl")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("acl line 2: unknown access \"raed\""),
            "{err}"
        );
        let acl = Acl::parse("topic isima/#\n", "acl").unwrap();
        assert!(
            acl.check(&client(None, "x"), Action::Publish, "isima/a"),
            "readwrite"
        );
        // A literal % that is not a placeholder is fine in a `topic` rule.
        assert!(Acl::parse("topic read stats/100%\n", "acl").is_ok());
    }

    #[test]
    fn filters_with_spaces() {
        let acl = Acl::parse("topic read $SYS/broker/retained messages/count\n", "t").unwrap();
        assert!(acl.check(
            &client(None, "a"),
            Action::Subscribe,
            "$SYS/broker/retained messages/count"
        ));
    }
}
