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
//! `pattern` takes the same words. The filter is the rest of the line, so it
//! may contain spaces (`$SYS/broker/retained messages/count`).
//!
//! Decisions: anything not allowed is denied. PUBLISH to a name is allowed by
//! a `write`/`readwrite` rule whose filter matches it. SUBSCRIBE to a filter is
//! allowed by a `read`/`readwrite` rule that covers it entirely (`isima/#`
//! covers `isima/G1` and `isima/+`, not `#`). A matching `deny` rule wins: for
//! SUBSCRIBE, any overlap with a denied filter refuses the subscription, so a
//! wide subscription can never receive a denied topic.
//!
//! A `%u`/`%c` substitution containing `/`, `+` or `#` would widen the rule;
//! such a rule then does not apply to that client.

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
                | (Access::Read, Action::Subscribe)
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
    /// Does this rule speak about `topic` for `action`?
    fn applies(filter: &str, action: Action, access: Access, topic: &str) -> bool {
        match (action, access) {
            (Action::Publish, _) => topic::matches(filter, topic),
            (Action::Subscribe, Access::Deny) => topic::overlaps(filter, topic),
            (Action::Subscribe, _) => topic::covers(filter, topic),
        }
    }
}

/// A loaded ACL file.
#[derive(Debug, Clone, Default)]
pub struct Acl {
    anonymous: Vec<Rule>,
    users: HashMap<String, Vec<Rule>>,
    patterns: Vec<Rule>,
}

enum Verdict {
    Allow,
    Deny,
    None,
}

fn judge<'a>(
    rules: impl Iterator<Item = (Access, std::borrow::Cow<'a, str>)>,
    action: Action,
    topic: &str,
) -> Verdict {
    let mut allowed = false;
    for (access, filter) in rules {
        if !Rule::applies(&filter, action, access, topic) {
            continue;
        }
        if access == Access::Deny {
            return Verdict::Deny;
        }
        if access.allows(action) {
            allowed = true;
        }
    }
    if allowed {
        Verdict::Allow
    } else {
        Verdict::None
    }
}

/// Replaces %u and %c; None when the rule cannot apply to this client.
fn substitute<'a>(filter: &'a str, client: &ClientInfo) -> Option<std::borrow::Cow<'a, str>> {
    if !filter.contains('%') {
        return Some(std::borrow::Cow::Borrowed(filter));
    }
    let safe = |s: &str| !s.is_empty() && !s.contains(['/', '+', '#']);
    let mut out = filter.to_owned();
    if out.contains("%u") {
        let user = client.username.as_deref().filter(|u| safe(u))?;
        out = out.replace("%u", user);
    }
    if out.contains("%c") {
        if !safe(&client.client_id) {
            return None;
        }
        out = out.replace("%c", &client.client_id);
    }
    Some(std::borrow::Cow::Owned(out))
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
                        _ => (Access::ReadWrite, rest),
                    };
                    if filter.is_empty() {
                        return Err(syntax(format!("`{keyword}` needs a topic filter")));
                    }
                    topic::validate_filter(filter)
                        .map_err(|e| syntax(format!("invalid topic filter {filter:?}: {e}")))?;
                    if keyword == "topic" && filter.contains('%') {
                        return Err(syntax(
                            "%u and %c are only substituted in `pattern` rules".into(),
                        ));
                    }
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
    /// for Subscribe)?
    pub fn check(&self, client: &ClientInfo, action: Action, topic: &str) -> bool {
        let own: &[Rule] = match &client.username {
            Some(u) => self.users.get(u).map(Vec::as_slice).unwrap_or_default(),
            None => &self.anonymous,
        };
        let direct = own
            .iter()
            .map(|r| (r.access, std::borrow::Cow::Borrowed(r.filter.as_str())));
        let patterns = self
            .patterns
            .iter()
            .filter_map(|r| substitute(&r.filter, client).map(|f| (r.access, f)));
        matches!(judge(direct.chain(patterns), action, topic), Verdict::Allow)
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
            !acl.check(&alice, Action::Subscribe, "#"),
            "overlaps a denied filter"
        );
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
