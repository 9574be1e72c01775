"""GB/T 26875.3-2011 fire-monitoring frames (``@@ … ##``) from transmission devices and NB detectors.

Frame: ``40 40 | serial(2 LE) | version main, user | time label (6) | source (6 LE) | destination
(6 LE) | ADU length (2 LE, ≤ 1024) | command | ADU | checksum | 23 23``; 30 + ADU length bytes.
The checksum is the byte sum mod 256 of the serial number through the end of the ADU (vendor
setting ``checksum_from = "command"`` starts at the command byte).  The ADU is a type flag, an
object count and that many fixed-size information objects.  One payload holds exactly one frame:
bytes before ``@@`` are ``framing``, bytes after the frame are ``length`` (``split_frames`` cuts a
stream by the length field first).  Sources: ``../shared/PROTOCOLS.md`` §2, docs/protocols/gb26875.md.

Fields returned (units):

* ``serial`` — business serial number; ``version`` — "main.user" as sent (1.1, 2.3, 2.255 …,
  never rejected); ``sent_at`` — the time label as an aware UTC datetime (None when 00- or FF-filled)
* ``source_address`` / ``destination_address`` — the 6-byte little-endian addresses as ints
* ``command`` — 1 control, 2 send data, 3 confirm, 4 request, 5 response, 6 deny
* ``app_type`` — ADU type flag (None when the frame carries no ADU); ``object_count``
* ``objects`` — one dict per information object: ``system_type``, ``system_address``,
  ``component_type``, ``component_address``, ``state`` + ``flags`` (named bools), ``description``
  (GB18030 text or None), ``analog_type``, ``raw`` (signed int16), ``value`` (float: raw ÷ the type's
  divisor, in ``unit``: m, °C, MPa, kPa, %LEL, s, V, A, L/s, m³/min, m/s; vendor types raw ÷ 1,
  unit None), ``operation`` + ``flags``, ``operator``, ``software_version``, ``time`` (UTC) — per type.

Vendor settings: ``tz_offset_minutes`` (device local time, default 480 = China time),
``checksum_from`` (``serial`` default | ``command``).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np

from .errors import DecodeError
from .gb26875_encode import encode_frame, sample_payloads
from .gb26875_kernel import decode_batch_kernel
from .gb26875_layout import (ANALOG_VALUE, CHECKSUM_FROM, COMPONENT_STATE, COMPONENT_STATE_SHORT,
                             FRAME_OVERHEAD, HEADER, MAX_ADU, MISSING_TIME, OBJECT_SIZES, SHORT_TIME_AT,
                             SYSTEM_OPERATION, SYSTEM_STATE, SYSTEM_TIME, SYSTEM_VERSION, TIME_AT,
                             UITD_OPERATION, UITD_STATE, UITD_VERSION, analog, flags)
from .registry import Codec

NAME = "gb26875"
DEFAULT_SETTINGS = {"tz_offset_minutes": 480, "checksum_from": "serial"}

FIELDS = {
    "serial": "business serial number",
    "version": "protocol version 'main.user'",
    "sent_at": "frame time label, UTC",
    "source_address": "6-byte source address (int, little-endian on the wire)",
    "destination_address": "6-byte destination address (int)",
    "command": "1 control, 2 send data, 3 confirm, 4 request, 5 response, 6 deny",
    "app_type": "ADU type flag (1, 2, 3, 4, 5, 8, 21, 24, 25, 28) or None",
    "object_count": "information objects in the ADU",
    "objects": "list of dicts per object (state + flags, analog value in its unit, time UTC, ...)",
}


# --------------------------------------------------------------------------- reference decoder

def _time_label(label: bytes, tz_offset_minutes: int) -> datetime | None:
    if label == b"\x00" * 6 or label == b"\xff" * 6:
        return None
    ss, mi, hh, dd, mo, yy = label
    year = 2000 + yy
    if not (1 <= mo <= 12 and 1 <= dd <= _days_in_month(year, mo) and hh < 24 and mi < 60 and ss < 60):
        raise DecodeError("time", f"{year:04d}-{mo:02d}-{dd:02d} {hh:02d}:{mi:02d}:{ss:02d} is not a time")
    return datetime(year, mo, dd, hh, mi, ss, tzinfo=UTC) - timedelta(minutes=tz_offset_minutes)


def _days_in_month(year: int, month: int) -> int:
    if month == 2:
        return 29 if (year % 4 == 0 and year % 100 != 0) or year % 400 == 0 else 28
    return 30 if month in (4, 6, 9, 11) else 31


def _description(raw: bytes) -> str | None:
    """The text before the first NUL, GB18030 (a superset of GB2312); None when there is none."""
    text = raw.split(b"\x00", 1)[0]
    return text.decode("gb18030", errors="replace") if text else None


def _object(app_type: int, o: bytes, time: datetime | None) -> dict[str, Any]:
    le = int.from_bytes
    if app_type == SYSTEM_STATE:
        state = le(o[2:4], "little")
        return {"system_type": o[0], "system_address": o[1], "state": state,
                "flags": flags(app_type, state), "time": time}
    if app_type == COMPONENT_STATE:
        state = le(o[7:9], "little")
        return {"system_type": o[0], "system_address": o[1], "component_type": o[2],
                "component_address": le(o[3:7], "little"), "state": state, "flags": flags(app_type, state),
                "description": _description(o[9:40]) if len(o) > COMPONENT_STATE_SHORT else None,
                "time": time}
    if app_type == ANALOG_VALUE:
        raw = le(o[8:10], "little", signed=True)
        value, unit = analog(o[7], raw)
        return {"system_type": o[0], "system_address": o[1], "component_type": o[2],
                "component_address": le(o[3:7], "little"), "analog_type": o[7], "raw": raw,
                "value": value, "unit": unit, "time": time}
    if app_type == SYSTEM_OPERATION:
        return {"system_type": o[0], "system_address": o[1], "operation": o[2],
                "flags": flags(app_type, o[2]), "operator": o[3], "time": time}
    if app_type == SYSTEM_VERSION:
        return {"system_type": o[0], "system_address": o[1], "software_version": f"{o[2]}.{o[3]}"}
    if app_type == SYSTEM_TIME:
        return {"system_type": o[0], "system_address": o[1], "time": time}
    if app_type == UITD_STATE:
        return {"state": o[0], "flags": flags(app_type, o[0]), "time": time}
    if app_type == UITD_OPERATION:
        return {"operation": o[0], "flags": flags(app_type, o[0]), "operator": o[1], "time": time}
    if app_type == UITD_VERSION:
        return {"software_version": f"{o[0]}.{o[1]}"}
    return {"time": time}                                   # UITD_TIME


def decode_reference(payload: bytes, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The header fields and information objects of one frame; DecodeError with the reason otherwise."""
    tz = int(settings.get("tz_offset_minutes", 480))
    start = CHECKSUM_FROM.get(settings.get("checksum_from", "serial"))
    if start is None:
        raise ValueError(f"checksum_from must be one of {sorted(CHECKSUM_FROM)}, not {settings['checksum_from']!r}")
    size = len(payload)
    if size == 0:
        raise DecodeError("empty", "no bytes")
    if payload[0] != 0x40 or (size >= 2 and payload[1] != 0x40):
        raise DecodeError("framing", f"expected 40 40, got {payload[:2].hex(' ')}")
    if size < HEADER:
        raise DecodeError("truncated", f"{size} bytes, the header alone is {HEADER}")
    adu = int.from_bytes(payload[24:26], "little")
    if adu > MAX_ADU:
        raise DecodeError("length", f"ADU length {adu} exceeds {MAX_ADU}")
    total = FRAME_OVERHEAD + adu
    if size < total:
        raise DecodeError("truncated", f"ADU length {adu} needs {total} bytes, got {size}")
    if size > total:
        raise DecodeError("length", f"{size - total} stray bytes after the frame")
    if payload[-2:] != b"##":
        raise DecodeError("framing", f"expected 23 23, got {payload[-2:].hex(' ')}")
    checksum = sum(payload[start:HEADER + adu]) & 0xFF
    if checksum != payload[HEADER + adu]:
        raise DecodeError("checksum", f"sum is {checksum:02X}, frame says {payload[HEADER + adu]:02X}")
    record: dict[str, Any] = {
        "serial": int.from_bytes(payload[2:4], "little"),
        "version": f"{payload[4]}.{payload[5]}",
        "sent_at": _time_label(payload[6:12], tz),
        "source_address": int.from_bytes(payload[12:18], "little"),
        "destination_address": int.from_bytes(payload[18:24], "little"),
        "command": payload[26],
        "app_type": None,
        "object_count": 0,
        "objects": [],
    }
    if adu == 0:
        return record
    if adu == 1:
        raise DecodeError("length", "an ADU of one byte has a type flag but no object count")
    app_type, count = payload[27], payload[28]
    obj_size = OBJECT_SIZES.get(app_type)
    if obj_size is None:
        raise DecodeError("unsupported", f"application type {app_type}")
    if 2 + count * obj_size != adu:
        if app_type == COMPONENT_STATE and 2 + count * COMPONENT_STATE_SHORT == adu:
            obj_size = COMPONENT_STATE_SHORT
        else:
            raise DecodeError("length", f"{count} objects of type {app_type} do not fill {adu} bytes")
    time_at = SHORT_TIME_AT if obj_size == COMPONENT_STATE_SHORT else TIME_AT[app_type]
    objects = [payload[29 + j * obj_size:29 + (j + 1) * obj_size] for j in range(count)]
    times = [None if time_at < 0 else _time_label(o[time_at:time_at + 6], tz) for o in objects]
    record["app_type"] = app_type
    record["object_count"] = count
    record["objects"] = [_object(app_type, o, t) for o, t in zip(objects, times)]
    return record


