//! Sensor sources end to end: real pseudo-terminals as serial ports, BLE
//! adverts replayed from a pty, MQTT subscribers on the gateway.

use std::sync::atomic::Ordering;

use capteurs_tests::*;

const CHEBARDE: &str = "fr/aubiere/rue_de_la_chebarde";

/// A `[[sensors]]` entry at the course's address.
fn sensor(id: &str, source: &str, grandeurs: &str, extra: &str) -> String {
    format!(
        "[[sensors]]\nid = \"{id}\"\nsource = \"{source}\"\npays = \"FR\"\nville = \"Aubière\"\nrue = \"Rue de la Chebarde\"\ngrandeurs = [{grandeurs}]\n{extra}\n"
    )
}

fn serial(port: &std::path::Path, extra: &str) -> String {
    format!(
        "[[serial]]\nport = \"{}\"\nreopen_min_ms = 20\nreopen_max_ms = 200\n{extra}\n",
        port.display()
    )
}

async fn subscriber(g: &TestGateway, filter: &str) -> RawClient {
    let mut c = RawClient::connect(g.addr, &ConnectOpts::new("sub")).await;
    c.subscribe(filter, QoS::AtLeastOnce).await;
    c
}

fn text(m: &Received) -> (&str, &str) {
    (m.topic.as_str(), std::str::from_utf8(&m.payload).unwrap())
}

