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
    sock.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
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
