"""Device payload codecs: pure functions from bytes to readings, no I/O.

Public entry points, the same for every codec:

* ``decode(codec, payload, settings=None) -> dict`` — the plain-Python reference decoder;
  raises ``DecodeError`` whose ``.reason`` is a stable short code.
* ``decode_batch(codec, payloads, settings=None) -> Batch`` — one call for many frames; binary
  codecs run a numba kernel over one packed buffer.  Never raises for a bad frame: each frame gets
  a status code (``errors.REASONS``).
* ``encode(codec, fields, settings=None) -> bytes`` — what a device would send (simulators, tests).
"""

from __future__ import annotations

from .errors import REASONS, REASON_CODE, DecodeError
from .registry import Batch, Codec, codec_names, decode, decode_batch, encode, get_codec, pack

__all__ = [
    "REASONS",
    "REASON_CODE",
    "Batch",
    "Codec",
    "DecodeError",
    "codec_names",
    "decode",
    "decode_batch",
    "encode",
    "get_codec",
    "pack",
]
