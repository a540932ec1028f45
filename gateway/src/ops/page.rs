//! The status page: one server-rendered HTML document, no JavaScript and no
//! build step, that refreshes itself every 10 s and fits a phone's screen.
//! Each sensor reading has an inline SVG chart of its last hour.

use std::fmt::Write;

use super::{ReadingStatus, Status};

/// Seconds between the page's own refreshes.
pub const REFRESH_SECS: u32 = 10;

fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `3 s`, `4 min`, `2 h 5 min`, `3 d 4 h`.
pub fn age(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    match s {
        0..=59 => format!("{s} s"),
        60..=3599 => format!("{} min", s / 60),
        3600..=86_399 => format!("{} h {} min", s / 3600, s % 3600 / 60),
        _ => format!("{} d {} h", s / 86_400, s % 86_400 / 3600),
    }
}

/// `512 B`, `1.5 KiB`, `12.0 MiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

/// `1 client`, `3 clients`.
pub fn plural(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

/// A value as the sensors publish it: at most two decimals.
pub fn value(v: f64) -> String {
    crate::sources::number((v * 100.0).round() / 100.0)
}

const CHART_W: f64 = 120.0;
const CHART_H: f64 = 28.0;

/// The last hour of a reading as an inline SVG polyline (now on the right).
fn chart(r: &ReadingStatus) -> String {
    if r.history.is_empty() {
        return String::new();
    }
    let (lo, hi) = r
        .history
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), (_, v)| {
            (lo.min(*v), hi.max(*v))
        });
    let span = if hi > lo { hi - lo } else { 1.0 };
    let span_secs = crate::sources::registry::HISTORY_SPAN.as_secs_f64();
    let mut points = String::new();
    for (ago, v) in &r.history {
        let x = CHART_W * (1.0 - (ago / span_secs).min(1.0));
        let y = CHART_H - 2.0 - (v - lo) / span * (CHART_H - 4.0);
        let _ = write!(points, "{x:.1},{y:.1} ");
    }
    let mut svg = format!(
        "<svg class=\"chart\" viewBox=\"0 0 {CHART_W} {CHART_H}\" width=\"{CHART_W}\" height=\"{CHART_H}\" role=\"img\" aria-label=\"last hour: {} to {}\">",
        value(lo),
        value(hi)
    );
    if r.history.len() == 1 {
        let (ago, _) = r.history[0];
        let x = CHART_W * (1.0 - (ago / span_secs).min(1.0));
        let _ = write!(
            svg,
            "<circle cx=\"{x:.1}\" cy=\"{:.1}\" r=\"2\"/>",
            CHART_H / 2.0
        );
    } else {
        let _ = write!(svg, "<polyline points=\"{}\"/>", points.trim_end());
    }
    svg.push_str("</svg>");
    svg
}

const STYLE: &str = "\
body{font-family:system-ui,sans-serif;margin:0;padding:.8em;color:#222;background:#f6f7f9}\
h1{font-size:1.3em;margin:.2em 0}h2{font-size:1.05em;margin:1.2em 0 .4em}\
.cards{display:flex;flex-wrap:wrap;gap:.6em}\
.card{background:#fff;border-radius:.5em;padding:.6em .8em;box-shadow:0 1px 2px #0002;min-width:9em;flex:1}\
.card>b{display:block;font-size:1.25em}\
.sensor{min-width:17em}.sensor table{box-shadow:none;margin-top:.3em}.sensor td{padding:.25em .3em}\
.ok{color:#17803d}.bad{color:#b42318}.muted{color:#667}\
table{border-collapse:collapse;width:100%;background:#fff;border-radius:.5em;overflow:hidden;box-shadow:0 1px 2px #0002}\
th,td{text-align:left;padding:.35em .5em;border-bottom:1px solid #eee;vertical-align:middle}\
th{background:#eef0f3;font-weight:600}.num{text-align:right;white-space:nowrap}\
.wrap{overflow-x:auto}code{font-size:.85em;word-break:break-all}\
meter{width:100%}\
.chart polyline{fill:none;stroke:#2563eb;stroke-width:1.5}.chart circle{fill:#2563eb}\
@media (max-width:600px){.hide-s{display:none}}";

