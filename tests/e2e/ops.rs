//! Operating the gateway as its operator does: Prometheus scrapes of
//! `/metrics` during simulator runs, the status page in headless Chromium,
//! `capteurs-gateway status` in a terminal, Home Assistant discovery, and
//! the systemd watchdog withheld while a stage is stuck.
//!
//! Longer than 600 lines because each of its six tests drives a whole
//! gateway, a simulator and a client (browser, Prometheus text, systemd
//! socket) and checks every figure it shows; they share only the fixtures of
//! `capteurs-tests`, and splitting them would scatter one operator's view.

use std::collections::HashMap;
use std::io::BufRead;
use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::process::Stdio;
use std::time::{Duration, Instant};

use capteurs_tests::*;
use rmqtt_codec::types::QoS;

/// `GET path` on the gateway's HTTP listener.
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || capteurs_gateway::ops::http::get(addr, &path).unwrap())
        .await
        .unwrap()
}

/// One scrape: `name{labels}` → value.
async fn scrape(addr: SocketAddr) -> HashMap<String, f64> {
    let (code, body) = get(addr, "/metrics").await;
    assert_eq!(code, 200, "{body}");
    let mut out = HashMap::new();
    for line in body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (key, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line:?}"));
        let v: f64 = value.parse().unwrap_or_else(|_| panic!("{line:?}"));
        assert!(out.insert(key.to_owned(), v).is_none(), "{key} twice");
    }
    out
}

fn at(m: &HashMap<String, f64>, key: &str) -> f64 {
    *m.get(key).unwrap_or_else(|| {
        panic!(
            "no {key} in the scrape: {:#?}",
            m.keys().collect::<Vec<_>>()
        )
    })
}

