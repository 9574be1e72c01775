"""CJ/T 188-2004/-2018 household meter read-data replies: water, heat and gas meters.

Frame: ``[FE…] 68 T A0..A6 C L DI0 DI1 SER data… CS 16``; ``CS`` is the byte sum of ``68`` through
the last data byte, mod 256; the frame is 13 + L bytes after the preamble.  Decoded replies (C = 81):

* DI 901F water/gas (T 0x10-0x19, 0x30-0x39) — ``record_kind`` "current": current and settlement-day
  cumulative flow, real time, status ST.
* DI 901F heat (T 0x20-0x29) — "current": settlement-day heat, current heat, heat power, flow rate,
  cumulative flow, supply/return temperature, working hours, real time, ST.
* DI 907F — "clock": the meter's real-time clock.
* DI D120-D12B — "history": settlement-day flow (heat: heat) of 1-12 months ago; D200-D2FF (2018)
  the same for 1-256 periods ago (heat adds settlement cooling and flow).
* DI D300-D3FF / D400-D4FF (2018, water/gas) — "freeze": timed / instant freeze record: freeze time,
  cumulative flow, flow rate, temperature, pressure.

Every other control code, DI or meter type is ``unsupported``.  Layouts: ``cjt188_layout.py``;
sources and the choices made where the public record is silent: ``docs/protocols/cjt188.md``.

Fields returned (units), present according to the record kind:

* ``meter_address`` (14 digits as printed, A6 first), ``meter_type`` (T), ``control`` (C),
  ``di`` (canonical, e.g. 0x901F whatever the wire byte order), ``serial`` (SER), ``record_kind``
* ``flow_m3``, ``settlement_flow_m3`` — volume, m³; ``flow_rate_m3h`` — m³/h
* ``settlement_heat_kwh``, ``heat_kwh``, ``settlement_cooling_kwh`` — energy, kWh (J, kJ, MJ, GJ,
  Wh, MWh codes are converted); ``heat_power_w`` — W (kW, MW and J/h … GJ/h codes converted)
* ``supply_temp_c``, ``return_temp_c``, ``temperature_c`` — °C; ``working_hours`` — h;
  ``pressure`` — as sent, XXXX.XX (the public record does not state its unit)
* ``<x>_unit`` / ``flow_unit`` / ``settlement_unit`` — the unit code as sent beside each value
* ``meter_time`` (current, clock) / ``freeze_time`` (freeze) — aware UTC datetime
* ``status`` — ST0 | ST1 << 8; ``valve`` — open/closed/unknown/abnormal; ``battery_low`` — bool
* ``periods_ago`` (history, freeze) — 1 = last month / last freeze; ``freeze_trigger`` — timed/instant

A field a meter fills with FF (a time also with 00) is None.

Vendor settings: ``tz_offset_minutes`` (meter local time, default 480 = China time),
``di_order`` (``any`` | ``low_first`` (1F 90, the standard's example) | ``high_first`` (90 1F)),
``valve_shift`` (bit of the two valve bits in ST, default 0; MSB-numbering vendors use 6),
``battery_bit`` (default 2; MSB-numbering vendors use 5), ``unit_before_value`` (default False:
some heat meters send the unit code before the BCD value instead of after it).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np

from . import cjt188_layout as lay
from .bcd import bcd_byte, days_in_month
from .cjt188_encode import encode_reply, sample_payloads
from .cjt188_kernel import MISSING_TIME, decode_batch_kernel
from .errors import DecodeError
from .registry import Codec, nan_to_none

NAME = "cjt188"
HEADER = lay.HEADER
DI_CURRENT = lay.DI_CURRENT
READ_DATA_REPLY = lay.READ_DATA_REPLY
L_901F = 3 + int(lay.DATA_LEN[lay.WATER_CURRENT])
VALVE_STATES = ("open", "closed", "unknown", "abnormal")
DI_ORDERS = {"any": 0, "low_first": 1, "high_first": 2}
VOLUME_UNITS: dict[int, float] = {c: f for c, (k, f) in lay.UNIT_CODES.items() if k == lay.VOLUME}

DEFAULT_SETTINGS = {"tz_offset_minutes": 480, "di_order": "any", "valve_shift": 0, "battery_bit": 2,
                    "unit_before_value": False}

FIELDS = {
    "meter_address": "14-digit meter number as printed",
    "meter_type": "T byte: 0x10 cold, 0x11 hot, 0x12 drinking, 0x13 reclaimed water; 0x20 heat, "
                  "0x21 cooling, 0x22 heat+cooling; 0x30 gas",
    "control": "C byte (0x81 = read-data reply)",
    "di": "data identifier, canonical (0x901F, 0x907F, 0xD120-0xD12B, 0xD2xx, 0xD3xx, 0xD4xx)",
    "serial": "SER byte",
    "record_kind": "current / clock / history / freeze",
    "flow_m3": "cumulative flow, m³",
    "flow_unit": "unit code as sent",
    "settlement_flow_m3": "settlement-day cumulative flow, m³",
    "settlement_unit": "unit code as sent",
    "settlement_heat_kwh": "settlement-day heat, kWh (heat meters)",
    "heat_kwh": "current heat, kWh (heat meters)",
    "settlement_cooling_kwh": "settlement-day cooling, kWh (heat meters, D2xx history)",
    "heat_power_w": "heat power, W",
    "flow_rate_m3h": "flow rate, m³/h",
    "supply_temp_c": "supply water temperature, °C",
    "return_temp_c": "return water temperature, °C",
    "working_hours": "cumulative working time, h",
    "temperature_c": "temperature at the freeze, °C",
    "pressure": "pressure at the freeze, as sent (unit not stated by the public record)",
    "meter_time": "meter clock, UTC",
    "freeze_time": "time of the freeze, UTC",
    "status": "ST0 | ST1<<8",
    "valve": "open / closed / unknown / abnormal (vendor bit map)",
    "battery_low": "bool (vendor bit map)",
    "periods_ago": "history: settlement periods back (1 = last month); freeze: freezes back",
    "freeze_trigger": "timed (D3xx) / instant (D4xx)",
}


# --------------------------------------------------------------------------- reference decoder

def _bcd(data: bytes) -> int:
    """Little-endian BCD bytes as an int; DecodeError('bcd') on a bad nibble."""
    value = 0
    for b in reversed(data):
        pair = bcd_byte.py_func(b)
        if pair < 0:
            raise DecodeError("bcd", f"byte {b:02X} is not BCD")
        value = value * 100 + pair
    return value


def _value(data: bytes, field: np.ndarray, unit_first: bool) -> tuple[float | None, int | None]:
    """(value in the output unit or None when FF-filled, unit code or None) of one layout field."""
    _, off, nbytes, decimals, unit_class, _ = (int(x) for x in field)
    unit = None
    if unit_class == lay.NO_UNIT:
        raw = data[off:off + nbytes]
    elif unit_first:
        unit, raw = data[off], data[off + 1:off + 1 + nbytes]
    else:
        raw, unit = data[off:off + nbytes], data[off + nbytes]
    if raw == b"\xff" * nbytes:
        return None, unit
    value = _bcd(raw)
    factor = 1.0
    if unit is not None:
        factor = float(lay.UNIT_FACTOR[unit_class, unit])
        if factor == 0.0:
            raise DecodeError("unit", f"unit code {unit:02X} is not a {lay.UNIT_CLASS_NAMES[unit_class]} unit")
    return value / float(lay.SCALE[decimals]) * factor, unit


def _meter_time(data: bytes, tz_offset_minutes: int) -> datetime | None:
    if data == b"\xff" * 7 or data == b"\x00" * 7:
        return None          # meters without a clock fill the field
    ss, mi, hh, dd, mo, yy, cc = (bcd_byte.py_func(b) for b in data)
    if min(ss, mi, hh, dd, mo, yy, cc) < 0:
        raise DecodeError("bcd", "real-time field is not BCD")
    year = cc * 100 + yy
    if not (1 <= mo <= 12 and 1 <= dd <= days_in_month.py_func(year, mo) and hh < 24 and mi < 60 and ss < 60):
        raise DecodeError("time", f"{year:04d}-{mo:02d}-{dd:02d} {hh:02d}:{mi:02d}:{ss:02d} is not a time")
    local = datetime(year, mo, dd, hh, mi, ss, tzinfo=UTC)
    return local - timedelta(minutes=tz_offset_minutes)


def _resolve_di(d0: int, d1: int, family: int, di_mode: int) -> int:
    """cjt188_layout.resolve_di in plain Python (its jitted callee would compile on first use)."""
    low_first, high_first = d1 << 8 | d0, d0 << 8 | d1
    if di_mode != 2 and lay.di_layout.py_func(low_first, family) >= 0:
        return low_first
    if di_mode != 1 and lay.di_layout.py_func(high_first, family) >= 0:
        return high_first
    return -1


def _frame(payload: bytes) -> bytes:
    """The frame from 68 to 16 with its length, end byte and checksum checked."""
    if not payload:
        raise DecodeError("empty", "no bytes")
    start = 0
    while start < len(payload) and payload[start] == 0xFE:
        start += 1
    frame = payload[start:]
    if not frame:
        raise DecodeError("truncated", "only preamble bytes")
    if frame[0] != 0x68:
        raise DecodeError("framing", f"expected 68 after the preamble, got {frame[0]:02X}")
    if len(frame) < HEADER:
        raise DecodeError("truncated", f"{len(frame)} bytes, the header alone is {HEADER}")
    total = HEADER + frame[10] + 2
    if len(frame) < total:
        raise DecodeError("truncated", f"L={frame[10]} needs {total} bytes, got {len(frame)}")
    if len(frame) > total:
        raise DecodeError("length", f"{len(frame) - total} stray bytes after the frame")
    if frame[-1] != 0x16:
        raise DecodeError("framing", f"expected end byte 16, got {frame[-1]:02X}")
    if sum(frame[:-2]) & 0xFF != frame[-2]:
        raise DecodeError("checksum", f"sum is {sum(frame[:-2]) & 0xFF:02X}, frame says {frame[-2]:02X}")
    return frame


def decode_reference(payload: bytes, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of one read-data reply; DecodeError with the reason otherwise."""
    frame = _frame(payload)
    length = frame[10]
    control = frame[9]
    if control & 0x40:
        raise DecodeError("device_error", f"abnormal reply C={control:02X}")
    if control != READ_DATA_REPLY:
        raise DecodeError("unsupported", f"control {control:02X} is not a read-data reply")
    meter_type = frame[1]
    family = lay.meter_family.py_func(meter_type)
    if family < 0:
        raise DecodeError("unsupported", f"meter type {meter_type:02X} has no known reply layout")
    address = _bcd(frame[2:9])
    if length < 3:
        raise DecodeError("length", f"L={length} cannot hold a DI and SER")
    order = settings["di_order"]
    if order not in DI_ORDERS:
        raise ValueError(f"di_order must be one of {sorted(DI_ORDERS)}, not {order!r}")
    di = _resolve_di(frame[11], frame[12], family, DI_ORDERS[order])
    if di < 0:
        raise DecodeError("unsupported", f"data identifier bytes {frame[11]:02X} {frame[12]:02X}")
    layout = lay.di_layout.py_func(di, family)
    if length < 3 + lay.DATA_LEN[layout]:
        raise DecodeError("length", f"L={length}, a {lay.LAYOUTS[layout][0]} reply needs "
                                    f"{3 + lay.DATA_LEN[layout]}")
    data = frame[14:HEADER + length]
    kind = lay.RECORD_KINDS[lay.LAYOUT_KIND[layout]]
    record: dict[str, Any] = {"meter_address": f"{address:014d}", "meter_type": meter_type,
                              "control": control, "di": di, "serial": frame[13], "record_kind": kind}
    for k in range(lay.FIELD_COUNT[layout]):
        field = lay.FIELD_TABLE[layout, k]
        value, unit = _value(data, field, bool(settings["unit_before_value"]))
        record[lay.VALUE_COLUMNS[field[0]]] = value
        if field[5] >= 0:
            record[lay.UNIT_COLUMNS[field[5]]] = unit
    t = lay.TIME_OFFSET[layout]
    if t >= 0:
        time_key = "freeze_time" if kind == "freeze" else "meter_time"
        record[time_key] = _meter_time(data[t:t + 7], settings["tz_offset_minutes"])
    s = lay.STATUS_OFFSET[layout]
    if s >= 0:
        status = data[s] | data[s + 1] << 8
        missing = status == 0xFFFF
        record["status"] = None if missing else status
        record["valve"] = None if missing else VALVE_STATES[(status >> settings["valve_shift"]) & 3]
        record["battery_low"] = None if missing else bool((status >> settings["battery_bit"]) & 1)
    if kind in ("history", "freeze"):
        record["periods_ago"] = lay.periods_ago(di)
    if kind == "freeze":
        record["freeze_trigger"] = lay.freeze_trigger(di)
    return record


