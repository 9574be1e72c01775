"""Fill numba's on-disk cache at image build time, so that no container pays the JIT compile.

Every kernel of the project is declared `@nb.njit(cache=True)` (decoders/*, analytics/rollups.py):
the first call for a signature compiles it and writes `<function>-<line>.py311.nbi/.nbc` into
NUMBA_CACHE_DIR; a later process with the same source files (same mtime and size, as in an image
layer) and the same CPU loads them instead of compiling.  This runs what the gateway runs at its
start (`decoders.warmup.warm_up`: every binary codec on `sample_payloads`) and the rollup kernels of
the write path (`reduce_groups`, `merge`) on a representative batch, then reports every cached
kernel that is still not compiled.  On a host whose CPU differs from the build machine's, numba
compiles again once and writes the new entries beside these (the directory stays writable).

    NUMBA_CACHE_DIR=/var/cache/iotjx/numba python deploy/warm_numba.py

Exit status 1 when the cache directory received no index file (NUMBA_CACHE_DIR unset or not writable).
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

# Modules that declare cache=True kernels; tests/deploy/test_dockerfile.py checks the list against a grep.
KERNEL_MODULES = ("decoders.bcd", "decoders.cjt188_kernel", "decoders.cjt188_layout", "decoders.gb26875_kernel",
                  "decoders.gbt43229_crc", "decoders.gbt43229_kernel", "decoders.parking", "analytics.rollups")


def warm_rollups(rows: int = 4096, columns: int = 6) -> None:
    """The rollup kernels on a batch shaped like a gateway's: int64 keys and buckets, float64 times
    and a float64[n, k] block with missing values."""
    import numpy as np

    from analytics.rollups import merge, reduce_groups

    rng = np.random.default_rng(0)
    keys = rng.integers(1, 500, rows, dtype=np.int64)
    buckets = (1_767_196_800 + 900 * rng.integers(0, 96, rows)).astype(np.int64)
    times = buckets.astype(np.float64) + rng.uniform(0, 900, rows)
    values = rng.normal(size=(rows, columns))
    values[rng.random((rows, columns)) < 0.1] = np.nan
    half = rows // 2
    merge(reduce_groups(keys[:half], buckets[:half], times[:half], values[:half]),
          reduce_groups(keys[half:], buckets[half:], times[half:], values[half:]))


def uncompiled() -> list[str]:
    """`module.function` of every cache=True kernel that has no compiled signature in this process."""
    from numba.core.registry import CPUDispatcher

    out = []
    for name in KERNEL_MODULES:
        module = importlib.import_module(name)
        for attr, value in vars(module).items():
            if isinstance(value, CPUDispatcher) and value.__module__ == name and not value.signatures:
                out.append(f"{name}.{attr}")
    return sorted(out)


def main() -> int:
    cache_dir = os.environ.get("NUMBA_CACHE_DIR")
    if not cache_dir:
        print("NUMBA_CACHE_DIR is not set: numba would write next to the installed sources", file=sys.stderr)
        return 1
    from decoders.warmup import warm_up

    for codec, seconds in warm_up().items():
        print(f"codec {codec}: {seconds:.2f} s")
    warm_rollups()
    indexes = sorted(Path(cache_dir).rglob("*.nbi"))
    print(f"{len(indexes)} cached kernels in {cache_dir}")
    left = uncompiled()
    if left:
        print("not compiled by the warm-up (inlined into their callers, or compiled at first use):", ", ".join(left))
    return 0 if indexes else 1


if __name__ == "__main__":
    sys.exit(main())