/// Scrapes until `key` reaches `want` (or fails after 10 s).
async fn scrape_until(addr: SocketAddr, key: &str, want: f64) -> HashMap<String, f64> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = scrape(addr).await;
        if m.get(key) == Some(&want) {
            return m;
        }
        assert!(
            Instant::now() < deadline,
            "{key} = {:?}, expected {want}",
            m.get(key)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn http_addr(g: &TestGateway) -> SocketAddr {
    g.gateway
        .as_ref()
        .and_then(|g| g.http.as_ref())
        .expect("[http] listen set")
        .local_addr
}

fn sensor(id: &str, source: &str, ville: &str, rue: &str, grandeurs: &str) -> String {
    format!(
        "[[sensors]]\nid = \"{id}\"\nsource = \"{source}\"\npays = \"FR\"\nville = \"{ville}\"\n\
         rue = \"{rue}\"\ngrandeurs = [{grandeurs}]\n"
    )
}

/// A simulator run into a serial port, MQTT clients at each QoS, and a full
/// buffer: every counter moves by exactly what was sent and dropped.
#[tokio::test]
async fn metrics_move_by_exactly_what_was_sent_and_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("ttySIM");
    // The cloud is a port nobody listens on: the buffer fills. 1,200 bytes
    // hold 50 messages of "capteurs/f/NNN" (14 bytes) + 10 bytes.
    // Held (bound, not listening) for the whole test: refused, and no
    // other test's server can take it.
    let dead = ReservedPort::new();
    let cfg = format!(
        "[http]\nlisten = \"127.0.0.1:0\"\n\
         [upstream]\nenabled = true\nservers = [\"mqtt://127.0.0.1:{dead}\"]\n\
         [[upstream.rules]]\npattern = \"capteurs/f/#\"\ndirection = \"out\"\nqos = 1\n\
         [buffer]\nmax_bytes = 1200\nwhen_full = \"drop_oldest\"\n\
         [[serial]]\nport = \"{}\"\nformat = \"kv\"\nreopen_min_ms = 20\nreopen_max_ms = 50\n",
        link.display(),
        dead = dead.port()
    ) + &sensor(
        "temperature-1-1",
        &format!("serial:{}", link.display()),
        "clermont",
        "temperature-1-1",
        "\"temperature\"",
    );
    let mut g = TestGateway::start(dir.path(), &cfg).await;
    let http = http_addr(&g);
    let before = scrape(http).await;
    assert_eq!(at(&before, "capteurs_healthy"), 1.0);
    assert_eq!(at(&before, "capteurs_upstream_connected"), 0.0);

    // MQTT: 7 at QoS 0, 5 at QoS 1, 3 at QoS 2, to a QoS 2 subscriber.
    let mut sub = RawClient::connect(g.addr, &ConnectOpts::new("sub")).await;
    sub.subscribe("test/#", QoS::ExactlyOnce).await;
    let mut publisher = RawClient::connect(g.addr, &ConnectOpts::new("pub")).await;
    for (qos, n) in [
        (QoS::AtMostOnce, 7),
        (QoS::AtLeastOnce, 5),
        (QoS::ExactlyOnce, 3),
    ] {
        for i in 0..n {
            publisher
                .publish("test/t", format!("{i}").as_bytes(), qos, false)
                .await;
            assert_eq!(sub.receive().await.qos, qos.value());
        }
    }
    // The buffer: 80 QoS 1 messages for the cloud, room for 50.
    for i in 0..80 {
        publisher
            .publish(
                &format!("capteurs/f/{i:03}"),
                b"0123456789",
                QoS::AtLeastOnce,
                true,
            )
            .await;
    }
    // The serial port: 300 lines, a fifth of them garbage or over-long.
    let Injected {
        good,
        garbage,
        overlong,
    } = sim_corrupt_serial(&sim_bin(), "kv", &link).await;

    let after = scrape_until(
        http,
        "capteurs_source_readings_published_total",
        good as f64,
    )
    .await;
    let delta = |key: &str| at(&after, key) - before.get(key).copied().unwrap_or(0.0);
    for (qos, n) in [("0", 7.0), ("1", 5.0 + 80.0), ("2", 3.0)] {
        assert_eq!(
            delta(&format!(
                "capteurs_broker_messages_received_total{{qos=\"{qos}\"}}"
            )),
            n,
            "received at QoS {qos}"
        );
    }
    for (qos, n) in [("0", 7.0), ("1", 5.0), ("2", 3.0)] {
        assert_eq!(
            delta(&format!(
                "capteurs_broker_messages_sent_total{{qos=\"{qos}\"}}"
            )),
            n,
            "sent at QoS {qos}"
        );
    }
    assert_eq!(at(&after, "capteurs_broker_connections"), 2.0);
    assert_eq!(
        at(
            &after,
            "capteurs_source_decode_errors_total{source=\"serial\",reason=\"garbage\"}"
        ),
        garbage as f64
    );
    assert_eq!(
        at(
            &after,
            "capteurs_source_decode_errors_total{source=\"serial\",reason=\"overlong\"}"
        ),
        overlong as f64
    );
    assert_eq!(
        at(
            &after,
            "capteurs_source_decode_errors_total{source=\"serial\",reason=\"unparsable\"}"
        ),
        0.0
    );
    let age = at(
        &after,
        "capteurs_sensor_last_reading_age_seconds{sensor=\"temperature-1-1\",grandeur=\"temperature\"}",
    );
    assert!((0.0..10.0).contains(&age), "{age}");
    assert_eq!(at(&after, "capteurs_buffer_messages"), 50.0);
    assert_eq!(at(&after, "capteurs_buffer_appended_total"), 80.0);
    assert_eq!(
        at(&after, "capteurs_buffer_dropped_total{reason=\"oldest\"}"),
        30.0
    );
    assert_eq!(
        at(&after, "capteurs_buffer_dropped_total{reason=\"newest\"}"),
        0.0
    );
    assert_eq!(at(&after, "capteurs_buffer_bytes"), 1200.0);
    let oldest = at(&after, "capteurs_buffer_oldest_age_seconds");
    assert!(oldest > 0.0 && oldest < 60.0, "{oldest}");
    assert!(at(&after, "capteurs_upstream_connect_failures_total") >= 1.0);
    assert_eq!(at(&after, "capteurs_upstream_acknowledged_total"), 0.0);

    // Unknown paths and methods get clear answers.
    assert_eq!(get(http, "/nope").await.0, 404);
    assert_eq!(get(http, "/health").await, (200, "ok\n".to_owned()));
    g.stop().await;
}

