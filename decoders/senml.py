"""SenML packs (RFC 8428) in JSON (``senml-json``) and CBOR (``senml-cbor``), resolved per §4.6.

Output: ``{"records": [...], "fields": {...}}``.  Each resolved record has every key:

* ``name`` — base name + name; ``unit`` — unit, else base unit, else None
* ``value`` (float: base value + value) | ``string_value`` | ``bool_value`` | ``data_value`` (bytes);
  the three not sent are None
* ``sum`` — base sum + sum (float), None when neither is sent; ``update_time`` — seconds or None
* ``time`` — aware UTC datetime: base time + time, and a result below 2**28 is relative to "now"

``fields`` maps the device model's ``name_map`` (SenML name -> reading name, e.g. ``/3424/0/1`` ->
``flow_m3``) to values; a name is matched exactly, then without a leading ``/``, then as the path tail
after a ``/`` (so ``urn:imei:…/3424/0/1`` matches ``3424/0/1``).  When a name repeats, the latest time
wins (ties: the later record).  Records keep the pack's order.

Settings: ``now`` (epoch seconds for relative times; default the wall clock), ``name_map``.
Rejects: ``syntax`` (not JSON/CBOR, trailing bytes, bad base64url), ``schema`` (not an array of maps,
wrong field type, no or several value fields, a must-understand label ending ``_``, versions that
differ within the pack, empty name), ``value`` (non-finite number, time outside 1970..9999),
``unsupported`` (a version above 10, which RFC 8428 §4.4 says must not be used).
A record with base fields only (RFC 8428 §5.1.7's first record) sets bases and yields no reading.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import time as wallclock
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from fractions import Fraction
from typing import Any

import cbor2

from .errors import DecodeError
from .registry import Codec

VERSION = 10
RELATIVE_LIMIT = 2 ** 28
# CBOR integer labels (RFC 8428 Table 4) -> JSON labels.
CBOR_LABELS = {-1: "bver", -2: "bn", -3: "bt", -4: "bu", -5: "bv", -6: "bs",
               0: "n", 1: "u", 2: "v", 3: "vs", 4: "vb", 5: "s", 6: "t", 7: "ut", 8: "vd"}
JSON_TO_CBOR = {label: key for key, label in CBOR_LABELS.items()}
BASE_LABELS = ("bn", "bt", "bu", "bv", "bs", "bver")
VALUE_LABELS = ("v", "vs", "vb", "vd")
RECORD_KEYS = ("name", "unit", "value", "string_value", "bool_value", "data_value", "sum", "time", "update_time")
_MAX_EPOCH = 253402300799.0
FIELDS = {
    "records": "resolved records: name, unit, value|string_value|bool_value|data_value, sum, time (UTC), "
               "update_time (s)",
    "fields": "readings named by the device model's name_map",
}
DEFAULT_SETTINGS: dict[str, Any] = {"name_map": {}}


def _number(value: Any, label: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, Decimal, Fraction)):
        raise DecodeError("schema", f"{label} must be a number, got {type(value).__name__}")
    try:
        number = float(value)
    except (OverflowError, ValueError):
        raise DecodeError("value", f"{label} does not fit a double") from None
    if not math.isfinite(number):
        raise DecodeError("value", f"{label} is not finite")
    return number


def _string(value: Any, label: str) -> str:
    if not isinstance(value, str):
        raise DecodeError("schema", f"{label} must be a string, got {type(value).__name__}")
    return value


def _utc(seconds: float) -> datetime:
    if not 0.0 <= seconds <= _MAX_EPOCH:
        raise DecodeError("value", f"time {seconds} is outside 1970..9999")
    return datetime.fromtimestamp(seconds, UTC)


def _data_value(value: Any, from_cbor: bool) -> bytes:
    if from_cbor:
        if not isinstance(value, bytes):
            raise DecodeError("schema", "vd must be a byte string in CBOR")
        return value
    text = _string(value, "vd")
    if "=" in text or "+" in text or "/" in text:
        raise DecodeError("syntax", "vd must be base64url without padding")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise DecodeError("syntax", "vd is not base64url") from None


def resolve(pack: Any, settings: Mapping[str, Any], from_cbor: bool = False) -> dict[str, Any]:
    """Resolved records (RFC 8428 §4.6) and mapped fields of a parsed pack (a list of label maps)."""
    if not isinstance(pack, list):
        raise DecodeError("schema", f"a SenML pack is an array, got {type(pack).__name__}")
    if not pack:
        raise DecodeError("schema", "a SenML pack holds at least one record")
    now = settings.get("now")
    now = wallclock.time() if now is None else float(now)
    base: dict[str, Any] = {"bn": "", "bt": 0.0, "bu": None, "bv": None, "bs": None}
    version: int | None = None          # carries to later records like any base field
    records = []
    for index, raw in enumerate(pack):
        if not isinstance(raw, dict):
            raise DecodeError("schema", f"record {index} is not a map")
        record: dict[str, Any] = {}
        for key, value in raw.items():
            label = CBOR_LABELS.get(key) if from_cbor and isinstance(key, int) else key
            if not isinstance(label, str):
                continue                    # unknown integer labels: RFC 8428 Table 4 is conclusive
            if label.endswith("_"):
                raise DecodeError("schema", f"record {index}: must-understand label {label!r}")
            record[label] = value
        if "bver" in record:
            bver = record["bver"]
            if isinstance(bver, bool) or not isinstance(bver, int) or bver < 1:
                raise DecodeError("schema", f"record {index}: bver must be a positive integer")
            if version is not None and bver != version:
                raise DecodeError("schema", f"record {index}: bver {bver} differs from {version}")
            version = bver
        elif version is None:
            version = VERSION               # the first record fixes the pack's version (default 10)
        if version > VERSION:
            raise DecodeError("unsupported", f"SenML version {version} is newer than {VERSION}")
        if "bn" in record:
            base["bn"] = _string(record["bn"], "bn")
        if "bu" in record:
            base["bu"] = _string(record["bu"], "bu")
        for label in ("bt", "bv", "bs"):
            if label in record:
                base[label] = _number(record[label], label)
        if not any(label in record for label in ("n", "u", "t", "ut", "s") + VALUE_LABELS):
            if any(label in record for label in BASE_LABELS):
                continue                    # a record of base fields only
            raise DecodeError("schema", f"record {index} has no SenML field")
        records.append(_resolve_record(index, record, base, now, from_cbor))
    return {"records": records, "fields": _mapped_fields(records, settings.get("name_map") or {})}


def _resolve_record(index: int, record: dict[str, Any], base: Mapping[str, Any], now: float,
                    from_cbor: bool) -> dict[str, Any]:
    name = base["bn"] + (_string(record["n"], "n") if "n" in record else "")
    if not name:
        raise DecodeError("schema", f"record {index} has neither a name nor a base name")
    present = [label for label in VALUE_LABELS if label in record]
    if len(present) > 1:
        raise DecodeError("schema", f"record {index} has several value fields: {', '.join(present)}")
    out: dict[str, Any] = dict.fromkeys(RECORD_KEYS)
    out["name"] = name
    out["unit"] = _string(record["u"], "u") if "u" in record else base["bu"]
    if "s" in record or base["bs"] is not None:
        out["sum"] = (base["bs"] or 0.0) + (_number(record["s"], "s") if "s" in record else 0.0)
    if present == ["v"] or (not present and base["bv"] is not None):
        out["value"] = (base["bv"] or 0.0) + (_number(record["v"], "v") if "v" in record else 0.0)
    elif present == ["vs"]:
        out["string_value"] = _string(record["vs"], "vs")
    elif present == ["vb"]:
        if not isinstance(record["vb"], bool):
            raise DecodeError("schema", f"record {index}: vb must be a boolean")
        out["bool_value"] = record["vb"]
    elif present == ["vd"]:
        out["data_value"] = _data_value(record["vd"], from_cbor)
    elif out["sum"] is None:
        raise DecodeError("schema", f"record {index} has no value and no sum")
    seconds = base["bt"] + (_number(record["t"], "t") if "t" in record else 0.0)
    out["time"] = _utc(seconds if seconds >= RELATIVE_LIMIT else now + seconds)
    if "ut" in record:
        out["update_time"] = _number(record["ut"], "ut")
    if out["value"] is not None and not math.isfinite(out["value"]):
        raise DecodeError("value", f"record {index}: value overflows")
    return out


def _match(name: str, name_map: Mapping[str, str]) -> str | None:
    if name in name_map:
        return name_map[name]
    bare = name.lstrip("/")
    for key, field in name_map.items():
        key_bare = key.lstrip("/")
        if bare == key_bare or bare.endswith("/" + key_bare):
            return field
    return None


def values_named(records: list[dict[str, Any]], name_map: Mapping[str, str]) -> dict[str, Any]:
    """Values of the resolved records named in `name_map` (SenML name -> key), matched and chosen as the
    device model's name_map is (exact, without a leading ``/``, path tail; the latest time wins)."""
    return _mapped_fields(records, name_map)


