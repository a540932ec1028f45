//! The gateway under test: whole in this process ([`TestGateway`]), or as
//! the `capteurs-gateway` binary ([`GatewayProcess`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The `capteurs-gateway` binary of this build (next to the test
/// executable; `cargo test --workspace` and tests/run.sh build it).
pub fn gateway_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let bin = dir.join("capteurs-gateway");
    assert!(
        bin.exists(),
        "{} not built: run `cargo build -p capteurs-gateway` (tests/run.sh does)",
        bin.display()
    );
    bin
}

/// A whole gateway in-process (broker, buffer, upstream) from TOML: the
/// given text plus a loopback port 0 listener and `data_dir`.
pub struct TestGateway {
    pub gateway: Option<capteurs_gateway::gateway::Gateway>,
    pub addr: SocketAddr,
}

impl TestGateway {
    pub async fn start(data_dir: &Path, toml: &str) -> TestGateway {
        let text = format!(
            "[gateway]\ndata_dir = {:?}\n[broker]\nlisten = \"127.0.0.1:0\"\n{toml}",
            data_dir.display().to_string()
        );
        let cfg = capteurs_gateway::GatewayConfig::parse(&text, "test config", data_dir)
            .unwrap_or_else(|e| panic!("{e}"));
        let gateway = capteurs_gateway::gateway::start(&cfg)
            .await
            .unwrap_or_else(|e| panic!("gateway starts: {e}"));
        let addr = gateway.broker.local_addr();
        TestGateway {
            gateway: Some(gateway),
            addr,
        }
    }

    pub fn buffer(&self) -> &capteurs_gateway::buffer::Buffer {
        self.gateway
            .as_ref()
            .and_then(|g| g.buffer.as_ref())
            .expect("upstream enabled")
    }

    pub fn upstream(&self) -> &capteurs_gateway::upstream::UpstreamStats {
        self.gateway
            .as_ref()
            .and_then(|g| g.upstream.as_ref())
            .expect("upstream enabled")
            .stats()
    }

    pub fn plugins(&self) -> &std::sync::Arc<capteurs_gateway::plugins::Plugins> {
        self.gateway
            .as_ref()
            .and_then(|g| g.plugins.as_ref())
            .expect("plugins configured")
    }

    pub fn sources(&self) -> &std::sync::Arc<capteurs_gateway::sources::SourceStats> {
        self.gateway
            .as_ref()
            .and_then(|g| g.sources.as_ref())
            .expect("sources configured")
            .stats()
    }

    pub async fn stop(&mut self) {
        if let Some(g) = self.gateway.take() {
            g.shutdown().await;
        }
    }
}

/// A `capteurs-gateway` process (for crash tests): started with a config
/// file, its address read from its log; SIGKILLed on drop.
pub struct GatewayProcess {
    child: std::process::Child,
    pub addr: SocketAddr,
    /// Every line it logged so far.
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl GatewayProcess {
    pub fn start(config: &Path) -> GatewayProcess {
        use std::io::BufRead;
        let mut child = std::process::Command::new(gateway_bin())
            .arg("--config")
            .arg(config)
            .env("NO_COLOR", "1")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("gateway starts");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = lines.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if let Some(addr) = line
                    .split("MQTT broker listening addr=")
                    .nth(1)
                    .and_then(|a| a.split_whitespace().next())
                    .and_then(|a| a.parse::<SocketAddr>().ok())
                {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(addr);
                    }
                }
                if std::env::var_os("CAPTEURS_TEST_LOG").is_some() {
                    eprintln!("gateway: {line}");
                }
                kept.lock().unwrap().push(line);
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the gateway logs its address");
        GatewayProcess { child, addr, lines }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The first line logged so far that contains `needle`.
    pub fn logged(&self, needle: &str) -> Option<String> {
        let lines = self.lines.lock().unwrap();
        lines.iter().find(|l| l.contains(needle)).cloned()
    }

    /// SIGTERM, then waits (up to `within`) for the process to exit.
    pub async fn terminate(&mut self, within: Duration) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                // Let the reader thread take the last lines.
                tokio::time::sleep(Duration::from_millis(100)).await;
                return status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the gateway did not exit within {within:?} of SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL: no clean-up of any kind.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