fn count(c: &std::sync::atomic::AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

#[tokio::test]
async fn serial_kv_lines_become_course_topics_retained() {
    let mut pty = Pty::open();
    let src = format!("serial:{}", pty.path.display());
    let cfg = serial(&pty.path, "format = \"kv\"")
        + &sensor("cuisine", &src, "\"temperature\", \"humidite\"", "");
    let dir = tempfile::tempdir().unwrap();
    let mut g = TestGateway::start(dir.path(), &cfg).await;
    let mut sub = subscriber(&g, "capteurs/+/fr/aubiere/rue_de_la_chebarde").await;
    pty.write(b"id=cuisine t=21.37 h=40\n");
    let t = format!("capteurs/temperature/{CHEBARDE}");
    let h = format!("capteurs/humidite/{CHEBARDE}");
    let m = sub.receive().await;
    assert_eq!(text(&m), (t.as_str(), "21.37"));
    let m = sub.receive().await;
    assert_eq!(text(&m), (h.as_str(), "40"));
    // Retained: a late subscriber (the course's point) gets the last value.
    pty.write(b"id=cuisine t=21.5 h=41\n");
    sub.receive().await;
    sub.receive().await;
    let mut late = RawClient::connect(g.addr, &ConnectOpts::new("late")).await;
    late.subscribe(&t, QoS::AtMostOnce).await;
    let m = late.receive().await;
    assert!(m.retain);
    assert_eq!(text(&m), (t.as_str(), "21.5"));
    assert_eq!(count(&g.sources().published), 4);
    g.stop().await;
}

#[tokio::test]
async fn every_line_format_and_every_kind_of_bad_input_counted_exactly() {
    let mut plain = Pty::open();
    let mut kv = Pty::open();
    let mut json = Pty::open();
    let cfg = serial(&plain.path, "format = \"plain\"\nmax_line_bytes = 64")
        + &serial(&kv.path, "format = \"kv\"\nchecksum = \"xor\"")
        + &serial(&json.path, "format = \"json\"")
        + &sensor(
            "salon",
            &format!("serial:{}", plain.path.display()),
            "\"temperature\"",
            "",
        )
        + &sensor(
            "cuisine",
            &format!("serial:{}", kv.path.display()),
            "\"temperature\", \"humidite\"",
            "payload = \"json\"",
        )
        + &sensor(
            "cave",
            &format!("serial:{}", json.path.display()),
            "\"pression\"",
            "",
        );
    let dir = tempfile::tempdir().unwrap();
    let mut g = TestGateway::start(dir.path(), &cfg).await;
    let mut sub = subscriber(&g, "capteurs/#").await;
    // plain: good, garbage, cut (runs into the next line), overlong,
    // not a number, out of range, good.
    plain.write(b"19.5\n\xff\xfe\xfa\n20.");
    plain.write(b"21.5\n");
    plain.write(&[b'9'; 100]);
    plain.write(b"\nchaud\n1e9\n20.5\n");
    // kv with checksums: good, bad checksum, unknown id, unexpected quantity.
    let ok = capteurs_gateway::sources::serial::lines::with_checksum("id=cuisine t=22.5 h=45");
    let bad = ok.replace("22.5", "23.5");
    let unknown = capteurs_gateway::sources::serial::lines::with_checksum("id=garage t=3");
    let co2 = capteurs_gateway::sources::serial::lines::with_checksum("id=cuisine co2=415");
    kv.write(format!("{ok}\n{bad}\n{unknown}\n{co2}\n").as_bytes());
    // json: good (hPa), bad JSON.
    json.write(b"{\"id\":\"cave\",\"pression\":1013.25}\n{\"id\":\"cave\",\n");
    let mut got = Vec::new();
    while got.len() < 5 {
        let m = sub.receive().await;
        if m.topic.starts_with("capteurs/discovery/") {
            continue;
        }
        got.push((
            m.topic.clone(),
            String::from_utf8(m.payload.clone()).unwrap(),
        ));
    }
    got.sort();
    let t = |g: &str| format!("capteurs/{g}/{CHEBARDE}");
    assert_eq!(got[0], (t("humidite"), got[0].1.clone()));
    let j: serde_json::Value = serde_json::from_str(&got[0].1).unwrap();
    assert_eq!(
        (
            j["value"].as_f64(),
            j["unit"].as_str(),
            j["sensor"].as_str()
        ),
        (Some(45.0), Some("%"), Some("cuisine"))
    );
    assert_eq!(got[1], (t("pression"), "1013.25".into()));
    assert_eq!(got[2], (t("temperature"), "19.5".into()));
    assert_eq!(got[3], (t("temperature"), "20.5".into()));
    let j: serde_json::Value = serde_json::from_str(&got[4].1).unwrap();
    assert_eq!(j["value"].as_f64(), Some(22.5));
    let s = g.sources().clone();
    eventually("every bad line counted", || count(&s.unparsable) == 3).await;
    assert_eq!(count(&s.published), 5);
    assert_eq!(count(&s.garbage), 1);
    assert_eq!(count(&s.overlong), 1);
    assert_eq!(count(&s.unparsable), 3, "cut line, 'chaud', bad JSON");
    assert_eq!(count(&s.out_of_range), 1);
    assert_eq!(count(&s.bad_checksum), 1);
    assert_eq!(count(&s.unknown_sensor), 1);
    assert_eq!(count(&s.unexpected_quantity), 1);
    // The unknown device was reported on the discovery topic.
    let mut disco = RawClient::connect(g.addr, &ConnectOpts::new("d")).await;
    disco
        .subscribe("capteurs/discovery/#", QoS::AtMostOnce)
        .await;
    kv.write(
        format!(
            "{}\n",
            capteurs_gateway::sources::serial::lines::with_checksum("id=grenier t=1")
        )
        .as_bytes(),
    );
    let m = disco.receive().await;
    assert_eq!(m.topic, "capteurs/discovery/serial/grenier");
    g.stop().await;
}

#[tokio::test]
async fn unplugged_and_replugged_port_is_reopened() {
    let dir = tempfile::tempdir().unwrap();
    // A stable name, like /dev/serial/by-id/…, pointing at the current pty.
    let link = dir.path().join("ttyCAPTEUR");
    let mut pty = Pty::open();
    std::os::unix::fs::symlink(&pty.path, &link).unwrap();
    let cfg = serial(&link, "")
        + &sensor(
            "salon",
            &format!("serial:{}", link.display()),
            "\"temperature\"",
            "",
        );
    let mut g = TestGateway::start(dir.path(), &cfg).await;
    let mut sub = subscriber(&g, "capteurs/temperature/#").await;
    pty.write(b"18.5\n");
    assert_eq!(text(&sub.receive().await).1, "18.5");
    // Unplug: the master goes away; the gateway sees the port lost.
    drop(pty);
    let s = g.sources().clone();
    eventually("the loss noticed", || count(&s.port_errors) >= 1).await;
    // Replug (as a new pty behind the same name).
    let mut pty = Pty::open();
    std::fs::remove_file(&link).unwrap();
    std::os::unix::fs::symlink(&pty.path, &link).unwrap();
    eventually("the port reopened", || count(&s.port_opens) >= 2).await;
    pty.write(b"19.25\n");
    assert_eq!(text(&sub.receive().await).1, "19.25");
    g.stop().await;
}

#[tokio::test]
async fn ble_adverts_decode_to_topics_and_duplicates_collapse() {
    let dir = tempfile::tempdir().unwrap();
    let mut pty = Pty::open();
    let cfg = format!("[ble]\nreplay = \"{}\"\n", pty.path.display())
        + &sensor(
            "balcon",
            "ble:A4:C1:38:02:83:F4",
            "\"temperature\", \"humidite\", \"batterie\"",
            "silence_timeout_secs = 1",
        )
        + &sensor(
            "bthome",
            "ble:54:48:E6:8F:80:A5",
            "\"temperature\", \"humidite\"",
            "key = \"231d39c1d7cc1ab1aee224cd096db932\"\npayload = \"json\"",
        )
        + &sensor(
            "ruuvi",
            "ble:CB:B8:33:4C:88:4F",
            "\"temperature\", \"humidite\", \"pression\"",
            "",
        );
    let mut g = TestGateway::start(dir.path(), &cfg).await;
    let mut sub = subscriber(&g, "capteurs/#").await;
    let atc = "A4:C1:38:02:83:F4 rssi=-61 svc=181A:A4C1380283F400A22F5F0BF819\n";
    pty.write(atc.as_bytes());
    pty.write(atc.as_bytes()); // the same frame again: collapsed
    pty.write(b"54:48:E6:8F:80:A5 rssi=-70 svc=FCD2:41A47266C95F730011223378237214\n");
    pty.write(b"CB:B8:33:4C:88:4F mfr=0499:0512FC5394C37C0004FFFC040CAC364200CDCBB8334C884F\n");
    pty.write(b"11:22:33:44:55:66 mfr=EC88:000341C26400\n"); // a Govee nobody listed
    pty.write(b"not an advert\n");
    let mut got = Vec::new();
    while got.len() < 8 {
        let m = sub.receive().await;
        if m.topic.starts_with("capteurs/discovery") || m.topic.starts_with("capteurs/status") {
            continue;
        }
        let g = m.topic.split('/').nth(1).unwrap().to_owned();
        got.push((g, String::from_utf8(m.payload.clone()).unwrap()));
    }
    let plain: Vec<(&str, &str)> = got.iter().map(|(g, p)| (g.as_str(), p.as_str())).collect();
    assert_eq!(
        &plain[..3],
        [
            ("temperature", "16.2"),
            ("humidite", "47"),
            ("batterie", "95")
        ]
    );
    let j: serde_json::Value = serde_json::from_str(plain[3].1).unwrap();
    assert_eq!(
        (plain[3].0, j["value"].as_f64(), j["rssi"].as_i64()),
        ("temperature", Some(25.06), Some(-70))
    );
    let j: serde_json::Value = serde_json::from_str(plain[4].1).unwrap();
    assert_eq!((plain[4].0, j["value"].as_f64()), ("humidite", Some(50.55)));
    assert_eq!(
        &plain[5..],
        [
            ("temperature", "24.3"),
            ("humidite", "53.49"),
            ("pression", "1000.44")
        ]
    );
    let s = g.sources().clone();
    eventually("all adverts handled", || {
        count(&s.unparsable) == 1 && count(&s.unknown_sensor) == 1
    })
    .await;
    assert_eq!(count(&s.collapsed), 1);
    assert_eq!(count(&s.published), 8, "atc 3 + bthome 2 + ruuvi 3");
    assert_eq!(count(&s.decrypt_failed), 0);
    // Silent for more than 1 s: a status message.
    let mut st = RawClient::connect(g.addr, &ConnectOpts::new("st")).await;
    st.subscribe("capteurs/status/balcon", QoS::AtMostOnce)
        .await;
    let m = st.receive().await;
    assert_eq!(text(&m), ("capteurs/status/balcon", "silent"));
    g.stop().await;
}

#[tokio::test]
async fn a_paho_subscriber_gets_every_reading_at_the_course_address() {
    let mut pty = Pty::open();
    let src = format!("serial:{}", pty.path.display());
    let cfg = serial(&pty.path, "format = \"json\"")
        + &sensor("cuisine", &src, "\"temperature\", \"humidite\"", "");
    let dir = tempfile::tempdir().unwrap();
    let mut g = TestGateway::start(dir.path(), &cfg).await;
    // paho-mqtt 1.6, the course's API, with the course's wildcard example.
    let script = r#"
import sys
import paho.mqtt.client as mqtt
seen = []
def on_connect(c, u, f, rc):
    c.subscribe("capteurs/+/fr/aubiere/rue_de_la_chebarde", qos=0)
def on_subscribe(c, u, mid, q):
    print("subscribed", flush=True)
def on_message(c, u, msg):
    print(msg.topic, msg.payload.decode(), flush=True)
    seen.append(msg)
    if len(seen) == 2:
        c.disconnect()
c = mqtt.Client()
c.on_connect, c.on_subscribe, c.on_message = on_connect, on_subscribe, on_message
c.connect("127.0.0.1", int(sys.argv[1]))
c.loop_forever()
"#;
    let mut child = tokio::process::Command::new(python())
        .args(["-u", "-c", script, &g.addr.port().to_string()])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut out = tokio::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    use tokio::io::AsyncBufReadExt;
    tokio::time::timeout(WAIT, out.read_line(&mut line))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(line.trim(), "subscribed");
    pty.write(b"{\"id\":\"cuisine\",\"temperature\":21.37,\"humidite\":40.5}\n");
    let mut rest = String::new();
    tokio::time::timeout(
        WAIT,
        tokio::io::AsyncReadExt::read_to_string(&mut out, &mut rest),
    )
    .await
    .expect("paho got both readings and disconnected")
    .unwrap();
    let mut lines: Vec<&str> = rest.lines().collect();
    lines.sort();
    assert_eq!(
        lines,
        [
            "capteurs/humidite/fr/aubiere/rue_de_la_chebarde 40.5",
            "capteurs/temperature/fr/aubiere/rue_de_la_chebarde 21.37"
        ]
    );
    g.stop().await;
}

/// `min_interval_ms` and `change_threshold`: a reading is published when the
/// interval has passed or the value moved by the threshold, and collapsed
/// (counted) otherwise.
#[tokio::test]
async fn readings_within_the_interval_publish_only_past_the_change_threshold() {
    let mut pty = Pty::open();
    let src = format!("serial:{}", pty.path.display());
    let cfg = serial(&pty.path, "format = \"plain\"")
        + &sensor(
            "cave",
            &src,
            "\"temperature\"",
            "min_interval_ms = 600000\nchange_threshold = 1.0",
        );
    let dir = tempfile::tempdir().unwrap();
    let mut g = TestGateway::start(dir.path(), &cfg).await;
    let mut sub = subscriber(&g, "capteurs/temperature/#").await;
    // The first always goes; then within the 10 minutes only a change of 1.0
    // or more does, measured from the last published value.
    pty.write(b"20.0\n20.4\n20.9\n21.0\n21.5\n19.9\n");
    let topic = format!("capteurs/temperature/{CHEBARDE}");
    for want in ["20", "21", "19.9"] {
        let m = sub.receive().await;
        assert_eq!(text(&m), (topic.as_str(), want));
    }
    let s = g.sources().clone();
    eventually("three collapsed", || count(&s.collapsed) == 3).await;
    assert_eq!(count(&s.published), 3);
    sub.expect_nothing().await;
    g.stop().await;
}

/// A BLE replay FIFO with no writer blocked shutdown for as long as nobody
/// wrote: open(2) of a FIFO waits for a writer, and it was not inside any
/// `select!`. Writers that come and go are all read.
#[tokio::test]
async fn a_replay_fifo_without_a_writer_does_not_hold_up_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("adverts");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let cfg = format!("[ble]\nreplay = \"{}\"\n", fifo.display())
        + &sensor("balcon", "ble:A4:C1:38:02:83:F4", "\"temperature\"", "")
        + &sensor("ruuvi", "ble:CB:B8:33:4C:88:4F", "\"temperature\"", "");
    let mut g = TestGateway::start(dir.path(), &cfg).await;
    let mut sub = subscriber(&g, "capteurs/temperature/#").await;
    let write = |line: &'static str| {
        let fifo = fifo.clone();
        tokio::task::spawn_blocking(move || {
            use std::io::Write;
            let mut w = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
            w.write_all(line.as_bytes()).unwrap();
        })
    };
    write("A4:C1:38:02:83:F4 rssi=-61 svc=181A:A4C1380283F400A22F5F0BF819\n")
        .await
        .unwrap();
    assert_eq!(text(&sub.receive().await).1, "16.2");
    // The first writer is gone; a second one is read all the same.
    write("CB:B8:33:4C:88:4F mfr=0499:0512FC5394C37C0004FFFC040CAC364200CDCBB8334C884F\n")
        .await
        .unwrap();
    assert_eq!(text(&sub.receive().await).1, "24.3");
    tokio::time::timeout(WAIT, g.stop())
        .await
        .expect("shutdown does not wait for a FIFO writer");

    // The gateway process with nobody writing at all: the FIFO opens at
    // once, and SIGTERM ends it.
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!("[gateway]\ndata_dir = \"data\"\n[broker]\nlisten = \"127.0.0.1:0\"\n{cfg}"),
    )
    .unwrap();
    let mut gw = GatewayProcess::start(&config);
    eventually("the FIFO opened without a writer", || {
        gw.logged("BLE replay input open").is_some()
    })
    .await;
    let status = gw.terminate(WAIT).await;
    assert!(status.success(), "{status:?}");
}

