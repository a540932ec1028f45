//! The `capteurs-sim` binary: sensor fleets behind pseudo-terminals.

use std::path::{Path, PathBuf};

use crate::{gateway_bin, numbers};

/// The `capteurs-sim` binary next to the test executable.
pub fn sim_bin() -> PathBuf {
    let bin = gateway_bin().with_file_name("capteurs-sim");
    assert!(
        bin.exists(),
        "{} not built: run `cargo build -p capteurs-sim` (tests/run.sh does)",
        bin.display()
    );
    bin
}

/// `capteurs-sim ARGS --pty`, and the path of the pseudo-terminal it made
/// (its first line of output).
pub fn sim_pty(sim: &Path, args: &[&str]) -> (std::process::Child, String) {
    use std::io::BufRead;
    let mut child = std::process::Command::new(sim)
        .args(args)
        .arg("--pty")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    let path = first
        .trim()
        .strip_prefix("pty: ")
        .unwrap_or_else(|| panic!("first line {first:?}"))
        .to_owned();
    (child, path)
}

/// What `capteurs-sim serial` says it wrote: good lines and each kind of
/// corruption.
#[derive(Debug, Clone, Copy)]
pub struct Injected {
    pub good: u64,
    pub garbage: u64,
    pub overlong: u64,
}

/// One sensor's 300 `format` lines from `capteurs-sim serial`, a fifth of
/// them garbage or over-long (seed 5), written to a pty that appears at
/// `link`; returns what the simulator says it injected once it is done.
pub async fn sim_corrupt_serial(sim: &Path, format: &str, link: &Path) -> Injected {
    use std::io::Read;
    let args = [
        "serial",
        "--quiet",
        "--line-format",
        format,
        "--sensors",
        "1",
        "--period-ms",
        "2",
        "--count",
        "300",
        "--corrupt-rate",
        "0.2",
        "--corrupt",
        "garbage,overlong",
        "--seed",
        "5",
    ];
    let (mut child, path) = sim_pty(sim, &args);
    std::os::unix::fs::symlink(&path, link).unwrap();
    let (status, err) = tokio::task::spawn_blocking(move || {
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        (child.wait().unwrap(), err)
    })
    .await
    .unwrap();
    // The simulator is gone and its pty number free for the next one made
    // (by another test): the gateway must not reopen this name onto it.
    let _ = std::fs::remove_file(link);
    assert!(status.success(), "{err}");
    // "lines written 300: good G, garbage A, cut 0, overlong C"
    let [written, good, garbage, cut, overlong] = numbers(&err)[..] else {
        panic!("{err}")
    };
    assert_eq!((written, cut), (300, 0));
    assert!(garbage > 0 && overlong > 0, "{err}");
    Injected {
        good,
        garbage,
        overlong,
    }
}
