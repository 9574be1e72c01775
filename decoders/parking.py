"""Geomagnetic parking-sensor reports in the Libelium Smart Parking frame layout (11 bytes).

No national standard covers parking sensors; we follow a real, public layout instead of inventing
one: Libelium's Smart Parking node (firmware v2/v3), as implemented with test frames by an
ELEMENT IoT parser (public source id 254690124, which cites Libelium's Smart Parking technical
guide).  Byte 0: bit 7 slot occupied, bit 6 battery needs changing, bits 5–4 reserved, bits 3–0
frame type; byte 1: frame counter (wraps at 256; gaps mean lost frames); bytes 2–10 by type:

* 0 info (sent when occupancy changes): temperature (int8 °C), magnetic X, Y, Z (uint16 BE),
  reserved, battery (uint8, mV = 2800 + 4·raw)
* 1 keep-alive, 6 service, 7 downlink, 8 RSSI: node hour, minute, temperature, X, Y, Z
* 2 daily update: 6 reserved, resets in the last 24 h, configuration id, reserved
* 3 error: error flags (bit 5 Sigfox, 4 LoRaWAN, 3 RTC, 2 X axis, 1 Y axis, 0 Z axis),
  temperature, X, Y, Z, battery (as in info)
* 4 start 1: temperature, X, Y, Z, battery (uint16 BE, mV)
* 5 start 2: firmware version, NM start, NM period, NM sleep time, NM keep-alive, radio mode,
  sleep time, keep-alive, detection threshold (raw configuration bytes)

Fields returned (every key always present; None where this frame type does not carry it):
``occupied`` (bool), ``battery_low`` (bool), ``frame_type`` (0–8), ``frame_kind`` (name),
``frame_counter``, ``occupancy_changed`` (bool, True for info frames), ``temperature_c`` (°C),
``mag_x`` / ``mag_y`` / ``mag_z`` (raw magnetometer counts, no scale is published),
``battery_mv`` (mV), ``node_hour`` / ``node_minute``, ``resets``, ``config_id``,
``error_flags``, and the start-2 configuration bytes ``firmware_version``, ``nm_start``,
``nm_period``, ``nm_sleep_time``, ``nm_keep_alive``, ``radio_mode``, ``sleep_time``,
``keep_alive``, ``threshold``.  Device id, time and radio (RSRP/SINR) come from the carrier
envelope that brings the report over NB-IoT, not from these 11 bytes.

Vendor setting ``crc`` (``none`` default, as Libelium sends; ``modbus`` | ``ccitt-false``): our
NB-IoT firmware and simulators append a CRC-16 of the 11 bytes, high byte first, because a bare
UDP/CoAP uplink has no LoRaWAN-style MIC.  See docs/protocols/parking.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numba as nb
import numpy as np

from .errors import CHECKSUM, EMPTY, LENGTH, TRUNCATED, UNSUPPORTED, DecodeError
from .gbt43229_crc import check_crc_setting, crc16, crc16_kernel
from .registry import Codec

NAME = "parking"
FRAME_SIZE = 11
FRAME_KINDS = ("info", "keep_alive", "daily_update", "error", "start1", "start2", "service", "downlink", "rssi")
CLOCK_KINDS = (1, 6, 7, 8)       # frame types with the node-clock layout
DEFAULT_SETTINGS = {"crc": "none"}
MISSING = np.iinfo(np.int64).min

# Column order of the kernel's value matrix; also the record's keys after the header ones.
VALUE_KEYS = ("temperature_c", "mag_x", "mag_y", "mag_z", "battery_mv", "node_hour", "node_minute",
              "resets", "config_id", "error_flags", "firmware_version", "nm_start", "nm_period",
              "nm_sleep_time", "nm_keep_alive", "radio_mode", "sleep_time", "keep_alive", "threshold")
HEADER_KEYS = ("occupied", "battery_low", "frame_type", "frame_counter")
START2_KEYS = VALUE_KEYS[10:]

FIELDS = {
    "occupied": "bool, the slot holds a vehicle",
    "battery_low": "bool, the battery needs changing",
    "frame_type": "0 info, 1 keep-alive, 2 daily update, 3 error, 4 start 1, 5 start 2, 6 service, 7 downlink, 8 RSSI",
    "frame_kind": "frame type name",
    "frame_counter": "0–255, wraps; gaps mean lost frames",
    "occupancy_changed": "bool, info frames are sent when occupancy changes",
    "temperature_c": "°C",
    "mag_x": "raw magnetometer count, X", "mag_y": "raw magnetometer count, Y", "mag_z": "raw magnetometer count, Z",
    "battery_mv": "battery voltage, mV",
    "node_hour": "node clock hour", "node_minute": "node clock minute",
    "resets": "resets in the last 24 h", "config_id": "configuration version loaded",
    "error_flags": "bit 5 Sigfox, 4 LoRaWAN, 3 RTC, 2 X axis, 1 Y axis, 0 Z axis",
    **{key: "start-2 configuration byte" for key in START2_KEYS},
}


# --------------------------------------------------------------------------- reference decoder

def _values(frame: bytes) -> dict[str, int | None]:
    values: dict[str, int | None] = dict.fromkeys(VALUE_KEYS)
    kind = frame[0] & 0x0F
    body = frame[2:]

    def magnetics(p: int) -> None:
        values["temperature_c"] = int.from_bytes(body[p:p + 1], "big", signed=True)
        values["mag_x"] = int.from_bytes(body[p + 1:p + 3], "big")
        values["mag_y"] = int.from_bytes(body[p + 3:p + 5], "big")
        values["mag_z"] = int.from_bytes(body[p + 5:p + 7], "big")

    if kind == 0:
        magnetics(0)
        values["battery_mv"] = 2800 + 4 * body[8]
    elif kind in CLOCK_KINDS:
        values["node_hour"], values["node_minute"] = body[0], body[1]
        magnetics(2)
    elif kind == 2:
        values["resets"], values["config_id"] = body[6], body[7]
    elif kind == 3:
        values["error_flags"] = body[0] & 0x3F
        magnetics(1)
        values["battery_mv"] = 2800 + 4 * body[8]
    elif kind == 4:
        magnetics(0)
        values["battery_mv"] = int.from_bytes(body[7:9], "big")
    else:
        values.update(zip(START2_KEYS, body))
    return values


def decode_reference(payload: bytes, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of one parking-sensor report; DecodeError with the reason otherwise."""
    crc_kind = settings["crc"]
    check_crc_setting(crc_kind)
    size = FRAME_SIZE + (0 if crc_kind == "none" else 2)
    if not payload:
        raise DecodeError("empty", "no bytes")
    if len(payload) < size:
        raise DecodeError("truncated", f"{len(payload)} bytes, a report is {size}")
    if len(payload) > size:
        raise DecodeError("length", f"{len(payload) - size} stray bytes after the report")
    if crc_kind != "none":
        computed, sent = crc16(payload[:FRAME_SIZE], crc_kind), int.from_bytes(payload[FRAME_SIZE:], "big")
        if computed != sent:
            raise DecodeError("checksum", f"CRC is {computed:04X}, report says {sent:04X}")
    kind = payload[0] & 0x0F
    if kind >= len(FRAME_KINDS):
        raise DecodeError("unsupported", f"frame type {kind}")
    return {
        "occupied": bool(payload[0] & 0x80),
        "battery_low": bool(payload[0] & 0x40),
        "frame_type": kind,
        "frame_kind": FRAME_KINDS[kind],
        "frame_counter": payload[1],
        "occupancy_changed": kind == 0,
        **_values(payload[:FRAME_SIZE]),
    }


