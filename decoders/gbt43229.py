"""GB/T 43229-2023 vehicle-detector frames: the real-time traffic-flow object 0x0301, per lane.

Frame: ``C0 | escaped(data table + CRC16) | C0`` with SLIP escaping (``DB DC`` = C0,
``DB DD`` = DB).  Data table: link address (2), sender id (7 = division code 3 + device type 2 +
device number 2), receiver id (7), protocol version (1, 0x10), operation (1: 0x82 active upload,
0x83 query reply), object id (2), content length (2, a vendor setting), content.  Content of
0x0301: lane count (1), then per lane: channel, class A/B/C counts (≥12 m, 6–12 m, <6 m),
time occupancy (2, 0.1 %), speed (1, km/h), vehicle length (2, 0.1 m), headway (0.1 s),
gap (0.1 s), stops (0.1), stop duration (0.1 s), presence sample count N, N presence samples.
Layout, sources and the choices where the public record is silent: docs/protocols/gbt43229.md.

Fields returned (units): ``division_code`` (sender's GB/T 2260 code, e.g. 360100 Nanchang),
``device_type`` (bit mask: 2 loop, 4 magnetometer, 16 video, 64 radar …), ``device_number``,
``receiver_division_code`` / ``receiver_device_type`` / ``receiver_device_number``,
``link_address``, ``protocol_version``, ``operation``, ``object_id`` (0x0301) and ``lanes``, a list
of dicts: ``channel``, ``count_a`` / ``count_b`` / ``count_c`` (vehicles), ``occupancy_pct``
(time occupancy in percent, 0–100), ``speed_kmh`` (km/h), ``length_m`` (m), ``headway_s`` and
``gap_s`` (s), ``stops`` (mean stops, 0.1 resolution), ``stop_duration_s`` (s),
``presence_samples`` (N) and ``presence_occupied`` (how many of the N samples saw a vehicle).
FF-filled values (FF, FFFF) are None.

Vendor settings: ``byte_order`` (``little`` default | ``big``) for every multi-byte field and the
CRC; ``crc`` (``modbus`` default | ``ccitt-false`` | ``none``); ``content_length_field``
(True default; False for senders that, like the public C implementation, omit it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .errors import DecodeError
from .gbt43229_crc import crc16
from .gbt43229_kernel import (
    CONTENT_LENGTH_SIZE, ESCAPE, ESCAPED_DELIMITER, ESCAPED_ESCAPE, FRAME_DELIMITER, HEADER,
    LANE_FIXED, MAX_OCCUPANCY_PERMILLE, OBJECT_REALTIME_FLOW, OP_ACTIVE_UPLOAD, OP_QUERY_REPLY,
    check_settings, decode_batch_kernel,
)
from .registry import Codec, nan_to_none

NAME = "gbt43229"
PROTOCOL_VERSION = 0x10
DEFAULT_SETTINGS = {"byte_order": "little", "crc": "modbus", "content_length_field": True}

FIELDS = {
    "division_code": "sender's administrative division code (GB/T 2260), e.g. 360100 Nanchang",
    "device_type": "sender device type bit mask (2 loop, 4 magnetometer, 8 ultrasonic, 16 video, 32 microwave, 64 radar)",
    "device_number": "sender device number",
    "receiver_division_code": "receiver's division code",
    "receiver_device_type": "receiver device type (1 = signal controller)",
    "receiver_device_number": "receiver device number",
    "link_address": "link address (reserved, 0)",
    "protocol_version": "protocol version byte (0x10)",
    "operation": "0x82 active upload, 0x83 query reply",
    "object_id": "0x0301 real-time traffic flow",
    "lanes": "list per lane: channel; count_a/b/c vehicles (A ≥12 m, B 6–12 m, C <6 m); occupancy_pct %; "
             "speed_kmh km/h; length_m m; headway_s s; gap_s s; stops (mean, 0.1); stop_duration_s s; "
             "presence_samples; presence_occupied",
}

LANE_KEYS = ("channel", "count_a", "count_b", "count_c", "occupancy_pct", "speed_kmh", "length_m",
             "headway_s", "gap_s", "stops", "stop_duration_s", "presence_samples", "presence_occupied")


# --------------------------------------------------------------------------- reference decoder

def _uint(data: bytes, order: str) -> int:
    return int.from_bytes(data, order)


def _unframe(payload: bytes) -> bytes:
    """The unescaped data table + CRC; DecodeError for framing, escaping and stray bytes."""
    if not payload:
        raise DecodeError("empty", "no bytes")
    if payload[0] != FRAME_DELIMITER:
        raise DecodeError("framing", f"expected C0, got {payload[0]:02X}")
    a = 0
    while a + 1 < len(payload) and payload[a + 1] == FRAME_DELIMITER:
        a += 1
    end = payload.find(FRAME_DELIMITER, a + 1)
    if end < 0:
        raise DecodeError("truncated", "no closing C0")
    if end != len(payload) - 1:
        raise DecodeError("length", f"{len(payload) - 1 - end} stray bytes after the closing C0")
    table = bytearray()
    k = a + 1
    while k < end:
        byte = payload[k]
        if byte == ESCAPE:
            nxt = payload[k + 1] if k + 1 < end else None
            if nxt == ESCAPED_DELIMITER:
                byte = FRAME_DELIMITER
            elif nxt == ESCAPED_ESCAPE:
                byte = ESCAPE
            else:
                raise DecodeError("framing", "DB not followed by DC or DD")
            k += 2
        else:
            k += 1
        table.append(byte)
    return bytes(table)


def _tenths(raw: int, missing: int) -> float | None:
    return None if raw == missing else raw / 10.0


def _byte(raw: int) -> int | None:
    return None if raw == 0xFF else raw


def _lane(content: bytes, p: int, order: str) -> dict[str, Any]:
    samples = content[p + 13]
    presence = content[p + LANE_FIXED:p + LANE_FIXED + samples]
    return {
        "channel": content[p],
        "count_a": _byte(content[p + 1]),
        "count_b": _byte(content[p + 2]),
        "count_c": _byte(content[p + 3]),
        "occupancy_pct": _tenths(_uint(content[p + 4:p + 6], order), 0xFFFF),
        "speed_kmh": _byte(content[p + 6]),
        "length_m": _tenths(_uint(content[p + 7:p + 9], order), 0xFFFF),
        "headway_s": _tenths(content[p + 9], 0xFF),
        "gap_s": _tenths(content[p + 10], 0xFF),
        "stops": _tenths(content[p + 11], 0xFF),
        "stop_duration_s": _tenths(content[p + 12], 0xFF),
        "presence_samples": samples,
        "presence_occupied": sum(1 for b in presence if b),
    }


def decode_reference(payload: bytes, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The header and lanes of one real-time flow frame; DecodeError with the reason otherwise."""
    check_settings(settings)
    order, crc_kind = settings["byte_order"], settings["crc"]
    table = _unframe(payload)
    start = HEADER + (CONTENT_LENGTH_SIZE if settings["content_length_field"] else 0)
    if len(table) < start + 2:
        raise DecodeError("truncated", f"{len(table)} bytes after unescaping, the header needs {start + 2}")
    if settings["content_length_field"]:
        declared = _uint(table[HEADER:HEADER + 2], order)
        total = start + declared + 2
        if len(table) < total:
            raise DecodeError("truncated", f"content length {declared} needs {total} bytes, got {len(table)}")
        if len(table) > total:
            raise DecodeError("length", f"{len(table) - total} bytes more than the content length says")
    if crc_kind != "none":
        computed, sent = crc16(table[:-2], crc_kind), _uint(table[-2:], order)
        if computed != sent:
            raise DecodeError("checksum", f"CRC is {computed:04X}, frame says {sent:04X}")
    object_id = _uint(table[18:20], order)
    if object_id != OBJECT_REALTIME_FLOW:
        raise DecodeError("unsupported", f"object {object_id:04X}")
    operation = table[17]
    if operation not in (OP_ACTIVE_UPLOAD, OP_QUERY_REPLY):
        raise DecodeError("unsupported", f"operation {operation:02X}")
    content = table[start:-2]
    if not content:
        raise DecodeError("length", "no lane count")
    p = 1
    for _ in range(content[0]):
        if p + LANE_FIXED > len(content) or p + LANE_FIXED + content[p + 13] > len(content):
            raise DecodeError("length", "a lane record runs past the content")
        p += LANE_FIXED + content[p + 13]
    if p != len(content):
        raise DecodeError("length", f"{len(content) - p} bytes after the last lane")
    lanes = []
    p = 1
    for _ in range(content[0]):
        lane = _lane(content, p, order)
        if lane["occupancy_pct"] is not None and lane["occupancy_pct"] * 10 > MAX_OCCUPANCY_PERMILLE:
            raise DecodeError("value", f"time occupancy {lane['occupancy_pct']} % on channel {lane['channel']}")
        lanes.append(lane)
        p += LANE_FIXED + content[p + 13]
    return {
        "link_address": _uint(table[0:2], order),
        "division_code": _uint(table[2:5], order),
        "device_type": _uint(table[5:7], order),
        "device_number": _uint(table[7:9], order),
        "receiver_division_code": _uint(table[9:12], order),
        "receiver_device_type": _uint(table[12:14], order),
        "receiver_device_number": _uint(table[14:16], order),
        "protocol_version": table[16],
        "operation": operation,
        "object_id": object_id,
        "lanes": lanes,
    }


