//! `capteurs-sim` as users run it: the real binary against our broker and
//! Debian's mosquitto over loopback, and against a real pseudo-terminal.
//!
//! Longer than 600 lines because it holds sixteen independent runs of the
//! binary, one per mode and option users rely on.

use std::collections::HashMap;
use std::io::Read;
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use capteurs_gateway::broker::router::Metrics;
use capteurs_tests::*;
use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

const SIM: &str = env!("CARGO_BIN_EXE_capteurs-sim");

/// A running `capteurs-sim` whose stdout lines arrive on a channel.
struct Sim {
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
    seen: Vec<String>,
}

impl Sim {
    fn spawn(args: &[&str]) -> Sim {
        let mut child = Command::new(SIM)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("capteurs-sim runs");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut r = tokio::io::BufReader::new(stdout).lines();
            while let Ok(Some(l)) = r.next_line().await {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Sim {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for a stdout line matching `f`; returns it.
    async fn line(&mut self, what: &str, f: impl Fn(&str) -> bool) -> String {
        let r = tokio::time::timeout(WAIT, async {
            while let Some(l) = self.lines.recv().await {
                self.seen.push(l.clone());
                if f(&l) {
                    return Some(l);
                }
            }
            None
        })
        .await;
        match r {
            Ok(Some(l)) => l,
            _ => panic!(
                "capteurs-sim never printed {what}; it printed {:#?}",
                self.seen
            ),
        }
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.id().expect("running").to_string();
        let ok = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} {pid}");
    }

    async fn exit_code(mut self) -> (i32, String) {
        let status = tokio::time::timeout(WAIT, self.child.wait())
            .await
            .expect("capteurs-sim exits")
            .unwrap();
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            use tokio::io::AsyncReadExt;
            let _ = e.read_to_string(&mut err).await;
        }
        (status.code().unwrap_or(-1), err)
    }
}

fn port(addr: SocketAddr) -> String {
    addr.port().to_string()
}

// ------------------------------------------------------------------ course

/// The course's publisher against a broker: connects, answers $SYS, leaves
/// the 4 retained temperatures a late subscriber sees, and its will fires
/// when it is killed.
async fn course_publisher(addr: SocketAddr, login: &[&str], watcher: ConnectOpts, version: &str) {
    let p = port(addr);
    let mut args = vec!["course", "--port", &p, "--period", "0.2"];
    args.extend_from_slice(login);
    let mut sim = Sim::spawn(&args);
    sim.line("the CONNACK", |l| {
        l == "-- on_connect callback -- Connection returned result: Connection Accepted."
    })
    .await;
    let sys = sim
        .line("the $SYS answer", |l| {
            l.contains("on topic '$SYS/broker/version'")
        })
        .await;
    assert!(
        sys.starts_with(&format!(
            "-- on_message callback -- Received message 'b'{version}"
        )) && sys.ends_with("' with QoS 0"),
        "{sys}"
    );
    sim.line("the retained flag", |l| l == "This is a retained message")
        .await;
    // paho's mids: 1 for the SUBSCRIBE, 2-5 clear the retained messages,
    // 6-9 the first round.
    sim.line("the first round's publish results", |l| {
        l == "Error return from publish of mid = 9 : No error."
    })
    .await;
    sim.line("the first round written", |l| {
        l == "-- on_publish callback -- mid: 9"
    })
    .await;

    // A broker may still have the first round unread in its socket when the
    // watcher subscribes (mosquitto on a loaded machine): then it holds no
    // retained message yet and every copy arrives live. Each attempt is a new
    // subscription, which gets the retained messages present at that moment.
    let mut attempts = 0;
    let mut w = loop {
        attempts += 1;
        let mut w = RawClient::connect(addr, &watcher).await;
        w.subscribe("isima/#", QoS::AtMostOnce).await;
        let mut retained = Vec::new();
        let mut live = 0;
        // Two live rounds without the 4 retained copies: the snapshot was
        // taken too early.
        while retained.len() < 4 && live < 8 {
            let m = w.receive().await;
            let v: f64 = std::str::from_utf8(&m.payload).unwrap().parse().unwrap();
            assert!((5.0..=25.0).contains(&v), "{v}");
            assert!(m.topic.starts_with("isima/G"), "{m:?}");
            if m.retain {
                retained.push(m.topic);
            } else {
                live += 1;
            }
        }
        retained.sort();
        if retained.len() == 4 {
            assert_eq!(retained, ["isima/G1", "isima/G2", "isima/G3", "isima/G4"]);
            break w;
        }
        assert!(
            attempts < 5,
            "no retained copies after {attempts} subscriptions"
        );
        w.disconnect().await;
    };

    sim.signal("-KILL");
    loop {
        let m = w.receive().await;
        if m.topic == "isima/LWT" {
            assert_eq!(m.payload, b"Lost Connection");
            assert!(!m.retain);
            break;
        }
        assert!(m.topic.starts_with("isima/G"), "{m:?}");
    }
}

#[tokio::test]
async fn course_against_the_classroom_gateway() {
    let b = TestBroker::start(classroom_auth(), |_| {}).await;
    course_publisher(
        b.addr,
        &["--username", "prof", "--password", "isimaProf"],
        ConnectOpts::new("G1-watch").login("G1", "isimaG1"),
        "capteurs-gateway",
    )
    .await;
}

#[tokio::test]
async fn course_against_mosquitto() {
    let m = Mosquitto::start().await;
    course_publisher(
        m.addr,
        &[],
        ConnectOpts::new("watch"),
        "mosquitto version 2.",
    )
    .await;
}

#[tokio::test]
async fn course_stopped_with_ctrl_c_disconnects_without_will() {
    let b = TestBroker::open().await;
    let mut w = RawClient::connect(b.addr, &ConnectOpts::new("watch")).await;
    w.subscribe("isima/LWT", QoS::AtMostOnce).await;
    let p = port(b.addr);
    let mut sim = Sim::spawn(&["course", "--port", &p, "--period", "0.1"]);
    sim.line("a publish result", |l| l.starts_with("Error return"))
        .await;
    sim.signal("-INT");
    let (code, err) = sim.exit_code().await;
    assert_eq!(code, 0, "{err}");
    w.expect_nothing().await;
}

#[tokio::test]
async fn course_with_a_wrong_password_says_why() {
    let b = TestBroker::start(classroom_auth(), |_| {}).await;
    let p = port(b.addr);
    let mut sim = Sim::spawn(&[
        "course",
        "--port",
        &p,
        "--username",
        "prof",
        "--password",
        "wrong",
    ]);
    sim.line("the refusal", |l| {
        l == "-- on_connect callback -- Connection returned result: Connection Refused: bad user name or password."
    })
    .await;
    let (code, err) = sim.exit_code().await;
    assert_ne!(code, 0);
    assert!(err.contains("refused the connection"), "{err}");
}

#[tokio::test]
async fn course_with_no_broker_says_where() {
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let p = port(free); // the listener is gone: nothing listens there
    let sim = Sim::spawn(&["course", "--port", &p]);
    let (code, err) = sim.exit_code().await;
    assert_ne!(code, 0);
    assert!(
        err.contains(&format!("cannot connect to 127.0.0.1:{p}")),
        "{err}"
    );
}

// ------------------------------------------------------------------- fleet

fn run_sim(args: &[&str]) -> String {
    let out = std::process::Command::new(SIM).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "capteurs-sim {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `--dry-run` lines: (virtual ms, topic, payload).
fn dry_run(args: &[&str]) -> Vec<(u64, String, String)> {
    run_sim(args)
        .lines()
        .map(|l| {
            let mut f = l.split_whitespace();
            let ms = f.next().unwrap().parse().unwrap();
            assert_eq!(f.next(), Some("ms"));
            (
                ms,
                f.next().unwrap().to_owned(),
                f.next().unwrap().to_owned(),
            )
        })
        .collect()
}

#[test]
fn fleet_is_deterministic_with_a_seed() {
    let scenario = format!("{}/configs/fleet-building.toml", workspace().display());
    let run = |seed: &str| {
        dry_run(&[
            "fleet",
            "--scenario",
            &scenario,
            "--seed",
            seed,
            "--dry-run",
            "200",
        ])
    };
    let (a, b, c) = (run("9"), run("9"), run("10"));
    assert_eq!(a.len(), 200);
    assert_eq!(a, b);
    assert_ne!(a, c);
    let topics: std::collections::HashSet<_> = a.iter().map(|r| r.1.as_str()).collect();
    assert!(topics.contains("capteurs/temperature/france/clermont/rue_chebarde"));
    assert!(topics.contains("capteurs/humidite/france/aubiere/rue_5"));
    assert!(topics.contains("isima/G2"));
}

#[tokio::test]
async fn fleet_publishes_what_its_seed_says() {
    let b = TestBroker::open().await;
    let mut w = RawClient::connect(b.addr, &ConnectOpts::new("watch")).await;
    w.subscribe("capteurs/temperature/#", QoS::AtLeastOnce)
        .await;
    let p = port(b.addr);
    let common = [
        "fleet",
        "--sensors",
        "3",
        "--period-ms",
        "25",
        "--seed",
        "5",
        "--qos",
        "1",
    ];
    let mut live = common.to_vec();
    live.extend([
        "--port",
        p.as_str(),
        "--connections",
        "2",
        "--duration",
        "1",
        "-q",
    ]);
    let sim = Sim::spawn(&live);
    let (code, err) = sim.exit_code().await;
    assert_eq!(code, 0, "{err}");
    // Every reading due in the first second, per sensor in order.
    let mut expected: HashMap<String, Vec<String>> = HashMap::new();
    let mut dry = common.to_vec();
    dry.extend(["--dry-run", "200"]);
    for (ms, topic, payload) in dry_run(&dry) {
        if ms < 1000 {
            expected.entry(topic).or_default().push(payload);
        }
    }
    let total: usize = expected.values().map(Vec::len).sum();
    assert!(total >= 100, "{total}");
    let mut got: HashMap<String, Vec<String>> = HashMap::new();
    while let Ok(Some(Packet::Publish(m))) = w.recv_within(QUIET).await {
        if let Some(id) = m.packet_id {
            w.send(Packet::PublishAck { packet_id: id }).await;
        }
        got.entry(m.topic.to_string())
            .or_default()
            .push(String::from_utf8(m.payload.to_vec()).unwrap());
    }
    assert_eq!(got, expected);
}

#[tokio::test]
async fn fleet_drop_fault_fires_the_will_then_resumes() {
    let b = TestBroker::open().await;
    let mut w = RawClient::connect(b.addr, &ConnectOpts::new("watch")).await;
    w.subscribe("capteurs/status/#", QoS::AtLeastOnce).await;
    let dir = tempfile::tempdir().unwrap();
    let scenario = dir.path().join("drop.toml");
    std::fs::write(
        &scenario,
        format!(
            "duration_secs = 1.5\n[mqtt]\nport = {}\npersistent = true\n\
             [[sensors]]\nperiod_ms = 50\nqos = 1\n\
             [[faults]]\nkind = \"drop\"\nat_secs = 0.3\nduration_secs = 0.3\n",
            b.addr.port()
        ),
    )
    .unwrap();
    let sim = Sim::spawn(&["fleet", "--scenario", scenario.to_str().unwrap(), "-q"]);
    let mut states = Vec::new();
    for _ in 0..4 {
        let m = w.receive().await;
        assert_eq!(m.topic, "capteurs/status/capteurs-sim-0");
        states.push(String::from_utf8(m.payload).unwrap());
    }
    // online, cut (the will), back (session resumed), clean stop.
    assert_eq!(states, ["online", "offline", "online", "offline"]);
    let (code, err) = sim.exit_code().await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(Metrics::get(&b.handle().metrics().wills_published), 1);
}

/// `burst` sends a sensor's readings at once, `silence` keeps one quiet:
/// a subscriber counts both.
#[tokio::test]
async fn fleet_burst_and_silence_faults_do_what_they_say() {
    let b = TestBroker::open().await;
    let mut w = RawClient::connect(b.addr, &ConnectOpts::new("watch")).await;
    w.subscribe("capteurs/temperature/#", QoS::AtMostOnce).await;
    let dir = tempfile::tempdir().unwrap();
    let scenario = dir.path().join("faults.toml");
    std::fs::write(
        &scenario,
        format!(
            "seed = 1\nduration_secs = 2.0\n[mqtt]\nport = {}\n\
             [[sensors]]\ncount = 2\nperiod_ms = 200\n\
             [[faults]]\nkind = \"silence\"\ntarget = 0\nat_secs = 0.0\nduration_secs = 10.0\n\
             [[faults]]\nkind = \"burst\"\ntarget = 1\nat_secs = 0.5\ncount = 30\n",
            b.addr.port()
        ),
    )
    .unwrap();
    let sim = Sim::spawn(&["fleet", "--scenario", scenario.to_str().unwrap(), "-q"]);
    let (code, err) = sim.exit_code().await;
    assert_eq!(code, 0, "{err}");
    let mut per_topic: HashMap<String, usize> = HashMap::new();
    while let Ok(Some(Packet::Publish(p))) = w.recv_within(QUIET).await {
        *per_topic.entry(p.topic.to_string()).or_default() += 1;
    }
    let silent = per_topic
        .get("capteurs/temperature/france/clermont/rue_1")
        .copied()
        .unwrap_or(0);
    let bursting = per_topic
        .get("capteurs/temperature/france/clermont/rue_2")
        .copied()
        .unwrap_or(0);
    assert_eq!(silent, 0, "{per_topic:?}");
    // About 10 in 2 s at 200 ms, plus the 30 of the burst.
    assert!((35..=45).contains(&bursting), "{per_topic:?}");
}

#[test]
fn fleet_scenario_errors_name_key_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[[sensors]]\ncount = 2\nperiode_ms = 100\n").unwrap();
    let out = std::process::Command::new(SIM)
        .args([
            "fleet",
            "--scenario",
            bad.to_str().unwrap(),
            "--dry-run",
            "1",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("periode_ms") && err.contains("line 3"),
        "{err}"
    );
}

// ------------------------------------------------------------------ serial

/// Starts `capteurs-sim serial --pty ...`; returns the process and the pty.
fn serial(args: &[&str]) -> (std::process::Child, std::fs::File) {
    // --quiet: stderr holds only the final counts.
    let mut all = vec!["serial", "--quiet"];
    all.extend_from_slice(args);
    let (child, path) = sim_pty(&all);
    let tty = std::fs::File::open(path).unwrap();
    (child, tty)
}

/// Reads from the pty until the simulator has exited and the pty is empty.
fn read_all(child: &mut std::process::Child, mut tty: std::fs::File) -> (Vec<u8>, String) {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            match tty.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.send(buf[..n].to_vec()).is_err() {
                        break;
                    }
                }
            }
        }
    });
    let mut out = Vec::new();
    // Ends with EIO once the simulator closed the pty.
    while let Ok(chunk) = rx.recv_timeout(WAIT) {
        out.extend(chunk);
    }
    let status = child.wait().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(status.success(), "{err}");
    (out, err)
}

