#!/bin/bash
# Tests the .deb packages as a user meets them (Debian 12, as root):
#
#   packaging/test-deb.sh            # amd64 and arm64
#   packaging/test-deb.sh amd64      # one of them
#
# amd64: builds the package (packaging/build-deb.sh), lintian, then in a
# Debian 12 root made by debootstrap (cached as a tarball in
# $CAPTEURS_PKG_CACHE, default /var/cache/capteurs-test): install, the
# binary runs, user, directories and conffiles are in place,
# `systemd-analyze verify` and `security` on the unit, the gateway starts
# as the capteurs user on the packaged config and keeps a buffered message
# across an upgrade to a rebuilt package that keeps a modified conffile;
# remove keeps data, purge deletes it.
# arm64: builds the package, lintian, then runs its binaries under
# qemu-aarch64: --version, check-config, and a broker session with a WASM
# plugin driven by mosquitto_pub/mosquitto_sub.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT_DIR=$PWD
CACHE=${CAPTEURS_PKG_CACHE:-/var/cache/capteurs-test}
MIRROR=${CAPTEURS_DEBIAN_MIRROR:-http://deb.debian.org/debian}

archs=("$@")
[ ${#archs[@]} -eq 0 ] && archs=(amd64 arm64)

say() { echo "test-deb: $*" >&2; }
fail() { echo "test-deb: FAIL: $*" >&2; exit 1; }

apt_install() {
    local missing=()
    for p in "$@"; do
        dpkg-query -W -f '${db:Status-Status}\n' "$p" 2>/dev/null | grep -qx installed || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        say "installing ${missing[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
    fi
}
apt_install lintian debootstrap qemu-user-static mosquitto-clients

# A free TCP port on 127.0.0.1 (bound and released: the gateway binds port
# 0 instead wherever it can; here a process under qemu is asked for one).
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Waits until FILE has a line matching REGEX (10 s), prints the match.
wait_line() {
    local file=$1 regex=$2
    for _ in $(seq 100); do
        if grep -Eo "$regex" "$file" 2>/dev/null | head -1 | grep .; then return 0; fi
        sleep 0.1
    done
    cat "$file" >&2
    fail "no line matching /$regex/ in $file"
}

run_lintian() {
    local deb=$1
    # Overrides ship in the package (usr/share/lintian/overrides), each
    # justified in packaging/README.md.
    lintian --fail-on error,warning --display-info "$deb" ||
        fail "lintian on $deb"
    say "lintian: no error, no warning on $(basename "$deb")"
}

# The Debian root of the amd64 test and the gateway running in it, for
# cleanup on any exit.
root=""
gw_pid=""
cleanup() {
    if [ -n "$gw_pid" ]; then kill "$gw_pid" 2>/dev/null || true; fi
    if [ -n "$root" ]; then
        umount "$root/proc" 2>/dev/null || true
        rm -rf "$root" "$root.debs"
    fi
    root=""
}

test_amd64() {
    packaging/build-deb.sh amd64
    local deb
    deb=$(ls -t target/debian/capteurs-gateway_*_amd64.deb | head -1)
    run_lintian "$deb"
    root=$(mktemp -d /tmp/capteurs-root.XXXXXX)
    trap cleanup EXIT
    local work=$root.debs
    mkdir -p "$work"
    cp "$deb" "$work/"
    deb=$work/$(basename "$deb")
    # The same binaries, a newer package version: the upgrade.
    local upgrade=$work/capteurs-gateway_upgrade_amd64.deb
    cargo deb -p capteurs-gateway --no-build --deb-revision 99 --output "$upgrade" >/dev/null
    # cargo-deb clears other versions from target/debian: put ours back.
    cp "$deb" target/debian/

    local tarball=$CACHE/bookworm-amd64.tar
    if [ ! -f "$tarball" ]; then
        say "debootstrap bookworm (cached in $tarball afterwards)"
        mkdir -p "$CACHE"
        rm -rf "$CACHE/build"
        debootstrap --variant=minbase --include=systemd,libdbus-1-3,procps bookworm "$CACHE/build" "$MIRROR" >/dev/null
        tar -C "$CACHE/build" -cf "$tarball.tmp" .
        mv "$tarball.tmp" "$tarball"
        rm -rf "$CACHE/build"
    fi
    tar -C "$root" -xf "$tarball"
    mount -t proc proc "$root/proc" 2>/dev/null || say "(no /proc in the chroot: not permitted here)"
    cp "$deb" "$upgrade" "$root/tmp/"
    local in=(chroot "$root")

    "${in[@]}" dpkg -i "/tmp/$(basename "$deb")" >/dev/null || fail "dpkg -i"
    "${in[@]}" capteurs-gateway --version | grep -q '^capteurs-gateway ' || fail "capteurs-gateway --version"
    "${in[@]}" capteurs-sim --version | grep -q '^capteurs-sim ' || fail "capteurs-sim --version"
    "${in[@]}" getent passwd capteurs >/dev/null || fail "no capteurs user"
    "${in[@]}" id -nG capteurs | grep -qw dialout || fail "capteurs not in dialout"
    [ "$("${in[@]}" stat -c '%U:%G %a' /var/lib/capteurs)" = "capteurs:capteurs 700" ] ||
        fail "/var/lib/capteurs: $("${in[@]}" stat -c '%U:%G %a' /var/lib/capteurs)"
    [ "$("${in[@]}" stat -c '%U:%G %a' /etc/capteurs/passwd)" = "root:capteurs 640" ] ||
        fail "/etc/capteurs/passwd: $("${in[@]}" stat -c '%U:%G %a' /etc/capteurs/passwd)"
    [ "$("${in[@]}" stat -c '%U:%G %a' /etc/capteurs/gateway.toml)" = "root:capteurs 640" ] ||
        fail "/etc/capteurs/gateway.toml: $("${in[@]}" stat -c '%U:%G %a' /etc/capteurs/gateway.toml)"
    # Adding a user keeps the file readable to the service.
    "${in[@]}" capteurs-gateway passwd /etc/capteurs/passwd test-deb --password secret ||
        fail "capteurs-gateway passwd"
    [ "$("${in[@]}" stat -c '%U:%G %a' /etc/capteurs/passwd)" = "root:capteurs 640" ] ||
        fail "passwd changed /etc/capteurs/passwd to $("${in[@]}" stat -c '%U:%G %a' /etc/capteurs/passwd)"
    "${in[@]}" capteurs-gateway passwd /etc/capteurs/passwd test-deb --delete || fail "passwd --delete"
    "${in[@]}" dpkg-query -W -f '${Conffiles}\n' capteurs-gateway | grep -q '/etc/capteurs/gateway.toml' ||
        fail "gateway.toml is not a conffile"
    for f in /usr/share/capteurs/plugins/deadband.wasm /usr/share/man/man1/capteurs-gateway.1.gz \
             /usr/lib/sysusers.d/capteurs-gateway.conf /usr/lib/tmpfiles.d/capteurs-gateway.conf \
             /usr/lib/systemd/system/capteurs-gateway.service /usr/share/doc/capteurs-gateway/gateway.toml.example; do
        [ -e "$root$f" ] || fail "$f missing"
    done
    [ -L "$root/etc/systemd/system/multi-user.target.wants/capteurs-gateway.service" ] ||
        fail "the service is not enabled"
    "${in[@]}" capteurs-gateway --config /etc/capteurs/gateway.toml check-config >/dev/null ||
        fail "check-config on the packaged config"
    say "installed: binaries run, user, directories, conffile, unit enabled"

    "${in[@]}" systemd-analyze verify --man=no /usr/lib/systemd/system/capteurs-gateway.service ||
        fail "systemd-analyze verify"
    local exposure
    exposure=$("${in[@]}" systemd-analyze security --offline=true --no-pager \
        /usr/lib/systemd/system/capteurs-gateway.service 2>&1 | tail -1)
    say "systemd-analyze verify: clean; security: $exposure"

    # The gateway as the service runs it (user capteurs, packaged config),
    # on another port; a QoS 1 message for the (unreachable) cloud stays
    # in the buffer, which must survive the upgrade.
    local port log
    port=$(free_port)
    log=$(mktemp)
    cat >>"$root/etc/capteurs/gateway.toml" <<EOF

# test-deb: a modified conffile must survive the upgrade.
EOF
    sed -i "s/^level = \"info\"/level = \"debug\"/; s/^enabled = false/enabled = true\nservers = [\"mqtt:\/\/127.0.0.1:$(free_port)\"]/" \
        "$root/etc/capteurs/gateway.toml"
    "${in[@]}" capteurs-gateway --config /etc/capteurs/gateway.toml check-config >/dev/null 2>"$log" ||
        { cat "$log" >&2; fail "check-config after the edit"; }
    "${in[@]}" setpriv --reuid=capteurs --regid=capteurs --init-groups \
        capteurs-gateway --config /etc/capteurs/gateway.toml --listen "127.0.0.1:$port" \
        --http-listen 127.0.0.1:0 2>"$log" &
    gw_pid=$!
    wait_line "$log" "MQTT broker listening" >/dev/null
    # The operations listener of the packaged config (another port here).
    local http
    http=$(wait_line "$log" 'HTTP listener.*addr=[0-9.:]+' | sed 's/.*addr=//')
    "${in[@]}" capteurs-gateway status --url "$http" | grep -q '^capteurs-gateway .*: healthy$' ||
        fail "capteurs-gateway status against the installed gateway"
    python3 -c 'import sys, urllib.request; sys.exit(0 if b"capteurs_build_info" in urllib.request.urlopen("http://" + sys.argv[1] + "/metrics").read() else 1)' "$http" ||
        fail "no metrics from the installed gateway"
    mosquitto_pub -h 127.0.0.1 -p "$port" -q 1 -t capteurs/temperature/fr/aubiere/rue_chebarde -m 21.5 ||
        fail "publish to the installed gateway"
    kill "$gw_pid"
    wait "$gw_pid" || true
    gw_pid=""
    [ -s "$root/var/lib/capteurs/buffer.sqlite" ] || fail "no buffer in /var/lib/capteurs"
    local before
    before=$(python3 - "$root/var/lib/capteurs/buffer.sqlite" <<'EOF'
import sqlite3, sys
print(sqlite3.connect(sys.argv[1]).execute("select count(*) from outbox").fetchone()[0])
EOF
)
    [ "$before" = 1 ] || fail "expected 1 buffered message, found $before"
    say "the service user runs the gateway; 1 message buffered for the cloud"

    DEBIAN_FRONTEND=noninteractive "${in[@]}" dpkg -i --force-confdef --force-confold \
        "/tmp/$(basename "$upgrade")" >/dev/null || fail "upgrade"
    "${in[@]}" dpkg-query -W -f '${Version}\n' capteurs-gateway | grep -q -- '-99$' || fail "not upgraded"
    grep -q "test-deb: a modified conffile" "$root/etc/capteurs/gateway.toml" ||
        fail "the upgrade overwrote the modified conffile"
    local after
    after=$(python3 - "$root/var/lib/capteurs/buffer.sqlite" <<'EOF'
import sqlite3, sys
print(sqlite3.connect(sys.argv[1]).execute("select count(*) from outbox").fetchone()[0])
EOF
)
    [ "$after" = 1 ] || fail "the buffered message did not survive the upgrade ($after)"
    # Under systemd the upgrade restarts the running service (in this root
    # systemd is not running: deb-systemd-invoke skips it; the script is
    # what runs on a real system).
    grep -q 'deb-systemd-invoke \$_dh_action .*capteurs-gateway.service' \
        "$root/var/lib/dpkg/info/capteurs-gateway.postinst" ||
        fail "postinst does not restart the service after an upgrade"
    say "upgrade: modified conffile kept, buffered message kept, service restarted"

    "${in[@]}" dpkg -r capteurs-gateway >/dev/null || fail "remove"
    [ -e "$root/var/lib/capteurs/buffer.sqlite" ] || fail "remove deleted the data"
    [ -e "$root/etc/capteurs/gateway.toml" ] || fail "remove deleted the conffile"
    "${in[@]}" dpkg -P capteurs-gateway >/dev/null || fail "purge"
    [ ! -e "$root/var/lib/capteurs" ] || fail "purge left /var/lib/capteurs"
    [ ! -e "$root/etc/capteurs/gateway.toml" ] || fail "purge left the conffile"
    say "remove keeps data and config; purge deletes them"
    cleanup
}

test_arm64() {
    packaging/build-deb.sh arm64
    local deb
    deb=$(ls -t target/debian/capteurs-gateway_*_arm64.deb | head -1)
    run_lintian "$deb"
    local x
    x=$(mktemp -d /tmp/capteurs-arm64.XXXXXX)
    dpkg-deb -x "$deb" "$x"
    file "$x/usr/bin/capteurs-gateway" 2>/dev/null | grep -q aarch64 ||
        dpkg-deb -I "$deb" | grep -q 'Architecture: arm64' || fail "not an arm64 package"
    # The arm64 C library and libdbus from Debian's arm64 architecture (the
    # build added it): qemu finds them at their usual paths. (With `-L
    # /usr/aarch64-linux-gnu`, the cross toolchain's copy, threads hang in
    # qemu 7.2.)
    apt_install libc6:arm64 libdbus-1-3:arm64
    local qemu=(qemu-aarch64-static)
    "${qemu[@]}" "$x/usr/bin/capteurs-gateway" --version | grep -q '^capteurs-gateway ' ||
        fail "arm64 capteurs-gateway --version under qemu"
    "${qemu[@]}" "$x/usr/bin/capteurs-sim" --version | grep -q '^capteurs-sim ' ||
        fail "arm64 capteurs-sim --version under qemu"
    sed "s|/var/lib/capteurs|$x/data|" "$x/etc/capteurs/gateway.toml" >"$x/gateway.toml"
    cat >>"$x/gateway.toml" <<EOF

[[plugins]]
name = "celsius-json"
kind = "transform"
path = "$x/usr/share/capteurs/plugins/celsius_json.wasm"
topics = ["capteurs/#"]
# Emulated, every instruction costs tens of native ones: a real Pi keeps the
# default deadline (20 ms).
timeout_ms = 5000
EOF
    "${qemu[@]}" "$x/usr/bin/capteurs-gateway" --config "$x/gateway.toml" check-config >/dev/null ||
        fail "arm64 check-config under qemu"
    local port log sub
    port=$(free_port)
    log=$x/gateway.log
    "${qemu[@]}" "$x/usr/bin/capteurs-gateway" --config "$x/gateway.toml" --listen "127.0.0.1:$port" \
        --http-listen 127.0.0.1:0 2>"$log" &
    local pid=$!
    # Compiling the plugin with Cranelift under qemu takes a while.
    for _ in $(seq 600); do
        grep -q "MQTT broker listening" "$log" && break
        kill -0 "$pid" 2>/dev/null || { cat "$log" >&2; fail "arm64 gateway exited"; }
        sleep 0.1
    done
    grep -q "MQTT broker listening" "$log" || { cat "$log" >&2; kill "$pid"; fail "arm64 gateway not listening"; }
    sub=$x/sub.out
    mosquitto_sub -h 127.0.0.1 -p "$port" -t 'capteurs/temperature/#' -C 1 -W 30 >"$sub" &
    local sub_pid=$!
    # The subscriber is in once a retained probe comes back.
    for _ in $(seq 50); do
        mosquitto_pub -h 127.0.0.1 -p "$port" -q 1 -t capteurs/temperature/fr/aubiere/rue_chebarde -m 21.5
        sleep 0.2
        [ -s "$sub" ] && break
    done
    wait "$sub_pid" || true
    kill "$pid"
    wait "$pid" || true
    grep -q '"value":21.5' "$sub" || { cat "$log" >&2; fail "arm64: no transformed message (got: $(cat "$sub"))"; }
    grep -q '"unit":"°C"' "$sub" || fail "arm64: celsius-json did not run (got: $(cat "$sub"))"
    say "arm64 under qemu: --version, check-config, broker session through a WASM plugin: $(cat "$sub")"
    rm -rf "$x"
}

for arch in "${archs[@]}"; do
    case "$arch" in
        amd64) test_amd64 ;;
        arm64) test_arm64 ;;
        *) fail "unknown architecture $arch (amd64, arm64)" ;;
    esac
done
say "all package tests passed (${archs[*]})"
