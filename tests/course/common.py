"""What the course scripts share: where the classroom broker is and which
group we are (the course hard-codes cloudmqtt.com and "GX"), and whole lines
on stdout (paho's network thread and the main thread both print)."""
import argparse
import sys
import threading


class _LineAtomic:
    """print() writes the text, then "\\n": from two threads, lines interleave.
    This keeps each thread's partial line and writes whole lines, one at a time."""

    def __init__(self, out):
        self._out = out
        self._lock = threading.Lock()
        self._partial = threading.local()

    def write(self, s):
        text = getattr(self._partial, "text", "") + s
        *lines, self._partial.text = text.split("\n")
        if lines:
            with self._lock:
                self._out.write("".join(line + "\n" for line in lines))
                self._out.flush()
        return len(s)

    def flush(self):
        self._out.flush()

    def __getattr__(self, name):
        return getattr(self._out, name)


def line_atomic_stdout():
    if not isinstance(sys.stdout, _LineAtomic):
        sys.stdout = _LineAtomic(sys.stdout)


def args(description, extra=None):
    line_atomic_stdout()
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=1883)
    p.add_argument("--group", default="1", help="X in GX / isimaGX")
    p.add_argument("--username", help="default: GX")
    p.add_argument("--password", help="default: isimaGX")
    if extra:
        extra(p)
    a = p.parse_args()
    a.username = a.username if a.username is not None else "G" + a.group
    a.password = a.password if a.password is not None else "isimaG" + a.group
    a.gx = "G" + a.group
    return a
