"""The CJ/T 188 numba batch decoder: one pass over a packed batch, columns out, a status per frame.

It checks things in the same order as ``cjt188.decode_reference`` so both give the same reason for
every input; the layouts come from the same table (``cjt188_layout``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numba as nb
import numpy as np

from . import cjt188_layout as lay
from . import errors as E
from .bcd import bcd_byte, days_from_civil, days_in_month

MISSING_TIME = np.iinfo(np.int64).min
DI_ORDERS = {"any": 0, "low_first": 1, "high_first": 2}


@nb.njit(cache=True)
def _bcd_le(buf, start, n):
    value = 0
    for k in range(n - 1, -1, -1):
        pair = bcd_byte(buf[start + k])
        if pair < 0:
            return -1
        value = value * 100 + pair
    return value


@nb.njit(cache=True)
def _all_equal(buf, start, n, byte):
    for k in range(n):
        if buf[start + k] != byte:
            return False
    return True


@nb.njit(cache=True)
def _meter_time(buf, q, tz_offset_s):
    """(status, epoch seconds) of a 7-byte ss mm hh DD MM YY CC field at q."""
    if _all_equal(buf, q, 7, 0xFF) or _all_equal(buf, q, 7, 0x00):
        return 0, np.iinfo(np.int64).min
    ss = bcd_byte(buf[q])
    mi = bcd_byte(buf[q + 1])
    hh = bcd_byte(buf[q + 2])
    dd = bcd_byte(buf[q + 3])
    mo = bcd_byte(buf[q + 4])
    yy = bcd_byte(buf[q + 5])
    cc = bcd_byte(buf[q + 6])
    if ss < 0 or mi < 0 or hh < 0 or dd < 0 or mo < 0 or yy < 0 or cc < 0:
        return E.BCD, 0
    year = cc * 100 + yy
    if not (1 <= mo and mo <= 12 and 1 <= dd and dd <= days_in_month(year, mo)
            and hh < 24 and mi < 60 and ss < 60):
        return E.TIME, 0
    return 0, days_from_civil(year, mo, dd) * 86400 + hh * 3600 + mi * 60 + ss - tz_offset_s


@nb.njit(cache=True)
def _fields(buf, p, layout, unit_first, i, field_table, field_count, unit_factor, scale, values, units):
    """Decodes the layout's value fields of the frame whose data (after SER) starts at p."""
    for k in range(field_count[layout]):
        col = field_table[layout, k, 0]
        off = field_table[layout, k, 1]
        nbytes = field_table[layout, k, 2]
        decimals = field_table[layout, k, 3]
        unit_class = field_table[layout, k, 4]
        unit_col = field_table[layout, k, 5]
        v = p + off
        unit = 0
        if unit_class >= 0:
            if unit_first:
                unit = buf[v]
                v += 1
            else:
                unit = buf[v + nbytes]
            units[unit_col, i] = unit
        if _all_equal(buf, v, nbytes, 0xFF):
            values[col, i] = np.nan
            continue
        raw = _bcd_le(buf, v, nbytes)
        if raw < 0:
            return E.BCD
        factor = 1.0
        if unit_class >= 0:
            factor = unit_factor[unit_class, unit]
            if factor == 0.0:
                return E.UNIT
        values[col, i] = raw / scale[decimals] * factor
    return 0