#[test]
fn serial_lines_read_back_through_a_pty() {
    let sensors = ["--sensors", "2", "--period-ms", "10", "--seed", "3"];
    let mut args = vec!["--line-format", "json", "--count", "30"];
    args.extend(sensors);
    let (mut child, tty) = serial(&args);
    let (bytes, err) = read_all(&mut child, tty);
    let text = String::from_utf8(bytes).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 30, "{text}");
    assert!(err.contains("lines written 30: good 30"), "{err}");
    let mut dry = vec!["fleet", "--dry-run", "30"];
    dry.extend(sensors);
    let expected: Vec<String> = dry_run(&dry).into_iter().map(|r| r.2).collect();
    for (line, want) in lines.iter().zip(&expected) {
        let j: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(j["grandeur"], "temperature");
        assert_eq!(j["unit"], "°C");
        let v = j["value"].as_f64().unwrap();
        assert_eq!(v, want.parse::<f64>().unwrap(), "{line}");
    }
}

#[test]
fn serial_corruption_is_what_it_says() {
    let (mut child, tty) = serial(&[
        "--line-format",
        "kv",
        "--count",
        "60",
        "--corrupt-rate",
        "0.5",
        "--sensors",
        "1",
        "--period-ms",
        "5",
        "--seed",
        "11",
    ]);
    let (bytes, err) = read_all(&mut child, tty);
    // "lines written 60: good G, garbage A, cut B, overlong C"
    let nums: Vec<u64> = err
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap())
        .collect();
    let [written, good, garbage, cut, overlong] = nums[..] else {
        panic!("{err}")
    };
    assert_eq!(written, 60);
    assert_eq!(good + garbage + cut + overlong, 60);
    assert!(garbage > 0 && cut > 0 && overlong > 0, "{err}");
    let lines: Vec<&[u8]> = bytes.split(|b| *b == b'\n').collect();
    let non_utf8 = lines
        .iter()
        .filter(|l| std::str::from_utf8(l).is_err())
        .count();
    let long = lines.iter().filter(|l| l.len() > 8192).count();
    let clean = lines
        .iter()
        .filter(|l| l.starts_with(b"sensor=temperature-1-1 grandeur=temperature value="))
        .count();
    assert_eq!(non_utf8 as u64, garbage);
    assert_eq!(long as u64, overlong);
    // A cut line runs into the next one; every good line is intact.
    assert!(clean as u64 >= good - cut, "{clean} {good} {cut}");
}

