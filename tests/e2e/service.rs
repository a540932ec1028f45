//! The gateway as a systemd service sees it: the `sd_notify` protocol over
//! a real datagram socket (`NOTIFY_SOCKET`), as `Type=notify` with
//! `WatchdogSec=` and `ExecReload=kill -HUP` use it.

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use capteurs_tests::gateway_bin;

/// The next datagram that is not a watchdog ping (those are counted).
fn next_state(sock: &UnixDatagram, pings: &mut u32) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 512];
    loop {
        assert!(Instant::now() < deadline, "no notification within 10 s");
        let n = sock.recv(&mut buf).expect("a notification within 10 s");
        let s = String::from_utf8_lossy(&buf[..n]).into_owned();
        if s == "WATCHDOG=1" {
            *pings += 1;
        } else {
            return s;
        }
    }
}

#[test]
fn ready_after_listening_watchdog_reload_and_stop() {
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let conf = dir.path().join("gw.toml");
    std::fs::write(
        &conf,
        format!(
            "[gateway]\ndata_dir = {:?}\n[broker]\nlisten = \"127.0.0.1:0\"\n",
            dir.path().join("data").display().to_string()
        ),
    )
    .unwrap();
    let mut child = std::process::Command::new(gateway_bin())
        .arg("--config")
        .arg(&conf)
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "200000")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id().to_string();
    let mut pings = 0;

    // READY=1 once the broker listens: the address it names takes clients.
    let ready = next_state(&sock, &mut pings);
    let addr = ready
        .strip_prefix("READY=1\nSTATUS=listening on ")
        .unwrap_or_else(|| panic!("{ready:?}"));
    std::net::TcpStream::connect(addr).expect("listening when READY=1 was sent");

    // The watchdog is fed at half its interval (200 ms): 4+ pings in 1 s.
    let since = Instant::now();
    let before = pings;
    let mut buf = [0u8; 64];
    while since.elapsed() < Duration::from_secs(1) {
        let n = sock.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"WATCHDOG=1");
        pings += 1;
    }
    assert!(pings - before >= 4, "{} pings in 1 s", pings - before);

    // `systemctl reload`: RELOADING=1 (with the time systemd asks for),
    // then READY=1 again; SIGHUP must not kill a gateway without plugins.
    let ok = std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    assert!(ok.success());
    let reloading = next_state(&sock, &mut pings);
    assert!(
        reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{reloading:?}"
    );
    assert_eq!(next_state(&sock, &mut pings), "READY=1");
    assert!(child.try_wait().unwrap().is_none(), "SIGHUP killed it");

    // `systemctl stop`: STOPPING=1, then a clean exit.
    let ok = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(ok.success());
    assert_eq!(next_state(&sock, &mut pings), "STOPPING=1");
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

/// One journal datagram (systemd's native protocol) as fields: `NAME=value`
/// lines, or `NAME`, a 64-bit little-endian length and the raw value.
fn journal_fields(mut d: &[u8]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    while !d.is_empty() {
        let nl = d.iter().position(|&b| b == b'\n').expect("a field ends");
        let line = &d[..nl];
        if let Some(eq) = line.iter().position(|&b| b == b'=') {
            out.push((
                String::from_utf8_lossy(&line[..eq]).into_owned(),
                String::from_utf8_lossy(&line[eq + 1..]).into_owned(),
            ));
            d = &d[nl + 1..];
        } else {
            let len = u64::from_le_bytes(d[nl + 1..nl + 9].try_into().unwrap()) as usize;
            let value = &d[nl + 9..nl + 9 + len];
            out.push((
                String::from_utf8_lossy(line).into_owned(),
                String::from_utf8_lossy(value).into_owned(),
            ));
            d = &d[nl + 9 + len + 1..];
        }
    }
    out
}

/// Under systemd (stderr is the journal's stream, `JOURNAL_STREAM` says so)
/// events go to journald with their fields as journal fields, nothing to
/// stderr. journald's socket is a fixed path: the gateway runs in a private
/// mount namespace where this test's socket is mounted there.
#[test]
fn logs_go_to_the_journal_with_fields_under_systemd() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let journal_dir = dir.path().join("journal");
    std::fs::create_dir(&journal_dir).unwrap();
    let journal = UnixDatagram::bind(journal_dir.join("socket")).unwrap();
    journal
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let stderr_path = dir.path().join("stderr");
    let stderr = std::fs::File::create(&stderr_path).unwrap();
    let meta = stderr.metadata().unwrap();
    let conf = dir.path().join("gw.toml");
    std::fs::write(
        &conf,
        format!(
            "[gateway]\ndata_dir = {:?}\n[broker]\nlisten = \"127.0.0.1:0\"\n",
            dir.path().join("data").display().to_string()
        ),
    )
    .unwrap();
    let script = format!(
        "mount -t tmpfs tmpfs /run/systemd && mkdir /run/systemd/journal && \
         mount --bind {:?} /run/systemd/journal && exec {:?} --config {:?}",
        journal_dir.display().to_string(),
        gateway_bin().display().to_string(),
        conf.display().to_string()
    );
    let mut child = std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .stderr(stderr)
        .spawn()
        .unwrap();
    let mut buf = vec![0u8; 65536];
    let mut next = |what: &str| -> Vec<(String, String)> {
        let n = journal
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("{what}: no journal datagram ({e})"));
        journal_fields(&buf[..n])
    };
    let get = |f: &[(String, String)], k: &str| {
        f.iter().find(|(name, _)| name == k).map(|(_, v)| v.clone())
    };
    // The broker's announcement: its text, its address as a field.
    let addr = loop {
        let f = next("the listening line");
        if get(&f, "MESSAGE").is_some_and(|m| m.starts_with("MQTT broker listening")) {
            // systemd-journal-logger maps log's Info to notice (5), Debug
            // to info (6): `journalctl -p info` shows both.
            assert_eq!(get(&f, "PRIORITY").as_deref(), Some("5"), "{f:?}");
            assert_eq!(
                get(&f, "SYSLOG_IDENTIFIER").as_deref(),
                Some("capteurs-gateway")
            );
            break get(&f, "ADDR").unwrap_or_else(|| panic!("no ADDR field: {f:?}"));
        }
    };
    // A client's connection: its id is a field of its own.
    let mut c = std::net::TcpStream::connect(&addr).unwrap();
    use std::io::Write;
    // CONNECT, MQTT 3.1.1, clean session, keep-alive 60, id "journal-probe".
    let id = b"journal-probe";
    let mut pkt = vec![
        0x10,
        (10 + 2 + id.len()) as u8,
        0,
        4,
        b'M',
        b'Q',
        b'T',
        b'T',
        4,
        2,
        0,
        60,
        0,
        id.len() as u8,
    ];
    pkt.extend_from_slice(id);
    c.write_all(&pkt).unwrap();
    loop {
        let f = next("the client's connection");
        if get(&f, "CLIENT_ID").as_deref() == Some("journal-probe") {
            assert!(
                get(&f, "MESSAGE")
                    .unwrap()
                    .contains("client_id=journal-probe"),
                "{f:?}"
            );
            break;
        }
    }
    drop(c);
    let ok = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    assert!(child.wait().unwrap().success());
    let err = std::fs::read_to_string(&stderr_path).unwrap();
    assert!(err.is_empty(), "logs went to stderr too:\n{err}");
}
