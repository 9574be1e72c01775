"""PostgreSQL's binary COPY format, built a column at a time with numpy.

psycopg's `Copy.write_row` formats one row per call (~6 µs a row on this machine, under the GIL the
MQTT thread needs); a batch of readings is already columns (the decoder's arrays), so the whole COPY
stream is assembled here with a few vectorised scatters per column and handed to `Copy.write`.

Format (PostgreSQL manual, "COPY", section "Binary Format"): the 19-byte header (signature, flags,
header extension length), then per tuple an int16 field count and per field an int32 byte length
(-1 for NULL) and the value in the type's binary send format, then the int16 trailer -1.  Values:
int2/int4/int8 and float8 big-endian, bool one byte, timestamptz int64 microseconds since
2000-01-01 UTC, text as UTF-8, bytea as is, jsonb a version byte 1 then the JSON text."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

SIGNATURE = b"PGCOPY\n\xff\r\n\x00" + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x00"
TRAILER = b"\xff\xff"
PG_EPOCH_S = 946_684_800          # 2000-01-01T00:00:00Z in Unix seconds

_FIXED = {"smallint": ">i2", "integer": ">i4", "bigint": ">i8", "double precision": ">f8", "boolean": "u1",
          "timestamp with time zone": ">i8"}
_VARIABLE = ("text", "bytea", "jsonb")
TYPES = tuple(_FIXED) + _VARIABLE


@dataclass(frozen=True, slots=True)
class Column:
    """One column of a block: its PostgreSQL type (as `format_type` names it) and its values.

    Fixed-width types take a numpy array (timestamptz: epoch seconds as float64, or int64
    microseconds since 2000 with `micros=True`) and an optional NULL mask; text, bytea and jsonb take
    a sequence of str/bytes with None for NULL (jsonb: JSON text)."""

    pgtype: str
    values: Any
    null: np.ndarray | None = None
    micros: bool = False


def encode(columns: Sequence[Column], rows: int) -> bytes:
    """The complete COPY ... (FORMAT BINARY) stream for `rows` tuples of `columns`."""
    if rows == 0:
        return SIGNATURE + TRAILER
    parts = [_field(c, rows) for c in columns]
    row_len = np.full(rows, 2, dtype=np.int64)
    for lens, _ in parts:
        row_len += 4 + np.maximum(lens, 0)
    starts = np.zeros(rows, dtype=np.int64)
    np.cumsum(row_len[:-1], out=starts[1:])
    total = int(starts[-1] + row_len[-1])
    out = np.empty(total, dtype=np.uint8)
    _put(out, starts, np.full(rows, len(columns), dtype=">i2").view(np.uint8).reshape(rows, 2))
    pos = starts + 2
    for lens, data in parts:
        _put(out, pos, lens.astype(">i4").view(np.uint8).reshape(rows, 4))
        pos += 4
        present = lens > 0
        if data is not None and len(data):
            width = data.shape[1] if data.ndim == 2 else 0
            if width:                                   # fixed width: one row of bytes per value
                _put(out, pos[present], data)
            else:                                       # variable: scatter the concatenated values
                n = lens[present]
                src = np.zeros(len(n), dtype=np.int64)
                np.cumsum(n[:-1], out=src[1:])
                dest = np.repeat(pos[present] - src, n) + np.arange(len(data), dtype=np.int64)
                out[dest] = data
        pos += np.maximum(lens, 0)
    return SIGNATURE + out.tobytes() + TRAILER


def _put(out: np.ndarray, at: np.ndarray, values: np.ndarray) -> None:
    """out[at[i] + j] = values[i, j] for every row i and byte j."""
    width = values.shape[1]
    out[(at[:, None] + np.arange(width, dtype=np.int64)).ravel()] = values.ravel()


def _field(c: Column, rows: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(byte length of each value, -1 for NULL; the values' bytes: a (k, width) array for fixed
    types, a flat array of the concatenated values for variable ones)."""
    if c.pgtype in _FIXED:
        dtype = _FIXED[c.pgtype]
        values = np.asarray(c.values)
        if len(values) != rows:
            raise ValueError(f"a {c.pgtype} column of {len(values)} values in a block of {rows} rows")
        null = np.zeros(rows, dtype=bool) if c.null is None else np.asarray(c.null, dtype=bool)
        if c.pgtype == "timestamp with time zone" and not c.micros:
            values = np.round((values.astype(np.float64) - PG_EPOCH_S) * 1e6)
        if values.dtype.kind == "f" and c.pgtype != "double precision":
            null = null | np.isnan(values)
            values = np.where(null, 0, values)
        if c.pgtype == "double precision":
            null = null | np.isnan(values.astype(np.float64))
        width = np.dtype(dtype).itemsize
        lens = np.where(null, -1, width).astype(np.int64)
        data = values[~null].astype(dtype).view(np.uint8).reshape(-1, width)
        return lens, data
    if c.pgtype not in _VARIABLE:
        raise ValueError(f"no binary COPY encoder for {c.pgtype!r} (have: {', '.join(TYPES)})")
    items = c.values if isinstance(c.values, list) else list(c.values)
    if len(items) != rows:
        raise ValueError(f"a {c.pgtype} column of {len(items)} values in a block of {rows} rows")
    n_null = items.count(None)
    if n_null == rows:
        return np.full(rows, -1, dtype=np.int64), None
    nulls = [i for i, v in enumerate(items) if v is None] if n_null else []
    if c.pgtype == "bytea":
        blobs = [b"" if v is None else v for v in items] if nulls else items
        joined = b"".join(blobs)
        lens = np.fromiter(map(len, blobs), dtype=np.int64, count=rows)
    else:
        texts = [("" if v is None else v) for v in items] if nulls else items
        if c.pgtype == "jsonb":                       # binary jsonb: version 1, then the JSON text
            texts = ["\x01" + t for t in texts]
        text = "".join(texts)
        if text.isascii():                            # one encode for the column, lengths in characters
            joined = text.encode("ascii")
            lens = np.fromiter(map(len, texts), dtype=np.int64, count=rows)
        else:
            blobs = [t.encode() for t in texts]
            joined = b"".join(blobs)
            lens = np.fromiter(map(len, blobs), dtype=np.int64, count=rows)
    if nulls:
        lens[nulls] = -1
        if c.pgtype == "jsonb":                       # the NULLs' version bytes are not data
            keep = np.ones(len(joined), dtype=bool)
            starts = np.concatenate(([0], np.cumsum(np.maximum(lens, 1))[:-1]))
            keep[starts[nulls]] = False
            return lens, np.frombuffer(joined, dtype=np.uint8)[keep]
    return lens, np.frombuffer(joined, dtype=np.uint8)
