#!/usr/bin/env python3
"""Serial source benchmark: lines written on pseudo-terminals, timed until a
subscriber of the gateway's broker receives them. Standard library only;
needs a release build of capteurs-gateway.

    python3 tests/bench/serial.py [--ports 50] [--rate 100] [--secs 10] [--json FILE]

Each port is a pty pair (the gateway opens the slave as a serial port,
`format = "plain"`, one sensor per port on capteurs/temperature/fr/bench/pN);
one writer thread writes `--rate` lines per second to every port, each line
a number that encodes its sequence number, and records when it wrote it. A
raw MQTT 3.1.1 subscriber (QoS 0, `capteurs/#`) notes when each arrives.
Latency is write() on the pty master -> the PUBLISH read by the subscriber,
both in this process, so it includes the pty, the gateway's serial read and
parse, the broker and the subscriber's own socket. Run twice: one port
(latency) and --ports 50 (throughput: does the gateway keep up?).
"""
import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tty

from benchlib import free_port, wait_port, rss_kib
import benchlib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GW = os.path.join(ROOT, "target/release/capteurs-gateway")




def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        x = f.read().split(")")[1].split()
    return int(x[11]) + int(x[12])


class Subscriber:
    def __init__(self, port):
        self.s = benchlib.subscribe(port, "bench-sub", "capteurs/temperature/#", 0)
        self.arrivals = []  # (time, topic, payload)
        self.stop = False
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        buf = b""
        self.s.settimeout(0.2)
        while not self.stop:
            try:
                chunk = self.s.recv(1 << 16)
            except socket.timeout:
                continue
            now = time.perf_counter()
            if not chunk:
                return
            pkts, buf = benchlib.packets(buf + chunk)
            for kind, body in pkts:
                if kind >> 4 == 9:
                    self.ready.set()
                elif kind >> 4 == 3:
                    topic, _, payload = benchlib.publish_parts(kind, body)
                    self.arrivals.append((now, topic, payload))


def run(ports, rate, secs):
    work = tempfile.mkdtemp(prefix="capteurs-serial-bench-")
    ptys = []
    for _ in range(ports):
        master, slave = os.openpty()
        tty.setraw(slave)
        ptys.append((master, slave, os.ttyname(slave)))
    conf = os.path.join(work, "gw.toml")
    with open(conf, "w") as f:
        f.write(f'[gateway]\ndata_dir = "{work}/data"\n[broker]\nlisten = "127.0.0.1:0"\n'
                '[sources]\nlog_interval_secs = 60\n')
        for i, (_, _, path) in enumerate(ptys):
            f.write(f'[[serial]]\nport = "{path}"\nformat = "plain"\n'
                    f'[[sensors]]\nid = "p{i}"\nsource = "serial:{path}"\npays = "fr"\n'
                    f'ville = "bench"\nrue = "p{i}"\nretain = false\n')
    gw = subprocess.Popen([GW, "--config", conf], stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "NO_COLOR": "1"})
    port = None
    opened = 0
    for line in gw.stderr:
        m = re.search(r"MQTT broker listening addr=127\.0\.0\.1:(\d+)", line)
        if m:
            port = int(m.group(1))
        if "serial port open" in line:
            opened += 1
        if port and opened == ports:
            break
    threading.Thread(target=lambda: [None for _ in gw.stderr], daemon=True).start()
    sub = Subscriber(port)
    sub.ready.wait(5)
    sent = {}  # (port index, seq) -> time written
    period = 1.0 / rate
    start = time.perf_counter()
    c0 = cpu_ticks(gw.pid)
    seq = 0
    while True:
        due = start + seq * period
        now = time.perf_counter()
        if due - start >= secs:
            break
        if due > now:
            time.sleep(due - now)
        value = f"{seq / 1000:.3f}\n".encode()
        for i, (master, _, _) in enumerate(ptys):
            sent[(i, seq)] = time.perf_counter()
            os.write(master, value)
        seq += 1
    wall = time.perf_counter() - start
    # Let the last ones arrive.
    deadline = time.time() + 5
    while len(sub.arrivals) < len(sent) and time.time() < deadline:
        time.sleep(0.05)
    cpu = (cpu_ticks(gw.pid) - c0) / os.sysconf("SC_CLK_TCK") / wall * 100
    rss = rss_kib(gw.pid) / 1024
    sub.stop = True
    lat = []
    seen = set()
    for t, topic, payload in sub.arrivals:
        i = int(topic.rsplit(b"/p", 1)[1])
        s = round(float(payload) * 1000)
        if (i, s) in sent and (i, s) not in seen:
            seen.add((i, s))
            lat.append((t - sent[(i, s)]) * 1000)
    lat.sort()
    q = lambda p: round(lat[min(len(lat) - 1, int(p * len(lat)))], 3) if lat else None
    gw.send_signal(signal.SIGTERM)
    gw.wait()
    for master, slave, _ in ptys:
        os.close(master)
        os.close(slave)
    shutil.rmtree(work, ignore_errors=True)
    return {"ports": ports, "rate_per_port": rate, "secs": secs,
            "lines": len(sent), "delivered": len(seen), "lost": len(sent) - len(seen),
            "achieved_lines_per_s": round(len(sent) / wall),
            "latency_ms": {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": round(lat[-1], 3) if lat else None},
            "gateway_cpu_percent": round(cpu), "gateway_rss_mib": round(rss, 1)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ports", type=int, default=None)
    ap.add_argument("--rate", type=int, default=100)
    ap.add_argument("--secs", type=float, default=10)
    ap.add_argument("--json")
    a = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "capteurs-gateway"], cwd=ROOT, check=True)
    runs = [run(a.ports, a.rate, a.secs)] if a.ports else [run(1, a.rate, a.secs), run(50, a.rate, a.secs)]
    print(json.dumps(runs, indent=2))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(runs, f, indent=2)


if __name__ == "__main__":
    main()
