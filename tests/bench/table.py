#!/usr/bin/env python3
"""Prints the Markdown tables of BENCHMARKS.md from broker.sh's results.jsonl.

    table.py results.jsonl

Throughput: the median run (by delivery rate) of each broker and scenario.
Latency: p50/p99/max in microseconds. Memory: RSS idle and with N clients.
"""
import json
import sys
from collections import defaultdict


def main():
    runs = defaultdict(list)
    with open(sys.argv[1]) as f:
        for line in f:
            r = json.loads(line)
            runs[(r["broker"], r["scenario"])].append(r["report"])

    def median(broker, scenario):
        rs = sorted(runs.get((broker, scenario), []), key=lambda r: r["delivery_rate"])
        return rs[len(rs) // 2] if rs else None

    print("| scenario | broker | published msg/s | delivered msg/s | lost | broker CPU | sim CPU | runs |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for scenario in ["qos0-fan-in", "qos1-fan-in", "qos0-fan-out", "qos1-fan-out"]:
        for broker in ["capteurs", "mosquitto"]:
            r = median(broker, scenario)
            if r is None:
                continue
            lost = r["lost"] / r["expected_deliveries"] * 100 if r["expected_deliveries"] else 0
            print(
                f"| {scenario} | {broker} | {r['publish_rate']:,.0f} | {r['delivery_rate']:,.0f} "
                f"| {lost:.1f} % | {r['cpu']['broker_percent']:.0f} % | {r['cpu']['bench_percent']:.0f} % "
                f"| {len(runs[(broker, scenario)])} |"
            )
    print()
    print("| latency at 2,000 msg/s | broker | p50 µs | p90 µs | p99 µs | max µs | lost |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for q in (0, 1, 2):
        for broker in ["capteurs", "mosquitto", "mosquitto-nodelay"]:
            for r in runs.get((broker, f"latency-qos{q}"), []):
                l = r["latency_us"]
                print(f"| QoS {q} | {broker} | {l['p50']} | {l['p90']} | {l['p99']} | {l['max']} | {r['lost']} |")
    print()
    print("| memory | broker | RSS idle | RSS with clients | clients |")
    print("|---|---|---:|---:|---:|")
    for broker in ["capteurs", "mosquitto"]:
        for r in runs.get((broker, "memory"), []):
            print(
                f"| 1,000 idle clients | {broker} | {r['rss_idle_kib'] / 1024:.1f} MiB "
                f"| {r['rss_with_clients_kib'] / 1024:.1f} MiB | {r['clients']} |"
            )


if __name__ == "__main__":
    main()