def _mapped_fields(records: list[dict[str, Any]], name_map: Mapping[str, str]) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    latest: dict[str, datetime] = {}
    for record in records:
        field = _match(record["name"], name_map) if name_map else None
        if field is None or (field in latest and record["time"] < latest[field]):
            continue
        latest[field] = record["time"]
        fields[field] = next((record[k] for k in ("value", "string_value", "bool_value", "data_value")
                              if record[k] is not None), record["sum"])
    return fields


# --------------------------------------------------------------------------- wire formats

def decode_json(payload: bytes, settings: Mapping[str, Any]) -> dict[str, Any]:
    """Resolved records of an ``application/senml+json`` pack."""
    if not payload:
        raise DecodeError("empty", "no bytes")
    try:
        pack = json.loads(payload.decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise DecodeError("syntax", f"not JSON: {exc}") from None
    return resolve(pack, settings, from_cbor=False)


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def decode_cbor(payload: bytes, settings: Mapping[str, Any]) -> dict[str, Any]:
    """Resolved records of an ``application/senml+cbor`` pack."""
    if not payload:
        raise DecodeError("empty", "no bytes")
    stream = io.BytesIO(payload)
    try:
        pack = cbor2.CBORDecoder(stream).decode()
    except Exception as exc:               # cbor2 raises many types for hostile input; all mean "not CBOR"
        raise DecodeError("syntax", f"not CBOR: {type(exc).__name__}") from None
    if stream.tell() != len(payload):
        raise DecodeError("syntax", f"{len(payload) - stream.tell()} bytes after the CBOR item")
    return resolve(pack, settings, from_cbor=True)


def _pack(fields: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Resolved records -> a pack: absolute times as given, one value field each (no base fields)."""
    pack = []
    for record in fields["records"]:
        item: dict[str, Any] = {"n": record["name"]}
        if record.get("unit") is not None:
            item["u"] = record["unit"]
        for key, label in (("value", "v"), ("string_value", "vs"), ("bool_value", "vb"), ("data_value", "vd"),
                           ("sum", "s"), ("update_time", "ut")):
            if record.get(key) is not None:
                item[label] = record[key]
        if record.get("time") is not None:
            item["t"] = record["time"].timestamp()
        pack.append(item)
    return pack


def encode_json(fields: Mapping[str, Any], settings: Mapping[str, Any]) -> bytes:
    """A SenML JSON pack of ``fields["records"]`` (resolved records, as ``decode`` returns them)."""
    pack = _pack(fields)
    for item in pack:
        if "vd" in item:
            item["vd"] = base64.urlsafe_b64encode(item["vd"]).decode().rstrip("=")
    return json.dumps(pack, separators=(",", ":")).encode()


def encode_cbor(fields: Mapping[str, Any], settings: Mapping[str, Any]) -> bytes:
    """A SenML CBOR pack (integer labels) of ``fields["records"]``."""
    return cbor2.dumps([{JSON_TO_CBOR[k]: v for k, v in item.items()} for item in _pack(fields)])


CODECS = [
    Codec(name="senml-json", family="generic", fields=FIELDS, decode=decode_json, encode=encode_json,
          default_settings=DEFAULT_SETTINGS),
    Codec(name="senml-cbor", family="generic", fields=FIELDS, decode=decode_cbor, encode=encode_cbor,
          default_settings=DEFAULT_SETTINGS),
]

__all__ = ["CODECS", "decode_cbor", "decode_json", "encode_cbor", "encode_json", "resolve", "values_named"]
