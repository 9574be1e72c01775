"""`ingest.coap_fast.parse_uplink` against its version at another git revision, in the same run.

    python benchmarks/coap_parse.py                 # this tree against HEAD
    python benchmarks/coap_parse.py --rev b2b385d --repeats 15

Datagrams as devices send them (aiocoap-encoded): CON POST /up/{IMEI}?t={token} with Content-Format
42 and a CJ/T 188-sized payload (IMEI and token need the extended option length), a NON with a short
id, and a GET that the parser hands on.  Each repeat times both versions over the same datagrams,
alternating which goes first; the result is the median µs per datagram of each and their ratio.
No timing is asserted anywhere."""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aiocoap  # noqa: E402

from ingest.coap_fast import parse_uplink  # noqa: E402


def _message(mtype, code, mid: int, token: bytes, payload: bytes, path: tuple[str, ...]) -> aiocoap.Message:
    message = aiocoap.Message(code=code, payload=payload)
    message.mtype, message.mid, message.token = mtype, mid, token      # as a device's stack sets them
    message.opt.uri_path = path
    return message


def _datagrams() -> list[bytes]:
    out = []
    for k in range(200):
        m = _message(aiocoap.CON, aiocoap.POST, k, bytes((k & 255, 7)), bytes(range(40)) + bytes((k & 255,)),
                     ("up", f"86037405109{k:04d}"))
        m.opt.uri_query = (f"t=Zk3{k:04d}qP0aL7xW2mN8vB",)
        m.opt.content_format = 42
        out.append(m.encode())
    short = _message(aiocoap.NON, aiocoap.POST, 1, b"\x01", b"\x68" * 30, ("up", "d1"))
    get = _message(aiocoap.CON, aiocoap.GET, 2, b"", b"", (".well-known", "core"))
    return out + [short.encode(), get.encode()]


def _old(rev: str):
    source = subprocess.run(["git", "show", f"{rev}:ingest/coap_fast.py"], cwd=ROOT, check=True,
                            capture_output=True).stdout
    path = Path(tempfile.mkdtemp()) / "coap_fast_old.py"
    path.write_bytes(source)
    spec = importlib.util.spec_from_file_location("coap_fast_old", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.parse_uplink


def _time(parse, datagrams: list[bytes], loops: int) -> float:
    start = time.perf_counter()
    for _ in range(loops):
        for d in datagrams:
            parse(d)
    return (time.perf_counter() - start) / (loops * len(datagrams)) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", default="HEAD")
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--loops", type=int, default=200)
    args = ap.parse_args()
    datagrams = _datagrams()
    old = _old(args.rev)
    assert all(old(d) == parse_uplink(d) for d in datagrams)
    times: dict[str, list[float]] = {"old": [], "new": []}
    for r in range(args.repeats):
        order = [("old", old), ("new", parse_uplink)]
        for name, parse in order if r % 2 == 0 else reversed(order):
            times[name].append(_time(parse, datagrams, args.loops))
    old_us, new_us = statistics.median(times["old"]), statistics.median(times["new"])
    print(f"parse_uplink at {args.rev}: {old_us:.3f} µs/datagram (min {min(times['old']):.3f})")
    print(f"parse_uplink here:        {new_us:.3f} µs/datagram (min {min(times['new']):.3f})")
    print(f"here / {args.rev}: {new_us / old_us:.3f} (median of {args.repeats} repeats, {len(datagrams)} datagrams)")


if __name__ == "__main__":
    main()
