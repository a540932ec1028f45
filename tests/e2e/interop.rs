//! Debian's `mosquitto_sub` / `mosquitto_pub` (mosquitto-clients) against the
//! gateway: QoS 0/1/2, retained messages, wills, logins.

use std::process::Stdio;

use capteurs_tests::*;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

fn find(name: &str) -> std::path::PathBuf {
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .chain([std::path::PathBuf::from("/usr/bin")])
        .map(|d| d.join(name))
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!("{name} not found: install mosquitto-clients (tests/run.sh does)")
        })
}

fn tool(name: &str) -> Command {
    let mut c = Command::new(find(name));
    c.kill_on_drop(true);
    c
}

/// mosquitto_sub with line-buffered stdout (it block-buffers into a pipe).
fn line_buffered(name: &str) -> Command {
    let mut c = Command::new(find("stdbuf"));
    c.arg("-oL").arg(find(name)).kill_on_drop(true);
    c
}

/// A running `mosquitto_sub -v -d`: its SUBACK and messages, line by line.
struct Sub {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    /// Its "Subscribed (mid: 1): <granted QoS>" line.
    granted: String,
}

impl Sub {
    /// Starts it and waits for its SUBACK, so publishes after this are seen.
    async fn start(b: &TestBroker, args: &[&str]) -> Sub {
        let mut child = line_buffered("mosquitto_sub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &b.addr.port().to_string(),
                "-v",
                "-d",
            ])
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("mosquitto_sub runs");
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut sub = Sub {
            child,
            lines,
            granted: String::new(),
        };
        sub.line_containing("received SUBACK").await;
        sub.granted = sub.line_containing("Subscribed (mid:").await;
        sub
    }

    /// Fails if mosquitto_sub prints a message within [`QUIET`].
    async fn expect_nothing(&mut self) {
        while let Ok(line) = tokio::time::timeout(QUIET, self.lines.next_line()).await {
            match line.expect("read") {
                Some(l) if l.starts_with("Client ") => {} // -d: PINGREQ...
                Some(l) => panic!("expected nothing, mosquitto_sub printed {l:?}"),
                None => panic!("mosquitto_sub exited"),
            }
        }
    }

    async fn line_containing(&mut self, pattern: &str) -> String {
        loop {
            let line = tokio::time::timeout(WAIT, self.lines.next_line())
                .await
                .unwrap_or_else(|_| panic!("mosquitto_sub did not print {pattern:?}"))
                .expect("read")
                .unwrap_or_else(|| panic!("mosquitto_sub exited before printing {pattern:?}"));
            if line.contains(pattern) {
                return line;
            }
        }
    }

    /// Next `topic payload` line (the -v output), skipping -d debug lines.
    async fn message(&mut self) -> String {
        loop {
            let line = self.line_containing("").await;
            if !line.starts_with("Client ") {
                return line;
            }
        }
    }
}