// ------------------------------------------------------------------- bench

#[tokio::test]
async fn bench_counts_messages_the_broker_really_dropped() {
    // A tiny queue and no patience: the broker drops for the slow subscriber.
    let b = TestBroker::start(open_auth(), |s| {
        s.max_queued = 10;
        s.slow_subscriber_timeout = Duration::ZERO;
    })
    .await;
    let p = port(b.addr);
    let out = tokio::process::Command::new(SIM)
        .args([
            "bench",
            "--port",
            &p,
            "--publishers",
            "4",
            "--subscribers",
            "1",
            "--fan-in",
            "--qos",
            "1",
            "--duration",
            "1",
            "--json",
            "-q",
        ])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let dropped = Metrics::get(&b.handle().metrics().dropped_queue_full);
    assert!(dropped > 0, "the broker dropped nothing: {r}");
    assert_eq!(r["lost"].as_u64().unwrap(), dropped, "{r}");
    assert_eq!(r["duplicated"], 0);
    assert_eq!(
        r["received"].as_u64().unwrap() + dropped,
        r["expected_deliveries"].as_u64().unwrap()
    );
}

/// Starts `capteurs-sim <args> --pty` and returns it with its pty path.
fn sim_pty(args: &[&str]) -> (std::process::Child, String) {
    capteurs_tests::sim_pty(std::path::Path::new(SIM), args)
}

