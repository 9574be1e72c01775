"""JSON uplinks from Cat-1 devices (MQTT/HTTP): one object or a list of objects, named by the device model.

Output: ``{"records": [{"time": UTC datetime | None, "fields": {...}, "radio": {...}}, ...],
"time": latest record time, "fields": {...}}`` where the top-level ``fields`` merges the records in time
order (a later non-None value wins) — the one flat reading a single-object uplink gives.

Settings (from the device model):

* ``name_map`` — source path -> reading name; a path is dotted (``data.flow``) and may index a list
  (``lanes.0.count``).  Mapped names that the uplink lacks come out None.  Without a name_map every
  scalar leaf comes out under its dotted path.
* ``time_field`` — dotted path of the measurement time: epoch seconds or milliseconds (a number or
  numeric string above 1e11 is milliseconds) or ISO-8601; an ISO time without a zone is local time
  at ``tz_offset_minutes`` (default 480, China).
* numbers come out as floats; booleans and strings unchanged.  ``radio`` as in ``decoders.carrier``.

Rejects: ``empty``, ``syntax`` (not UTF-8 JSON), ``schema`` (not an object or a list of objects, a
mapped value that is an object or list, a time field of the wrong type), ``value`` (unreadable time).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from .carrier import parse_json_body, radio_fields
from .errors import DecodeError
from .registry import Codec

MS_THRESHOLD = 1e11          # 1e11 s is the year 5138, 1e11 ms is 1973: above it, a number is ms
_MAX_EPOCH_S = 253402300799.0
MISSING = object()
FIELDS = {
    "records": "per object: time (UTC), fields (mapped readings, numbers as floats), radio",
    "time": "latest record time, UTC",
    "fields": "readings merged in time order",
}
DEFAULT_SETTINGS: dict[str, Any] = {"name_map": {}, "time_field": None, "tz_offset_minutes": 480}


def _lookup(obj: Any, path: str) -> Any:
    for part in path.split("."):
        if isinstance(obj, dict) and part in obj:
            obj = obj[part]
        elif isinstance(obj, list) and part.isdigit() and int(part) < len(obj):
            obj = obj[int(part)]
        else:
            return MISSING
    return obj


def _scalar(value: Any, path: str) -> Any:
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, float)):
        try:
            number = float(value)
        except OverflowError:
            raise DecodeError("value", f"{path} does not fit a double") from None
        if not math.isfinite(number):
            raise DecodeError("value", f"{path} is not finite")
        return number
    raise DecodeError("schema", f"{path} is a {type(value).__name__}, not a scalar")


def _leaves(obj: Any, prefix: str, out: dict[str, Any], depth: int = 0) -> None:
    if depth > 16:
        raise DecodeError("schema", f"{prefix} is nested too deeply")
    items = obj.items() if isinstance(obj, dict) else enumerate(obj)
    for key, value in items:
        path = f"{prefix}{key}"
        if isinstance(value, (dict, list)):
            _leaves(value, path + ".", out, depth + 1)
        else:
            out[path] = _scalar(value, path)


def parse_time(value: Any, field: str, tz_offset_minutes: int) -> datetime | None:
    """Epoch s / ms (number or numeric string) or ISO-8601 as an aware UTC datetime."""
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise DecodeError("schema", f"{field} must be a number or a string")
    number: float | None = None
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
        if number is None:
            try:
                parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
            except ValueError:
                raise DecodeError("value", f"{field} {value!r} is neither epoch nor ISO-8601") from None
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=timezone(timedelta(minutes=tz_offset_minutes)))
            return parsed.astimezone(UTC)
    else:
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
    if not math.isfinite(number):
        raise DecodeError("value", f"{field} is not finite")
    seconds = number / 1000.0 if number > MS_THRESHOLD else number
    if not 0.0 <= seconds <= _MAX_EPOCH_S:
        raise DecodeError("value", f"{field} {value!r} is outside 1970..9999")
    return datetime.fromtimestamp(seconds, UTC)


def _record(obj: dict[str, Any], settings: Mapping[str, Any]) -> dict[str, Any]:
    name_map = settings.get("name_map") or {}
    fields: dict[str, Any] = {}
    if name_map:
        for path, name in name_map.items():
            value = _lookup(obj, path)
            fields[name] = None if value is MISSING else _scalar(value, path)
    else:
        _leaves(obj, "", fields)
    time_field = settings.get("time_field")
    when = None
    if time_field:
        raw = _lookup(obj, time_field)
        when = None if raw is MISSING else parse_time(raw, time_field, int(settings.get("tz_offset_minutes", 480)))
    return {"time": when, "fields": fields, "radio": radio_fields([obj], settings)}


def decode_reference(payload: bytes, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The readings of one JSON uplink (an object or a list of objects)."""
    body = parse_json_body(payload)
    objects = body if isinstance(body, list) else [body]
    if not objects or not all(isinstance(o, dict) for o in objects):
        raise DecodeError("schema", "a JSON uplink is an object or a non-empty list of objects")
    records = [_record(o, settings) for o in objects]
    epoch = datetime.min.replace(tzinfo=UTC)
    merged: dict[str, Any] = {}
    for record in sorted(records, key=lambda r: r["time"] or epoch):    # stable: ties keep list order
        for name, value in record["fields"].items():
            if value is not None or name not in merged:
                merged[name] = value
    times = [r["time"] for r in records if r["time"] is not None]
    return {"records": records, "time": max(times) if times else None, "fields": merged}


def encode(fields: Mapping[str, Any], settings: Mapping[str, Any]) -> bytes:
    """A JSON uplink: ``fields`` (a mapping of dotted paths to values) as nested objects."""
    body: dict[str, Any] = {}
    for path, value in fields.items():
        node = body
        *parents, leaf = str(path).split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value.timestamp() if isinstance(value, datetime) else value
    return json.dumps(body, separators=(",", ":")).encode()


CODEC = Codec(name="json", family="generic", fields=FIELDS, decode=decode_reference, encode=encode,
              default_settings=DEFAULT_SETTINGS)

__all__ = ["CODEC", "decode_reference", "encode", "parse_time"]