/// Runs Chromium headless on `url` with `args`; its stdout.
async fn chromium(profile: &std::path::Path, args: &[&str], url: &str) -> String {
    let mut cmd = tokio::process::Command::new("chromium");
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--hide-scrollbars",
        "--disable-extensions",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .args(args)
    .arg(url)
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(90), cmd.output())
        .await
        .expect("chromium within 90 s")
        .expect("chromium runs (tests/run.sh installs Debian's chromium)");
    assert!(
        out.status.success(),
        "chromium {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The status page of a gateway fed by `capteurs-sim ble`, as a browser
/// renders it: real values, battery, the cloud link and buffer, a chart;
/// the screenshot is kept in target/ for people to look at.
#[tokio::test]
async fn status_page_renders_real_values_in_headless_chromium() {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("adverts");
    let dead = ReservedPort::new();
    let cfg = format!(
        "[http]\nlisten = \"127.0.0.1:0\"\n[ble]\nreplay = \"{}\"\n\
         [upstream]\nenabled = true\nservers = [\"mqtt://127.0.0.1:{}\"]\n\
         [[upstream.rules]]\npattern = \"capteurs/#\"\ndirection = \"out\"\nqos = 1\n",
        link.display(),
        dead.port()
    ) + &sensor(
        "cuisine",
        "ble:A4:C1:38:CA:00:00",
        "Aubière",
        "Rue de la Chebarde",
        "\"temperature\", \"humidite\"",
    ) + &sensor(
        "salon",
        "ble:A4:C1:38:CA:00:01",
        "Aubière",
        "Rue de la Chebarde",
        "\"temperature\", \"humidite\"",
    );
    let mut g = TestGateway::start(dir.path(), &cfg).await;
    let http = http_addr(&g);
    let mut sub = RawClient::connect(g.addr, &ConnectOpts::new("phone")).await;
    sub.subscribe("capteurs/#", QoS::AtMostOnce).await;
    let (mut child, path) = sim_pty(
        &sim_bin(),
        &[
            "ble",
            "--advert",
            "atc1441",
            "--sensors",
            "2",
            "--period-ms",
            "50",
            "--count",
            "12",
            "--seed",
            "3",
        ],
    );
    std::os::unix::fs::symlink(&path, &link).unwrap();
    // 12 adverts x 2 readings; the last value of each topic wins.
    let mut last = HashMap::new();
    for _ in 0..24 {
        let m = sub.receive().await;
        last.insert(m.topic.clone(), String::from_utf8(m.payload).unwrap());
    }
    let _ = child.wait();
    // Its pty number is free for the next pty made (another test's): the
    // gateway must not reopen this name onto it.
    std::fs::remove_file(&link).unwrap();
    let (code, html) = get(http, "/").await;
    assert_eq!(code, 200);
    assert!(html.contains("http-equiv=\"refresh\""), "refreshes itself");
    assert!(!html.contains("<script"), "no JavaScript");

    let profile = dir.path().join("chromium");
    let url = format!("http://{http}/");
    let dom = chromium(&profile, &["--dump-dom"], &url).await;
    assert!(
        dom.contains("<span id=\"gateway-id\">capteurs</span>"),
        "{dom}"
    );
    assert!(dom.contains(&format!(
        "<span id=\"version\">{}</span>",
        env!("CARGO_PKG_VERSION")
    )));
    // Both sensors, every quantity, with the value last published.
    let (temps, hums) = (2, 2);
    assert_eq!(dom.matches("data-grandeur=\"temperature\"").count(), temps);
    assert_eq!(dom.matches("data-grandeur=\"humidite\"").count(), hums);
    for (topic, payload) in &last {
        let g = topic.split('/').nth(1).unwrap();
        let unit = if g == "temperature" { "°C" } else { "%" };
        let v = capteurs_gateway::ops::page::value(payload.parse().unwrap());
        assert!(
            dom.contains(&format!("<td class=\"num value\">{v} {unit}</td>")),
            "{topic} = {payload} not on the page: {dom}"
        );
    }
    assert!(
        dom.contains("Rue de la Chebarde, Aubière, FR"),
        "the place as configured"
    );
    assert_eq!(
        dom.matches("battery <span class=\"battery\">").count(),
        2,
        "the battery level of the ATC adverts"
    );
    assert!(
        dom.contains("<polyline") || dom.contains("<circle"),
        "a chart per reading"
    );
    assert!(
        dom.contains("id=\"upstream-state\">disconnected</b>"),
        "{dom}"
    );
    assert!(dom.contains("id=\"buffer-depth\">"), "the buffer gauge");
    assert!(dom.contains("<code>phone</code>"), "the connected client");

    // As a phone shows it.
    let shot = workspace().join("target/status-page.png");
    let _ = std::fs::remove_file(&shot);
    chromium(
        &profile,
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=412,1400",
        ],
        &url,
    )
    .await;
    let png = std::fs::read(&shot).expect("the screenshot is written");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG");
    assert!(png.len() > 10_000, "{} bytes: an empty page?", png.len());
    g.stop().await;
}

