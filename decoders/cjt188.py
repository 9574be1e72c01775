"""CJ/T 188 household meter frames (water and gas): the read-data reply (DI 901F).

Frame: ``[FE…] 68 T A0..A6 C L DI0 DI1 SER data… CS 16``; ``CS`` is the byte sum of ``68`` through
the last data byte, mod 256; the frame is 13 + L bytes after the preamble.  The 901F reply data:
current cumulative flow (4 BCD bytes, low first, XXXXXX.XX) + unit, settlement-day flow + unit,
real time (7 BCD bytes ``ss mm hh DD MM YY CC``, local time), status ST (2 bytes).
Sources: ``../shared/PROTOCOLS.md`` §1 (ng-gateway's cjt188 codec and defs, cj188.h).

Fields returned (units):

* ``meter_address`` — 14-digit meter number as printed (A6 first)
* ``meter_type`` — T byte (0x10 cold water … 0x30 gas); ``control`` — C byte; ``di`` — 0x901F;
  ``serial`` — SER
* ``flow_m3`` / ``settlement_flow_m3`` — cumulative volume in m³ (None when the meter sends FF)
* ``flow_unit`` / ``settlement_unit`` — the unit code as sent (0x29 L … 0x2C m³ … 0x2E m³×100)
* ``meter_time`` — the meter's clock as an aware UTC datetime (None when FF- or zero-filled)
* ``status`` — ST0 | ST1 << 8; ``valve`` — open/closed/unknown/abnormal; ``battery_low`` — bool

Vendor settings: ``tz_offset_minutes`` (meter local time, default 480 = China time),
``di_order`` (``any`` | ``low_first`` (1F 90, the standard's example) | ``high_first`` (90 1F)),
``valve_shift`` (bit of the two valve bits in ST, default 0; MSB-numbering vendors use 6),
``battery_bit`` (default 2; MSB-numbering vendors use 5).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import numba as nb
import numpy as np

from . import errors as E
from .bcd import bcd_byte, days_from_civil, days_in_month, encode_bcd
from .errors import DecodeError
from .registry import Codec, nan_to_none

NAME = "cjt188"
HEADER = 11                  # 68 T A0..A6 C L
DI_CURRENT = 0x901F
READ_DATA_REPLY = 0x81
L_901F = 22                  # DI(2) SER(1) flow(5) settlement(5) time(7) ST(2)
MISSING_TIME = np.iinfo(np.int64).min
VALVE_STATES = ("open", "closed", "unknown", "abnormal")
DI_ORDERS = {"any": 0, "low_first": 1, "high_first": 2}

# Volume unit code -> factor to m³ (CJ/T 188-2004 Table 13 / 2018 Table 20, via PROTOCOLS.md).
VOLUME_UNITS: dict[int, float] = {0x29: 0.001, 0x2A: 0.01, 0x2B: 0.1, 0x2C: 1.0, 0x2D: 10.0, 0x2E: 100.0}
_UNIT_FACTOR = np.zeros(256, dtype=np.float64)
for _code, _factor in VOLUME_UNITS.items():
    _UNIT_FACTOR[_code] = _factor

DEFAULT_SETTINGS = {"tz_offset_minutes": 480, "di_order": "any", "valve_shift": 0, "battery_bit": 2}

FIELDS = {
    "meter_address": "14-digit meter number as printed",
    "meter_type": "T byte: 0x10 cold, 0x11 hot, 0x12 drinking, 0x13 reclaimed water; 0x30 gas",
    "control": "C byte (0x81 = read-data reply)",
    "di": "data identifier (0x901F)",
    "serial": "SER byte",
    "flow_m3": "current cumulative flow, m³",
    "flow_unit": "unit code as sent",
    "settlement_flow_m3": "settlement-day cumulative flow, m³",
    "settlement_unit": "unit code as sent",
    "meter_time": "meter clock, UTC",
    "status": "ST0 | ST1<<8",
    "valve": "open / closed / unknown / abnormal (vendor bit map)",
    "battery_low": "bool (vendor bit map)",
}


# --------------------------------------------------------------------------- reference decoder

def _skip_preamble(payload: bytes) -> int:
    i = 0
    while i < len(payload) and payload[i] == 0xFE:
        i += 1
    return i


def _bcd(data: bytes) -> int:
    """Little-endian BCD bytes as an int; DecodeError('bcd') on a bad nibble."""
    value = 0
    for b in reversed(data):
        pair = bcd_byte.py_func(b)
        if pair < 0:
            raise DecodeError("bcd", f"byte {b:02X} is not BCD")
        value = value * 100 + pair
    return value


def _volume(data: bytes) -> tuple[float | None, int]:
    raw, unit = data[:4], data[4]
    if raw == b"\xff\xff\xff\xff":
        return None, unit
    value = _bcd(raw)
    factor = VOLUME_UNITS.get(unit)
    if factor is None:
        raise DecodeError("unit", f"unit code {unit:02X} is not a volume unit")
    return value / 100.0 * factor, unit


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


def _di(d0: int, d1: int, order: str) -> int:
    low_first = (d1 << 8) | d0
    high_first = (d0 << 8) | d1
    if order in ("any", "low_first") and low_first == DI_CURRENT:
        return DI_CURRENT
    if order in ("any", "high_first") and high_first == DI_CURRENT:
        return DI_CURRENT
    return low_first if order != "high_first" else high_first


def decode_reference(payload: bytes, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of one 901F read-data reply; DecodeError with the reason otherwise."""
    if not payload:
        raise DecodeError("empty", "no bytes")
    start = _skip_preamble(payload)
    frame = payload[start:]
    if not frame:
        raise DecodeError("truncated", "only preamble bytes")
    if frame[0] != 0x68:
        raise DecodeError("framing", f"expected 68 after the preamble, got {frame[0]:02X}")
    if len(frame) < HEADER:
        raise DecodeError("truncated", f"{len(frame)} bytes, the header alone is {HEADER}")
    length = frame[10]
    total = HEADER + length + 2
    if len(frame) < total:
        raise DecodeError("truncated", f"L={length} needs {total} bytes, got {len(frame)}")
    if len(frame) > total:
        raise DecodeError("length", f"{len(frame) - total} stray bytes after the frame")
    if frame[-1] != 0x16:
        raise DecodeError("framing", f"expected end byte 16, got {frame[-1]:02X}")
    if sum(frame[:-2]) & 0xFF != frame[-2]:
        raise DecodeError("checksum", f"sum is {sum(frame[:-2]) & 0xFF:02X}, frame says {frame[-2]:02X}")
    control = frame[9]
    if control & 0x40:
        raise DecodeError("device_error", f"abnormal reply C={control:02X}")
    if control != READ_DATA_REPLY:
        raise DecodeError("unsupported", f"control {control:02X} is not a read-data reply")
    meter_type = frame[1]
    if not (0x10 <= meter_type <= 0x19 or 0x30 <= meter_type <= 0x39):
        raise DecodeError("unsupported", f"meter type {meter_type:02X} has another 901F layout")
    address = _bcd(frame[2:9])
    if length < 3:
        raise DecodeError("length", f"L={length} cannot hold a DI and SER")
    di = _di(frame[11], frame[12], settings["di_order"])
    if di != DI_CURRENT:
        raise DecodeError("unsupported", f"data identifier {di:04X}")
    if length < L_901F:
        raise DecodeError("length", f"L={length}, a 901F reply needs {L_901F}")
    data = frame[14:HEADER + length]
    flow, flow_unit = _volume(data[0:5])
    settlement, settlement_unit = _volume(data[5:10])
    meter_time = _meter_time(data[10:17], settings["tz_offset_minutes"])
    status = data[17] | data[18] << 8
    return {
        "meter_address": f"{address:014d}",
        "meter_type": meter_type,
        "control": control,
        "di": di,
        "serial": frame[13],
        "flow_m3": flow,
        "flow_unit": flow_unit,
        "settlement_flow_m3": settlement,
        "settlement_unit": settlement_unit,
        "meter_time": meter_time,
        "status": status,
        "valve": VALVE_STATES[(status >> settings["valve_shift"]) & 3],
        "battery_low": bool((status >> settings["battery_bit"]) & 1),
    }


