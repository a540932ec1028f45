#!/usr/bin/env python3
"""Issue 13's benchmarks: what the hardening costs and what it saved, with
two gateway binaries (before and after) and Debian's mosquitto side by side.

  python3 tests/bench/hostile.py --before BIN --after BIN [--sim BIN]
        [--sessions 10000] [--duration 5] [--reps 3]

1. Publish cost with N persistent sessions subscribed to `#` (offline,
   QoS 1): one publisher, QoS 1 publishes one after another; the time from
   PUBLISH to PUBACK. Before, the router de-duplicated subscribers with a
   linear search per match: quadratic in N.
2. The read ACL on the hot path: `capteurs-sim bench` QoS 0 fan-out (1
   publisher, 100 subscribers) and fan-in (10 publishers, 1 subscriber)
   with an ACL file (`topic readwrite bench/#`), msg/s delivered; after,
   every delivery is also a receive check (cached per session and topic).
3. Bytes written per message: a persistent session with 300 queued 20 KB
   QoS 1 messages, then 1-byte QoS 1 messages, one per save; the gateway's
   bytes written (/proc/PID/io wchar: every write(2), WAL included) per
   message.
Only loopback; every broker on a free port; temporary data directories.
"""
import argparse
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))
from benchlib import enc_len, free_port, mqtt_str, packets, proc_value, wait_port  # noqa: E402