# --------------------------------------------------------------------------- numba batch kernel

@nb.njit(cache=True)
def _u16(buf, p):
    return (np.int64(buf[p]) << 8) | buf[p + 1]


@nb.njit(cache=True)
def _magnetics(buf, p, row):
    t = np.int64(buf[p])
    row[0] = t - 256 if t >= 128 else t
    row[1] = _u16(buf, p + 1)
    row[2] = _u16(buf, p + 3)
    row[3] = _u16(buf, p + 5)


@nb.njit(cache=True)
def _kernel(buf, offsets, crc_kind, status, header, values):
    size = FRAME_SIZE if crc_kind == 0 else FRAME_SIZE + 2
    for i in range(len(offsets) - 1):
        a = offsets[i]
        n = offsets[i + 1] - a
        if n == 0:
            status[i] = EMPTY
            continue
        if n < size:
            status[i] = TRUNCATED
            continue
        if n > size:
            status[i] = LENGTH
            continue
        if crc_kind != 0 and crc16_kernel(buf, a, FRAME_SIZE, crc_kind) != _u16(buf, a + FRAME_SIZE):
            status[i] = CHECKSUM
            continue
        kind = buf[a] & 0x0F
        if kind > 8:
            status[i] = UNSUPPORTED
            continue
        header[i, 0] = buf[a] >> 7
        header[i, 1] = (buf[a] >> 6) & 1
        header[i, 2] = kind
        header[i, 3] = buf[a + 1]
        row = values[i]
        b = a + 2
        if kind == 0:
            _magnetics(buf, b, row)
            row[4] = 2800 + 4 * np.int64(buf[b + 8])
        elif kind == 1 or kind >= 6:
            row[5] = buf[b]
            row[6] = buf[b + 1]
            _magnetics(buf, b + 2, row)
        elif kind == 2:
            row[7] = buf[b + 6]
            row[8] = buf[b + 7]
        elif kind == 3:
            row[9] = buf[b] & 0x3F
            _magnetics(buf, b + 1, row)
            row[4] = 2800 + 4 * np.int64(buf[b + 8])
        elif kind == 4:
            _magnetics(buf, b, row)
            row[4] = _u16(buf, b + 7)
        else:
            for k in range(9):
                row[10 + k] = buf[b + k]