# --------------------------------------------------------------------------- batch rows

def _to_record(cols: Mapping[str, np.ndarray], i: int) -> dict[str, Any]:
    """Row i of the batch columns as the dict decode_reference returns."""
    layout = int(cols["layout"][i])
    di = int(cols["di"][i])
    kind = lay.RECORD_KINDS[lay.LAYOUT_KIND[layout]]
    record: dict[str, Any] = {
        "meter_address": f"{int(cols['address'][i]):014d}", "meter_type": int(cols["meter_type"][i]),
        "control": int(cols["control"][i]), "di": di, "serial": int(cols["serial"][i]), "record_kind": kind,
    }
    for k in range(lay.FIELD_COUNT[layout]):
        field = lay.FIELD_TABLE[layout, k]
        record[lay.VALUE_COLUMNS[field[0]]] = nan_to_none(cols[lay.VALUE_COLUMNS[field[0]]][i])
        if field[5] >= 0:
            name = lay.UNIT_COLUMNS[field[5]]
            record[name] = int(cols[name][i])
    if lay.TIME_OFFSET[layout] >= 0:
        when = int(cols["meter_time"][i])
        record["freeze_time" if kind == "freeze" else "meter_time"] = (
            None if when == MISSING_TIME else datetime.fromtimestamp(when, UTC))
    if lay.STATUS_OFFSET[layout] >= 0:
        missing = bool(cols["status_missing"][i])
        record["status"] = None if missing else int(cols["status"][i])
        record["valve"] = None if missing else VALVE_STATES[int(cols["valve"][i])]
        record["battery_low"] = None if missing else bool(cols["battery_low"][i])
    if kind in ("history", "freeze"):
        record["periods_ago"] = lay.periods_ago(di)
    if kind == "freeze":
        record["freeze_trigger"] = lay.freeze_trigger(di)
    return record


CODEC = Codec(
    name=NAME,
    family="water",
    fields=FIELDS,
    decode=decode_reference,
    batch=decode_batch_kernel,
    to_record=_to_record,
    encode=encode_reply,
    default_settings=DEFAULT_SETTINGS,
)

__all__ = ["CODEC", "MISSING_TIME", "VALVE_STATES", "decode_batch_kernel", "decode_reference",
           "encode_reply", "sample_payloads"]
