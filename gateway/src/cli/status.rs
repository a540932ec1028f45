//! `capteurs-gateway status`: the running gateway's summary, read from its
//! HTTP listener and printed for a terminal (or as the JSON it came as).

use std::net::SocketAddr;

use anyhow::{bail, Context};
use capteurs_gateway::config::GatewayConfig;

/// `capteurs-gateway status`.
pub fn run(
    config: Option<&std::path::Path>,
    url: Option<String>,
    json: bool,
) -> anyhow::Result<()> {
    use capteurs_gateway::ops::Status;
    let addr = match url {
        Some(u) => u,
        None => {
            let cfg = match config {
                Some(path) => GatewayConfig::load(path)?,
                None => GatewayConfig::embedded_default()?,
            };
            if cfg.http.listen.is_empty() {
                bail!(
                    "the gateway's HTTP listener is off in {} ([http] listen is empty): set it, or pass --url HOST:PORT",
                    config.map_or("the embedded default configuration".to_owned(), |p| p.display().to_string())
                );
            }
            cfg.http.listen
        }
    };
    let host = addr.trim_start_matches("http://").trim_end_matches('/');
    let sock: SocketAddr = std::net::ToSocketAddrs::to_socket_addrs(host)
        .with_context(|| format!("{host:?} is not host:port"))?
        .next()
        .with_context(|| format!("{host:?} resolves to no address"))?;
    let (code, body) = capteurs_gateway::ops::http::get(sock, "/status.json")
        .context("is the gateway running with its [http] listener on?")?;
    if code != 200 {
        bail!("http://{sock}/status.json answered {code}: {body}");
    }
    if json {
        println!("{body}");
    }
    let s: Status = serde_json::from_str(&body).context("reading /status.json")?;
    if !json {
        print!("{}", status_text(&s));
    }
    if !s.healthy {
        bail!("a stage is stuck");
    }
    Ok(())
}

/// The terminal form of the status page.
fn status_text(s: &capteurs_gateway::ops::Status) -> String {
    use capteurs_gateway::ops::page::{age, bytes, value};
    use std::fmt::Write;
    let mut o = String::new();
    let health = if s.healthy {
        "healthy".to_owned()
    } else {
        let what: Vec<String> = s
            .stuck
            .iter()
            .map(|(n, a)| format!("{n} silent for {a:.1} s"))
            .collect();
        format!("STUCK: {}", what.join(", "))
    };
    let _ = writeln!(
        o,
        "capteurs-gateway {} \"{}\", up {}: {health}",
        s.version,
        s.gateway,
        age(s.uptime_secs as f64)
    );
    let b = &s.broker;
    let _ = writeln!(
        o,
        "broker    {}: {} clients, {} sessions, {} subscriptions, {} retained; {} received, {} sent, {} dropped",
        b.listen, b.clients.len(), b.sessions, b.subscriptions, b.retained, b.messages_received, b.messages_sent, b.dropped
    );
    match &s.upstream {
        Some(u) if u.connected => {
            let _ = writeln!(
                o,
                "upstream  connected: {} forwarded, {} in flight, {:.1} msg/s, {} connects",
                u.acknowledged, u.inflight, u.drain_rate, u.connects
            );
        }
        Some(u) => {
            let _ = writeln!(
                o,
                "upstream  DISCONNECTED ({}), {} failed attempts",
                u.last_error.as_deref().unwrap_or("not connected yet"),
                u.connect_failures
            );
        }
        None => {
            let _ = writeln!(o, "upstream  off");
        }
    }
    if let Some(buf) = &s.buffer {
        let dropped: Vec<String> = buf
            .dropped
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        let _ = writeln!(
            o,
            "buffer    {} messages, {} of {}, oldest {}, dropped: {}",
            buf.messages,
            bytes(buf.bytes),
            bytes(buf.max_bytes),
            buf.oldest_age_secs.map_or("-".to_owned(), age),
            if dropped.is_empty() {
                "none".to_owned()
            } else {
                dropped.join(", ")
            }
        );
    }
    let _ = writeln!(o, "sensors   {}", s.sensors.len());
    for sensor in &s.sensors {
        for r in &sensor.readings {
            let v = r
                .value
                .map_or("-".to_owned(), |v| format!("{} {}", value(v), r.unit));
            let a = r
                .age_secs
                .map_or("never".to_owned(), |a| format!("{} ago", age(a)));
            let _ = writeln!(
                o,
                "  {:<16} {:<12} {:>12}  {:<10} {}{}",
                sensor.id,
                r.grandeur,
                v,
                a,
                r.topic,
                if sensor.silent { "  (silent)" } else { "" }
            );
        }
    }
    let dropped: Vec<String> = s
        .dropped_input
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    if !dropped.is_empty() {
        let _ = writeln!(o, "  input dropped: {}", dropped.join(", "));
    }
    let _ = writeln!(o, "plugins   {}", s.plugins.len());
    for p in &s.plugins {
        let _ = writeln!(
            o,
            "  {:<16} {:<9} {} calls, {} faults, {} restarts{}",
            p.name,
            p.kind,
            p.calls,
            p.faults,
            p.restarts,
            if p.disabled { ", DISABLED" } else { "" }
        );
        if let Some(f) = &p.last_fault {
            let _ = writeln!(o, "  {:<16} last fault: {f}", "");
        }
    }
    let _ = writeln!(
        o,
        "clients   {}",
        if b.clients.is_empty() {
            "none".to_owned()
        } else {
            b.clients.join(" ")
        }
    );
    o
}