# --------------------------------------------------------------------------- batch row -> record

_LANE_INTS = {"channel": "lane_channel", "count_a": "lane_count_a", "count_b": "lane_count_b",
              "count_c": "lane_count_c", "speed_kmh": "lane_speed_kmh",
              "presence_samples": "lane_presence_samples", "presence_occupied": "lane_presence_occupied"}
_LANE_FLOATS = {"occupancy_pct": "lane_occupancy_pct", "length_m": "lane_length_m",
                "headway_s": "lane_headway_s", "gap_s": "lane_gap_s", "stops": "lane_stops",
                "stop_duration_s": "lane_stop_duration_s"}
_FRAME_KEYS = ("link_address", "division_code", "device_type", "device_number", "receiver_division_code",
               "receiver_device_type", "receiver_device_number", "protocol_version", "operation", "object_id")


def _to_record(cols: Mapping[str, np.ndarray], i: int) -> dict[str, Any]:
    record: dict[str, Any] = {key: int(cols[key][i]) for key in _FRAME_KEYS}
    start, count = int(cols["lane_start"][i]), int(cols["lane_count"][i])
    lanes = []
    for row in range(start, start + count):
        lane: dict[str, Any] = {}
        for key in LANE_KEYS:
            if key in _LANE_INTS:
                value = int(cols[_LANE_INTS[key]][row])
                lane[key] = None if value < 0 else value
            else:
                lane[key] = nan_to_none(cols[_LANE_FLOATS[key]][row])
        lanes.append(lane)
    record["lanes"] = lanes
    return record