def start_gateway(bin_path, extra=""):
    d = tempfile.mkdtemp(prefix="bench-gw-")
    port = free_port()
    cfg = os.path.join(d, "gateway.toml")
    with open(cfg, "w") as f:
        f.write(f'[gateway]\ndata_dir = "data"\n[broker]\nlisten = "127.0.0.1:{port}"\n'
                f'{extra}\n[log]\nlevel = "warn"\n')
    p = subprocess.Popen([bin_path, "--config", cfg], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    return p, port, d


def start_mosquitto(extra=""):
    d = tempfile.mkdtemp(prefix="bench-mq-")
    port = free_port()
    cfg = os.path.join(d, "mosquitto.conf")
    with open(cfg, "w") as f:
        f.write(f"listener {port} 127.0.0.1\nallow_anonymous true\n{extra}\n")
    p = subprocess.Popen(["mosquitto", "-c", cfg], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    return p, port, d


def stop(p):
    p.terminate()
    try:
        p.wait(timeout=60)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def connect(port, client_id, clean=True):
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    body = mqtt_str("MQTT") + bytes([4, 0x02 if clean else 0x00]) + struct.pack(">H", 600) + mqtt_str(client_id)
    s.sendall(bytes([0x10]) + enc_len(len(body)) + body)
    read_packet(s, 0x20)
    return s


def read_packet(s, want_type):
    """Reads until a packet of type `want_type` (high nibble) arrives."""
    data = bytearray()
    while True:
        got, rest = packets(bytes(data))
        for t, body in got:
            if t & 0xF0 == want_type:
                return body
        data = bytearray(rest)
        chunk = s.recv(65536)
        if not chunk:
            raise OSError("closed")
        data += chunk


def subscribe(s, topic, qos):
    body = struct.pack(">H", 1) + mqtt_str(topic) + bytes([qos])
    s.sendall(bytes([0x82]) + enc_len(len(body)) + body)
    read_packet(s, 0x90)


def publish(s, topic, payload, qos, pid=1, retain=False):
    body = mqtt_str(topic) + (struct.pack(">H", pid) if qos else b"") + payload
    s.sendall(bytes([0x30 | (qos << 1) | (1 if retain else 0)]) + enc_len(len(body)) + body)
    if qos == 1:
        read_packet(s, 0x40)


def disconnect(s):
    s.sendall(b"\xe0\x00")
    s.close()


def make_sessions(port, n, prefix):
    """n persistent sessions subscribed to `#` at QoS 1, left offline."""
    def work(lo, hi):
        for i in range(lo, hi):
            s = connect(port, f"{prefix}{i}", clean=False)
            subscribe(s, "#", 1)
            disconnect(s)
    threads = []
    step = (n + 7) // 8
    for lo in range(0, n, step):
        t = threading.Thread(target=work, args=(lo, min(n, lo + step)))
        t.start()
        threads.append(t)
    for t in threads:
        t.join()


def publish_cost(start, n, count=200):
    p, port, d = start()
    try:
        t0 = time.time()
        make_sessions(port, n, "s")
        made = time.time() - t0
        pub = connect(port, "publisher")
        times = []
        for i in range(count):
            t = time.perf_counter()
            publish(pub, "t", b"0123456789abcdef", 1, pid=i % 60000 + 1)
            times.append((time.perf_counter() - t) * 1000)
        disconnect(pub)
        return {"sessions": n, "setup_s": round(made, 1), "publishes": count,
                "mean_ms": round(statistics.mean(times), 3),
                "p50_ms": round(statistics.median(times), 3),
                "p99_ms": round(sorted(times)[int(len(times) * 0.99) - 1], 3)}
    finally:
        stop(p)


def sim_bench(sim, port, pid, args):
    cmd = [sim, "bench", "--port", str(port), "--broker-pid", str(pid), "--json", "-q"] + args
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def acl_throughput(starts, sim, duration, reps):
    """Each scenario against each broker in turn (before, after, mosquitto,
    before, after…), so a change in the machine's speed hits all alike."""
    out = {}
    for name, args in [
        ("fan-out q0", ["--publishers", "1", "--subscribers", "100", "--qos", "0"]),
        ("fan-in q0", ["--publishers", "10", "--subscribers", "1", "--qos", "0", "--fan-in"]),
    ]:
        runs = {broker: [] for broker in starts}
        for _ in range(reps):
            for broker, start in starts.items():
                p, port, d = start()
                try:
                    runs[broker].append(sim_bench(sim, port, p.pid, args + ["--duration", str(duration), "--warmup", "1"]))
                finally:
                    stop(p)
        out[name] = {}
        for broker, rs in runs.items():
            vals = sorted(round(r["delivery_rate"]) for r in rs)
            out[name][broker] = {"delivered_per_sec_median": statistics.median(vals), "runs": vals,
                                 "lost": sum(r["lost"] for r in rs)}
        b, a = out[name]["before"], out[name]["after"]
        out[name]["after_vs_before_percent"] = round(a["delivered_per_sec_median"] / b["delivered_per_sec_median"] * 100, 1)
    return out


def wchar(pid):
    """Bytes the process wrote with write(2) and friends, WAL included."""
    return proc_value(pid, "io", "wchar")


def bytes_per_message(bin_path, small=40):
    p, port, d = start_gateway(bin_path, "persist_interval_ms = 100\nmax_queued = 100000")
    try:
        s = connect(port, "slow", clean=False)
        subscribe(s, "big/#", 1)
        disconnect(s)
        pub = connect(port, "pub")
        for i in range(300):
            publish(pub, "big/x", b"x" * 20000, 1, pid=i + 1)
        time.sleep(1.0)  # saved (every 100 ms)
        before = wchar(p.pid)
        for i in range(small):
            publish(pub, "big/y", b"1", 1, pid=1000 + i)
            time.sleep(0.15)  # one message per save
        time.sleep(0.3)
        after = wchar(p.pid)
        disconnect(pub)
        return {"messages": small, "bytes_written": after - before,
                "bytes_per_message": (after - before) // small}
    finally:
        stop(p)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", required=True)
    ap.add_argument("--after", required=True)
    ap.add_argument("--sim", default=None)
    ap.add_argument("--sessions", type=int, default=10000)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--only", default="123")
    a = ap.parse_args()
    sim = a.sim or os.path.join(os.path.dirname(a.after), "capteurs-sim")
    report = {}
    if "1" in a.only:
        report["publish_cost"] = {
            "before": publish_cost(lambda: start_gateway(a.before), a.sessions),
            "after": publish_cost(lambda: start_gateway(a.after), a.sessions),
            "mosquitto": publish_cost(lambda: start_mosquitto(), a.sessions),
        }
        print(json.dumps({"publish_cost": report["publish_cost"]}), flush=True)
    if "2" in a.only:
        def acl_gw(bin_path, acl):
            def start():
                d = tempfile.mkdtemp(prefix="bench-acl-")
                path = os.path.join(d, "acl")
                with open(path, "w") as f:
                    f.write(acl)
                return start_gateway(bin_path, f'acl_file = "{path}"')
            return start
        acl = "topic readwrite bench/#\n"
        report["read_acl"] = acl_throughput({
            "before": acl_gw(a.before, acl),
            "after": acl_gw(a.after, acl),
            "mosquitto": lambda: start_mosquitto_acl(acl),
        }, sim, a.duration, a.reps)
        print(json.dumps({"read_acl": report["read_acl"]}), flush=True)
    if "3" in a.only:
        report["bytes_per_message"] = {
            "before": bytes_per_message(a.before),
            "after": bytes_per_message(a.after),
        }
        print(json.dumps({"bytes_per_message": report["bytes_per_message"]}), flush=True)


def start_mosquitto_acl(acl):
    d = tempfile.mkdtemp(prefix="bench-mqacl-")
    os.chmod(d, 0o755)  # mosquitto started as root reads it as user mosquitto
    path = os.path.join(d, "acl")
    with open(path, "w") as f:
        f.write(acl)
    os.chmod(path, 0o644)
    return start_mosquitto(f"acl_file {path}")


if __name__ == "__main__":
    main()
