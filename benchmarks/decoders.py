"""Decoder throughput: numba batch vs the plain-Python reference, and the JIT compile cost.

    python benchmarks/decoders.py                      # every binary codec that imports
    python benchmarks/decoders.py --codec cjt188 --repeats 5

For each binary codec (its module imports and has ``sample_payloads``): frames/s of
``decode_batch`` on an already packed batch (``decoders.pack`` not timed; records not built — the
gateway reads the columns) and of the reference ``decode`` called once per frame, at batch sizes
1, 100, 10,000 and 1,000,000; min / median / max over repeats and the median ratio.  The reference
at 1,000,000 is extrapolated from its 100,000 rate (the output says so).  Batches larger than
10,000 repeat 10,000 distinct sample frames.  The JIT compile is timed in a fresh subprocess with an
empty numba cache (NUMBA_CACHE_DIR in a temporary directory) and again in a fresh subprocess
that finds that cache on disk (``cache=True``) — which is what keeps the compile off the gateway's
first batch, together with ``decoders.warmup.warm_up()`` at start-up.  No timing is asserted.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numba  # noqa: E402
import numpy as np  # noqa: E402

import decoders  # noqa: E402
from decoders import DecodeError  # noqa: E402
from decoders.warmup import binary_codecs  # noqa: E402

SIZES = (1, 100, 10_000, 1_000_000)
DISTINCT = 10_000
REFERENCE_LIMIT = 100_000
MIN_SECONDS = 0.2            # small batches are looped until one measurement lasts this long

_COMPILE_PROBE = """
import importlib, sys, time
t0 = time.perf_counter()
import decoders
from decoders.registry import _MODULES
module = importlib.import_module(_MODULES[sys.argv[1]])
payloads = module.sample_payloads(8)
t1 = time.perf_counter()
decoders.decode_batch(sys.argv[1], payloads)
t2 = time.perf_counter()
print(t1 - t0, t2 - t1)
"""


def _payloads(codec: str, n: int) -> list[bytes]:
    module = __import__(decoders.registry._MODULES[codec], fromlist=["sample_payloads"])
    distinct = module.sample_payloads(min(n, DISTINCT), 1)
    return (distinct * (n // len(distinct) + 1))[:n]


def _rate(run, frames: int, repeats: int, warm: bool = True) -> list[float]:
    """frames/s of `run` (which handles `frames` frames), one figure per repeat."""
    if warm:
        run()                                            # compile, fill caches
    rates = []
    for _ in range(repeats):
        loops, elapsed = 0, 0.0
        started = time.perf_counter()
        while elapsed < MIN_SECONDS or loops == 0:
            run()
            loops += 1
            elapsed = time.perf_counter() - started
        rates.append(frames * loops / elapsed)
    return rates


def _reference_run(codec: str, payloads: list[bytes]):
    def run():
        for p in payloads:
            try:
                decoders.decode(codec, p)
            except DecodeError:
                pass
    return run


def bench_codec(codec: str, sizes: tuple[int, ...], repeats: int) -> list[dict]:
    rows = []
    for size in sizes:
        payloads = _payloads(codec, size)
        packed = decoders.pack(payloads)
        batch_rates = _rate(lambda: decoders.decode_batch(codec, packed), size,
                            repeats if size < 1_000_000 else max(2, repeats // 2))
        if size <= REFERENCE_LIMIT:
            ref_rates = _rate(_reference_run(codec, payloads), size, repeats if size < REFERENCE_LIMIT else 2,
                              warm=size < 1000)
            note = ""
        else:
            ref_rates = _rate(_reference_run(codec, _payloads(codec, REFERENCE_LIMIT)), REFERENCE_LIMIT, 2, warm=False)
            note = f"reference extrapolated from {REFERENCE_LIMIT:,} frames"
        rows.append({"codec": codec, "size": size, "batch": batch_rates, "reference": ref_rates,
                     "ratio": statistics.median(batch_rates) / statistics.median(ref_rates), "note": note})
    return rows


def compile_times(codec: str) -> tuple[float, float, float]:
    """(cold compile s, cached load s, import s) of the first decode_batch in fresh subprocesses."""
    with tempfile.TemporaryDirectory() as cache_dir:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache_dir, "PYTHONPATH": str(ROOT)}
        results = []
        for _ in range(2):                                # 1st: empty cache, 2nd: the cache it wrote
            out = subprocess.run([sys.executable, "-c", _COMPILE_PROBE, codec], env=env, cwd=ROOT,
                                 capture_output=True, text=True, check=True).stdout.split()
            results.append((float(out[0]), float(out[1])))
    return results[0][1], results[1][1], results[1][0]


def _fmt(rates: list[float]) -> str:
    return f"{min(rates):>12,.0f} {statistics.median(rates):>12,.0f} {max(rates):>12,.0f}"


def _ratio(r: float) -> str:
    return f"{r:.2f}x" if r < 10 else f"{r:,.0f}x"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--codec", action="append", help="codec name (repeatable); default: every binary codec")
    parser.add_argument("--sizes", default=",".join(str(s) for s in SIZES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="skip the subprocess compile timing")
    args = parser.parse_args(argv)
    codecs = args.codec or binary_codecs()
    sizes = tuple(int(s) for s in args.sizes.split(","))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, numba {numba.__version__}, numpy {np.__version__}")
    print(f"frames/s, min / median / max over repeats (1M batch: {max(2, args.repeats // 2)} repeats)")
    header = (f"{'codec':<9} {'batch':>9}  {'numba min':>12} {'median':>12} {'max':>12}  "
              f"{'reference min':>13} {'median':>12} {'max':>12}  {'ratio':>7}")
    print(header)
    print("-" * len(header))
    for codec in codecs:
        for row in bench_codec(codec, sizes, args.repeats):
            print(f"{codec:<9} {row['size']:>9,}  {_fmt(row['batch'])}  {_fmt(row['reference']):>38}  "
                  f"{_ratio(row['ratio']):>7}  {row['note']}")
    if not args.no_compile:
        print()
        print(f"{'codec':<9} {'JIT compile, empty cache':>25} {'load from on-disk cache':>24} {'import + samples':>17}")
        for codec in codecs:
            cold, cached, imported = compile_times(codec)
            print(f"{codec:<9} {cold:>24.2f}s {cached:>23.2f}s {imported:>16.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