# --------------------------------------------------------------------------- encoder

def _escape(table: bytes) -> bytes:
    return (table.replace(b"\xdb", b"\xdb\xdd").replace(b"\xc0", b"\xdb\xdc"))


def _tenths_raw(value: float | None, missing: int) -> int:
    return missing if value is None else round(value * 10)


def encode_lane(lane: Mapping[str, Any], order: str) -> bytes:
    """One lane record; None → FF-filled.  ``presence`` (list of sample bytes) wins over
    presence_samples/presence_occupied, which otherwise give that many 1s then 0s."""
    presence = lane.get("presence")
    if presence is None:
        samples = int(lane.get("presence_samples", 0))
        occupied = int(lane.get("presence_occupied", 0))
        presence = [1] * occupied + [0] * (samples - occupied)

    def byte(key: str) -> int:
        value = lane.get(key)
        return 0xFF if value is None else int(value)

    return (bytes([int(lane["channel"]), byte("count_a"), byte("count_b"), byte("count_c")])
            + _tenths_raw(lane.get("occupancy_pct"), 0xFFFF).to_bytes(2, order)
            + bytes([byte("speed_kmh")])
            + _tenths_raw(lane.get("length_m"), 0xFFFF).to_bytes(2, order)
            + bytes([_tenths_raw(lane.get(k), 0xFF) for k in ("headway_s", "gap_s", "stops", "stop_duration_s")])
            + bytes([len(presence)]) + bytes(presence))


