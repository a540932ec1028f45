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
        let mut sub = Sub { child, lines };
        sub.line_containing("Client").await; // CONNECT sent
        sub.line_containing("received SUBACK").await;
        sub.line_containing("Subscribed (mid:").await;
        sub
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
    for qos in ["0", "1", "2"] {
        let mut sub = Sub::start(&b, &["-t", "capteurs/+/fr/#", "-q", qos]).await;
        let topic = "capteurs/temperature/fr/aubiere/rue_chebarde";
        publish(&b, &["-t", topic, "-q", qos, "-m", &format!("21.{qos}")]).await;
        let mut debug = Vec::new();
        let message = loop {
            let line = sub.line_containing("").await;
            if !line.starts_with("Client ") {
                break line;
            }
            debug.push(line);
        };
        assert_eq!(message, format!("{topic} 21.{qos}"));
        assert!(
            debug
                .iter()
                .any(|l| l.contains(&format!("received PUBLISH (d0, q{qos}, r0"))),
            "{debug:?}"
        );
        // The QoS flow completes from mosquitto_sub's side too.
        match qos {
            "1" => assert!(
                debug.iter().any(|l| l.contains("sending PUBACK")),
                "{debug:?}"
            ),
            "2" => {
                assert!(
                    debug.iter().any(|l| l.contains("sending PUBREC")),
                    "{debug:?}"
                );
                // libmosquitto hands the message over on PUBREL, so its
                // PUBCOMP is printed before or after the message line.
                if !debug.iter().any(|l| l.contains("sending PUBCOMP")) {
                    sub.line_containing("sending PUBCOMP").await;
                }
            }
            _ => {}
        }
        sub.child.kill().await.unwrap();
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
        ])
        .output()
        .await
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).trim().is_empty(),
        "{:?}",
        out
    );
}

#[tokio::test]
async fn mosquitto_clients_will() {
    let b = TestBroker::open().await;
    let mut watcher = Sub::start(&b, &["-t", "isima/LWT"]).await;
    let mut dying = Sub::start(
        &b,
        &[
            "-t",
            "x",
            "--will-topic",
            "isima/LWT",
            "--will-payload",
            "Lost Connection",
            "-i",
            "dying",
        ],
    )
    .await;
    dying.child.kill().await.unwrap();
    assert_eq!(watcher.message().await, "isima/LWT Lost Connection");
}

#[tokio::test]
async fn mosquitto_clients_login() {
    let b = TestBroker::start(classroom_auth(), |_| {}).await;
    let port = b.addr.port().to_string();
    let run = |user: &'static str, pass: &'static str| {
        let port = port.clone();
        async move {
            tool("mosquitto_sub")
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port,
                    "-t",
                    "isima/#",
                    "-u",
                    user,
                    "-P",
                    pass,
                    "-C",
                    "1",
                    "-W",
                    "2",
                ])
                .output()
                .await
                .unwrap()
        }
    };
    let bad = run("G1", "isimaG2").await;
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr).to_lowercase();
    assert!(err.contains("bad user name or password"), "{err}");
    let good = tokio::spawn(run("G1", "isimaG1"));
    // A login that works receives what the classroom publishes.
    let mut waiter =
        RawClient::connect(b.addr, &ConnectOpts::new("w").login("G2", "isimaG2")).await;
    waiter.subscribe("isima/#", QoS::AtMostOnce).await;
    let mut p = RawClient::connect(b.addr, &ConnectOpts::new("p").login("G1", "isimaG1")).await;
    // Retained so mosquitto_sub gets it whenever its SUBSCRIBE lands.
    p.publish("isima/G1", b"hello", QoS::AtMostOnce, true).await;
    let out = good.await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "hello");
}
