#!/usr/bin/env python3
"""Upstream benchmarks: the store-and-forward buffer and an outage, side by
side with a Mosquitto bridge. Standard library only; needs Debian's
mosquitto and release builds of capteurs-gateway and capteurs-sim.

    tests/bench/upstream.py [--fill-secs 4] [--outage-secs 5] [--rate 2000] [--json FILE]

1. Append: capteurs-sim bench publishes QoS 1 flat out (10 connections,
   64-byte payloads) to the gateway while the cloud is down: every PUBACK
   waits for the buffer's group commit (synchronous=FULL), so the publish
   rate is the buffer's durable append rate. RSS is read with everything
   still buffered (at least 1,000,000 messages).
2. Drain: the gateway restarts with mosquitto up; time until the buffer is
   empty (every row deleted on mosquitto's PUBACK, QoS 1), from the stats
   message. RSS is sampled during the drain.
3. Outage: a steady QoS 1 stream at --rate msg/s for 12 s through (a) our
   gateway and (b) mosquitto bridged to the cloud mosquitto
   (`topic capteurs/# out 1`, cleansession false, defaults otherwise); the
   cloud is stopped for --outage-secs in the middle. A persistent cloud
   subscriber counts the distinct messages that arrive; the cloud has
   `max_queued_messages 0` (no limit) so that the counting subscriber,
   slower than a drain, never has messages dropped on its way: what is
   counted lost was lost before the cloud.
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

from benchlib import free_port, wait_port, rss_kib
import benchlib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GW = os.path.join(ROOT, "target/release/capteurs-gateway")
SIM = os.path.join(ROOT, "target/release/capteurs-sim")
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"








class Mosquitto:
    def __init__(self, work, name, port, extra=""):
        self.conf = os.path.join(work, f"{name}.conf")
        self.port = port
        with open(self.conf, "w") as f:
            f.write(f"user root\nlistener {port} 127.0.0.1\nallow_anonymous true\n{extra}\n")
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen([MOSQUITTO, "-c", self.conf],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)
        return self

    def stop(self):
        if self.proc:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait()
            self.proc = None


class Gateway:
    def __init__(self, work, upstream_port, extra=""):
        self.data = os.path.join(work, "gw-data")
        self.conf = os.path.join(work, "gw.toml")
        with open(self.conf, "w") as f:
            f.write(f"""[gateway]
data_dir = "{self.data}"
[broker]
listen = "127.0.0.1:0"
[upstream]
enabled = true
servers = ["mqtt://127.0.0.1:{upstream_port}"]
reconnect_min_ms = 100
reconnect_max_ms = 1000
stats_interval_secs = 1
status_prefix = "ops"
{extra}
[[upstream.rules]]
pattern = "#"
direction = "out"
qos = 1
""")
        self.proc = None
        self.port = None

    def start(self):
        self.proc = subprocess.Popen([GW, "--config", self.conf], stderr=subprocess.PIPE,
                                     text=True, env={**os.environ, "NO_COLOR": "1"})
        for line in self.proc.stderr:
            m = re.search(r"MQTT broker listening addr=127\.0\.0\.1:(\d+)", line)
            if m:
                self.port = int(m.group(1))
                break
        threading.Thread(target=lambda: [None for _ in self.proc.stderr], daemon=True).start()
        return self

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait()


def sim_bench(port, args):
    out = subprocess.run([SIM, "bench", "--port", str(port), "--json", "-q", *args],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


class StatsWatcher:
    """Follows the gateway's retained stats message on the cloud broker."""

    def __init__(self, port):
        self.proc = subprocess.Popen(
            ["mosquitto_sub", "-p", str(port), "-t", "ops/gateways/+/stats"],
            stdout=subprocess.PIPE, text=True)
        self.last = None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            try:
                self.last = json.loads(line)
            except ValueError:
                pass

    def close(self):
        self.proc.kill()


class Counter:
    """Counts distinct payloads on a topic filter; reconnects with its
    persistent session whenever the broker goes away."""

    def __init__(self, port, topic, client_id):
        self.port, self.topic, self.client_id = port, topic, client_id
        self.seen = set()
        self.total = 0
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _session(self):
        s = benchlib.subscribe(self.port, self.client_id, self.topic, 1, clean=False)
        s.settimeout(0.5)
        buf = b""
        while not self.stop:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                continue
            if not chunk:
                raise OSError("closed")
            pkts, buf = benchlib.packets(buf + chunk)
            for kind, body in pkts:
                if kind >> 4 == 3:
                    _, pid, payload = benchlib.publish_parts(kind, body)
                    if pid:
                        s.sendall(b"\x40\x02" + pid)
                    self.total += 1
                    self.seen.add(payload[:20])  # publisher + sequence number

    def _run(self):
        while not self.stop:
            try:
                self._session()
            except OSError:
                time.sleep(0.1)

    def close(self):
        self.stop = True
        self.thread.join(timeout=3)