fn sensor_entry(id: &str, source: &str, grandeurs: &str, extra: &str) -> String {
    format!("[[sensors]]\nid = \"{id}\"\nsource = \"{source}\"\npays = \"fr\"\nville = \"clermont\"\nrue = \"{id}\"\ngrandeurs = [{grandeurs}]\n{extra}\n")
}

#[tokio::test]
async fn sim_serial_into_the_gateway_counts_match_what_was_injected() {
    use std::sync::atomic::Ordering::Relaxed;
    for format in ["plain", "kv", "json"] {
        let dir = tempfile::tempdir().unwrap();
        // The gateway waits on a stable name; the simulator's pty appears behind it.
        let link = dir.path().join("ttySIM");
        let cfg = format!(
            "[[serial]]\nport = \"{}\"\nformat = \"{format}\"\nreopen_min_ms = 20\nreopen_max_ms = 50\n",
            link.display()
        ) + &sensor_entry(
            "temperature-1-1",
            &format!("serial:{}", link.display()),
            "\"temperature\"",
            "",
        );
        let mut g = TestGateway::start(dir.path(), &cfg).await;
        let mut sub = RawClient::connect(g.addr, &ConnectOpts::new("sub")).await;
        sub.subscribe("capteurs/temperature/fr/clermont/#", QoS::AtMostOnce)
            .await;
        let mut got = 0u64;
        let stats = g.sources().clone();
        let Injected {
            good,
            garbage,
            overlong,
        } = sim_corrupt_serial(std::path::Path::new(SIM), format, &link).await;
        while got < good {
            let m = sub.receive().await;
            assert!(m.payload.iter().all(|b| b.is_ascii()), "{format}");
            got += 1;
        }
        assert_eq!(stats.published.load(Relaxed), good, "{format}");
        assert_eq!(stats.garbage.load(Relaxed), garbage, "{format}");
        assert_eq!(stats.overlong.load(Relaxed), overlong, "{format}");
        assert_eq!(stats.unparsable.load(Relaxed), 0, "{format}");
        g.stop().await;
    }
}

