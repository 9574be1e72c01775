"""Compile (or load from numba's on-disk cache) every binary codec's kernel before the first batch."""

from __future__ import annotations

import importlib
import time

from .registry import _MODULES, decode_batch


def binary_codecs() -> list[str]:
    """Names of the codecs whose module imports and offers ``sample_payloads`` (the binary ones)."""
    names = []
    for name, module_name in sorted(_MODULES.items()):
        try:
            module = importlib.import_module(module_name)
        except Exception:            # a codec module that does not import is reported by get_codec
            continue
        if callable(getattr(module, "sample_payloads", None)):
            names.append(name)
    return names


def warm_up() -> dict[str, float]:
    """Seconds each binary codec took to decode ``sample_payloads(8)``: the gateway calls this at
    start-up so that the JIT compile (or cache load) is not paid by the first uplinks' batch."""
    took = {}
    for name in binary_codecs():
        module = importlib.import_module(_MODULES[name])
        started = time.perf_counter()
        decode_batch(name, module.sample_payloads(8))
        took[name] = time.perf_counter() - started
    return took
