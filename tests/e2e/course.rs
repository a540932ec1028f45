//! The course's own paho-mqtt 1.6 scripts (part IV, exercises A–G, in
//! `tests/course/`) against the gateway configured as the classroom: each
//! test checks what the course says the student should see.

use std::process::Stdio;
use std::time::Duration;

use capteurs_gateway::broker::router::Metrics;
use capteurs_tests::*;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

/// The interpreter with paho-mqtt 1.6: `$CAPTEURS_PYTHON` (set by
/// tests/run.sh) or the workspace's `.venv`.
fn python() -> String {
    if let Ok(p) = std::env::var("CAPTEURS_PYTHON") {
        return p;
    }
    let venv = workspace().join(".venv/bin/python3");
    assert!(
        venv.exists(),
        "no Python with paho-mqtt: run tests/run.sh, or set CAPTEURS_PYTHON to an interpreter with paho-mqtt==1.6.1"
    );
    venv.display().to_string()
}

/// A running course script and what it printed so far.
struct Script {
    name: String,
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    seen: Vec<String>,
}

impl Script {
    fn spawn(name: &str, broker: &TestBroker, args: &[&str]) -> Script {
        let path = workspace().join("tests/course").join(name);
        let mut child = Command::new(python())
            .arg("-u")
            .arg(&path)
            .args([
                "--host",
                "127.0.0.1",
                "--port",
                &broker.addr.port().to_string(),
            ])
            .args(args)
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", path.display()));
        let lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        Script {
            name: name.into(),
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for the next line containing `pattern`; fails with everything
    /// the script printed if it does not come within [`WAIT`].
    async fn expect(&mut self, pattern: &str) -> String {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let next = tokio::time::timeout_at(deadline, self.lines.next_line()).await;
            match next {
                Ok(Ok(Some(line))) => {
                    self.seen.push(line.clone());
                    if line.contains(pattern) {
                        return line;
                    }
                }
                Ok(Ok(None)) | Ok(Err(_)) => {
                    panic!(
                        "{} ended without printing {pattern:?}; it printed:\n{}",
                        self.name,
                        self.seen.join("\n")
                    )
                }
                Err(_) => panic!(
                    "{} did not print {pattern:?} in time; it printed:\n{}",
                    self.name,
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Waits for the script to exit by itself; returns every line it printed.
    async fn finish(mut self) -> Vec<String> {
        let rest = tokio::time::timeout(WAIT, async {
            while let Ok(Some(line)) = self.lines.next_line().await {
                self.seen.push(line);
            }
            self.child.wait().await
        })
        .await;
        match rest {
            Ok(Ok(status)) => assert!(
                status.success(),
                "{} failed ({status}):\n{}",
                self.name,
                self.seen.join("\n")
            ),
            other => panic!(
                "{} did not exit: {other:?}\n{}",
                self.name,
                self.seen.join("\n")
            ),
        }
        self.seen
    }

    /// SIGKILL: the "arrêt brutal" of exercise E.
    async fn kill(mut self) {
        self.child.kill().await.expect("kill");
    }
}

async fn classroom() -> TestBroker {
    TestBroker::start(classroom_auth(), |s| {
        s.sys_interval = Duration::from_millis(500)
    })
    .await
}

fn prof() -> ConnectOpts {
    ConnectOpts::new("test-prof").login("prof", "isimaProf")
}

#[tokio::test]
async fn a_connect() {
    let b = classroom().await;
    let s = Script::spawn("ex_a_connect.py", &b, &["--group", "1"]);
    let out = s.finish().await;
    assert!(
        out.contains(&"Connected with result code => Connection Accepted.".to_string()),
        "{out:?}"
    );
    let s = Script::spawn(
        "ex_a_connect.py",
        &b,
        &["--group", "1", "--password", "isimaG2"],
    );
    let out = s.finish().await;
    assert!(
        out.contains(
            &"Connected with result code => Connection Refused: bad user name or password."
                .to_string()
        ),
        "{out:?}"
    );
    let s = Script::spawn("ex_a_connect.py", &b, &["--username", ""]);
    let out = s.finish().await;
    assert!(
        out.contains(
            &"Connected with result code => Connection Refused: not authorised.".to_string()
        ),
        "{out:?}"
    );
}

#[tokio::test]
async fn b_subscribe() {
    let b = classroom().await;
    let mut s = Script::spawn("ex_b_subscribe.py", &b, &["--group", "3", "--count", "2"]);
    s.expect("Connected with result code => Connection Accepted.")
        .await;
    s.expect("Subscribed: 1 (0,)").await;
    let mut p = RawClient::connect(b.addr, &prof()).await;
    p.publish("isima/G3", b"21.5", QoS::AtLeastOnce, false)
        .await;
    p.publish("isima/G4", b"not for G3's topic", QoS::AtMostOnce, false)
        .await;
    p.publish("isima/G3", b"22.0", QoS::AtMostOnce, false).await;
    s.expect("Received message 'b'21.5'' on topic 'isima/G3' with QoS 0")
        .await;
    s.expect("Received message 'b'22.0'' on topic 'isima/G3' with QoS 0")
        .await;
    let out = s.finish().await;
    assert!(!out.iter().any(|l| l.contains("isima/G4")), "{out:?}");
}

#[tokio::test]
async fn c_publish_with_denied_topics() {
    let b = classroom().await;
    let mut watcher = RawClient::connect(b.addr, &prof()).await;
    watcher.subscribe("isima/#", QoS::AtMostOnce).await;
    let topics = [
        "isima/G1",
        "isima/G2",
        "isima/G1/sensor1",
        "isima",
        "my_topic",
    ];
    let mut args = vec!["--group", "1"];
    for t in &topics {
        args.extend(["--topic", t]);
    }
    let s = Script::spawn("ex_c_publish.py", &b, &args);
    let out = s.finish().await;
    // QoS 0: paho reports every publish as sent (MQTT 3.1.1 has no negative ack)...
    assert_eq!(
        out.iter().filter(|l| l.ends_with(": No error.")).count(),
        5,
        "{out:?}"
    );
    assert_eq!(
        out.iter()
            .filter(|l| l.starts_with("-- on_publish callback -- mid: "))
            .count(),
        5,
        "{out:?}"
    );
    // ...but only the group's own topics reach subscribers, the student's too.
    assert!(
        out.contains(&"Received message 'b'TEST_G1'' on topic 'isima/G1' with QoS 0".to_string()),
        "{out:?}"
    );
    assert!(
        out.contains(
            &"Received message 'b'TEST_G1'' on topic 'isima/G1/sensor1' with QoS 0".to_string()
        ),
        "{out:?}"
    );
    assert!(
        !out.iter()
            .any(|l| l.contains("on topic 'isima/G2'") || l.contains("on topic 'isima'")),
        "{out:?}"
    );
    assert_eq!(watcher.receive().await.topic, "isima/G1");
    assert_eq!(watcher.receive().await.topic, "isima/G1/sensor1");
    watcher.expect_nothing().await;
    assert_eq!(
        Metrics::get(&b.handle().metrics().publish_denied),
        3,
        "isima/G2, isima and my_topic refused"
    );
}

#[tokio::test]
async fn d_retained_message_and_its_deletion() {
    let b = classroom().await;
    let mut s = Script::spawn("ex_d_retained.py", &b, &["--group", "2", "--wait", "0.5"]);
    s.expect("-- subscribing after the retained publish").await;
    s.expect("Received message b'retained_G2' on topic isima/G2 with QoS 0")
        .await;
    s.expect("This is a retained message").await;
    s.expect("-- subscribing after the deletion").await;
    let out = s.finish().await;
    let after = out
        .iter()
        .skip_while(|l| !l.contains("after the deletion"))
        .cloned()
        .collect::<Vec<_>>();
    assert!(
        !after.iter().any(|l| l.starts_with("Received message")),
        "deleted message came back: {out:?}"
    );
    let mut late = RawClient::connect(b.addr, &prof()).await;
    late.subscribe("isima/G2", QoS::AtMostOnce).await;
    late.expect_nothing().await;
}

#[tokio::test]
async fn e_last_will_on_a_killed_client_only() {
    let b = classroom().await;
    let mut watcher = RawClient::connect(b.addr, &prof()).await;
    watcher.subscribe("isima/#", QoS::AtMostOnce).await;
    let mut s = Script::spawn("ex_e_will.py", &b, &["--group", "5", "--disconnect"]);
    s.expect("Connection Accepted.").await;
    s.finish().await;
    watcher.expect_nothing().await;
    let mut s = Script::spawn("ex_e_will.py", &b, &["--group", "5"]);
    s.expect("-- waiting to be killed").await;
    s.kill().await;
    let will = watcher.receive().await;
    assert_eq!(
        (will.topic.as_str(), &will.payload[..]),
        ("isima/G5/LWT", &b"G5 Lost Connection"[..])
    );
}

#[tokio::test]
async fn f_persistent_session_gets_missed_messages() {
    let b = classroom().await;
    let mut s = Script::spawn(
        "ex_f_persistent.py",
        &b,
        &["--group", "6", "--client-id", "G6_ID", "--subscribe"],
    );
    s.expect("session present: 0").await;
    s.expect("Subscribed: 1 (1,)").await;
    s.finish().await;
    let mut p = RawClient::connect(b.addr, &prof()).await;
    for i in 0..5 {
        p.publish(
            "isima/G6",
            format!("missed {i}").as_bytes(),
            QoS::AtLeastOnce,
            false,
        )
        .await;
    }
    let mut s = Script::spawn(
        "ex_f_persistent.py",
        &b,
        &["--group", "6", "--client-id", "G6_ID", "--count", "5"],
    );
    s.expect("session present: 1").await;
    for i in 0..5 {
        s.expect(&format!(
            "Received message 'b'missed {i}'' on topic 'isima/G6' with QoS 1"
        ))
        .await;
    }
    s.finish().await;
}

#[tokio::test]
async fn g_the_course_publisher() {
    let b = classroom().await;
    let mut watcher = RawClient::connect(b.addr, &prof().keep_alive(0)).await;
    watcher.subscribe("isima/#", QoS::AtMostOnce).await;
    let mut s = Script::spawn(
        "ex_g_publisher.py",
        &b,
        &["--rounds", "2", "--period", "0.5"],
    );
    s.expect("-- on_connect callback -- Connection returned result: Connection Accepted.")
        .await;
    let version = s.expect("on topic '$SYS/broker/version'").await;
    assert!(version.contains("capteurs-gateway"), "{version}");
    s.expect("This is a retained message").await;
    s.expect("-- rounds done").await;
    // Two rounds of four temperatures in [5, 25], after the empty retained clears.
    let mut values = Vec::new();
    while values.len() < 8 {
        let m = watcher.receive().await;
        if m.payload.is_empty() {
            continue;
        }
        let v: f64 = String::from_utf8(m.payload)
            .unwrap()
            .parse()
            .expect("a number, as the course's subscribers expect");
        assert!((5.0..=25.0).contains(&v), "{v}");
        values.push(v);
    }
    // Retained: a student arriving now gets the four last values at once.
    let mut student =
        RawClient::connect(b.addr, &ConnectOpts::new("g7").login("G7", "isimaG7")).await;
    student.subscribe("isima/+", QoS::AtMostOnce).await;
    let mut topics: Vec<String> = Vec::new();
    for _ in 0..4 {
        let m = student.receive().await;
        assert!(m.retain);
        topics.push(m.topic);
    }
    topics.sort();
    assert_eq!(topics, ["isima/G1", "isima/G2", "isima/G3", "isima/G4"]);
    // Killed: its will.
    s.kill().await;
    let will = watcher.receive().await;
    assert_eq!(
        (will.topic.as_str(), &will.payload[..]),
        ("isima/LWT", &b"Lost Connection"[..])
    );
}