def encode_frame(fields: Mapping[str, Any], settings: Mapping[str, Any]) -> bytes:
    """A real-time flow frame as a detector sends it.

    fields: division_code, device_type, device_number, lanes (dicts as decoded); optional
    receiver_division_code (= division_code), receiver_device_type (1), receiver_device_number (1),
    link_address (0), protocol_version (0x10), operation (0x82), object_id (0x0301)."""
    check_settings(settings)
    order = settings["byte_order"]
    content = bytes([len(fields["lanes"])]) + b"".join(encode_lane(lane, order) for lane in fields["lanes"])
    division = int(fields["division_code"])
    table = (int(fields.get("link_address", 0)).to_bytes(2, order)
             + division.to_bytes(3, order)
             + int(fields["device_type"]).to_bytes(2, order)
             + int(fields["device_number"]).to_bytes(2, order)
             + int(fields.get("receiver_division_code", division)).to_bytes(3, order)
             + int(fields.get("receiver_device_type", 1)).to_bytes(2, order)
             + int(fields.get("receiver_device_number", 1)).to_bytes(2, order)
             + bytes([int(fields.get("protocol_version", PROTOCOL_VERSION)),
                      int(fields.get("operation", OP_ACTIVE_UPLOAD))])
             + int(fields.get("object_id", OBJECT_REALTIME_FLOW)).to_bytes(2, order))
    if settings["content_length_field"]:
        table += len(content).to_bytes(2, order)
    table += content
    table += crc16(table, settings["crc"]).to_bytes(2, order)
    return b"\xc0" + _escape(table) + b"\xc0"


CODEC = Codec(
    name=NAME,
    family="traffic",
    fields=FIELDS,
    decode=decode_reference,
    batch=decode_batch_kernel,
    to_record=_to_record,
    encode=encode_frame,
    default_settings=DEFAULT_SETTINGS,
)

__all__ = ["CODEC", "decode_batch_kernel", "decode_reference", "encode_frame", "sample_payloads"]

# Jiangxi's eleven prefecture-level cities (GB/T 2260): the pilots' detectors sit in these.
JIANGXI_DIVISIONS = (360100, 360200, 360300, 360400, 360500, 360600, 360700, 360800, 360900, 361000, 361100)


def random_lane(rng: Any, channel: int) -> dict[str, Any]:
    """A plausible lane record, sometimes with FF-filled (missing) values."""
    def maybe(value: Any) -> Any:
        return None if rng.random() < 0.05 else value

    samples = rng.randrange(0, 9)
    return {
        "channel": channel,
        "count_a": maybe(rng.randrange(0, 10)), "count_b": maybe(rng.randrange(0, 20)),
        "count_c": maybe(rng.randrange(0, 60)),
        "occupancy_pct": maybe(rng.randrange(0, 1001) / 10), "speed_kmh": maybe(rng.randrange(0, 130)),
        "length_m": maybe(rng.randrange(20, 180) / 10), "headway_s": maybe(rng.randrange(0, 255) / 10),
        "gap_s": maybe(rng.randrange(0, 255) / 10), "stops": maybe(rng.randrange(0, 50) / 10),
        "stop_duration_s": maybe(rng.randrange(0, 255) / 10),
        "presence_samples": samples, "presence_occupied": rng.randrange(0, samples + 1),
    }


def sample_payloads(n: int, seed: int = 0) -> list[bytes]:
    """`n` valid, varied real-time flow frames in the default settings; deterministic for a seed."""
    import random
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        fields = {
            "division_code": rng.choice(JIANGXI_DIVISIONS) + rng.randrange(0, 30),
            "device_type": rng.choice((2, 4, 16, 32, 64)),
            "device_number": rng.randrange(1 << 16),
            "operation": rng.choice((OP_ACTIVE_UPLOAD, OP_ACTIVE_UPLOAD, OP_QUERY_REPLY)),
            "lanes": [random_lane(rng, c + 1) for c in range(rng.randrange(0, 9))],
        }
        out.append(encode_frame(fields, DEFAULT_SETTINGS))
    return out