/// `capteurs-gateway status` prints the running gateway's summary; without
/// a listener it says where to turn it on.
#[tokio::test]
async fn status_command_prints_the_summary_of_the_running_gateway() {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("adverts");
    let cfg = format!(
        "[http]\nlisten = \"127.0.0.1:0\"\n[ble]\nreplay = \"{}\"\n",
        link.display()
    ) + &sensor(
        "cuisine",
        "ble:A4:C1:38:CA:00:00",
        "Aubière",
        "Rue de la Chebarde",
        "\"temperature\", \"humidite\"",
    );
    let mut g = TestGateway::start(dir.path(), &cfg).await;
    let http = http_addr(&g);
    let _client = RawClient::connect(g.addr, &ConnectOpts::new("thermostat")).await;
    let status = |args: Vec<String>| async move {
        tokio::process::Command::new(gateway_bin())
            .args(args)
            .output()
            .await
            .unwrap()
    };
    let out = status(vec![
        "status".into(),
        "--url".into(),
        format!("http://{http}"),
    ])
    .await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with(&format!(
            "capteurs-gateway {} \"capteurs\", up ",
            env!("CARGO_PKG_VERSION")
        )) && lines[0].ends_with(": healthy"),
        "{text}"
    );
    assert!(
        lines[1].starts_with(&format!("broker    {}: 1 clients, 1 sessions", g.addr)),
        "{text}"
    );
    assert_eq!(lines[2], "upstream  off");
    assert_eq!(lines[3], "sensors   1");
    assert!(
        lines[4].contains("cuisine") && lines[4].contains("never"),
        "{text}"
    );
    assert!(
        lines[4].ends_with("capteurs/temperature/fr/aubiere/rue_de_la_chebarde"),
        "{text}"
    );
    assert_eq!(*lines.last().unwrap(), "clients   thermostat");

    // --json is the page's summary as it comes.
    let out = status(vec![
        "status".into(),
        "--json".into(),
        "--url".into(),
        http.to_string(),
    ])
    .await;
    assert!(out.status.success());
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["sensors"][0]["id"], "cuisine");
    assert_eq!(j["broker"]["clients"][0], "thermostat");

    // A configuration with the listener off: the error says which key.
    let conf = dir.path().join("off.toml");
    std::fs::write(&conf, "[http]\nlisten = \"\"\n").unwrap();
    let out = status(vec![
        "--config".into(),
        conf.display().to_string(),
        "status".into(),
    ])
    .await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("[http] listen is empty"), "{err}");
    g.stop().await;
    // And a gateway that is not running: a clear error, exit 1.
    let out = status(vec!["status".into(), "--url".into(), http.to_string()]).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is the gateway running"));
}

