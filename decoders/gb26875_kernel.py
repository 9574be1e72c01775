"""The GB/T 26875.3-2011 numba batch decoder: per-frame header columns and a flat objects table.

The checks run in the order of ``gb26875.decode_reference`` so that both give the same reject reason
for every input.  Two passes: the first validates every frame and counts its information objects,
the second fills the objects table (``obj_*`` columns) whose size is only known after the first.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numba as nb
import numpy as np

from .bcd import days_from_civil, days_in_month
from .gb26875_layout import CHECKSUM_FROM, DESCRIPTION, MISSING_TIME, OBJECT_SIZES, TIME_AT
from .registry import check_packed

_SIZE = np.zeros(256, dtype=np.int64)
_TIME_AT = np.full(256, -1, dtype=np.int64)
for _t, _s in OBJECT_SIZES.items():
    _SIZE[_t] = _s
    _TIME_AT[_t] = TIME_AT[_t]


@nb.njit(cache=True)
def _time_label(buf, p, tz_offset_s):
    """(status, UTC seconds) of a binary sec/min/hour/day/month/year-2000 label; all 00 or FF = missing."""
    zeros = True
    ones = True
    for k in range(6):
        if buf[p + k] != 0:
            zeros = False
        if buf[p + k] != 0xFF:
            ones = False
    if zeros or ones:
        return 0, MISSING_TIME
    ss = np.int64(buf[p])
    mi = np.int64(buf[p + 1])
    hh = np.int64(buf[p + 2])
    dd = np.int64(buf[p + 3])
    mo = np.int64(buf[p + 4])
    year = 2000 + np.int64(buf[p + 5])
    if not (1 <= mo and mo <= 12 and 1 <= dd and dd <= days_in_month(year, mo)
            and hh < 24 and mi < 60 and ss < 60):
        return 8, MISSING_TIME                  # time
    return 0, days_from_civil(year, mo, dd) * 86400 + hh * 3600 + mi * 60 + ss - tz_offset_s


@nb.njit(cache=True)
def _le(buf, p, n):
    value = np.int64(0)
    for k in range(n - 1, -1, -1):
        value = (value << 8) | buf[p + k]
    return value


@nb.njit(cache=True)
def _validate(buf, offsets, tz_offset_s, checksum_from, size_of, time_at,
              status, serial, version_main, version_user, sent_at, source, destination,
              command, app_type, object_count, object_size):
    # Reason codes (errors.REASONS) and their order mirror gb26875.decode_reference exactly.
    n = len(offsets) - 1
    for i in range(n):
        a = offsets[i]
        size = offsets[i + 1] - a
        if size == 0:
            status[i] = 13                      # empty
            continue
        if buf[a] != 0x40 or (size >= 2 and buf[a + 1] != 0x40):
            status[i] = 3                       # framing
            continue
        if size < 27:
            status[i] = 1                       # truncated
            continue
        adu = _le(buf, a + 24, 2)
        if adu > 1024:
            status[i] = 2                       # length
            continue
        total = 30 + adu
        if size < total:
            status[i] = 1
            continue
        if size > total:
            status[i] = 2
            continue
        if buf[a + total - 2] != 0x23 or buf[a + total - 1] != 0x23:
            status[i] = 3
            continue
        cs = 0
        for k in range(checksum_from, 27 + adu):
            cs += buf[a + k]
        if (cs & 0xFF) != buf[a + 27 + adu]:
            status[i] = 4                       # checksum
            continue
        st, when = _time_label(buf, a + 6, tz_offset_s)
        if st != 0:
            status[i] = st
            continue
        serial[i] = _le(buf, a + 2, 2)
        version_main[i] = buf[a + 4]
        version_user[i] = buf[a + 5]
        sent_at[i] = when
        source[i] = _le(buf, a + 12, 6)
        destination[i] = _le(buf, a + 18, 6)
        command[i] = buf[a + 26]
        if adu == 0:
            status[i] = 0
            app_type[i] = -1
            continue
        if adu == 1:
            status[i] = 2
            continue
        t = buf[a + 27]
        count = np.int64(buf[a + 28])
        obj = size_of[t]
        if obj == 0:
            status[i] = 6                       # unsupported
            continue
        if 2 + count * obj != adu:
            if t == 2 and 2 + count * 15 == adu:
                obj = 15
            else:
                status[i] = 2
                continue
        at = time_at[t]
        if t == 2 and obj == 15:
            at = 9
        bad = 0
        if at >= 0:
            for j in range(count):
                st, when = _time_label(buf, a + 29 + j * obj + at, tz_offset_s)
                if st != 0:
                    bad = st
                    break
        if bad != 0:
            status[i] = bad
            continue
        status[i] = 0
        app_type[i] = t
        object_count[i] = count
        object_size[i] = obj


@nb.njit(cache=True)
def _fill_objects(buf, offsets, tz_offset_s, time_at, status, app_type, object_count, object_size,
                  obj_first, o_frame, o_system_type, o_system_address, o_component_type,
                  o_component_address, o_state, o_analog_type, o_value, o_operator, o_major, o_minor,
                  o_time, o_has_description, o_description):
    n = len(offsets) - 1
    for i in range(n):
        if status[i] != 0 or object_count[i] == 0:
            continue
        t = app_type[i]
        obj = object_size[i]
        at = time_at[t]
        if t == 2 and obj == 15:
            at = 9
        for j in range(object_count[i]):
            r = obj_first[i] + j
            p = offsets[i] + 29 + j * obj
            o_frame[r] = i
            if at >= 0:
                _, when = _time_label(buf, p + at, tz_offset_s)
                o_time[r] = when
            if t == 1 or t == 2 or t == 3 or t == 4 or t == 5 or t == 8:
                o_system_type[r] = buf[p]
                o_system_address[r] = buf[p + 1]
            if t == 1:
                o_state[r] = _le(buf, p + 2, 2)
            elif t == 2 or t == 3:
                o_component_type[r] = buf[p + 2]
                o_component_address[r] = _le(buf, p + 3, 4)
                if t == 2:
                    o_state[r] = _le(buf, p + 7, 2)
                    if obj == 46:
                        o_has_description[r] = True
                        for k in range(31):
                            o_description[r, k] = buf[p + 9 + k]
                else:
                    o_analog_type[r] = buf[p + 7]
                    raw = _le(buf, p + 8, 2)
                    o_value[r] = raw - 65536 if raw >= 32768 else raw
            elif t == 4:
                o_state[r] = buf[p + 2]
                o_operator[r] = buf[p + 3]
            elif t == 5:
                o_major[r] = buf[p + 2]
                o_minor[r] = buf[p + 3]
            elif t == 21:
                o_state[r] = buf[p]
            elif t == 24:
                o_state[r] = buf[p]
                o_operator[r] = buf[p + 1]
            elif t == 25:
                o_major[r] = buf[p]
                o_minor[r] = buf[p + 1]


def decode_batch_kernel(buf: np.ndarray, offsets: np.ndarray,
                        settings: Mapping[str, Any]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Header columns (length n) and the ``obj_*`` objects table for a packed batch, and a status per frame.

    Frame i's objects are rows ``obj_first[i] : obj_first[i] + object_count[i]`` of the obj_ columns."""
    check_packed(buf, offsets)
    start = settings.get("checksum_from", "serial")
    if start not in CHECKSUM_FROM:
        raise ValueError(f"checksum_from must be one of {sorted(CHECKSUM_FROM)}, not {start!r}")
    tz_offset_s = int(settings.get("tz_offset_minutes", 480)) * 60
    n = len(offsets) - 1
    status = np.zeros(n, dtype=np.int8)
    cols: dict[str, np.ndarray] = {
        "serial": np.zeros(n, dtype=np.int64),
        "version_main": np.zeros(n, dtype=np.uint8),
        "version_user": np.zeros(n, dtype=np.uint8),
        "sent_at": np.full(n, MISSING_TIME, dtype=np.int64),
        "source_address": np.zeros(n, dtype=np.int64),
        "destination_address": np.zeros(n, dtype=np.int64),
        "command": np.zeros(n, dtype=np.uint8),
        "app_type": np.full(n, -1, dtype=np.int16),
        "object_count": np.zeros(n, dtype=np.int64),
        "object_size": np.zeros(n, dtype=np.int64),
    }
    _validate(buf, offsets, tz_offset_s, CHECKSUM_FROM[start], _SIZE, _TIME_AT, status,
              cols["serial"], cols["version_main"], cols["version_user"], cols["sent_at"],
              cols["source_address"], cols["destination_address"], cols["command"], cols["app_type"],
              cols["object_count"], cols["object_size"])
    counts = np.where(status == 0, cols["object_count"], 0)
    first = np.zeros(n, dtype=np.int64)
    if n:
        np.cumsum(counts[:-1], out=first[1:])
    cols["obj_first"] = first
    m = int(counts.sum())
    obj = {
        "obj_frame": np.zeros(m, dtype=np.int64),
        "obj_system_type": np.zeros(m, dtype=np.uint8),
        "obj_system_address": np.zeros(m, dtype=np.uint8),
        "obj_component_type": np.zeros(m, dtype=np.uint8),
        "obj_component_address": np.zeros(m, dtype=np.int64),
        "obj_state": np.zeros(m, dtype=np.int32),
        "obj_analog_type": np.zeros(m, dtype=np.uint8),
        "obj_value": np.zeros(m, dtype=np.int32),
        "obj_operator": np.zeros(m, dtype=np.uint8),
        "obj_major": np.zeros(m, dtype=np.uint8),
        "obj_minor": np.zeros(m, dtype=np.uint8),
        "obj_time": np.full(m, MISSING_TIME, dtype=np.int64),
        "obj_has_description": np.zeros(m, dtype=bool),
        "obj_description": np.zeros((m, DESCRIPTION), dtype=np.uint8),
    }
    _fill_objects(buf, offsets, tz_offset_s, _TIME_AT, status, cols["app_type"], cols["object_count"],
                  cols["object_size"], first, *obj.values())
    cols.update(obj)
    return status, cols
