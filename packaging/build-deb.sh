#!/bin/bash
# Builds the .deb packages: packaging/build-deb.sh [amd64] [arm64] [armhf]
# (default: amd64). Output: target/debian/capteurs-gateway_<version>_<arch>.deb;
# their paths are printed.
#
# Installs what it needs when missing (Debian, as root): cargo-deb, help2man,
# the rustup targets, Debian's cross compilers and the target's libdbus (BLE
# support goes through BlueZ over D-Bus). Release builds, thin LTO, SQLite
# bundled; about 5-10 minutes per architecture from clean on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."

archs=("$@")
[ ${#archs[@]} -eq 0 ] && archs=(amd64)

apt_install() {
    local missing=()
    for p in "$@"; do
        dpkg-query -W -f '${db:Status-Status}\n' "$p" 2>/dev/null | grep -qx installed || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "build-deb: installing ${missing[*]}" >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
    fi
}

command -v cargo-deb >/dev/null || cargo install cargo-deb --version 3.8.0 --locked
apt_install help2man pkg-config libdbus-1-dev
rustup target list --installed | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2

# The example plugins shipped in /usr/share/capteurs/plugins.
cargo build --release --target wasm32-wasip2 --manifest-path plugins/Cargo.toml

# Man pages from --help (the same text on every architecture: made with a
# host binary, the release one when amd64 is built, else a debug one).
man_pages() {
    local dir=target/release
    if [ ! -x "$dir/capteurs-gateway" ] || [ ! -x "$dir/capteurs-sim" ]; then
        dir=target/debug
        cargo build -p capteurs-gateway -p capteurs-sim --features capteurs-gateway/ble
    fi
    mkdir -p target/man
    for bin in capteurs-gateway capteurs-sim; do
        local include="target/man/$bin.h2m"
        cp "packaging/$bin.h2m" "$include"
        {
            echo "[COMMANDS]"
            for cmd in $("$dir/$bin" --help | sed -n '/^Commands:/,/^$/p' | awk 'NR>1 && $1!="help" {print $1}'); do
                echo ".SS \"$bin $cmd\""
                echo ".nf"
                "$dir/$bin" "$cmd" --help | sed 's/\\/\\\\/g; s/^\./\\\&./'
                echo ".fi"
            done
        } >>"$include"
        help2man --no-info --section 1 --include "$include" \
            --name "$("$dir/$bin" --help | head -1 | sed 's/\.$//')" \
            "$dir/$bin" | gzip -9n >"target/man/$bin.1.gz"
    done
}

for arch in "${archs[@]}"; do
    case "$arch" in
        amd64) target="" ;;
        arm64) target=aarch64-unknown-linux-gnu; gcc=gcc-aarch64-linux-gnu; triple=aarch64-linux-gnu ;;
        armhf) target=armv7-unknown-linux-gnueabihf; gcc=gcc-arm-linux-gnueabihf; triple=arm-linux-gnueabihf ;;
        *) echo "build-deb: unknown architecture $arch (amd64, arm64, armhf)" >&2; exit 2 ;;
    esac
    if [ -z "$target" ]; then
        cargo build --release -p capteurs-gateway -p capteurs-sim --features capteurs-gateway/ble
        man_pages
        cargo deb -p capteurs-gateway --no-build
        continue
    fi
    rustup target list --installed | grep -qx "$target" || rustup target add "$target"
    if ! dpkg --print-foreign-architectures | grep -qx "$arch"; then
        dpkg --add-architecture "$arch"
        apt-get update -q >/dev/null
    fi
    apt_install "$gcc" "libdbus-1-dev:$arch"
    # libdbus-sys finds the target's libdbus through pkg-config.
    PKG_CONFIG_ALLOW_CROSS=1 \
    PKG_CONFIG_LIBDIR="/usr/lib/$triple/pkgconfig:/usr/share/pkgconfig" \
        cargo build --release --target "$target" -p capteurs-gateway -p capteurs-sim --features capteurs-gateway/ble
    man_pages
    cargo deb -p capteurs-gateway --no-build --target "$target"
done
