"""CJ/T 188 read-data replies as meters send them (simulators, tests, benchmarks)."""

from __future__ import annotations

import random
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from . import cjt188_layout as lay
from .bcd import encode_bcd

_KIND_DI = {"current": lay.DI_CURRENT, "clock": lay.DI_CLOCK}


def _reply_di(fields: Mapping[str, Any]) -> int:
    """The DI a record's fields call for: explicit ``di``, else from record_kind and periods_ago."""
    if "di" in fields:
        return int(fields["di"])
    kind = fields.get("record_kind", "current")
    if kind in _KIND_DI:
        return _KIND_DI[kind]
    back = int(fields.get("periods_ago", 1))
    if kind == "history":
        return 0xD120 + back - 1 if back <= 12 else 0xD200 + back - 1
    if kind == "freeze":
        base = 0xD400 if fields.get("freeze_trigger") == "instant" else 0xD300
        return base + back - 1
    raise ValueError(f"unknown record_kind {kind!r}")


def _time_bytes(when: datetime | None, tz_offset_minutes: int) -> bytes:
    if when is None:
        return b"\xff" * 7
    local = when.astimezone(UTC) + timedelta(minutes=tz_offset_minutes)
    return b"".join(encode_bcd(v, 1) for v in (local.second, local.minute, local.hour, local.day,
                                               local.month, local.year % 100, local.year // 100))


def _value_bytes(value: float | None, nbytes: int, decimals: int, unit_class: int, unit: int) -> bytes:
    if value is None:
        return b"\xff" * nbytes
    factor = lay.UNIT_FACTOR[unit_class, unit] if unit_class != lay.NO_UNIT else 1.0
    if factor == 0.0:
        raise ValueError(f"unit code {unit:02X} is not a {lay.UNIT_CLASS_NAMES[unit_class]} unit")
    raw = round(value / factor * 10 ** decimals)
    return encode_bcd(raw % 10 ** (2 * nbytes), nbytes)      # registers roll over


def encode_reply(fields: Mapping[str, Any], settings: Mapping[str, Any]) -> bytes:
    """A read-data reply (C = 81) as a meter sends it.

    fields: meter_address (14 digits); optional meter_type (0x10; 0x2x heat, 0x3x gas),
    record_kind (current) or di, periods_ago and freeze_trigger (history/freeze), serial (0),
    the value fields of that kind (None or absent: FF-filled; for a water 901F reply
    settlement_flow_m3 defaults to flow_m3), their unit codes (flow_unit applies to settlement_unit
    unless given; defaults m³, kWh, kW, m³/h), meter_time / freeze_time (aware datetime), status
    (0; None sends FF FF).
    settings: preamble (count of FE, default 2), di_order (low_first default), tz_offset_minutes,
    unit_before_value."""
    meter_type = int(fields.get("meter_type", 0x10))
    family = lay.meter_family.py_func(meter_type)
    di = _reply_di(fields)
    layout = lay.di_layout.py_func(di, family)
    if layout < 0:
        raise ValueError(f"no reply layout for DI {di:04X} on meter type {meter_type:02X}")
    name, kind, field_specs, time_off, status_off, data_len = lay.LAYOUTS[layout]
    values = dict(fields)
    if layout == lay.WATER_CURRENT:
        values.setdefault("settlement_flow_m3", fields.get("flow_m3"))
        values.setdefault("settlement_unit", fields.get("flow_unit", lay.DEFAULT_UNIT[lay.VOLUME]))
    data = bytearray(b"\x00" * data_len)
    for column, off, nbytes, decimals, unit_class in field_specs:
        if unit_class == lay.NO_UNIT:
            data[off:off + nbytes] = _value_bytes(values.get(column), nbytes, decimals, unit_class, 0)
            continue
        unit = int(values.get(lay.UNIT_COLUMN_OF[column], lay.DEFAULT_UNIT[unit_class]))
        raw = _value_bytes(values.get(column), nbytes, decimals, unit_class, unit)
        chunk = bytes([unit]) + raw if settings.get("unit_before_value") else raw + bytes([unit])
        data[off:off + nbytes + 1] = chunk
    tz = int(settings.get("tz_offset_minutes", 480))
    if time_off >= 0:
        when = fields.get("freeze_time" if kind == lay.FREEZE else "meter_time")
        data[time_off:time_off + 7] = _time_bytes(when, tz)
    if status_off >= 0:
        status = fields.get("status", 0)
        data[status_off:status_off + 2] = b"\xff\xff" if status is None else bytes(
            [int(status) & 0xFF, int(status) >> 8 & 0xFF])
    di_bytes = bytes([di >> 8, di & 0xFF]) if settings.get("di_order") == "high_first" else bytes(
        [di & 0xFF, di >> 8])
    body_data = di_bytes + bytes([int(fields.get("serial", 0)) & 0xFF]) + bytes(data)
    body = (bytes([0x68, meter_type]) + encode_bcd(int(fields["meter_address"]), 7)
            + bytes([lay.READ_DATA_REPLY, len(body_data)]) + body_data)
    return b"\xfe" * int(settings.get("preamble", 2)) + body + bytes([sum(body) & 0xFF, 0x16])


def random_reply_fields(rng: random.Random, kind: str | None = None) -> dict[str, Any]:
    """Random, valid fields for a reply of `kind` (any kind when None); used by tests and benchmarks."""
    kind = kind or rng.choice(("current", "current", "current", "clock", "history", "freeze"))
    heat = kind != "freeze" and rng.random() < 0.25
    meter_type = rng.choice((0x20, 0x21, 0x22)) if heat else rng.choice((0x10, 0x11, 0x12, 0x13, 0x30))
    base = datetime(2026, 1, 1, tzinfo=UTC)

    def maybe(value: float) -> float | None:
        return None if rng.random() < 0.05 else value

    fields: dict[str, Any] = {
        "meter_address": f"{rng.randrange(10**14):014d}", "meter_type": meter_type, "record_kind": kind,
        "serial": rng.randrange(256), "status": None if rng.random() < 0.03 else rng.randrange(0xFFFF),
        "meter_time": None if rng.random() < 0.05 else base + timedelta(seconds=rng.randrange(10**8)),
        "freeze_time": base + timedelta(seconds=rng.randrange(10**8)),
        "periods_ago": rng.randrange(1, 13) if rng.random() < 0.5 else rng.randrange(1, 257),
        "freeze_trigger": rng.choice(("timed", "instant")),
        "flow_m3": maybe(rng.randrange(10**8) / 100), "settlement_flow_m3": maybe(rng.randrange(10**8) / 100),
        "flow_unit": 0x2C, "settlement_unit": 0x2C,
        "settlement_heat_kwh": maybe(rng.randrange(10**8) / 100), "heat_kwh": maybe(rng.randrange(10**8) / 100),
        "settlement_cooling_kwh": maybe(rng.randrange(10**8) / 100),
        "heat_power_w": maybe(rng.randrange(10**6) / 100 * 1000), "heat_power_unit": 0x17,
        "flow_rate_m3h": maybe(rng.randrange(10**8) / 10**4),
        "supply_temp_c": maybe(rng.randrange(1500, 9500) / 100), "return_temp_c": maybe(rng.randrange(1000, 6000) / 100),
        "working_hours": maybe(float(rng.randrange(10**6))),
        "temperature_c": maybe(rng.randrange(100, 4000) / 100), "pressure": maybe(rng.randrange(10**6) / 100),
    }
    return fields


def sample_payloads(n: int, seed: int = 0) -> list[bytes]:
    """`n` valid, varied replies of every kind (benchmarks, fuzz seeds); deterministic for a seed."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        settings = {"tz_offset_minutes": 480, "preamble": rng.randrange(0, 5),
                    "di_order": rng.choice(("low_first", "high_first"))}
        fields = random_reply_fields(rng)
        di = _reply_di(fields)
        family = lay.meter_family.py_func(fields["meter_type"])
        if lay.resolve_di.py_func(di >> 8, di & 0xFF, family, 0) != di:
            settings["di_order"] = "low_first"     # read back as another DI under di_order "any"
        out.append(encode_reply(fields, settings))
    return out
