//! Debian's `mosquitto`: the cloud stand-in and the reference broker.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::net::TcpStream;

use crate::{ReservedPort, WAIT};

/// Debian's `mosquitto` on a loopback port: the cloud stand-in and the
/// reference broker. Anonymous clients allowed; nothing on disk unless the
/// extra configuration says so; killed on drop.
pub struct Mosquitto {
    child: Option<std::process::Child>,
    pub addr: SocketAddr,
    conf: PathBuf,
    pub dir: tempfile::TempDir,
}

fn mosquitto_bin() -> &'static str {
    ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("mosquitto not found: install it (tests/run.sh does)")
}

impl Mosquitto {
    pub async fn start() -> Mosquitto {
        Self::start_with("").await
    }

    /// With extra lines for its configuration file (`{dir}` is replaced by
    /// its own temporary directory).
    pub async fn start_with(extra: &str) -> Mosquitto {
        // The port is free now; another process could take it before
        // mosquitto binds it, hence the retries.
        for _ in 0..5 {
            if let Some(m) = Self::try_on(ReservedPort::new().release(), extra).await {
                return m;
            }
        }
        panic!("mosquitto did not start");
    }

    /// On a given port (a server the gateway fails over to later).
    pub async fn start_on(port: u16, extra: &str) -> Mosquitto {
        Self::try_on(port, extra)
            .await
            .unwrap_or_else(|| panic!("mosquitto did not start on port {port}"))
    }

    async fn try_on(port: u16, extra: &str) -> Option<Mosquitto> {
        let dir = tempfile::tempdir().expect("temp dir");
        let conf = dir.path().join("mosquitto.conf");
        let extra = extra.replace("{dir}", &dir.path().display().to_string());
        std::fs::write(
            &conf,
            // `user root`: run as root (CI), mosquitto would switch to the
            // `mosquitto` user, who cannot read our temporary files.
            format!("user root\nlistener {port} 127.0.0.1\nallow_anonymous true\n{extra}\n"),
        )
        .expect("write mosquitto.conf");
        let mut m = Mosquitto {
            child: None,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            conf,
            dir,
        };
        m.spawn().await.then_some(m)
    }

    async fn spawn(&mut self) -> bool {
        let mut child = std::process::Command::new(mosquitto_bin())
            .arg("-c")
            .arg(&self.conf)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("mosquitto starts");
        let deadline = tokio::time::Instant::now() + WAIT;
        while tokio::time::Instant::now() < deadline {
            if TcpStream::connect(self.addr).await.is_ok() {
                self.child = Some(child);
                return true;
            }
            if child.try_wait().ok().flatten().is_some() {
                return false; // port taken
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }

    /// Kills it (SIGKILL: an outage, nothing saved).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port with the same configuration.
    pub async fn restart(&mut self) {
        self.kill();
        for _ in 0..50 {
            if self.spawn().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("mosquitto did not restart on {}", self.addr);
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.kill();
    }
}