#[tokio::test]
async fn sim_ble_adverts_in_every_format_decode_in_the_gateway() {
    use std::sync::atomic::Ordering::Relaxed;
    for format in [
        "bthome",
        "bthome-encrypted",
        "atc1441",
        "pvvx",
        "ruuvi",
        "govee",
    ] {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("adverts");
        // A sensor with a key is heard only through encrypted BTHome: the
        // key goes with that format alone.
        let key = if format == "bthome-encrypted" {
            "key = \"231d39c1d7cc1ab1aee224cd096db932\""
        } else {
            ""
        };
        let q = "\"temperature\", \"humidite\", \"pression\"";
        let cfg = format!("[ble]\nreplay = \"{}\"\n", link.display())
            + &sensor_entry("s0", "ble:A4:C1:38:CA:00:00", q, key)
            + &sensor_entry("s1", "ble:A4:C1:38:CA:00:01", q, key);
        let mut g = TestGateway::start(dir.path(), &cfg).await;
        let mut sub = RawClient::connect(g.addr, &ConnectOpts::new("sub")).await;
        sub.subscribe("capteurs/+/fr/clermont/#", QoS::AtMostOnce)
            .await;
        // A FIFO the gateway holds open from its start: the simulator's
        // lines wait in the pipe until read, nothing is lost at either end
        // (a pty threw away what was left when the simulator closed it).
        let c = std::ffi::CString::new(link.to_str().unwrap()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let mut child = std::process::Command::new(SIM)
            .args(["ble", "--advert", format, "--repeat", "3", "--sensors", "2"])
            .args([
                "--period-ms",
                "100",
                "--count",
                "10",
                "--seed",
                "9",
                "--quiet",
            ])
            .arg("--output")
            .arg(&link)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let per_frame = if format == "ruuvi" { 3 } else { 2 };
        let mut temps = 0;
        for _ in 0..10 * per_frame {
            let m = sub.receive().await;
            let v: f64 = std::str::from_utf8(&m.payload).unwrap().parse().unwrap();
            if m.topic.starts_with("capteurs/temperature/") {
                assert!((5.0..=25.0).contains(&v), "{format}: {v}");
                temps += 1;
            }
        }
        assert_eq!(temps, 10, "{format}");
        let _ = child.wait();
        let s = g.sources().clone();
        assert_eq!(s.published.load(Relaxed), 10 * per_frame, "{format}");
        let collapsed = || s.collapsed.load(Relaxed);
        let replayed = || s.replayed.load(Relaxed);
        let unauth = || s.unauthenticated.load(Relaxed);
        let adverts = || s.adverts.load(Relaxed);
        let d = std::time::Instant::now() + WAIT;
        while collapsed() != 20 {
            assert!(
                std::time::Instant::now() < d,
                "{format}: collapsed {}, replayed {}, unauthenticated {}, adverts {}",
                collapsed(),
                replayed(),
                unauth(),
                adverts()
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(
            s.decrypt_failed.load(Relaxed) + s.undecodable.load(Relaxed),
            0
        );
        g.stop().await;
    }
}

/// The course's publisher clears the groups' retained messages when it
/// starts (empty retained publishes), as `prof_ISIMA`.
#[tokio::test]
async fn course_clears_the_retained_messages_first_as_prof_isima() {
    let b = TestBroker::open().await;
    let mut old = RawClient::connect(b.addr, &ConnectOpts::new("yesterday")).await;
    for g in 1..=4 {
        old.publish(&format!("isima/G{g}"), b"99", QoS::AtLeastOnce, true)
            .await;
    }
    let mut w = RawClient::connect(b.addr, &ConnectOpts::new("watch")).await;
    w.subscribe("isima/#", QoS::AtMostOnce).await;
    for _ in 1..=4 {
        let m = w.receive().await;
        assert!(m.retain && m.payload == b"99", "{m:?}");
    }
    // A long period: only the clearing happens within the test.
    let p = port(b.addr);
    let sim = Sim::spawn(&["course", "--port", &p, "--period", "60"]);
    let mut cleared = Vec::new();
    for _ in 1..=4 {
        let m = w.receive().await;
        assert!(m.payload.is_empty(), "{m:?}");
        cleared.push(m.topic);
    }
    cleared.sort();
    assert_eq!(cleared, ["isima/G1", "isima/G2", "isima/G3", "isima/G4"]);
    let clients = b.handle().view().router().connected_clients();
    assert!(clients.iter().any(|c| &**c == "prof_ISIMA"), "{clients:?}");
    // Nothing retained is left for a newcomer.
    let mut late = RawClient::connect(b.addr, &ConnectOpts::new("late")).await;
    late.subscribe("isima/#", QoS::AtMostOnce).await;
    late.expect_nothing().await;
    sim.signal("-INT");
    let (code, err) = sim.exit_code().await;
    assert_eq!(code, 0, "{err}");
}
