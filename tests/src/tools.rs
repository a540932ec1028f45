//! What the tests run besides Rust: Python with paho-mqtt 1.6 (the
//! course's scripts) and the example plugins built for wasm32-wasip2.

use std::path::PathBuf;

use crate::workspace;

/// The interpreter with paho-mqtt 1.6: `$CAPTEURS_PYTHON`, which
/// tests/run.sh sets to its `.venv`. Checked once; never skipped.
pub fn python() -> &'static str {
    static PYTHON: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PYTHON.get_or_init(|| {
        let python = std::env::var("CAPTEURS_PYTHON").unwrap_or_else(|_| {
            panic!(
                "CAPTEURS_PYTHON is not set: run tests/run.sh, or set it to a Python \
                 with paho-mqtt==1.6.1 (python3 -m venv .venv && \
                 .venv/bin/pip install paho-mqtt==1.6.1)"
            )
        });
        let out = std::process::Command::new(&python)
            .args(["-c", "import paho.mqtt; print(paho.mqtt.__version__)"])
            .output()
            .unwrap_or_else(|e| panic!("CAPTEURS_PYTHON={python} does not run: {e}"));
        let version = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert!(
            out.status.success() && version.starts_with("1.6"),
            "CAPTEURS_PYTHON={python} lacks paho-mqtt 1.6 (the course's API): \
             version {version:?}, {}",
            String::from_utf8_lossy(&out.stderr)
        );
        python
    })
}

/// The example plugins (and tests/plugins/misbehave), built once for
/// wasm32-wasip2 by the first test that needs them; returns the path of
/// `name`.wasm (`name` with `_`, as cargo writes it).
pub fn plugin_wasm(name: &str) -> PathBuf {
    static BUILT: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    let dir = BUILT
        .get_or_init(|| {
            let root = workspace();
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let out = std::process::Command::new(cargo)
                .args(["build", "--release", "--target", "wasm32-wasip2", "--manifest-path"])
                .arg(root.join("plugins/Cargo.toml"))
                .output()
                .map_err(|e| format!("cannot run cargo: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "building the plugins failed (is the wasm32-wasip2 target installed? tests/run.sh adds it):\n{}",
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
            Ok(root.join("plugins/target/wasm32-wasip2/release"))
        })
        .as_ref()
        .unwrap_or_else(|e| panic!("{e}"));
    let path = dir.join(format!("{}.wasm", name.replace('-', "_")));
    assert!(path.exists(), "{} was not built", path.display());
    path
}