def decode_batch_kernel(buf: np.ndarray, offsets: np.ndarray,
                        settings: Mapping[str, Any]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Columns for every report of a packed batch (see decoders.pack) and a status per report.

    Values a frame type does not carry hold ``MISSING`` (int64 min)."""
    crc_kind = check_crc_setting(settings["crc"])
    n = len(offsets) - 1
    status = np.zeros(n, dtype=np.int8)
    header = np.zeros((n, len(HEADER_KEYS)), dtype=np.int64)
    values = np.full((n, len(VALUE_KEYS)), MISSING, dtype=np.int64)
    _kernel(buf, offsets, crc_kind, status, header, values)
    cols = {key: header[:, k].copy() for k, key in enumerate(HEADER_KEYS)}
    cols.update({key: values[:, k].copy() for k, key in enumerate(VALUE_KEYS)})
    return status, cols


def _to_record(cols: Mapping[str, np.ndarray], i: int) -> dict[str, Any]:
    kind = int(cols["frame_type"][i])
    record: dict[str, Any] = {
        "occupied": bool(cols["occupied"][i]),
        "battery_low": bool(cols["battery_low"][i]),
        "frame_type": kind,
        "frame_kind": FRAME_KINDS[kind],
        "frame_counter": int(cols["frame_counter"][i]),
        "occupancy_changed": kind == 0,
    }
    for key in VALUE_KEYS:
        value = int(cols[key][i])
        record[key] = None if value == MISSING else value
    return record


# --------------------------------------------------------------------------- encoder

def _battery_byte(mv: int | None) -> int:
    return 0 if mv is None else min(255, max(0, round((mv - 2800) / 4)))


def encode_report(fields: Mapping[str, Any], settings: Mapping[str, Any]) -> bytes:
    """An 11-byte report (+ CRC when the `crc` setting asks for one) as the sensor sends it.

    fields: frame_type (or frame_kind), occupied, battery_low, frame_counter and the values of
    that frame type as decoded (missing ones are sent as 0)."""
    kind = fields.get("frame_type")
    if kind is None:
        kind = FRAME_KINDS.index(fields["frame_kind"])

    def v(key: str) -> int:
        value = fields.get(key)
        return 0 if value is None else int(value)

    def magnetics() -> bytes:
        return (v("temperature_c").to_bytes(1, "big", signed=True)
                + b"".join(v(k).to_bytes(2, "big") for k in ("mag_x", "mag_y", "mag_z")))

    if kind == 0:
        body = magnetics() + bytes([0, _battery_byte(fields.get("battery_mv"))])
    elif kind in CLOCK_KINDS:
        body = bytes([v("node_hour"), v("node_minute")]) + magnetics()
    elif kind == 2:
        body = bytes(6) + bytes([v("resets"), v("config_id"), 0])
    elif kind == 3:
        body = bytes([v("error_flags") & 0x3F]) + magnetics() + bytes([_battery_byte(fields.get("battery_mv"))])
    elif kind == 4:
        body = magnetics() + v("battery_mv").to_bytes(2, "big")
    else:
        body = bytes(v(k) for k in START2_KEYS)
    first = (0x80 if fields.get("occupied") else 0) | (0x40 if fields.get("battery_low") else 0) | kind
    frame = bytes([first, v("frame_counter") & 0xFF]) + body
    crc_kind = settings.get("crc", "none")
    check_crc_setting(crc_kind)
    if crc_kind != "none":
        frame += crc16(frame, crc_kind).to_bytes(2, "big")
    return frame


CODEC = Codec(
    name=NAME,
    family="traffic",
    fields=FIELDS,
    decode=decode_reference,
    batch=decode_batch_kernel,
    to_record=_to_record,
    encode=encode_report,
    default_settings=DEFAULT_SETTINGS,
)

__all__ = ["CODEC", "decode_batch_kernel", "decode_reference", "encode_report", "sample_payloads"]


def random_report_fields(rng: Any) -> dict[str, Any]:
    """Fields of a plausible report of a random frame type (simulators, tests)."""
    kind = rng.choice((0, 0, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8))
    fields: dict[str, Any] = {"frame_type": kind, "occupied": rng.random() < 0.5,
                              "battery_low": rng.random() < 0.05, "frame_counter": rng.randrange(256),
                              "temperature_c": rng.randrange(-30, 70), "node_hour": rng.randrange(24),
                              "node_minute": rng.randrange(60), "resets": rng.randrange(5),
                              "config_id": rng.randrange(256), "error_flags": rng.randrange(64)}
    for axis in ("mag_x", "mag_y", "mag_z"):
        fields[axis] = rng.randrange(1 << 16)
    fields["battery_mv"] = rng.randrange(3000, 3700) if kind == 4 else 2800 + 4 * rng.randrange(256)
    for key in START2_KEYS:
        fields[key] = rng.randrange(256)
    return fields


def sample_payloads(n: int, seed: int = 0) -> list[bytes]:
    """`n` valid, varied reports in the default settings (no CRC); deterministic for a seed."""
    import random
    rng = random.Random(seed)
    return [encode_report(random_report_fields(rng), DEFAULT_SETTINGS) for _ in range(n)]
