//! `acl-groups`: the course's classroom as an auth plugin. Users `G1`…`GN`
//! with passwords `isimaG1`…; each group reads `<prefix>/#` and writes only
//! `<prefix>/GX` and `<prefix>/GX/…`. Other user names are left to the next
//! authenticator in the chain (abstain).
//!
//! Parameters: `groups` (default 16), `prefix` (default "isima"),
//! `password_prefix` (default "isima": the password of GX is `isimaGX`).

use std::cell::RefCell;

wit_bindgen::generate!({ world: "auth-plugin", path: "../../wit" });

use exports::capteurs::plugins::auth::{
    Action, ConnectDecision, ConnectInfo, Decision, Guest, Param,
};

#[derive(Debug, Clone, PartialEq)]
pub struct Classroom {
    pub groups: u32,
    pub prefix: String,
    pub password_prefix: String,
}

impl Classroom {
    pub fn parse(params: &[(String, String)]) -> Result<Self, String> {
        let mut c = Classroom {
            groups: 16,
            prefix: "isima".into(),
            password_prefix: "isima".into(),
        };
        for (k, v) in params {
            match k.as_str() {
                "groups" => {
                    c.groups = v.parse().map_err(|_| format!("groups = {v:?}: a number"))?
                }
                "prefix" => c.prefix = v.clone(),
                "password_prefix" => c.password_prefix = v.clone(),
                _ => {
                    return Err(format!(
                        "unknown parameter {k:?} (groups, prefix, password_prefix)"
                    ))
                }
            }
        }
        Ok(c)
    }

    /// `Some(X)` for a user name `GX` of this classroom.
    fn group(&self, user: &str) -> Option<u32> {
        let n: u32 = user.strip_prefix('G')?.parse().ok()?;
        (1..=self.groups).contains(&n).then_some(n)
    }

    pub fn authenticate(&self, user: Option<&str>, password: Option<&[u8]>) -> ConnectDecision {
        let Some(user) = user else {
            return ConnectDecision::Abstain;
        };
        if self.group(user).is_none() {
            return ConnectDecision::Abstain;
        }
        let want = format!("{}{user}", self.password_prefix);
        if password == Some(want.as_bytes()) {
            ConnectDecision::Accept
        } else {
            ConnectDecision::BadCredentials
        }
    }

    pub fn authorize(&self, user: Option<&str>, action: Action, topic: &str) -> Decision {
        let Some(user) = user.filter(|u| self.group(u).is_some()) else {
            return Decision::Abstain;
        };
        let own = format!("{}/{user}", self.prefix);
        let ok = match action {
            // Reads: anything under the prefix (a filter covered by prefix/#).
            Action::Subscribe => {
                topic == self.prefix || topic.starts_with(&format!("{}/", self.prefix))
            }
            Action::Publish => topic == own || topic.starts_with(&format!("{own}/")),
        };
        if ok {
            Decision::Allow
        } else {
            Decision::Deny
        }
    }
}

thread_local! {
    static CLASSROOM: RefCell<Option<Classroom>> = const { RefCell::new(None) };
}

struct Plugin;

impl Guest for Plugin {
    fn init(params: Vec<Param>) -> Result<(), String> {
        let p: Vec<(String, String)> = params.into_iter().map(|p| (p.key, p.value)).collect();
        let c = Classroom::parse(&p)?;
        capteurs::plugins::host::log(
            capteurs::plugins::host::Level::Info,
            &format!("classroom of {} groups under {}/", c.groups, c.prefix),
        );
        CLASSROOM.with(|s| *s.borrow_mut() = Some(c));
        Ok(())
    }

    fn authenticate(info: ConnectInfo) -> ConnectDecision {
        CLASSROOM.with(|c| {
            c.borrow().as_ref().map_or(ConnectDecision::Abstain, |c| {
                c.authenticate(info.username.as_deref(), info.password.as_deref())
            })
        })
    }

    fn authorize(
        _client_id: String,
        username: Option<String>,
        action: Action,
        topic: String,
    ) -> Decision {
        CLASSROOM.with(|c| {
            c.borrow().as_ref().map_or(Decision::Abstain, |c| {
                c.authorize(username.as_deref(), action, &topic)
            })
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
    fn the_course_classroom() {
        let c = Classroom::parse(&[]).unwrap();
        assert_eq!(
            c.authenticate(Some("G1"), Some(b"isimaG1")),
            ConnectDecision::Accept
        );
        assert_eq!(
            c.authenticate(Some("G1"), Some(b"isimaG2")),
            ConnectDecision::BadCredentials
        );
        assert_eq!(
            c.authenticate(Some("G17"), Some(b"isimaG17")),
            ConnectDecision::Abstain
        );
        assert_eq!(c.authenticate(None, None), ConnectDecision::Abstain);
        assert_eq!(
            c.authorize(Some("G1"), Action::Subscribe, "isima/#"),
            Decision::Allow
        );
        assert_eq!(
            c.authorize(Some("G1"), Action::Subscribe, "#"),
            Decision::Deny
        );
        assert_eq!(
            c.authorize(Some("G1"), Action::Publish, "isima/G1"),
            Decision::Allow
        );
        assert_eq!(
            c.authorize(Some("G1"), Action::Publish, "isima/G1/t"),
            Decision::Allow
        );
        assert_eq!(
            c.authorize(Some("G1"), Action::Publish, "isima/G2"),
            Decision::Deny
        );
        assert_eq!(
            c.authorize(Some("G1"), Action::Publish, "isima/G10"),
            Decision::Deny
        );
        assert_eq!(
            c.authorize(Some("prof"), Action::Publish, "isima/G1"),
            Decision::Abstain
        );
    }
}
