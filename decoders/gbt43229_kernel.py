"""numba batch decoder for GB/T 43229 real-time traffic-flow frames (object 0x0301).

Two passes over the packed batch: the first checks every frame and counts its lanes, the second
writes the lanes into one flat table (``lane_*`` columns, ``lane_frame`` = frame index).  Both
unescape a frame into the same scratch buffer; the checks and their order mirror
``gbt43229.decode_reference`` exactly so that both give the same reason for every input.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numba as nb
import numpy as np

from .errors import CHECKSUM, EMPTY, FRAMING, LENGTH, TRUNCATED, UNSUPPORTED, VALUE
from .gbt43229_crc import check_crc_setting, crc16_kernel

FRAME_DELIMITER = 0xC0
ESCAPE = 0xDB
ESCAPED_DELIMITER = 0xDC
ESCAPED_ESCAPE = 0xDD
HEADER = 20                  # link(2) sender(7) receiver(7) version(1) operation(1) object(2)
CONTENT_LENGTH_SIZE = 2
OBJECT_REALTIME_FLOW = 0x0301
OP_ACTIVE_UPLOAD = 0x82
OP_QUERY_REPLY = 0x83
LANE_FIXED = 14              # channel .. presence sample count, before the presence samples
MAX_OCCUPANCY_PERMILLE = 1000
BYTE_ORDERS = {"little": 0, "big": 1}

FRAME_INT_COLUMNS = ("link_address", "division_code", "device_type", "device_number",
                     "receiver_division_code", "receiver_device_type", "receiver_device_number",
                     "protocol_version", "operation", "object_id", "lane_count", "lane_start")
# Missing (FF-filled) values: -1 in the int columns, NaN in the float ones.
LANE_INT_COLUMNS = ("lane_frame", "lane_channel", "lane_count_a", "lane_count_b", "lane_count_c",
                    "lane_speed_kmh", "lane_presence_samples", "lane_presence_occupied")
LANE_FLOAT_COLUMNS = ("lane_occupancy_pct", "lane_length_m", "lane_headway_s", "lane_gap_s",
                      "lane_stops", "lane_stop_duration_s")


@nb.njit(cache=True)
def _uint(t, i, size, big):
    value = 0
    for k in range(size):
        b = t[i + k] if big else t[i + size - 1 - k]
        value = (value << 8) | b
    return value


@nb.njit(cache=True)
def _unframe(buf, a, b, scratch):
    """(status, table length): the unescaped data table + CRC of the frame buf[a:b] in scratch."""
    if a == b:
        return EMPTY, 0
    if buf[a] != FRAME_DELIMITER:
        return FRAMING, 0
    while a + 1 < b and buf[a + 1] == FRAME_DELIMITER:
        a += 1                               # SLIP senders may flush with extra delimiters
    end = -1
    for k in range(a + 1, b):
        if buf[k] == FRAME_DELIMITER:
            end = k
            break
    if end < 0:
        return TRUNCATED, 0
    if end != b - 1:
        return LENGTH, 0
    n = 0
    k = a + 1
    while k < end:
        byte = buf[k]
        if byte == ESCAPE:
            if k + 1 >= end:
                return FRAMING, 0
            nxt = buf[k + 1]
            if nxt == ESCAPED_DELIMITER:
                byte = FRAME_DELIMITER
            elif nxt == ESCAPED_ESCAPE:
                byte = ESCAPE
            else:
                return FRAMING, 0
            k += 2
        else:
            k += 1
        scratch[n] = byte
        n += 1
    return 0, n


@nb.njit(cache=True)
def _check_table(t, n, big, crc_kind, has_length):
    """(status, content start, content end, lanes) of an unescaped table t[:n]."""
    start = HEADER + (CONTENT_LENGTH_SIZE if has_length else 0)
    if n < start + 2:
        return TRUNCATED, 0, 0, 0
    if has_length:
        total = start + _uint(t, HEADER, 2, big) + 2
        if n < total:
            return TRUNCATED, 0, 0, 0
        if n > total:
            return LENGTH, 0, 0, 0
    if crc_kind != 0 and crc16_kernel(t, 0, n - 2, crc_kind) != _uint(t, n - 2, 2, big):
        return CHECKSUM, 0, 0, 0
    if _uint(t, 18, 2, big) != OBJECT_REALTIME_FLOW:
        return UNSUPPORTED, 0, 0, 0
    op = t[17]
    if op != OP_ACTIVE_UPLOAD and op != OP_QUERY_REPLY:
        return UNSUPPORTED, 0, 0, 0
    end = n - 2
    if end - start < 1:
        return LENGTH, 0, 0, 0
    lanes = t[start]
    p = start + 1
    for _ in range(lanes):
        if p + LANE_FIXED > end:
            return LENGTH, 0, 0, 0
        p += LANE_FIXED + t[p + 13]
        if p > end:
            return LENGTH, 0, 0, 0
    if p != end:
        return LENGTH, 0, 0, 0
    p = start + 1
    for _ in range(lanes):
        occupancy = _uint(t, p + 4, 2, big)
        if occupancy != 0xFFFF and occupancy > MAX_OCCUPANCY_PERMILLE:
            return VALUE, 0, 0, 0
        p += LANE_FIXED + t[p + 13]
    return 0, start, end, lanes


@nb.njit(cache=True)
def _scan(buf, offsets, big, crc_kind, has_length, scratch, status, frame_cols):
    for i in range(len(offsets) - 1):
        st, n = _unframe(buf, offsets[i], offsets[i + 1], scratch)
        if st != 0:
            status[i] = st
            continue
        st, start, end, lanes = _check_table(scratch, n, big, crc_kind, has_length)
        status[i] = st
        if st != 0:
            continue
        frame_cols[i, 0] = _uint(scratch, 0, 2, big)
        frame_cols[i, 1] = _uint(scratch, 2, 3, big)
        frame_cols[i, 2] = _uint(scratch, 5, 2, big)
        frame_cols[i, 3] = _uint(scratch, 7, 2, big)
        frame_cols[i, 4] = _uint(scratch, 9, 3, big)
        frame_cols[i, 5] = _uint(scratch, 12, 2, big)
        frame_cols[i, 6] = _uint(scratch, 14, 2, big)
        frame_cols[i, 7] = scratch[16]
        frame_cols[i, 8] = scratch[17]
        frame_cols[i, 9] = OBJECT_REALTIME_FLOW
        frame_cols[i, 10] = lanes


@nb.njit(cache=True)
def _byte_or_missing(b):
    return -1 if b == 0xFF else b


@nb.njit(cache=True)
def _tenths(raw, missing):
    return np.nan if raw == missing else raw / 10.0


@nb.njit(cache=True)
def _fill(buf, offsets, big, has_length, scratch, status, lane_start, lane_ints, lane_floats):
    for i in range(len(offsets) - 1):
        if status[i] != 0:
            continue
        _, n = _unframe(buf, offsets[i], offsets[i + 1], scratch)
        p = HEADER + (CONTENT_LENGTH_SIZE if has_length else 0)
        lanes = scratch[p]
        p += 1
        row = lane_start[i]
        for _ in range(lanes):
            samples = scratch[p + 13]
            occupied = 0
            for k in range(samples):
                if scratch[p + LANE_FIXED + k] != 0:
                    occupied += 1
            lane_ints[row, 0] = i
            lane_ints[row, 1] = scratch[p]
            lane_ints[row, 2] = _byte_or_missing(scratch[p + 1])
            lane_ints[row, 3] = _byte_or_missing(scratch[p + 2])
            lane_ints[row, 4] = _byte_or_missing(scratch[p + 3])
            lane_ints[row, 5] = _byte_or_missing(scratch[p + 6])
            lane_ints[row, 6] = samples
            lane_ints[row, 7] = occupied
            lane_floats[row, 0] = _tenths(_uint(scratch, p + 4, 2, big), 0xFFFF)
            lane_floats[row, 1] = _tenths(_uint(scratch, p + 7, 2, big), 0xFFFF)
            lane_floats[row, 2] = _tenths(scratch[p + 9], 0xFF)
            lane_floats[row, 3] = _tenths(scratch[p + 10], 0xFF)
            lane_floats[row, 4] = _tenths(scratch[p + 11], 0xFF)
            lane_floats[row, 5] = _tenths(scratch[p + 12], 0xFF)
            row += 1
            p += LANE_FIXED + samples


def check_settings(settings: Mapping[str, Any]) -> tuple[int, int, bool]:
    """(big-endian flag, CRC kind, content-length flag) of the vendor settings; ValueError if unknown."""
    order = settings["byte_order"]
    if order not in BYTE_ORDERS:
        raise ValueError(f"byte_order must be one of {sorted(BYTE_ORDERS)}, not {order!r}")
    return BYTE_ORDERS[order], check_crc_setting(settings["crc"]), bool(settings["content_length_field"])


def decode_batch_kernel(buf: np.ndarray, offsets: np.ndarray,
                        settings: Mapping[str, Any]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Per-frame columns (length n), the flat lanes table (``lane_*``) and a status per frame."""
    big, crc_kind, has_length = check_settings(settings)
    n = len(offsets) - 1
    status = np.zeros(n, dtype=np.int8)
    frame_cols = np.zeros((n, len(FRAME_INT_COLUMNS)), dtype=np.int64)
    longest = int(np.max(np.diff(offsets))) if n else 0
    scratch = np.zeros(max(longest, 1), dtype=np.uint8)
    _scan(buf, offsets, big, crc_kind, has_length, scratch, status, frame_cols)
    counts = np.where(status == 0, frame_cols[:, 10], 0)
    starts = np.zeros(n, dtype=np.int64)
    if n:
        np.cumsum(counts[:-1], out=starts[1:])
    frame_cols[:, 11] = starts
    total = int(counts.sum())
    lane_ints = np.zeros((total, len(LANE_INT_COLUMNS)), dtype=np.int64)
    lane_floats = np.full((total, len(LANE_FLOAT_COLUMNS)), np.nan)
    _fill(buf, offsets, big, has_length, scratch, status, starts, lane_ints, lane_floats)
    cols: dict[str, np.ndarray] = {}
    for k, name in enumerate(FRAME_INT_COLUMNS):
        cols[name] = frame_cols[:, k].copy()
    for k, name in enumerate(LANE_INT_COLUMNS):
        cols[name] = lane_ints[:, k].copy()
    for k, name in enumerate(LANE_FLOAT_COLUMNS):
        cols[name] = lane_floats[:, k].copy()
    return status, cols