/// Home Assistant discovery: every sensor quantity announced, retained, with
/// its device class, unit, state topic and the gateway's status as
/// availability.
#[tokio::test]
async fn home_assistant_discovery_announces_every_sensor_quantity() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = format!(
        "[homeassistant]\ndiscovery = true\n[ble]\nreplay = \"{}\"\n",
        dir.path().join("adverts").display()
    ) + &sensor(
        "cuisine",
        "ble:A4:C1:38:CA:00:09",
        "Aubière",
        "Rue de la Chebarde",
        "\"temperature\", \"humidite\", \"batterie\"",
    );
    let mut g = TestGateway::start(dir.path(), &cfg).await;
    let mut ha = RawClient::connect(g.addr, &ConnectOpts::new("homeassistant")).await;
    ha.subscribe("homeassistant/#", QoS::AtLeastOnce).await;
    let mut configs = HashMap::new();
    for _ in 0..3 {
        let m = ha.receive().await;
        assert!(
            m.retain,
            "retained: Home Assistant finds them when it starts"
        );
        let j: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        configs.insert(m.topic.clone(), j);
    }
    ha.expect_nothing().await;
    let status_topic = "capteurs/gateways/capteurs/status";
    for (g_, class, unit) in [
        ("temperature", "temperature", "°C"),
        ("humidite", "humidity", "%"),
        ("batterie", "battery", "%"),
    ] {
        let c = &configs[&format!("homeassistant/sensor/cuisine_{g_}/config")];
        assert_eq!(c["device_class"], class);
        assert_eq!(c["unit_of_measurement"], unit);
        assert_eq!(
            c["state_topic"],
            format!("capteurs/{g_}/fr/aubiere/rue_de_la_chebarde")
        );
        assert_eq!(c["availability_topic"], status_topic);
        assert_eq!(c["payload_available"], "online");
        assert_eq!(c["unique_id"], format!("capteurs_capteurs_cuisine_{g_}"));
        assert_eq!(c["device"]["name"], "cuisine");
    }
    // The availability topic says online, retained, on the gateway itself.
    let mut s = RawClient::connect(g.addr, &ConnectOpts::new("avail")).await;
    s.subscribe(status_topic, QoS::AtLeastOnce).await;
    let m = s.receive().await;
    assert_eq!((m.payload.as_slice(), m.retain), (&b"online"[..], true));
    g.stop().await;

    // Stopped cleanly, it says offline: kept with the retained messages.
    let store = rusqlite::Connection::open(dir.path().join("broker.sqlite")).unwrap();
    let (payload, qos): (Vec<u8>, u8) = store
        .query_row(
            "SELECT payload, qos FROM retained WHERE topic = ?1",
            [status_topic],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((payload.as_slice(), qos), (&b"offline"[..], 1));
}

