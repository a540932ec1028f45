#!/usr/bin/env python3
"""Plugin benchmarks. Standard library only; builds the release gateway,
capteurs-sim and the example plugins.

    python3 tests/bench/plugins.py [--duration 5] [--reps 3] [--json FILE]

1. Per call: `capteurs-gateway plugin bench` — the median cost of one
   `process` call of a trivial transform (tests/plugins/misbehave on an
   ordinary payload: it returns the message unchanged), and of one
   `authorize` of acl-groups, with and without the decision cache.
2. Throughput: `capteurs-sim bench` (10 publishers -> 1 subscriber, QoS 0
   then QoS 1, 64-byte payloads, flat out) against the gateway without plugins and with
   that trivial transform on every message ("#"); median of --reps runs.
3. Start: the gateway with the 5 example plugins (acl-groups + 4
   transforms), compiled components already cached, from spawn to the first
   accepted TCP connection; median of 5 starts.
"""
import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time

from benchlib import free_port, wait_port, rss_kib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GW = os.path.join(ROOT, "target/release/capteurs-gateway")
SIM = os.path.join(ROOT, "target/release/capteurs-sim")
WASM = os.path.join(ROOT, "plugins/target/wasm32-wasip2/release")




def plugin(name, kind, extra=""):
    path = os.path.join(WASM, name.replace("-", "_") + ".wasm")
    return f'[[plugins]]\nname = "{name}"\nkind = "{kind}"\npath = "{path}"\n{extra}\n'


def gateway(work, port, plugins):
    conf = os.path.join(work, "gw.toml")
    with open(conf, "w") as f:
        f.write(f'[gateway]\ndata_dir = "{work}/data"\n[broker]\nlisten = "127.0.0.1:{port}"\n'
                f'persistence = false\n[log]\nlevel = "warn"\n{plugins}')
    return conf




def per_call():
    out = {}
    text = subprocess.run([GW, "plugin", "bench", os.path.join(WASM, "misbehave.wasm"), "--payload", "21.37"],
                          check=True, capture_output=True, text=True).stdout
    out["transform_process_ns"] = float(re.search(r"median (\d+) ns per call", text).group(1))
    out["transform_batch_ns_per_message"] = float(re.search(r"process-batch of \d+: median (\d+) ns", text).group(1))
    text = subprocess.run([GW, "plugin", "bench", os.path.join(WASM, "acl_groups.wasm"), "--username", "G1",
                           "--action", "publish", "--topic", "isima/G1"],
                          check=True, capture_output=True, text=True).stdout
    nums = re.findall(r"\((no cache|decision cache)\): median (\d+) ns", text)
    for kind, ns in nums:
        out["authorize_ns_" + kind.replace(" ", "_")] = float(ns)
    return out


def throughput(work, plugins, duration, qos):
    port = free_port()
    conf = gateway(work, port, plugins)
    gw = subprocess.Popen([GW, "--config", conf], stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        r = subprocess.run([SIM, "bench", "--port", str(port), "--publishers", "10", "--subscribers", "1",
                            "--fan-in", "--qos", str(qos), "--warmup", "1", "--duration", str(duration),
                            "--json", "-q"], check=True, capture_output=True, text=True).stdout
        return json.loads(r)["delivery_rate"]
    finally:
        gw.terminate()
        gw.wait()


def start_time(work):
    five = (plugin("acl-groups", "auth") + plugin("deadband", "transform") + plugin("celsius-json", "transform")
            + plugin("outlier-filter", "transform") + plugin("downsample", "transform"))
    times = []
    first = None
    for i in range(6):
        port = free_port()
        conf = gateway(work, port, five)
        t0 = time.perf_counter()
        gw = subprocess.Popen([GW, "--config", conf], stderr=subprocess.DEVNULL)
        wait_port(port)
        took = (time.perf_counter() - t0) * 1000
        gw.terminate()
        gw.wait()
        if i == 0:  # the first start compiles and fills the cache
            first = took
        else:
            times.append(took)
    times.sort()
    return {"first_start_ms_compiling": round(first, 1), "cached_start_ms_median": round(times[len(times) // 2], 1),
            "cached_start_ms_all": [round(t, 1) for t in times]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=5)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json")
    a = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "capteurs-gateway", "-p", "capteurs-sim"],
                   cwd=ROOT, check=True)
    subprocess.run(["cargo", "build", "--release", "-q", "--target", "wasm32-wasip2", "--manifest-path",
                    os.path.join(ROOT, "plugins/Cargo.toml")], check=True)
    work = tempfile.mkdtemp(prefix="capteurs-plugin-bench-")
    report = {}
    try:
        report["per_call"] = per_call()
        trivial = plugin("misbehave", "transform", 'topics = ["#"]')
        for qos in (0, 1):
            without = sorted(throughput(work, "", a.duration, qos) for _ in range(a.reps))[a.reps // 2]
            shutil.rmtree(os.path.join(work, "data"), ignore_errors=True)
            with_t = sorted(throughput(work, trivial, a.duration, qos) for _ in range(a.reps))[a.reps // 2]
            shutil.rmtree(os.path.join(work, "data"), ignore_errors=True)
            report[f"throughput_qos{qos}"] = {"without_plugins_msg_per_s": round(without),
                                              "one_transform_msg_per_s": round(with_t),
                                              "ratio": round(with_t / without, 3)}
        shutil.rmtree(os.path.join(work, "data"), ignore_errors=True)
        report["start"] = start_time(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report, indent=2))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
