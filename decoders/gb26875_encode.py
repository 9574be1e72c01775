"""GB/T 26875.3-2011 frames as transmission devices and NB detectors send them (simulators, tests)."""

from __future__ import annotations

import random
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from .gb26875_layout import (ANALOG_TYPES, ANALOG_VALUE, CHECKSUM_FROM, COMPONENT_STATE, DESCRIPTION,
                             MAX_ADU, SYSTEM_OPERATION, SYSTEM_STATE, SYSTEM_TIME, SYSTEM_VERSION,
                             UITD_OPERATION, UITD_STATE, UITD_TIME, UITD_VERSION, word)

HEARTBEAT_STATE = 0x01          # UITD running normally, nothing raised


def _time_label(when: datetime | None, tz_offset_minutes: int) -> bytes:
    if when is None:
        return b"\x00" * 6
    local = when.astimezone(UTC) + timedelta(minutes=tz_offset_minutes)
    if not 2000 <= local.year <= 2255:
        raise ValueError(f"{when} is outside the time label's years 2000–2255")
    return bytes((local.second, local.minute, local.hour, local.day, local.month, local.year - 2000))


def _state(app_type: int, obj: Mapping[str, Any], key: str = "state") -> int:
    if "flags" in obj:
        return word(app_type, obj["flags"])
    return int(obj.get(key, 0))


def _description(text: str | None) -> bytes:
    raw = (text or "").encode("gb18030")
    if len(raw) > DESCRIPTION:
        raise ValueError(f"description {text!r} is {len(raw)} bytes in GB18030, the field holds {DESCRIPTION}")
    return raw.ljust(DESCRIPTION, b"\x00")


def _raw_analog(obj: Mapping[str, Any]) -> int:
    if "raw" in obj:
        raw = int(obj["raw"])
    else:
        divisor = ANALOG_TYPES.get(int(obj["analog_type"]), (1, None))[0]
        raw = round(float(obj["value"]) * divisor)
    if not -32768 <= raw <= 32767:
        raise ValueError(f"analog raw value {raw} does not fit a signed 16-bit field")
    return raw


def _object(app_type: int, obj: Mapping[str, Any], with_description: bool, tz: int) -> bytes:
    def u(value: Any, n: int) -> bytes:
        return int(value).to_bytes(n, "little")

    system = u(obj.get("system_type", 1), 1) + u(obj.get("system_address", 0), 1)
    component = system + u(obj.get("component_type", 0), 1) + u(obj.get("component_address", 0), 4)
    time = _time_label(obj.get("time"), tz)
    if app_type == SYSTEM_STATE:
        return system + u(_state(app_type, obj), 2) + time
    if app_type == COMPONENT_STATE:
        text = _description(obj.get("description")) if with_description else b""
        return component + u(_state(app_type, obj), 2) + text + time
    if app_type == ANALOG_VALUE:
        return component + u(obj["analog_type"], 1) + _raw_analog(obj).to_bytes(2, "little", signed=True) + time
    if app_type == SYSTEM_OPERATION:
        return system + u(_state(app_type, obj, "operation"), 1) + u(obj.get("operator", 0), 1) + time
    if app_type in (SYSTEM_VERSION, UITD_VERSION):
        major, minor = (int(part) for part in str(obj.get("software_version", "1.0")).split("."))
        return (system if app_type == SYSTEM_VERSION else b"") + u(major, 1) + u(minor, 1)
    if app_type == SYSTEM_TIME:
        return system + time
    if app_type == UITD_STATE:
        return u(_state(app_type, obj), 1) + time
    if app_type == UITD_OPERATION:
        return u(_state(app_type, obj, "operation"), 1) + u(obj.get("operator", 0), 1) + time
    if app_type == UITD_TIME:
        return time
    raise ValueError(f"application type {app_type} has no encoder")


