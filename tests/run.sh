#!/usr/bin/env bash
# Runs the whole test suite, installing what the tests need when it is missing:
# Debian's mosquitto + mosquitto-clients (the cloud stand-in and interop
# clients), chromium (the status page, headless), Python paho-mqtt 1.6.1 in
# ./.venv (the API the course is written in), and the wasm32-wasip2 target
# (rust-toolchain.toml lists it).
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ] || ! command -v mosquitto_sub >/dev/null 2>&1; then
  echo "== installing mosquitto and mosquitto-clients"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto mosquitto-clients >/dev/null
fi

# The status page is checked in a real browser (headless).
if ! command -v chromium >/dev/null 2>&1; then
  echo "== installing chromium (status page test)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi

if ! .venv/bin/python3 -c 'import paho.mqtt, sys; sys.exit(0 if paho.mqtt.__version__.startswith("1.6") else 1)' 2>/dev/null; then
  echo "== creating .venv with paho-mqtt 1.6.1"
  rm -rf .venv
  # Debian's python3 needs python3-venv for `-m venv`.
  if ! python3 -c 'import ensurepip' 2>/dev/null; then
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
  fi
  python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check paho-mqtt==1.6.1
fi
export CAPTEURS_PYTHON="$PWD/.venv/bin/python3"

rustup target add wasm32-wasip2 >/dev/null 2>&1 || true

# The `ble` feature (BlueZ through bluer) links libdbus: its headers are
# needed to check that it still compiles.
if ! pkg-config --exists dbus-1 2>/dev/null; then
  echo "== installing libdbus-1-dev and pkg-config (BLE feature check)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libdbus-1-dev pkg-config >/dev/null
fi

# One build for everything, with the gateway's `ble` feature on (BlueZ via
# bluer): the radio cannot be tested here, but it must compile, and building
# once is cheaper than checking twice.
features=(--features capteurs-gateway/ble)
echo "== building"
cargo build --workspace --all-targets "${features[@]}"
echo "== example plugins (wasm32-wasip2) and their unit tests"
cargo build --release --target wasm32-wasip2 --manifest-path plugins/Cargo.toml
cargo test --manifest-path plugins/Cargo.toml
echo "== testing"
cargo test --workspace --no-fail-fast "${features[@]}"
# The .deb packages, amd64 and arm64 (release builds: the longest step):
# lintian, install/upgrade/remove/purge in a debootstrapped Debian 12 root,
# systemd-analyze, the arm64 binaries under qemu. Needs root (chroot, apt).
echo "== packages"
as_root packaging/test-deb.sh amd64 arm64