@nb.njit(cache=True)
def _kernel(buf, offsets, tz_offset_s, di_mode, unit_first,
            field_table, field_count, unit_factor, scale, time_offset, status_offset, data_len,
            status, layout_col, di_col, meter_type, address, control, serial, values, units,
            meter_time, st):
    n = len(offsets) - 1
    for i in range(n):
        a = offsets[i]
        b = offsets[i + 1]
        if a == b:
            status[i] = E.EMPTY
            continue
        while a < b and buf[a] == 0xFE:
            a += 1
        size = b - a
        if size == 0:
            status[i] = E.TRUNCATED
            continue
        if buf[a] != 0x68:
            status[i] = E.FRAMING
            continue
        if size < 11:
            status[i] = E.TRUNCATED
            continue
        length = buf[a + 10]
        total = 13 + length
        if size < total:
            status[i] = E.TRUNCATED
            continue
        if size > total:
            status[i] = E.LENGTH
            continue
        if buf[a + total - 1] != 0x16:
            status[i] = E.FRAMING
            continue
        cs = 0
        for k in range(total - 2):
            cs += buf[a + k]
        if (cs & 0xFF) != buf[a + total - 2]:
            status[i] = E.CHECKSUM
            continue
        c = buf[a + 9]
        if c & 0x40:
            status[i] = E.DEVICE_ERROR
            continue
        if c != 0x81:
            status[i] = E.UNSUPPORTED
            continue
        t = buf[a + 1]
        family = lay.meter_family(t)
        if family < 0:
            status[i] = E.UNSUPPORTED
            continue
        addr = _bcd_le(buf, a + 2, 7)
        if addr < 0:
            status[i] = E.BCD
            continue
        if length < 3:
            status[i] = E.LENGTH
            continue
        di = lay.resolve_di(buf[a + 11], buf[a + 12], family, di_mode)
        if di < 0:
            status[i] = E.UNSUPPORTED
            continue
        layout = lay.di_layout(di, family)
        if length < 3 + data_len[layout]:
            status[i] = E.LENGTH
            continue
        p = a + 14
        s = _fields(buf, p, layout, unit_first, i, field_table, field_count, unit_factor, scale,
                    values, units)
        if s != 0:
            status[i] = s
            continue
        when = np.iinfo(np.int64).min
        if time_offset[layout] >= 0:
            s, when = _meter_time(buf, p + time_offset[layout], tz_offset_s)
            if s != 0:
                status[i] = s
                continue
        status[i] = 0
        layout_col[i] = layout
        di_col[i] = di
        meter_type[i] = t
        address[i] = addr
        control[i] = c
        serial[i] = buf[a + 13]
        meter_time[i] = when
        q = status_offset[layout]
        if q >= 0:
            st[i] = buf[p + q] | (np.uint16(buf[p + q + 1]) << 8)


def decode_batch_kernel(buf: np.ndarray, offsets: np.ndarray,
                        settings: Mapping[str, Any]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Columns for every frame of a packed batch (see decoders.pack) and a status per frame.

    Rows of a kind lack the columns of other kinds: those hold NaN / 0 (see ``layout``)."""
    order = settings["di_order"]
    if order not in DI_ORDERS:
        raise ValueError(f"di_order must be one of {sorted(DI_ORDERS)}, not {order!r}")
    n = len(offsets) - 1
    status = np.zeros(n, dtype=np.int8)
    values = np.full((len(lay.VALUE_COLUMNS), n), np.nan)
    units = np.zeros((len(lay.UNIT_COLUMNS), n), dtype=np.uint8)
    cols = {
        "layout": np.zeros(n, dtype=np.int8),
        "di": np.zeros(n, dtype=np.uint16),
        "meter_type": np.zeros(n, dtype=np.uint8),
        "address": np.zeros(n, dtype=np.int64),
        "control": np.zeros(n, dtype=np.uint8),
        "serial": np.zeros(n, dtype=np.uint8),
        "meter_time": np.full(n, MISSING_TIME, dtype=np.int64),
        "status": np.zeros(n, dtype=np.uint16),
    }
    _kernel(buf, offsets, int(settings["tz_offset_minutes"]) * 60, DI_ORDERS[order],
            bool(settings["unit_before_value"]),
            lay.FIELD_TABLE, lay.FIELD_COUNT, lay.UNIT_FACTOR, lay.SCALE,
            lay.TIME_OFFSET, lay.STATUS_OFFSET, lay.DATA_LEN,
            status, cols["layout"], cols["di"], cols["meter_type"], cols["address"], cols["control"],
            cols["serial"], values, units, cols["meter_time"], cols["status"])
    for j, name in enumerate(lay.VALUE_COLUMNS):
        cols[name] = values[j]
    for j, name in enumerate(lay.UNIT_COLUMNS):
        cols[name] = units[j]
    cols["record_kind"] = lay.LAYOUT_KIND[cols["layout"]]
    st = cols["status"].astype(np.int64)
    has_status = lay.STATUS_OFFSET[cols["layout"]] >= 0
    cols["status_missing"] = has_status & (st == 0xFFFF)
    cols["valve"] = ((st >> int(settings["valve_shift"])) & 3).astype(np.int8)
    cols["battery_low"] = ((st >> int(settings["battery_bit"])) & 1).astype(bool)
    return status, cols