# --------------------------------------------------------------------------- numba batch kernel

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
def _volume_kernel(buf, p, unit_factor):
    """(status, m³) of a 4+1-byte volume field at p."""
    if _all_equal(buf, p, 4, 0xFF):
        return 0, np.nan
    raw = _bcd_le(buf, p, 4)
    if raw < 0:
        return 5, np.nan                        # bcd
    factor = unit_factor[buf[p + 4]]
    if factor == 0.0:
        return 7, np.nan                        # unit
    return 0, raw / 100.0 * factor


@nb.njit(cache=True)
def _kernel(buf, offsets, tz_offset_s, di_mode, unit_factor,
            status, meter_type, address, control, serial, flow, flow_unit,
            settle, settle_unit, meter_time, st):
    # The reason codes and their order mirror decode_reference exactly (errors.REASONS).
    n = len(offsets) - 1
    for i in range(n):
        a = offsets[i]
        b = offsets[i + 1]
        if a == b:
            status[i] = 13                      # empty
            continue
        while a < b and buf[a] == 0xFE:
            a += 1
        size = b - a
        if size == 0:
            status[i] = 1                       # truncated
            continue
        if buf[a] != 0x68:
            status[i] = 3                       # framing
            continue
        if size < 11:
            status[i] = 1
            continue
        length = buf[a + 10]
        total = 13 + length
        if size < total:
            status[i] = 1
            continue
        if size > total:
            status[i] = 2                       # length
            continue
        if buf[a + total - 1] != 0x16:
            status[i] = 3
            continue
        cs = 0
        for k in range(total - 2):
            cs += buf[a + k]
        if (cs & 0xFF) != buf[a + total - 2]:
            status[i] = 4                       # checksum
            continue
        c = buf[a + 9]
        if c & 0x40:
            status[i] = 9                       # device_error
            continue
        if c != 0x81:
            status[i] = 6                       # unsupported
            continue
        t = buf[a + 1]
        if not ((0x10 <= t and t <= 0x19) or (0x30 <= t and t <= 0x39)):
            status[i] = 6
            continue
        addr = _bcd_le(buf, a + 2, 7)
        if addr < 0:
            status[i] = 5                       # bcd
            continue
        if length < 3:
            status[i] = 2
            continue
        d0 = buf[a + 11]
        d1 = buf[a + 12]
        ok_low = d0 == 0x1F and d1 == 0x90
        ok_high = d0 == 0x90 and d1 == 0x1F
        if not ((ok_low and di_mode != 2) or (ok_high and di_mode != 1)):
            status[i] = 6
            continue
        if length < 22:
            status[i] = 2
            continue
        p = a + 14
        s1, v1 = _volume_kernel(buf, p, unit_factor)
        if s1 != 0:
            status[i] = s1
            continue
        s2, v2 = _volume_kernel(buf, p + 5, unit_factor)
        if s2 != 0:
            status[i] = s2
            continue
        q = p + 10
        if _all_equal(buf, q, 7, 0xFF) or _all_equal(buf, q, 7, 0x00):
            when = np.iinfo(np.int64).min
        else:
            ss = bcd_byte(buf[q])
            mi = bcd_byte(buf[q + 1])
            hh = bcd_byte(buf[q + 2])
            dd = bcd_byte(buf[q + 3])
            mo = bcd_byte(buf[q + 4])
            yy = bcd_byte(buf[q + 5])
            cc = bcd_byte(buf[q + 6])
            if ss < 0 or mi < 0 or hh < 0 or dd < 0 or mo < 0 or yy < 0 or cc < 0:
                status[i] = 5
                continue
            year = cc * 100 + yy
            if not (1 <= mo and mo <= 12 and 1 <= dd and dd <= days_in_month(year, mo)
                    and hh < 24 and mi < 60 and ss < 60):
                status[i] = 8                   # time
                continue
            when = days_from_civil(year, mo, dd) * 86400 + hh * 3600 + mi * 60 + ss - tz_offset_s
        status[i] = 0
        meter_type[i] = t
        address[i] = addr
        control[i] = c
        serial[i] = buf[a + 13]
        flow[i] = v1
        flow_unit[i] = buf[p + 4]
        settle[i] = v2
        settle_unit[i] = buf[p + 9]
        meter_time[i] = when
        st[i] = buf[q + 7] | (np.uint16(buf[q + 8]) << 8)