def split_frames(stream: bytes) -> tuple[list[bytes], bytes]:
    """Whole frames cut from the front of a byte stream by their length field, and the rest.

    Never searches for ``##``: a checksum of 0x23 ends a frame ``23 23 23``.  Bytes that do not start
    with ``@@`` are returned as one frame-sized piece so that the decoder rejects them as ``framing``."""
    frames: list[bytes] = []
    pos = 0
    while len(stream) - pos >= HEADER:
        if stream[pos:pos + 2] != b"@@":
            nxt = stream.find(b"@@", pos + 1)
            end = len(stream) if nxt < 0 else nxt
            frames.append(stream[pos:end])
            pos = end
            continue
        total = FRAME_OVERHEAD + int.from_bytes(stream[pos + 24:pos + 26], "little")
        if len(stream) - pos < total:
            break
        frames.append(stream[pos:pos + total])
        pos += total
    return frames, stream[pos:]


# --------------------------------------------------------------------------- batch rows -> records

def _utc(seconds: int) -> datetime | None:
    return None if seconds == MISSING_TIME else datetime.fromtimestamp(seconds, UTC)


def _object_from_columns(cols: Mapping[str, np.ndarray], app_type: int, r: int) -> dict[str, Any]:
    desc = bytes(cols["obj_description"][r]) if cols["obj_has_description"][r] else None
    o = {k[4:]: int(cols[k][r]) for k in ("obj_system_type", "obj_system_address", "obj_component_type",
                                         "obj_component_address", "obj_state", "obj_analog_type",
                                         "obj_value", "obj_operator", "obj_major", "obj_minor")}
    time = _utc(int(cols["obj_time"][r]))
    system = {"system_type": o["system_type"], "system_address": o["system_address"]}
    component = {**system, "component_type": o["component_type"], "component_address": o["component_address"]}
    if app_type == SYSTEM_STATE:
        return {**system, "state": o["state"], "flags": flags(app_type, o["state"]), "time": time}
    if app_type == COMPONENT_STATE:
        return {**component, "state": o["state"], "flags": flags(app_type, o["state"]),
                "description": None if desc is None else _description(desc), "time": time}
    if app_type == ANALOG_VALUE:
        value, unit = analog(o["analog_type"], o["value"])
        return {**component, "analog_type": o["analog_type"], "raw": o["value"], "value": value,
                "unit": unit, "time": time}
    if app_type == SYSTEM_OPERATION:
        return {**system, "operation": o["state"], "flags": flags(app_type, o["state"]),
                "operator": o["operator"], "time": time}
    if app_type == SYSTEM_VERSION:
        return {**system, "software_version": f"{o['major']}.{o['minor']}"}
    if app_type == SYSTEM_TIME:
        return {**system, "time": time}
    if app_type == UITD_STATE:
        return {"state": o["state"], "flags": flags(app_type, o["state"]), "time": time}
    if app_type == UITD_OPERATION:
        return {"operation": o["state"], "flags": flags(app_type, o["state"]), "operator": o["operator"],
                "time": time}
    if app_type == UITD_VERSION:
        return {"software_version": f"{o['major']}.{o['minor']}"}
    return {"time": time}


def to_record(cols: Mapping[str, np.ndarray], i: int) -> dict[str, Any]:
    """Row i of the batch columns as the dict ``decode_reference`` returns."""
    app_type = int(cols["app_type"][i])
    first, count = int(cols["obj_first"][i]), int(cols["object_count"][i])
    return {
        "serial": int(cols["serial"][i]),
        "version": f"{int(cols['version_main'][i])}.{int(cols['version_user'][i])}",
        "sent_at": _utc(int(cols["sent_at"][i])),
        "source_address": int(cols["source_address"][i]),
        "destination_address": int(cols["destination_address"][i]),
        "command": int(cols["command"][i]),
        "app_type": None if app_type < 0 else app_type,
        "object_count": count,
        "objects": [_object_from_columns(cols, app_type, r) for r in range(first, first + count)],
    }


CODEC = Codec(
    name=NAME,
    family="fire",
    fields=FIELDS,
    decode=decode_reference,
    batch=decode_batch_kernel,
    to_record=to_record,
    encode=encode_frame,
    default_settings=DEFAULT_SETTINGS,
)

__all__ = ["CODEC", "decode_batch_kernel", "decode_reference", "encode_frame", "sample_payloads",
           "split_frames", "to_record"]
