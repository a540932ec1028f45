//! The cloud brokers' addresses: `mqtt://host[:port]`, `mqtts://host[:port]`.

use std::fmt;

use thiserror::Error;

/// One server of `upstream.servers`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
}

/// Why a server address was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum UrlError {
    #[error("{0:?}: must start with mqtt:// or mqtts://")]
    Scheme(String),
    #[error("{url:?}: {port:?} is not a port")]
    Port { url: String, port: String },
    #[error("{0:?}: no host")]
    Host(String),
}

impl ServerUrl {
    pub fn parse(url: &str) -> Result<ServerUrl, UrlError> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("mqtts://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("mqtt://") {
            (false, r)
        } else {
            return Err(UrlError::Scheme(url.to_owned()));
        };
        let rest = rest.trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
                h,
                p.parse().map_err(|_| UrlError::Port {
                    url: url.to_owned(),
                    port: p.to_owned(),
                })?,
            ),
            _ => (rest, if tls { 8883 } else { 1883 }),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || host.contains('/') {
            return Err(UrlError::Host(url.to_owned()));
        }
        Ok(ServerUrl {
            tls,
            host: host.to_owned(),
            port,
        })
    }
}

impl fmt::Display for ServerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        write!(f, "{scheme}://{}:{}", self.host, self.port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes_ports_and_hosts() {
        assert_eq!(
            ServerUrl::parse("mqtt://127.0.0.1:1884").unwrap(),
            ServerUrl {
                tls: false,
                host: "127.0.0.1".into(),
                port: 1884
            }
        );
        assert_eq!(ServerUrl::parse("mqtt://h").unwrap().port, 1883);
        let u = ServerUrl::parse("mqtts://cloud.example/").unwrap();
        assert_eq!(
            (u.tls, u.host.as_str(), u.port),
            (true, "cloud.example", 8883)
        );
        let u = ServerUrl::parse("mqtt://[::1]:1884").unwrap();
        assert_eq!((u.tls, u.host.as_str(), u.port), (false, "::1", 1884));
        assert_eq!(u.to_string(), "mqtt://::1:1884");
        assert!(matches!(
            ServerUrl::parse("tcp://x"),
            Err(UrlError::Scheme(_))
        ));
        assert!(matches!(
            ServerUrl::parse("mqtt://x:http"),
            Err(UrlError::Port { .. })
        ));
        assert!(matches!(
            ServerUrl::parse("mqtt://:1"),
            Err(UrlError::Host(_))
        ));
        assert!(matches!(
            ServerUrl::parse("mqtt://"),
            Err(UrlError::Host(_))
        ));
    }
}
