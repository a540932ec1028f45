//! The `capteurs-gateway` binary: runs, reports where it listens, stops
//! cleanly on SIGTERM/SIGINT with its state saved, and checks configurations.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_capteurs-gateway");

/// Starts the gateway on a free port; returns it with its address, read
/// from its "MQTT broker listening" log line.
fn start(data_dir: &Path, extra: &[&str]) -> (Child, SocketAddr, mpsc::Receiver<String>) {
    let mut child = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .args(extra)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stderr(Stdio::piped())
        .spawn()
        .expect("gateway starts");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let addr = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("gateway logs its address");
        if line.contains("MQTT broker listening") {
            let a = line
                .split("addr=")
                .nth(1)
                .expect("addr field")
                .split_whitespace()
                .next()
                .unwrap();
            break a.parse().expect("socket address");
        }
    };
    (child, addr, rx)
}

/// A minimal MQTT 3.1.1 exchange over a std socket.
fn mqtt_connect(addr: SocketAddr, client_id: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60];
    body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend(body);
    s.write_all(&packet).unwrap();
    let mut connack = [0u8; 4];
    s.read_exact(&mut connack).unwrap();
    assert_eq!(connack, [0x20, 2, 0, 0]);
    s
}

fn publish_retained_qos1(s: &mut TcpStream, topic: &str, payload: &[u8]) {
    let mut body = (topic.len() as u16).to_be_bytes().to_vec();
    body.extend_from_slice(topic.as_bytes());
    body.extend_from_slice(&[0, 1]);
    body.extend_from_slice(payload);
    let mut packet = vec![0x33, body.len() as u8];
    packet.extend(body);
    s.write_all(&packet).unwrap();
    let mut puback = [0u8; 4];
    s.read_exact(&mut puback).unwrap();
    assert_eq!(puback, [0x40, 2, 0, 1]);
}

fn subscribe_and_read_one(s: &mut TcpStream, filter: &str) -> Vec<u8> {
    let mut body = vec![0, 1];
    body.extend_from_slice(&(filter.len() as u16).to_be_bytes());
    body.extend_from_slice(filter.as_bytes());
    body.push(0);
    let mut packet = vec![0x82, body.len() as u8];
    packet.extend(body);
    s.write_all(&packet).unwrap();
    let mut suback = [0u8; 5];
    s.read_exact(&mut suback).unwrap();
    assert_eq!(suback, [0x90, 3, 0, 1, 0]);
    let mut header = [0u8; 2];
    s.read_exact(&mut header).unwrap();
    assert_eq!(header[0], 0x31, "retained QoS 0 PUBLISH");
    let mut rest = vec![0u8; header[1] as usize];
    s.read_exact(&mut rest).unwrap();
    let tlen = u16::from_be_bytes([rest[0], rest[1]]) as usize;
    rest[2 + tlen..].to_vec()
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    for _ in 0..200 {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    panic!("gateway did not exit within 10 s");
}

#[test]
fn sigterm_saves_state_and_exits_zero_then_restart_restores_it() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, addr, _log) = start(dir.path(), &[]);
    let mut c = mqtt_connect(addr, "writer");
    publish_retained_qos1(
        &mut c,
        "capteurs/temperature/fr/aubiere/rue_chebarde",
        b"21.37",
    );
    signal(&child, "-TERM");
    let status = wait_exit(&mut child);
    assert!(status.success(), "exit status {status:?}");
    assert!(dir.path().join("broker.sqlite").exists());

    let (mut child, addr, _log) = start(dir.path(), &[]);
    let mut c = mqtt_connect(addr, "reader");
    assert_eq!(subscribe_and_read_one(&mut c, "capteurs/#"), b"21.37");
    signal(&child, "-INT");
    assert!(wait_exit(&mut child).success());
}

#[test]
fn classroom_config_runs() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/classroom.toml");
    let (mut child, addr, _log) = start(dir.path(), &["--config", cfg.to_str().unwrap()]);
    // Anonymous refused with CONNACK 5 in the classroom.
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"\x10\x0e\x00\x04MQTT\x04\x02\x00\x3c\x00\x02an")
        .unwrap();
    let mut connack = [0u8; 4];
    s.read_exact(&mut connack).unwrap();
    assert_eq!(connack, [0x20, 2, 0, 5]);
    signal(&child, "-TERM");
    assert!(wait_exit(&mut child).success());
}

#[test]
fn check_config_reports_key_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[broker]\nlisten = \"nowhere\"\nmax_inflight = 0\n").unwrap();
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 2: broker.listen"), "{err}");
    assert!(err.contains("line 3: broker.max_inflight"), "{err}");

    let typo = dir.path().join("typo.toml");
    std::fs::write(
        &typo,
        "[broker]\nlisten = \"127.0.0.1:1883\"\nallow_anonymus = true\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&typo)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("line 3") && err.contains("allow_anonymus"),
        "{err}"
    );

    let good = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/gateway.toml");
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&good)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The systemd unit's form: the file the daemon would run with.
    let packaged = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/package.toml");
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&packaged)
        .arg("check-config")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(BIN)
        .args(["--config"])
        .arg(&typo)
        .arg("check-config")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("allow_anonymus"));
}

#[test]
fn passwd_command_writes_a_usable_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("passwd");
    let out = Command::new(BIN)
        .arg("passwd")
        .arg(&file)
        .args(["G1", "--password", "isimaG1"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut child = Command::new(BIN)
        .arg("passwd")
        .arg(&file)
        .arg("G2")
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"isimaG2\n").unwrap();
    assert!(child.wait().unwrap().success());
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.lines().any(|l| l.starts_with("G1:$7$")), "{text}");
    assert!(text.lines().any(|l| l.starts_with("G2:$7$")), "{text}");

    let cfg = dir.path().join("gw.toml");
    std::fs::write(
        &cfg,
        "[broker]\nallow_anonymous = false\npassword_file = \"passwd\"\n",
    )
    .unwrap();
    let (mut gw, addr, _log) = start(dir.path(), &["--config", cfg.to_str().unwrap()]);
    for (user, pass, code) in [
        ("G1", "isimaG1", 0u8),
        ("G2", "isimaG2", 0),
        ("G2", "isimaG1", 4),
    ] {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0xc2, 0, 60, 0, 1, b'x'];
        for field in [user, pass] {
            body.extend_from_slice(&(field.len() as u16).to_be_bytes());
            body.extend_from_slice(field.as_bytes());
        }
        let mut packet = vec![0x10, body.len() as u8];
        packet.extend(body);
        s.write_all(&packet).unwrap();
        let mut connack = [0u8; 4];
        s.read_exact(&mut connack).unwrap();
        assert_eq!(connack[3], code, "{user}/{pass}");
    }
    signal(&gw, "-TERM");
    assert!(wait_exit(&mut gw).success());
}
