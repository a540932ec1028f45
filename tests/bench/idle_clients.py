#!/usr/bin/env python3
"""Holds N idle MQTT 3.1.1 connections to a broker, then prints the broker's RSS.

    idle_clients.py HOST PORT N PID [--hold SECS]

Used by tests/bench/broker.sh to measure memory with 1,000 idle clients on
our gateway and on mosquitto alike. Raw sockets, no client library: each
connection sends CONNECT (keep-alive 600 s) and waits for CONNACK 0.
"""
import socket
import struct
import sys
import time


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def connect(host, port, client_id):
    s = socket.create_connection((host, port), timeout=10)
    cid = client_id.encode()
    body = b"\x00\x04MQTT\x04\x02" + struct.pack(">H", 600) + struct.pack(">H", len(cid)) + cid
    s.sendall(bytes([0x10, len(body)]) + body)
    ack = s.recv(4)
    if ack != b"\x20\x02\x00\x00":
        raise RuntimeError(f"{client_id}: CONNACK {ack!r}")
    return s


def main():
    host, port, n, pid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    hold = float(sys.argv[6]) if len(sys.argv) > 6 and sys.argv[5] == "--hold" else 1.0
    before = rss_kib(pid)
    socks = [connect(host, port, f"idle-{i}") for i in range(n)]
    time.sleep(hold)
    after = rss_kib(pid)
    print(f'{{"clients": {n}, "rss_idle_kib": {before}, "rss_with_clients_kib": {after}}}')
    for s in socks:
        s.close()


if __name__ == "__main__":
    main()