/// The replay lines `capteurs-sim ble` writes for one sensor
/// (A4:C1:38:CA:00:00, frame counters 0, 1, 2…).
fn sim_adverts(format: &str, count: u32) -> Vec<String> {
    let out = std::process::Command::new(sim_bin())
        .args([
            "ble",
            "--advert",
            format,
            "--sensors",
            "1",
            "--period-ms",
            "10",
            "--seed",
            "7",
        ])
        .args(["--count", &count.to_string()])
        .output()
        .expect("capteurs-sim runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("A4:C1:38:CA:00:00 "))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// A sensor with a key used to accept plaintext BTHome from its address,
/// custom-firmware frames from any advertiser naming its address, and any
/// counter but the last one. Now: encrypted BTHome from its own address,
/// with a counter that increases, and nothing else.
#[tokio::test]
async fn a_sensor_with_a_key_hears_only_fresh_encrypted_frames_from_itself() {
    let dir = tempfile::tempdir().unwrap();
    let mut pty = Pty::open();
    let cfg = format!("[ble]\nreplay = \"{}\"\n", pty.path.display())
        + &sensor(
            "chiffre",
            "ble:A4:C1:38:CA:00:00",
            "\"temperature\"",
            "key = \"231d39c1d7cc1ab1aee224cd096db932\"\nretain = false",
        );
    let encrypted = sim_adverts("bthome-encrypted", 3);
    let plain = sim_adverts("bthome", 1);
    let atc = sim_adverts("atc1441", 1);
    let mut g = TestGateway::start(dir.path(), &cfg).await;
    let mut sub = subscriber(&g, "capteurs/temperature/#").await;
    let s = g.sources().clone();
    pty.write(encrypted[1].as_bytes());
    sub.receive().await;
    pty.write(encrypted[0].as_bytes()); // older: a replay
    pty.write(encrypted[1].as_bytes()); // the same: a repeat
    pty.write(plain[0].as_bytes()); // plaintext from its address
    pty.write(atc[0].as_bytes()); // custom firmware from its address
                                  // Custom firmware from another advertiser, naming the sensor's address.
    pty.write(
        atc[0]
            .replacen("A4:C1:38:CA:00:00", "11:22:33:44:55:66", 1)
            .as_bytes(),
    );
    pty.write(encrypted[2].as_bytes());
    sub.receive().await;
    sub.expect_nothing().await;
    assert_eq!(count(&s.replayed), 1);
    assert_eq!(count(&s.unauthenticated), 3);
    assert_eq!(count(&s.collapsed), 1);
    assert_eq!(count(&s.published), 2);
    g.stop().await;
}