def outage(work, label, local_port_of, cloud, rate, outage_secs):
    """A 12 s QoS 1 stream; the cloud stops for outage_secs in the middle."""
    counter = Counter(cloud.port, "capteurs/#", f"counter-{label}")
    time.sleep(0.5)
    result = {}

    def run_bench():
        result["r"] = sim_bench(local_port_of(), [
            "--publishers", "1", "--subscribers", "0", "--qos", "1", "--rate", str(rate),
            "--duration", "12", "--topic", "capteurs/bench"])

    t = threading.Thread(target=run_bench)
    t.start()
    time.sleep(3)
    cloud.stop()
    time.sleep(outage_secs)
    cloud.start()
    t.join()
    # Let whatever is queued arrive.
    last, stable = -1, 0
    while stable < 6:
        time.sleep(0.5)
        stable = stable + 1 if len(counter.seen) == last else 0
        last = len(counter.seen)
    counter.close()
    sent = result["r"]["sent"]
    return {"sent": sent, "arrived": len(counter.seen), "lost": sent - len(counter.seen),
            "duplicates": counter.total - len(counter.seen)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fill-secs", type=float, default=4)
    ap.add_argument("--outage-secs", type=float, default=5)
    ap.add_argument("--rate", type=int, default=2000)
    ap.add_argument("--json")
    a = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "capteurs-gateway", "-p", "capteurs-sim"],
                   cwd=ROOT, check=True)
    work = tempfile.mkdtemp(prefix="capteurs-bench-")
    report = {}
    try:
        # 1. Append rate, cloud down.
        cloud_port = free_port()
        gw = Gateway(work, cloud_port, "[buffer]\nmax_bytes = 1073741824").start()
        r = sim_bench(gw.port, ["--publishers", "10", "--subscribers", "0", "--qos", "1",
                                "--duration", str(a.fill_secs), "--broker-pid", str(gw.proc.pid)])
        time.sleep(0.5)
        report["append"] = {"msg_per_s": round(r["publish_rate"]), "messages": r["sent"],
                            "rss_mib_buffered": round(rss_kib(gw.proc.pid) / 1024, 1),
                            "gateway_cpu_percent": round(r["cpu"]["broker_percent"])}
        gw.stop()
        # 2. Drain to mosquitto at QoS 1.
        cloud = Mosquitto(work, "cloud", cloud_port).start()
        stats = StatsWatcher(cloud_port)
        t0 = time.time()
        gw = Gateway(work, cloud_port, "[buffer]\nmax_bytes = 1073741824").start()
        peak = 0
        while True:
            peak = max(peak, rss_kib(gw.proc.pid))
            s = stats.last
            if s and s["buffer"]["messages"] == 0 and s["forwarded"] > 0:
                break
            time.sleep(0.05)
        took = time.time() - t0
        report["drain"] = {"messages": r["sent"], "seconds": round(took, 2),
                           "msg_per_s": round(r["sent"] / took),
                           "rss_mib_peak": round(peak / 1024, 1)}
        stats.close()
        gw.stop()
        cloud.stop()
        shutil.rmtree(gw.data)
        # 3. Outage: ours vs a mosquitto bridge.
        cloud = Mosquitto(work, "cloud2", free_port(),
                          f"persistence true\npersistence_location {work}/\nmax_queued_messages 0\n").start()
        gw = Gateway(work, cloud.port, "").start()
        report["outage_capteurs"] = outage(work, "gw", lambda: gw.port, cloud, a.rate, a.outage_secs)
        gw.stop()
        bridge_port = free_port()
        bridge = Mosquitto(work, "bridge", bridge_port, f"""connection cloud
address 127.0.0.1:{cloud.port}
topic capteurs/# out 1
cleansession false
""").start()
        report["outage_mosquitto_bridge"] = outage(work, "bridge", lambda: bridge_port, cloud,
                                                   a.rate, a.outage_secs)
        bridge.stop()
        cloud.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["settings"] = vars(a)
    print(json.dumps(report, indent=2))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
