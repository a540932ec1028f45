"""Command-line arguments shared by the course scripts: where the classroom
broker is and which group we are (the course hard-codes cloudmqtt.com and "GX")."""
import argparse


def args(description, extra=None):
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
