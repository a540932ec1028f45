#!/usr/bin/env bash
# Broker benchmark: the same load generator (capteurs-sim bench) against our
# gateway and against Debian's mosquitto, side by side on this machine.
#
#   tests/bench/broker.sh [--reps N] [--duration SECS] [--out DIR]
#
# Scenarios (64-byte payloads), as in issue 2: QoS 0 and QoS 1 fan-in
# (10 publishers -> 1 subscriber on one topic), QoS 0 and QoS 1 fan-out
# (1 publisher -> 100 subscribers), publish->deliver latency at a fixed
# 2,000 msg/s for QoS 0/1/2, and RSS idle and with 1,000 idle clients.
# Each throughput scenario runs --reps times (default 3) per broker; the
# table shows the median run. Raw JSON reports go to DIR/results.jsonl.
# Both brokers listen on free loopback ports and keep nothing on disk
# (ours: persistence on in a temp dir, as shipped; mosquitto: default).
set -euo pipefail

reps=3
duration=10
out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --reps) reps=$2; shift 2 ;;
    --duration) duration=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "usage: $0 [--reps N] [--duration SECS] [--out DIR]" >&2; exit 2 ;;
  esac
done

root=$(cd "$(dirname "$0")/../.." && pwd)
work=$(mktemp -d)
out=${out:-$work}
mkdir -p "$out"
results="$out/results.jsonl"
: > "$results"
gw_pid=""
mq_pid=""
cleanup() {
  [ -n "$gw_pid" ] && kill "$gw_pid" 2>/dev/null || true
  [ -n "$mq_pid" ] && kill "$mq_pid" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap cleanup EXIT

command -v mosquitto >/dev/null || { echo "mosquitto not installed (apt-get install mosquitto)" >&2; exit 1; }
(cd "$root" && cargo build --release -q -p capteurs-gateway -p capteurs-sim)
gw=$root/target/release/capteurs-gateway
sim=$root/target/release/capteurs-sim

free_port() {
  python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'
}

wait_port() { # port
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "nothing listening on 127.0.0.1:$1" >&2
  return 1
}

start_gateway() {
  rm -rf "$work/gw-data"
  "$gw" --listen 127.0.0.1:0 --data-dir "$work/gw-data" 2> "$work/gw.log" &
  gw_pid=$!
  for _ in $(seq 100); do
    gw_port=$(grep -o 'MQTT broker listening addr=127.0.0.1:[0-9]*' "$work/gw.log" | cut -d: -f2 || true)
    [ -n "$gw_port" ] && return 0
    sleep 0.05
  done
  echo "gateway did not start:" >&2
  cat "$work/gw.log" >&2
  exit 1
}

start_mosquitto() { # extra config line
  mq_port=$(free_port)
  printf 'listener %s 127.0.0.1\nallow_anonymous true\n%s\n' "$mq_port" "${1:-}" > "$work/mosquitto.conf"
  mosquitto -c "$work/mosquitto.conf" > "$work/mosquitto.log" 2>&1 &
  mq_pid=$!
  wait_port "$mq_port"
}

stop() { # pid
  kill "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}

bench() { # broker-name port pid scenario args...
  local broker=$1 port=$2 pid=$3 scenario=$4
  shift 4
  echo "== $broker $scenario: capteurs-sim bench --port PORT $* --broker-pid PID --json" >&2
  local json
  json=$("$sim" bench --port "$port" --broker-pid "$pid" -q --json "$@")
  printf '{"broker":"%s","scenario":"%s","report":%s}\n' "$broker" "$scenario" "$json" >> "$results"
}

scenarios() { # broker-name port pid
  local r
  for r in $(seq "$reps"); do
    bench "$1" "$2" "$3" qos0-fan-in --publishers 10 --subscribers 1 --fan-in --qos 0 --warmup 1 --duration "$duration"
    bench "$1" "$2" "$3" qos1-fan-in --publishers 10 --subscribers 1 --fan-in --qos 1 --warmup 1 --duration "$duration"
    bench "$1" "$2" "$3" qos0-fan-out --publishers 1 --subscribers 100 --qos 0 --warmup 1 --duration "$duration"
    bench "$1" "$2" "$3" qos1-fan-out --publishers 1 --subscribers 100 --qos 1 --warmup 1 --duration "$duration"
  done
  local q
  for q in 0 1 2; do
    bench "$1" "$2" "$3" "latency-qos$q" --publishers 10 --subscribers 1 --fan-in --qos "$q" --rate 2000 --warmup 1 --duration "$duration"
  done
}

rss() { # broker-name port pid
  local line
  line=$(python3 "$root/tests/bench/idle_clients.py" 127.0.0.1 "$2" 1000 "$3" --hold 2)
  echo "== $1 memory: $line" >&2
  printf '{"broker":"%s","scenario":"memory","report":%s}\n' "$1" "$line" >> "$results"
}

ulimit -n 8192

start_gateway
rss capteurs "$gw_port" "$gw_pid"
stop "$gw_pid"; gw_pid=""
start_gateway
scenarios capteurs "$gw_port" "$gw_pid"
stop "$gw_pid"; gw_pid=""

start_mosquitto
rss mosquitto "$mq_port" "$mq_pid"
stop "$mq_pid"; mq_pid=""
start_mosquitto
scenarios mosquitto "$mq_port" "$mq_pid"
stop "$mq_pid"; mq_pid=""
# mosquitto leaves Nagle on by default; measure its latency with it off too.
start_mosquitto "set_tcp_nodelay true"
for q in 0 1 2; do
  bench mosquitto-nodelay "$mq_port" "$mq_pid" "latency-qos$q" --publishers 10 --subscribers 1 --fan-in --qos "$q" --rate 2000 --warmup 1 --duration "$duration"
done
stop "$mq_pid"; mq_pid=""

python3 "$root/tests/bench/table.py" "$results"
echo "raw reports: $results" >&2