def decode_batch_kernel(buf: np.ndarray, offsets: np.ndarray,
                        settings: Mapping[str, Any]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Columns for every frame of a packed batch (see decoders.pack) and a status per frame."""
    order = settings["di_order"]
    if order not in DI_ORDERS:
        raise ValueError(f"di_order must be one of {sorted(DI_ORDERS)}, not {order!r}")
    n = len(offsets) - 1
    status = np.zeros(n, dtype=np.int8)
    cols = {
        "meter_type": np.zeros(n, dtype=np.uint8),
        "address": np.zeros(n, dtype=np.int64),
        "control": np.zeros(n, dtype=np.uint8),
        "serial": np.zeros(n, dtype=np.uint8),
        "flow_m3": np.full(n, np.nan),
        "flow_unit": np.zeros(n, dtype=np.uint8),
        "settlement_flow_m3": np.full(n, np.nan),
        "settlement_unit": np.zeros(n, dtype=np.uint8),
        "meter_time": np.full(n, MISSING_TIME, dtype=np.int64),
        "status": np.zeros(n, dtype=np.uint16),
    }
    _kernel(buf, offsets, int(settings["tz_offset_minutes"]) * 60, DI_ORDERS[order], _UNIT_FACTOR,
            status, cols["meter_type"], cols["address"], cols["control"], cols["serial"],
            cols["flow_m3"], cols["flow_unit"], cols["settlement_flow_m3"], cols["settlement_unit"],
            cols["meter_time"], cols["status"])
    st = cols["status"].astype(np.int64)
    cols["valve"] = ((st >> int(settings["valve_shift"])) & 3).astype(np.int8)
    cols["battery_low"] = ((st >> int(settings["battery_bit"])) & 1).astype(bool)
    return status, cols


def _to_record(cols: Mapping[str, np.ndarray], i: int) -> dict[str, Any]:
    when = int(cols["meter_time"][i])
    return {
        "meter_address": f"{int(cols['address'][i]):014d}",
        "meter_type": int(cols["meter_type"][i]),
        "control": int(cols["control"][i]),
        "di": DI_CURRENT,
        "serial": int(cols["serial"][i]),
        "flow_m3": nan_to_none(cols["flow_m3"][i]),
        "flow_unit": int(cols["flow_unit"][i]),
        "settlement_flow_m3": nan_to_none(cols["settlement_flow_m3"][i]),
        "settlement_unit": int(cols["settlement_unit"][i]),
        "meter_time": None if when == MISSING_TIME else datetime.fromtimestamp(when, UTC),
        "status": int(cols["status"][i]),
        "valve": VALVE_STATES[int(cols["valve"][i])],
        "battery_low": bool(cols["battery_low"][i]),
    }


# --------------------------------------------------------------------------- encoder

def _encode_volume(m3: float | None, unit: int) -> bytes:
    if m3 is None:
        return b"\xff" * 4 + bytes([unit])
    factor = VOLUME_UNITS[unit]
    hundredths = round(m3 / factor * 100)
    return encode_bcd(hundredths % 100_000_000, 4) + bytes([unit])   # the register rolls over


def encode_reply(fields: Mapping[str, Any], settings: Mapping[str, Any]) -> bytes:
    """A 901F read-data reply as a meter sends it.

    fields: meter_address (14 digits), flow_m3, optional meter_type (0x10), settlement_flow_m3,
    flow_unit (0x2C), meter_time (aware datetime), status (0), serial (0).
    settings: preamble (count of FE, default 2), di_order (low_first default), tz_offset_minutes."""
    unit = int(fields.get("flow_unit", 0x2C))
    address = int(fields["meter_address"])
    when = fields.get("meter_time")
    if when is None:
        time_bytes = b"\xff" * 7
    else:
        local = when.astimezone(UTC) + timedelta(minutes=settings["tz_offset_minutes"])
        time_bytes = b"".join(encode_bcd(v, 1) for v in (local.second, local.minute, local.hour, local.day,
                                                         local.month, local.year % 100, local.year // 100))
    status = int(fields.get("status", 0))
    di = b"\x90\x1f" if settings.get("di_order") == "high_first" else b"\x1f\x90"
    data = (di + bytes([int(fields.get("serial", 0)) & 0xFF])
            + _encode_volume(fields.get("flow_m3"), unit)
            + _encode_volume(fields.get("settlement_flow_m3", fields.get("flow_m3")), unit)
            + time_bytes + bytes([status & 0xFF, status >> 8 & 0xFF]))
    body = (bytes([0x68, int(fields.get("meter_type", 0x10))]) + encode_bcd(address, 7)
            + bytes([READ_DATA_REPLY, len(data)]) + data)
    return b"\xfe" * int(settings.get("preamble", 2)) + body + bytes([sum(body) & 0xFF, 0x16])


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

__all__ = ["CODEC", "decode_batch_kernel", "decode_reference", "encode_reply"]


def sample_payloads(n: int, seed: int = 0) -> list[bytes]:
    """`n` valid, varied 901F replies (benchmarks, fuzz seeds); deterministic for a seed."""
    import random
    rng = random.Random(seed)
    base = datetime(2026, 1, 1, tzinfo=UTC)
    out = []
    for _ in range(n):
        fields = {
            "meter_address": f"{rng.randrange(10**14):014d}",
            "meter_type": rng.choice((0x10, 0x11, 0x12, 0x13, 0x30)),
            "flow_m3": rng.randrange(10**8) / 100,
            "settlement_flow_m3": rng.randrange(10**8) / 100,
            "meter_time": base + timedelta(seconds=rng.randrange(10**8)),
            "status": rng.randrange(1 << 16),
            "serial": rng.randrange(256),
        }
        out.append(encode_reply(fields, {**DEFAULT_SETTINGS, "preamble": rng.randrange(0, 5),
                                         "di_order": rng.choice(("low_first", "high_first"))}))
    return out
