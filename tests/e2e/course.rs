//! The course's own paho-mqtt 1.6 scripts (part IV, exercises A–G, in
//! `tests/course/`) against the gateway configured as the classroom: each
//! test checks what the course says the student should see.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use capteurs_gateway::broker::router::Metrics;
use capteurs_tests::*;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};
use tokio::task::JoinHandle;

/// A running course script and what it printed so far.
struct Script {
    name: String,
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    seen: Vec<String>,
    stderr: Arc<Mutex<String>>,
    stderr_reader: JoinHandle<()>,
}

impl Script {
    /// Runs `tests/course/<name>` against `broker` with `args`.
    fn spawn(name: &str, broker: &TestBroker, args: &[&str]) -> Script {
        let path = workspace().join("tests/course").join(name);
        let mut child = Command::new(python())
            .arg("-u")
            .arg(&path)
            .args(["--host", "127.0.0.1", "--port"])
            .arg(broker.addr.port().to_string())
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", path.display()));
        let lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        // Collected on the side (a traceback explains a failure).
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err = BufReader::new(child.stderr.take().expect("stderr")).lines();
        let sink = stderr.clone();
        let stderr_reader = tokio::spawn(async move {
            while let Ok(Some(line)) = err.next_line().await {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        Script {
            name: format!("{name} {}", args.join(" ")),
            child,
            lines,
            seen: Vec::new(),
            stderr,
            stderr_reader,
        }
    }

    /// Once the script has ended: waits (briefly) until its stderr is read.
    async fn exited(&mut self) {
        let _ = self.child.wait().await;
        let _ = tokio::time::timeout(Duration::from_secs(1), &mut self.stderr_reader).await;
    }

    /// Everything the script printed so far, for failure messages.
    fn transcript(&self) -> String {
        format!(
            "-- stdout:\n{}\n-- stderr:\n{}",
            self.seen.join("\n"),
            self.stderr.lock().unwrap()
        )
    }

    /// Waits for the next line containing `pattern`; fails with everything
    /// the script printed if it does not come within [`WAIT`].
    async fn expect(&mut self, pattern: &str) -> String {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.lines.next_line()).await {
                Ok(Ok(Some(line))) => {
                    self.seen.push(line.clone());
                    if line.contains(pattern) {
                        return line;
                    }
                }
                Ok(_) => {
                    self.exited().await;
                    panic!(
                        "{} ended without printing {pattern:?}\n{}",
                        self.name,
                        self.transcript()
                    )
                }
                Err(_) => panic!(
                    "{} did not print {pattern:?} within {WAIT:?}\n{}",
                    self.name,
                    self.transcript()
                ),
            }
        }
    }

    /// Waits for the script to exit by itself, successfully; returns every
    /// line it printed.
    async fn finish(mut self) -> Vec<String> {
        let rest = tokio::time::timeout(WAIT, async {
            while let Ok(Some(line)) = self.lines.next_line().await {
                self.seen.push(line);
            }
            self.child.wait().await
        })
        .await;
        match rest {
            Ok(Ok(status)) if status.success() => {}
            Ok(status) => {
                self.exited().await;
                panic!("{} failed: {status:?}\n{}", self.name, self.transcript())
            }
            Err(_) => panic!(
                "{} did not exit within {WAIT:?}\n{}",
                self.name,
                self.transcript()
            ),
        }
        self.seen
    }

    /// The lines printed so far (read by [`Script::expect`]).
    fn printed(&self) -> &[String] {
        &self.seen
    }

    /// SIGKILL: the "arrêt brutal" of exercise E (no DISCONNECT is sent).
    async fn kill(mut self) {
        self.child.kill().await.expect("kill");
    }
}

/// Asserts `out` has the exact line `line`.
fn assert_printed(out: &[String], line: &str) {
    assert!(
        out.iter().any(|l| l == line),
        "expected the line {line:?} in:\n{}",
        out.join("\n")
    );
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
    // The group's login, a wrong password (CONNACK 4), no login at all (CONNACK 5).
    for (args, connack) in [
        (&["--group", "1"][..], "Connection Accepted."),
        (
            &["--group", "1", "--password", "isimaG2"],
            "Connection Refused: bad user name or password.",
        ),
        (&["--username", ""], "Connection Refused: not authorised."),
    ] {
        let out = Script::spawn("ex_a_connect.py", &b, args).finish().await;
        assert_printed(&out, &format!("Connected with result code => {connack}"));
    }
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
    let mut s = Script::spawn("ex_c_publish.py", &b, &args);
    s.expect("Subscribed: 1 (0,)").await;
    // The group's own topics come back to the student's isima/# subscription...
    s.expect("Received message 'b'TEST_G1'' on topic 'isima/G1' with QoS 0")
        .await;
    s.expect("Received message 'b'TEST_G1'' on topic 'isima/G1/sensor1' with QoS 0")
        .await;
    let out = s.finish().await;
    // ...QoS 0: paho reports every publish as sent (MQTT 3.1.1 has no
    // negative ack; mid 1 was the SUBSCRIBE)...
    for mid in 2..=6 {
        assert_printed(
            &out,
            &format!("Error return from publish of mid = {mid} : No error."),
        );
        assert_printed(&out, &format!("-- on_publish callback -- mid: {mid}"));
    }
    // ...but the other group's topic, "isima" and "my_topic" reach no one.
    let received: Vec<_> = out
        .iter()
        .filter(|l| l.starts_with("Received message"))
        .collect();
    assert_eq!(received.len(), 2, "{out:#?}");
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
    s.expect("Connection Accepted.").await;
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
    s.expect("-- rounds done").await;
    let out = s.printed();
    assert_printed(
        out,
        "-- on_connect callback -- Connection returned result: Connection Accepted.",
    );
    // $SYS/broker/version, retained (so it came at once on subscribing).
    let version = out
        .iter()
        .position(|l| l.contains("on topic '$SYS/broker/version' with QoS 0"))
        .unwrap_or_else(|| panic!("no $SYS/broker/version message:\n{}", out.join("\n")));
    assert!(
        out[version].starts_with("-- on_message callback -- Received message 'b'capteurs-gateway "),
        "{}",
        out[version]
    );
    // (the network thread prints it next; the main thread's lines may come between)
    assert!(
        out[version..].contains(&"This is a retained message".to_owned()),
        "{}",
        out.join("\n")
    );
    // mid 1: SUBSCRIBE; 2-5: the clears; 6-13: two rounds of four values.
    for mid in 6..=13 {
        assert_printed(
            out,
            &format!("Error return from publish of mid = {mid} : No error."),
        );
    }
    // The four retained values cleared, then two rounds of four temperatures
    // in [5, 25] -- flagged retain 0: they match an established subscription
    // [MQTT-3.3.1-9].
    let groups = ["isima/G1", "isima/G2", "isima/G3", "isima/G4"];
    for topic in groups {
        let m = watcher.receive().await;
        assert_eq!(
            (m.topic.as_str(), &m.payload[..], m.retain),
            (topic, &b""[..], false)
        );
    }
    for _round in 0..2 {
        for topic in groups {
            let m = watcher.receive().await;
            assert_eq!((m.topic.as_str(), m.retain), (topic, false), "{m:?}");
            let v: f64 = String::from_utf8_lossy(&m.payload)
                .parse()
                .unwrap_or_else(|_| panic!("not a number: {m:?}"));
            assert!((5.0..=25.0).contains(&v), "{v}");
        }
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