/// The page for `s`.
pub fn render(s: &Status) -> String {
    let mut h = String::with_capacity(16 * 1024);
    let health = if s.healthy {
        "<span class=\"ok\">healthy</span>".to_owned()
    } else {
        let what: Vec<String> = s
            .stuck
            .iter()
            .map(|(n, a)| format!("{} silent for {:.1} s", esc(n), a))
            .collect();
        format!("<span class=\"bad\">stuck: {}</span>", what.join(", "))
    };
    let _ = write!(
        h,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
<meta http-equiv=\"refresh\" content=\"{REFRESH_SECS}\">\
<title>{id} · Capteurs</title><style>{STYLE}</style></head><body>\
<h1>Capteurs gateway <span id=\"gateway-id\">{id}</span></h1>\
<p class=\"muted\">version <span id=\"version\">{version}</span> · up {up} · {health}</p>",
        id = esc(&s.gateway),
        version = esc(&s.version),
        up = age(s.uptime_secs as f64),
    );

    // The cards: broker, upstream, buffer.
    h.push_str("<div class=\"cards\">");
    let b = &s.broker;
    let _ = write!(
        h,
        "<div class=\"card\" id=\"broker\">Broker <code>{}</code><b>{}</b>\
<span class=\"muted\">{} sessions · {} retained · {} in / {} out · {} dropped</span></div>",
        esc(&b.listen),
        plural(b.clients.len(), "client"),
        b.sessions,
        b.retained,
        b.messages_received,
        b.messages_sent,
        b.dropped
    );
    match &s.upstream {
        Some(u) => {
            let state = if u.connected {
                "<b class=\"ok\" id=\"upstream-state\">connected</b>".to_owned()
            } else {
                format!(
                    "<b class=\"bad\" id=\"upstream-state\">disconnected</b><span class=\"muted\">{}</span><br>",
                    esc(u.last_error.as_deref().unwrap_or("not connected yet"))
                )
            };
            let _ = write!(
                h,
                "<div class=\"card\" id=\"upstream\">Cloud link{state}<span class=\"muted\">{} forwarded · {} in flight · {:.1} msg/s · {} connects, {} failed</span></div>",
                u.acknowledged, u.inflight, u.drain_rate, u.connects, u.connect_failures
            );
        }
        None => h.push_str(
            "<div class=\"card\" id=\"upstream\">Cloud link<b class=\"muted\" id=\"upstream-state\">off</b></div>",
        ),
    }
    if let Some(buf) = &s.buffer {
        let dropped: u64 = buf.dropped.values().sum();
        let _ = write!(
            h,
            "<div class=\"card\" id=\"buffer\">Buffer<b id=\"buffer-depth\">{} messages</b>\
<meter min=\"0\" max=\"{}\" value=\"{}\" title=\"{} of {}\"></meter>\
<span class=\"muted\">{} of {} · oldest {} · {} dropped · {} write errors</span></div>",
            buf.messages,
            buf.max_bytes.max(1),
            buf.bytes,
            bytes(buf.bytes),
            bytes(buf.max_bytes),
            bytes(buf.bytes),
            bytes(buf.max_bytes),
            buf.oldest_age_secs.map_or("—".to_owned(), age),
            dropped,
            buf.write_errors
        );
    }
    h.push_str("</div>");

    // Sensors: a card each, a row per quantity.
    let _ = write!(h, "<h2>Sensors ({})</h2>", s.sensors.len());
    if s.sensors.is_empty() {
        h.push_str("<p class=\"muted\">No [[sensors]] in the configuration.</p>");
    }
    h.push_str("<div class=\"cards\" id=\"sensors\">");
    for sensor in &s.sensors {
        let place = sensor
            .place
            .iter()
            .rev()
            .map(|p| esc(p))
            .collect::<Vec<_>>()
            .join(", ");
        let mut radio = Vec::new();
        if let Some(b) = sensor.battery {
            radio.push(format!(
                "battery <span class=\"battery\">{} %</span>",
                value(b)
            ));
        }
        if let Some(r) = sensor.rssi {
            radio.push(format!("RSSI {r} dBm"));
        }
        let _ = write!(
            h,
            "<div class=\"card sensor\" data-sensor=\"{id}\"><b>{id}{silent}</b>\
<span class=\"muted place\">{place}</span><span class=\"muted\"> · {source}{radio}</span>\
<table><tbody>",
            id = esc(&sensor.id),
            silent = if sensor.silent {
                " <span class=\"bad\">silent</span>"
            } else {
                ""
            },
            source = esc(&sensor.source),
            radio = if radio.is_empty() {
                String::new()
            } else {
                format!(" · {}", radio.join(" · "))
            },
        );
        for r in &sensor.readings {
            let _ = write!(
                h,
                "<tr data-grandeur=\"{g}\" title=\"{topic}\"><td>{g}</td>\
<td class=\"num value\">{v}</td><td class=\"num muted\">{a}</td><td class=\"num\">{chart}</td></tr>",
                g = esc(&r.grandeur),
                topic = esc(&r.topic),
                v = r
                    .value
                    .map_or("—".to_owned(), |v| format!("{} {}", value(v), esc(&r.unit))),
                a = r.age_secs.map_or("never".to_owned(), age),
                chart = chart(r),
            );
        }
        h.push_str("</tbody></table></div>");
    }
    h.push_str("</div>");
    if s.dropped_input.values().any(|n| *n > 0) {
        h.push_str("<p class=\"muted\" id=\"dropped-input\">Input dropped: ");
        let parts: Vec<String> = s
            .dropped_input
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(k, n)| format!("{} {n}", esc(k)))
            .collect();
        h.push_str(&parts.join(" · "));
        h.push_str("</p>");
    }

    // Clients and plugins.
    let _ = write!(h, "<h2>Connected clients ({})</h2>", s.broker.clients.len());
    if s.broker.clients.is_empty() {
        h.push_str("<p class=\"muted\">None.</p>");
    } else {
        h.push_str("<p id=\"clients\">");
        let ids: Vec<String> = s
            .broker
            .clients
            .iter()
            .map(|c| format!("<code>{}</code>", esc(c)))
            .collect();
        h.push_str(&ids.join(" "));
        h.push_str("</p>");
    }
    let _ = write!(h, "<h2>Plugins ({})</h2>", s.plugins.len());
    if s.plugins.is_empty() {
        h.push_str("<p class=\"muted\">No [[plugins]] loaded.</p>");
    } else {
        h.push_str(
            "<div class=\"wrap\"><table id=\"plugins\"><thead><tr><th>Plugin</th><th>Kind</th>\
<th class=\"num\">Calls</th><th class=\"num\">Faults</th><th class=\"num\">Restarts</th>\
<th class=\"num hide-s\">Mean call</th><th>State</th></tr></thead><tbody>",
        );
        for p in &s.plugins {
            let mean = if p.calls > 0 {
                format!("{:.2} µs", p.busy_secs / p.calls as f64 * 1e6)
            } else {
                "—".into()
            };
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
<td class=\"num hide-s\">{mean}</td><td>{}{}</td></tr>",
                esc(&p.name),
                esc(&p.kind),
                p.calls,
                p.faults,
                p.restarts,
                if p.disabled { "<span class=\"bad\">disabled</span>" } else { "<span class=\"ok\">running</span>" },
                p.last_fault.as_deref().map_or(String::new(), |f| format!(
                    "<br><span class=\"muted\">last fault: {}</span>",
                    esc(&f.chars().take(160).collect::<String>())
                ))
            );
        }
        h.push_str("</tbody></table></div>");
    }
    let _ = write!(
        h,
        "<p class=\"muted\">Refreshes every {REFRESH_SECS} s · <a href=\"/metrics\">metrics</a> · \
<a href=\"/status.json\">status.json</a> · <a href=\"/health\">health</a></p></body></html>"
    );
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_and_sizes_read_well() {
        assert_eq!(age(3.4), "3 s");
        assert_eq!(age(125.0), "2 min");
        assert_eq!(age(7500.0), "2 h 5 min");
        assert_eq!(age(200_000.0), "2 d 7 h");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(
            esc("<a href='x'>&\""),
            "&lt;a href=&#39;x&#39;&gt;&amp;&quot;"
        );
    }

    #[test]
    fn a_chart_spans_the_hour() {
        let r = ReadingStatus {
            grandeur: "temperature".into(),
            unit: "°C".into(),
            topic: "t".into(),
            value: Some(21.0),
            age_secs: Some(0.0),
            history: vec![(3600.0, 20.0), (0.0, 22.0)],
        };
        let svg = chart(&r);
        assert!(svg.contains("points=\"0.0,26.0 120.0,2.0\""), "{svg}");
    }
}
