"""What the benchmark scripts share: free ports, waiting for a listener,
RSS, and a minimal MQTT 3.1.1 subscriber (standard library only, so the
benchmarks need nothing installed)."""
import socket
import struct
import time


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_port(port, timeout=10):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.001)
    raise RuntimeError(f"nothing listens on {port}")


def proc_value(pid, file, key):
    """The number after `key:` in /proc/PID/FILE (0 if absent)."""
    with open(f"/proc/{pid}/{file}") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def rss_kib(pid):
    return proc_value(pid, "status", "VmRSS")


def enc_len(n):
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def mqtt_str(s):
    b = s.encode()
    return struct.pack(">H", len(b)) + b


def subscribe(port, client_id, topic, qos, clean=True, timeout=2):
    """Connects, subscribes; returns the socket (SUBACK not awaited)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    flags = 0x02 if clean else 0x00
    body = mqtt_str("MQTT") + bytes([4, flags]) + struct.pack(">H", 60) + mqtt_str(client_id)
    s.sendall(bytes([0x10]) + enc_len(len(body)) + body)
    if s.recv(4)[:2] != b"\x20\x02":
        raise OSError("no CONNACK")
    body = struct.pack(">H", 1) + mqtt_str(topic) + bytes([qos])
    s.sendall(bytes([0x82]) + enc_len(len(body)) + body)
    return s


def packets(buf):
    """Splits complete packets off `buf`: returns ([(type byte, body)], rest)."""
    out = []
    while len(buf) >= 2:
        mult, n, i = 1, 0, 1
        while True:
            if i >= len(buf):
                return out, buf
            b = buf[i]
            n += (b & 127) * mult
            mult *= 128
            i += 1
            if not b & 128:
                break
        if len(buf) < i + n:
            break
        out.append((buf[0], buf[i:i + n]))
        buf = buf[i + n:]
    return out, buf


def publish_parts(kind, body):
    """(topic, packet id or None, payload) of a PUBLISH."""
    tlen = struct.unpack(">H", body[:2])[0]
    pos = 2 + tlen
    pid = None
    if (kind >> 1) & 3:
        pid = body[pos:pos + 2]
        pos += 2
    return body[2:2 + tlen], pid, body[pos:]