/// The watchdog under systemd's protocol: fed while every stage beats, held
/// back (and the reason in STATUS=, /health 503) while the buffer's writer
/// is stuck in SQLite behind another process's write lock, fed again once
/// it is free.
#[test]
fn watchdog_is_withheld_while_the_buffer_writer_is_stuck() {
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let data = dir.path().join("data");
    let conf = dir.path().join("gw.toml");
    let dead = ReservedPort::new();
    std::fs::write(
        &conf,
        format!(
            "[gateway]\ndata_dir = {:?}\n[broker]\nlisten = \"127.0.0.1:0\"\n[http]\nlisten = \"127.0.0.1:0\"\n\
             [upstream]\nenabled = true\nservers = [\"mqtt://127.0.0.1:{}\"]\n\
             [[upstream.rules]]\npattern = \"#\"\ndirection = \"out\"\nqos = 1\n",
            data.display().to_string(),
            dead.port()
        ),
    )
    .unwrap();
    let mut child = std::process::Command::new(gateway_bin())
        .arg("--config")
        .arg(&conf)
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "2000000")
        .env("NO_COLOR", "1")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if let Some(a) = line
                .split("HTTP listener")
                .nth(1)
                .and_then(|l| l.split("addr=").nth(1))
            {
                let _ = tx.send(a.trim().parse::<SocketAddr>().unwrap());
            }
        }
    });
    let http = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the HTTP address in the log");
    let health = || capteurs_gateway::ops::http::get(http, "/health").unwrap();
    let mut buf = [0u8; 512];
    let mut recv = || {
        let n = sock.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let ready = recv();
    let addr: SocketAddr = ready
        .strip_prefix("READY=1\nSTATUS=listening on ")
        .unwrap_or_else(|| panic!("{ready:?}"))
        .parse()
        .unwrap();
    // Healthy: a ping every second (half of WatchdogSec=2s).
    for _ in 0..2 {
        assert_eq!(recv(), "WATCHDOG=1");
    }
    assert_eq!(health(), (200, "ok\n".to_owned()));

    // Another process takes SQLite's write lock on the buffer, and a QoS 0
    // message bound upstream makes the writer try to commit: it waits
    // inside SQLite.
    let db = rusqlite::Connection::open(data.join("buffer.sqlite")).unwrap();
    db.execute_batch("BEGIN IMMEDIATE").unwrap();
    {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut c = RawClient::connect(addr, &ConnectOpts::new("sensor")).await;
            c.publish("capteurs/t", b"21.5", QoS::AtMostOnce, false)
                .await;
            c.disconnect().await;
        });
    }
    let mut last_ping = Instant::now();
    let status = loop {
        let s = recv();
        if s != "WATCHDOG=1" {
            break s;
        }
        last_ping = Instant::now();
    };
    assert!(
        status.starts_with("STATUS=stuck: buffer writer silent for "),
        "{status:?}"
    );
    let (code, body) = health();
    assert_eq!(code, 503);
    assert!(
        body.starts_with("stuck: buffer writer silent for "),
        "{body}"
    );
    // No ping while it is stuck (systemd would restart it): the next one
    // comes only when SQLite gives up waiting (5 s) and the writer is back
    // in its loop, far more than the usual second after the last.
    assert_eq!(recv(), "WATCHDOG=1");
    let gap = last_ping.elapsed();
    assert!(gap >= Duration::from_secs(2), "pings {gap:?} apart");
    assert_eq!(recv(), "STATUS=running");

    // The lock goes: the writer commits, the pings keep their pace.
    db.execute_batch("COMMIT").unwrap();
    drop(db);
    let mut last = Instant::now();
    for _ in 0..4 {
        assert_eq!(recv(), "WATCHDOG=1");
        assert!(last.elapsed() < Duration::from_millis(1600));
        last = Instant::now();
    }
    assert_eq!(health().0, 200);
    let _ = child.kill();
    let _ = child.wait();
}

/// 32 idle sockets used to hold every slot of the HTTP listener: `/health`
/// waited for the first one's 5 s head timeout. Now the oldest idle one is
/// shed for each new connection.
#[tokio::test]
async fn idle_sockets_cannot_starve_health() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = TestGateway::start(dir.path(), "[http]\nlisten = \"127.0.0.1:0\"\n").await;
    let http = http_addr(&g);
    let mut idle = Vec::new();
    for _ in 0..64 {
        idle.push(tokio::net::TcpStream::connect(http).await.unwrap());
    }
    let started = Instant::now();
    assert_eq!(get(http, "/health").await, (200, "ok\n".to_owned()));
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(2500),
        "/health took {took:?} behind 64 idle sockets (the head timeout is 5 s)"
    );
    // The first idle ones were closed to make room.
    let mut first = idle.remove(0);
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(WAIT, tokio::io::AsyncReadExt::read(&mut first, &mut buf))
        .await
        .expect("the oldest idle socket was closed")
        .unwrap_or(0);
    assert_eq!(n, 0);
    g.stop().await;
}