async fn publish(b: &TestBroker, args: &[&str]) {
    let out = tool("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &b.addr.port().to_string()])
        .args(args)
        .output()
        .await
        .expect("mosquitto_pub runs");
    assert!(
        out.status.success(),
        "mosquitto_pub {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn mosquitto_clients_qos_0_1_2() {
    let b = TestBroker::open().await;
    let topic = "capteurs/temperature/fr/aubiere/rue_chebarde";
    for qos in ["0", "1", "2"] {
        let mut sub = Sub::start(&b, &["-t", "capteurs/+/fr/#", "-q", qos, "-C", "3"]).await;
        assert_eq!(sub.granted, format!("Subscribed (mid: 1): {qos}"));
        let payloads: Vec<String> = (0..3).map(|i| format!("21.{qos}{i}")).collect();
        for p in &payloads {
            publish(&b, &["-t", topic, "-q", qos, "-m", p]).await;
        }
        // -d prints each PUBLISH's header and the QoS flow around the -v lines.
        let mut messages = Vec::new();
        let mut debug = Vec::new();
        while messages.len() < payloads.len() {
            let line = sub.line_containing("").await;
            if line.starts_with("Client ") {
                debug.push(line);
            } else {
                messages.push(line);
            }
        }
        let expected: Vec<String> = payloads.iter().map(|p| format!("{topic} {p}")).collect();
        assert_eq!(messages, expected);
        // -C 3: it leaves by itself once it has them all (the QoS 2 flow done).
        while let Ok(Some(line)) = tokio::time::timeout(WAIT, sub.lines.next_line())
            .await
            .expect("mosquitto_sub -C 3 did not exit")
        {
            debug.push(line);
        }
        let status = tokio::time::timeout(WAIT, sub.child.wait())
            .await
            .expect("mosquitto_sub -C 3 did not exit")
            .unwrap();
        assert!(status.success(), "{status}: {debug:#?}");
        let count = |pattern: &str| debug.iter().filter(|l| l.contains(pattern)).count();
        assert_eq!(
            count(&format!("received PUBLISH (d0, q{qos}, r0")),
            3,
            "{debug:#?}"
        );
        let flow: &[&str] = match qos {
            "1" => &["sending PUBACK"],
            "2" => &["sending PUBREC", "received PUBREL", "sending PUBCOMP"],
            _ => &[],
        };
        for step in flow {
            assert_eq!(count(step), 3, "{step}: {debug:#?}");
        }
    }
}

#[tokio::test]
async fn mosquitto_clients_retained() {
    let b = TestBroker::open().await;
    publish(&b, &["-t", "isima/G1", "-r", "-m", "19.5"]).await;
    let out = tool("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &b.addr.port().to_string(),
            "-t",
            "isima/#",
            "-C",
            "1",
            "-v",
            "-W",
            "5",
            "-F",
            "%r %t %p",
        ])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "1 isima/G1 19.5"
    );
    // Deleted by an empty retained message: --retained-only then sees nothing.
    publish(&b, &["-t", "isima/G1", "-r", "-n"]).await;
    let out = tool("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &b.addr.port().to_string(),
            "-t",
            "isima/#",
            "--retained-only",
            "-W",
            "1",
            "-d",
        ])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    // Subscribed (-d prints the SUBACK), and no message line at all.
    assert!(stdout.contains("received SUBACK"), "{out:?}");
    let messages: Vec<&str> = stdout
        .lines()
        .filter(|l| !l.starts_with("Client ") && !l.starts_with("Subscribed (mid:"))
        .collect();
    assert!(messages.is_empty(), "{messages:?}");
}

#[tokio::test]
async fn mosquitto_clients_will() {
    let b = TestBroker::open().await;
    let mut watcher = Sub::start(&b, &["-t", "isima/LWT"]).await;
    let will = [
        "--will-topic",
        "isima/LWT",
        "--will-payload",
        "Lost Connection",
    ];
    // A clean DISCONNECT (mosquitto_pub exiting normally): no will.
    publish(
        &b,
        &[&["-t", "x", "-m", "bye", "-i", "leaving"][..], &will].concat(),
    )
    .await;
    watcher.expect_nothing().await;
    // Killed: the will.
    let mut dying = Sub::start(&b, &[&["-t", "x", "-i", "dying"][..], &will].concat()).await;
    dying.child.kill().await.unwrap();
    assert_eq!(watcher.message().await, "isima/LWT Lost Connection");
}

#[tokio::test]
async fn mosquitto_clients_login() {
    let b = TestBroker::start(classroom_auth(), |_| {}).await;
    let port = b.addr.port().to_string();
    let run = |login: &'static [&'static str]| {
        let port = port.clone();
        async move {
            let out = tool("mosquitto_sub")
                .args(["-h", "127.0.0.1", "-p", &port, "-t", "isima/#"])
                .args(login)
                .args(["-C", "1", "-W", "5"])
                .output()
                .await
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            (
                out.status,
                String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr,
            )
        }
    };
    // Refused: CONNACK 4, then CONNACK 5 without a login.
    for (login, refusal) in [
        (
            &["-u", "G1", "-P", "isimaG2"][..],
            "bad user name or password",
        ),
        (&[][..], "not authorised"),
    ] {
        let (status, _, stderr) = run(login).await;
        assert!(!status.success(), "{login:?}: {status}");
        assert!(
            stderr.to_lowercase().contains(refusal),
            "{login:?}: {stderr}"
        );
    }
    // Accepted: it receives what the classroom publishes (retained, so
    // whenever its SUBSCRIBE lands).
    let mut p = RawClient::connect(b.addr, &ConnectOpts::new("p").login("G1", "isimaG1")).await;
    p.publish("isima/G1", b"hello", QoS::AtMostOnce, true).await;
    let (status, stdout, stderr) = run(&["-u", "G2", "-P", "isimaG2"]).await;
    assert!(status.success(), "{status}: {stderr}");
    assert_eq!(stdout.trim(), "hello");
}
