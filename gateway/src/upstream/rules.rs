//! Topic rules between the local broker and the cloud, in the spirit of
//! Mosquitto's bridge `topic pattern direction qos local-prefix remote-prefix`:
//! a local topic `local_prefix + T` with `T` matching `pattern` goes out as
//! `remote_prefix + T`; a cloud topic `remote_prefix + T` comes in as
//! `local_prefix + T`. The first matching rule wins.

use super::config::{Direction, UpstreamRule};
use crate::broker::topic;
use crate::message::QoS;

#[derive(Debug, Clone)]
pub struct Rules {
    rules: Vec<UpstreamRule>,
}

impl Rules {
    pub fn new(rules: Vec<UpstreamRule>) -> Rules {
        Rules { rules }
    }

    /// The cloud topic and QoS for a local message, if a rule sends it out.
    pub fn outbound(&self, local: &str) -> Option<(String, QoS)> {
        self.rules
            .iter()
            .filter(|r| r.direction != Direction::In)
            .find_map(|r| {
                let rest = local.strip_prefix(r.local_prefix.as_str())?;
                topic::matches(&r.pattern, rest)
                    .then(|| (format!("{}{rest}", r.remote_prefix), r.qos))
            })
    }

    /// The local topic for a message from the cloud, if a rule brings it in.
    pub fn inbound(&self, remote: &str) -> Option<(String, QoS)> {
        self.rules
            .iter()
            .filter(|r| r.direction != Direction::Out)
            .find_map(|r| {
                let rest = remote.strip_prefix(r.remote_prefix.as_str())?;
                topic::matches(&r.pattern, rest)
                    .then(|| (format!("{}{rest}", r.local_prefix), r.qos))
            })
    }

    /// What to subscribe to on the cloud broker: `remote_prefix + pattern`
    /// of every `in` and `both` rule.
    pub fn subscriptions(&self) -> Vec<(String, QoS)> {
        self.rules
            .iter()
            .filter(|r| r.direction != Direction::Out)
            .map(|r| (format!("{}{}", r.remote_prefix, r.pattern), r.qos))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(
        pattern: &str,
        direction: Direction,
        qos: u8,
        local: &str,
        remote: &str,
    ) -> UpstreamRule {
        UpstreamRule {
            pattern: pattern.into(),
            direction,
            qos: QoS::from_u8(qos).unwrap(),
            local_prefix: local.into(),
            remote_prefix: remote.into(),
        }
    }

    #[test]
    fn prefixes_are_rewritten_both_ways() {
        let r = Rules::new(vec![
            rule(
                "temperature/#",
                Direction::Out,
                1,
                "capteurs/",
                "sites/clermont/",
            ),
            rule("cmd/+", Direction::In, 2, "capteurs/", "sites/clermont/"),
            rule("config", Direction::Both, 1, "", "gw/"),
        ]);
        assert_eq!(
            r.outbound("capteurs/temperature/france/clermont/rue_1"),
            Some((
                "sites/clermont/temperature/france/clermont/rue_1".into(),
                QoS::AtLeastOnce
            ))
        );
        assert_eq!(r.outbound("capteurs/humidite/x"), None);
        assert_eq!(
            r.outbound("capteurs/cmd/a"),
            None,
            "in rules do not send out"
        );
        assert_eq!(
            r.inbound("sites/clermont/cmd/reboot"),
            Some(("capteurs/cmd/reboot".into(), QoS::ExactlyOnce))
        );
        assert_eq!(r.inbound("sites/clermont/temperature/x"), None);
        assert_eq!(
            r.outbound("config"),
            Some(("gw/config".into(), QoS::AtLeastOnce))
        );
        assert_eq!(
            r.inbound("gw/config"),
            Some(("config".into(), QoS::AtLeastOnce))
        );
        assert_eq!(
            r.subscriptions(),
            [
                ("sites/clermont/cmd/+".to_string(), QoS::ExactlyOnce),
                ("gw/config".to_string(), QoS::AtLeastOnce)
            ]
        );
    }

    #[test]
    fn wildcards_do_not_match_dollar_topics() {
        let r = Rules::new(vec![rule("#", Direction::Out, 1, "", "")]);
        assert!(r.outbound("$SYS/broker/uptime").is_none());
        assert!(r.outbound("a/b").is_some());
    }
}