def encode_frame(fields: Mapping[str, Any], settings: Mapping[str, Any]) -> bytes:
    """One ``@@ … ##`` frame.

    fields: serial (0), version ("1.1"; any "main.user"), sent_at (aware datetime; None = zeros),
    source_address / destination_address (ints, 0), command (2 = send data), app_type (None = no
    ADU, as confirm frames), objects (dicts with the decoder's keys; ``flags`` may replace ``state``
    or ``operation``; analog objects take ``raw`` or ``value`` in the type's unit), with_description
    (True; False sends the 15-byte component-state objects of NB smoke detectors).
    settings: tz_offset_minutes (480), checksum_from ("serial" | "command")."""
    tz = int(settings.get("tz_offset_minutes", 480))
    main, user = (int(part) for part in str(fields.get("version", "1.1")).split("."))
    app_type = fields.get("app_type")
    adu = b""
    if app_type is not None:
        objects = list(fields.get("objects", ()))
        with_description = bool(fields.get("with_description", True))
        adu = bytes((int(app_type), len(objects))) + b"".join(
            _object(int(app_type), obj, with_description, tz) for obj in objects)
    if len(adu) > MAX_ADU:
        raise ValueError(f"ADU of {len(adu)} bytes exceeds {MAX_ADU}; send fewer objects per frame")
    body = (b"@@" + int(fields.get("serial", 0)).to_bytes(2, "little") + bytes((main, user))
            + _time_label(fields.get("sent_at"), tz)
            + int(fields.get("source_address", 0)).to_bytes(6, "little")
            + int(fields.get("destination_address", 0)).to_bytes(6, "little")
            + len(adu).to_bytes(2, "little") + bytes((int(fields.get("command", 2)),)) + adu)
    checksum = sum(body[CHECKSUM_FROM[settings.get("checksum_from", "serial")]:]) & 0xFF
    return body + bytes((checksum,)) + b"##"


def heartbeat(source_address: int, sent_at: datetime, serial: int = 0, state: int = HEARTBEAT_STATE,
              version: str = "1.1") -> dict[str, Any]:
    """Fields of a UITD-state frame (type 21), the transmission device's periodic heartbeat."""
    return {"serial": serial, "version": version, "sent_at": sent_at, "source_address": source_address,
            "command": 2, "app_type": UITD_STATE, "objects": [{"state": state, "time": sent_at}]}


def smoke_alarm(source_address: int, component_address: int, sent_at: datetime, description: str | None,
                serial: int = 0, fire: bool = True) -> dict[str, Any]:
    """Fields of a point smoke detector's component-state frame (type 2); no description = NB variant."""
    obj = {"system_type": 1, "system_address": 0, "component_type": 0x28,
           "component_address": component_address, "description": description, "time": sent_at,
           "flags": {"normal_running": True, "fire_alarm": fire, "started": fire}}
    return {"serial": serial, "version": "2.3", "sent_at": sent_at, "source_address": source_address,
            "command": 2, "app_type": COMPONENT_STATE, "objects": [obj],
            "with_description": description is not None}


def sample_payloads(n: int, seed: int = 0) -> list[bytes]:
    """`n` valid, varied frames of every decoded type (benchmarks, fuzz seeds); deterministic for a seed."""
    rng = random.Random(seed)
    base = datetime(2024, 1, 1, tzinfo=UTC)
    kinds = (SYSTEM_STATE, COMPONENT_STATE, ANALOG_VALUE, SYSTEM_OPERATION, SYSTEM_VERSION, SYSTEM_TIME,
             UITD_STATE, UITD_OPERATION, UITD_VERSION, UITD_TIME, None)
    out = []
    for _ in range(n):
        when = base + timedelta(seconds=rng.randrange(10**8))
        app_type = rng.choice(kinds)
        objects = [random_object(rng, app_type, when) for _ in range(rng.randrange(1, 4))]
        fields = {"serial": rng.randrange(1 << 16), "version": rng.choice(("1.1", "2.3", "2.255", "1.0")),
                  "sent_at": when, "source_address": rng.randrange(1 << 48),
                  "command": 3 if app_type is None else rng.choice((2, 2, 2, 5)),
                  "app_type": app_type, "objects": objects, "with_description": rng.random() < 0.5}
        out.append(encode_frame(fields, {"tz_offset_minutes": 480, "checksum_from": "serial"}))
    return out


def random_object(rng: random.Random, app_type: int | None, when: datetime) -> dict[str, Any]:
    """One information object of `app_type` with random fields (samples, property tests)."""
    return {
        "system_type": rng.choice((1, 10, 11, 23, 0x83, 0x87)), "system_address": rng.randrange(256),
        "component_type": rng.choice((0x28, 0x29, 0x79, 0)), "component_address": rng.randrange(1 << 32),
        "state": rng.randrange(1 << 16) if app_type != UITD_STATE else rng.randrange(256),
        "operation": rng.randrange(256), "operator": rng.randrange(256),
        "description": rng.choice((None, "7楼02室会议室烟感", "Ａ区１层走廊", "F9164-TD-NB")),
        "analog_type": rng.choice((3, 4, 5, 6, 0x80, 0x88)), "raw": rng.randrange(-32768, 32768),
        "software_version": f"{rng.randrange(256)}.{rng.randrange(256)}",
        "time": rng.choice((when, when - timedelta(seconds=rng.randrange(86400)), None)),
    }
