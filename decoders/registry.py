"""The codec registry: one name per wire format, looked up lazily so that importing ``decoders``
does not compile every numba kernel."""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import REASON_CODE, REASONS, DecodeError

Settings = Mapping[str, Any]
# (buffer, offsets, settings) -> (status per frame, columns); offsets has n + 1 entries.
BatchKernel = Callable[[np.ndarray, np.ndarray, Settings], tuple[np.ndarray, dict[str, np.ndarray]]]


@dataclass(frozen=True, slots=True)
class Codec:
    """A wire format: its reference decoder, optional numba batch decoder, and encoder."""

    name: str
    family: str                                   # water, fire, traffic, envelope, generic
    fields: Mapping[str, str]                     # field name -> unit and meaning (README, docs)
    decode: Callable[[bytes, Settings], dict[str, Any]]
    batch: BatchKernel | None = None
    # Turns row i of the batch columns into the same dict `decode` returns.
    to_record: Callable[[Mapping[str, np.ndarray], int], dict[str, Any]] | None = None
    encode: Callable[[Mapping[str, Any], Settings], bytes] | None = None
    default_settings: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Batch:
    """What one `decode_batch` call returns: a status per frame (0 = decoded) and columns."""

    codec: str
    status: np.ndarray                 # int8, errors.REASONS index per frame
    columns: Mapping[str, np.ndarray]  # each of length n; rows with status != 0 hold junk
    _to_record: Callable[[Mapping[str, np.ndarray], int], dict[str, Any]]

    def __len__(self) -> int:
        return len(self.status)

    def reason(self, i: int) -> str | None:
        """The reject reason of frame i, or None when it decoded."""
        code = int(self.status[i])
        return None if code == 0 else REASONS[code]

    def record(self, i: int) -> dict[str, Any]:
        """Frame i as the dict the reference decoder returns; ValueError for a rejected frame."""
        if self.status[i] != 0:
            raise ValueError(f"frame {i} was rejected: {self.reason(i)}")
        return self._to_record(self.columns, i)


# name -> module that defines CODEC (or CODECS, a list).  Adding a codec is one line here.
_MODULES: dict[str, str] = {
    "cjt188": "decoders.cjt188",
    "gb26875": "decoders.gb26875",
    "gbt43229": "decoders.gbt43229",
    "parking": "decoders.parking",
    "ctwing": "decoders.carrier",
    "onenet": "decoders.carrier",
    "senml-json": "decoders.senml",
    "senml-cbor": "decoders.senml",
    "json": "decoders.jsoncodec",
}
_LOADED: dict[str, Codec] = {}


def codec_names() -> list[str]:
    """Every registered codec name."""
    return sorted(_MODULES)


def get_codec(name: str) -> Codec:
    """The codec registered as `name`; KeyError naming the known ones otherwise."""
    codec = _LOADED.get(name)
    if codec is not None:
        return codec
    module_name = _MODULES.get(name)
    if module_name is None:
        raise KeyError(f"no codec named {name!r}; known codecs: {', '.join(codec_names())}")
    module = importlib.import_module(module_name)
    for candidate in getattr(module, "CODECS", None) or [module.CODEC]:
        _LOADED[candidate.name] = candidate
    return _LOADED[name]


def _merged(codec: Codec, settings: Settings | None) -> dict[str, Any]:
    merged = dict(codec.default_settings)
    if settings:
        merged.update(settings)
    return merged


def decode(codec: str, payload: bytes, settings: Settings | None = None) -> dict[str, Any]:
    """The decoded fields of one payload, or DecodeError with a stable `.reason`."""
    c = get_codec(codec)
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise TypeError(f"payload must be bytes, not {type(payload).__name__}")
    return c.decode(bytes(payload), _merged(c, settings))


def encode(codec: str, fields: Mapping[str, Any], settings: Settings | None = None) -> bytes:
    """The payload a device would send for these fields."""
    c = get_codec(codec)
    if c.encode is None:
        raise NotImplementedError(f"codec {codec!r} has no encoder")
    return c.encode(fields, _merged(c, settings))


def pack(payloads: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """One contiguous uint8 buffer and the n + 1 offsets that delimit each payload in it."""
    offsets = np.zeros(len(payloads) + 1, dtype=np.int64)
    if payloads:
        np.cumsum([len(p) for p in payloads], out=offsets[1:])
    buf = np.frombuffer(b"".join(payloads), dtype=np.uint8)
    return buf, offsets


def check_packed(buf: np.ndarray, offsets: np.ndarray) -> None:
    """Refuse a packed batch that a kernel would read out of bounds; the message says what is wrong."""
    if not isinstance(buf, np.ndarray) or buf.dtype != np.uint8 or buf.ndim != 1:
        raise ValueError("buf must be a 1-D numpy array of uint8 (see decoders.pack)")
    if not isinstance(offsets, np.ndarray) or offsets.dtype != np.int64 or offsets.ndim != 1:
        raise ValueError("offsets must be a 1-D numpy array of int64 with n + 1 entries")
    if len(offsets) == 0:
        raise ValueError("offsets needs at least one entry (0) even for an empty batch")
    if offsets[0] < 0 or offsets[-1] > len(buf) or np.any(np.diff(offsets) < 0):
        raise ValueError("offsets must be non-decreasing and lie within buf")


def decode_batch(codec: str, payloads: Sequence[bytes] | tuple[np.ndarray, np.ndarray],
                 settings: Settings | None = None) -> Batch:
    """Decode many payloads in one call; a bad frame gets a status code, never an exception.

    `payloads` is a sequence of bytes, or an already packed ``(buf, offsets)`` pair."""
    c = get_codec(codec)
    merged = _merged(c, settings)
    if isinstance(payloads, tuple) and len(payloads) == 2 and isinstance(payloads[0], np.ndarray):
        buf, offsets = payloads
    else:
        buf, offsets = pack(list(payloads))
    check_packed(buf, offsets)
    if c.batch is not None:
        status, columns = c.batch(buf, offsets, merged)
        assert c.to_record is not None
        return Batch(c.name, status, columns, c.to_record)
    return _batch_by_reference(c, buf, offsets, merged)


def _batch_by_reference(c: Codec, buf: np.ndarray, offsets: np.ndarray, settings: Settings) -> Batch:
    """Codecs without a kernel (text formats) decode one by one into object columns."""
    n = len(offsets) - 1
    status = np.zeros(n, dtype=np.int8)
    records: list[dict[str, Any] | None] = []
    for i in range(n):
        try:
            records.append(c.decode(buf[offsets[i]:offsets[i + 1]].tobytes(), settings))
        except DecodeError as exc:
            status[i] = REASON_CODE[exc.reason]
            records.append(None)
    column = np.empty(n, dtype=object)
    column[:] = records
    return Batch(c.name, status, {"record": column}, lambda cols, i: dict(cols["record"][i]))


def nan_to_none(value: float) -> float | None:
    """NaN marks a missing number in float columns; records carry None instead."""
    return None if math.isnan(value) else float(value)
