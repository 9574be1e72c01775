"""Where decoded readings go: one wide table per device family.

A codec with its own record shape (CJ/T 188, GB/T 26875.3, GB/T 43229, parking) has a function that
turns one decoded record into rows; CJ/T 188, the bulk of the traffic, also has a columnar path that
reads the batch columns directly.  Field-mapped codecs (SenML, JSON, carrier object models) put each
mapped field in the family table's column of the same name, and whatever has no column in `extra`."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
from psycopg.types.json import Jsonb

from decoders import Batch
from decoders.cjt188 import MISSING_TIME, VALVE_STATES
from decoders.cjt188_layout import WATER_CURRENT
from iotjx.model import Uplink

from .pgbinary import PG_EPOCH_S, Column

COMMON = ("time", "device_id", "transport")


@dataclass(frozen=True, slots=True)
class FamilyTable:
    """A family's readings table: its columns after the common (time, device_id, transport)."""

    table: str
    columns: tuple[str, ...]
    types: tuple[tuple[str, type], ...] = ()     # non-float columns, for field-mapped values

    @property
    def all_columns(self) -> tuple[str, ...]:
        return COMMON + self.columns

    def row(self, u: Uplink, values: dict[str, Any]) -> tuple:
        return (_utc(u.received_at), u.device_id, u.transport) + tuple(values.get(c) for c in self.columns)


WATER = FamilyTable("water_readings", ("meter_address", "meter_type", "flow_m3", "settlement_flow_m3", "meter_time",
                                       "status", "valve", "battery_low", "extra"),
                    (("meter_address", str), ("meter_type", int), ("status", int), ("valve", str),
                     ("battery_low", bool)))
FIRE = FamilyTable("fire_events", ("sent_at", "serial", "command", "app_type", "object_index", "system_type",
                                   "system_address", "component_type", "component_address", "state", "flags",
                                   "fire_alarm", "fault", "description", "analog_type", "analog_value",
                                   "analog_unit", "operation", "operator", "software_version", "event_time", "extra"),
                   (("fire_alarm", bool), ("fault", bool), ("description", str), ("state", int)))
TRAFFIC = FamilyTable("traffic_flow", ("division_code", "device_type", "device_number", "operation", "channel",
                                       "count_a", "count_b", "count_c", "occupancy_pct", "speed_kmh", "length_m",
                                       "headway_s", "gap_s", "stops", "stop_duration_s", "extra"),
                      (("channel", int), ("count_a", int), ("count_b", int), ("count_c", int)))
PARKING = FamilyTable("parking_events", ("occupied", "occupancy_changed", "frame_kind", "frame_counter",
                                         "battery_low", "battery_mv", "temperature_c", "mag_x", "mag_y", "mag_z",
                                         "error_flags", "extra"),
                      (("occupied", bool), ("occupancy_changed", bool), ("battery_low", bool), ("battery_mv", int),
                       ("frame_counter", int), ("frame_kind", str)))
RADIO = FamilyTable("radio_readings", ("source", "rsrp_dbm", "sinr_db", "rsrq_db", "ecl", "pci", "cell_id"))
MEASURED_AT = {"water_readings": "meter_time", "fire_events": "event_time"}
FAMILIES: dict[str, FamilyTable] = {"water": WATER, "fire": FIRE, "traffic": TRAFFIC, "parking": PARKING}


def _utc(epoch_s: float) -> datetime:
    return datetime.fromtimestamp(epoch_s, UTC)


def _json(value: dict[str, Any] | None) -> Jsonb | None:
    return Jsonb(json.loads(json.dumps(value, default=str))) if value else None


# --------------------------------------------------------------------------- codec-shaped records

def _water(record: dict[str, Any]) -> list[dict[str, Any]]:
    known = set(WATER.columns)
    extra = {k: v for k, v in record.items() if k not in known and k not in ("control", "di", "serial",
                                                                              "flow_unit", "settlement_unit")}
    row = {k: record.get(k) for k in WATER.columns}
    if row["meter_time"] is None and record.get("freeze_time") is not None:
        # A freeze record (CJ/T 188-2018 D3xx/D4xx) is the register at its freeze time: that is when it
        # was measured (the meter's interval data); record_kind and periods_ago stay in `extra`.
        row["meter_time"] = record["freeze_time"]
    return [{**row, "extra": _json(extra)}]


def _fire(record: dict[str, Any]) -> list[dict[str, Any]]:
    header = {"sent_at": record.get("sent_at"), "serial": record.get("serial"), "command": record.get("command"),
              "app_type": record.get("app_type")}
    objects = record.get("objects") or []
    if not objects:
        return [header]
    rows = []
    for k, o in enumerate(objects):
        flags = o.get("flags") or {}
        rows.append({**header, "object_index": k, "system_type": o.get("system_type"),
                     "system_address": o.get("system_address"), "component_type": o.get("component_type"),
                     "component_address": o.get("component_address"), "state": o.get("state"),
                     "flags": _json(flags), "fire_alarm": flags.get("fire_alarm"), "fault": flags.get("fault"),
                     "description": o.get("description"), "analog_type": o.get("analog_type"),
                     "analog_value": o.get("value"), "analog_unit": o.get("unit"), "operation": o.get("operation"),
                     "operator": o.get("operator"), "software_version": o.get("software_version"),
                     "event_time": o.get("time")})
    return rows


def _traffic(record: dict[str, Any]) -> list[dict[str, Any]]:
    header = {k: record.get(k) for k in ("division_code", "device_type", "device_number", "operation")}
    lanes = record.get("lanes") or []
    if not lanes:
        return [header]
    known = set(TRAFFIC.columns)
    return [{**header, **{k: v for k, v in lane.items() if k in known},
             "extra": _json({k: v for k, v in lane.items() if k not in known})} for lane in lanes]


def _parking(record: dict[str, Any]) -> list[dict[str, Any]]:
    known = set(PARKING.columns)
    return [{**{k: record.get(k) for k in PARKING.columns},
             "extra": _json({k: v for k, v in record.items() if k not in known and v is not None})}]


CODEC_ROWS: dict[str, tuple[FamilyTable, Callable[[dict[str, Any]], list[dict[str, Any]]]]] = {
    "cjt188": (WATER, _water),
    "gb26875": (FIRE, _fire),
    "gbt43229": (TRAFFIC, _traffic),
    "parking": (PARKING, _parking),
}


def field_rows(table: FamilyTable, record: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of a field-mapped record (SenML, JSON, carrier object models): mapped names that are
    columns go to their column, the rest to `extra`."""
    fields = dict(record.get("fields") or {})
    when = record.get("time")            # the device's own time for the reading, where it gave one
    if when is None:                     # SenML: the newest of the pack's record times
        when = max((r["time"] for r in record.get("records") or () if r.get("time") is not None), default=None)
    if when is not None:
        fields.setdefault(MEASURED_AT.get(table.table, "measured_at"), when)
    known = set(table.columns) - {"extra"}
    types = dict(table.types)
    values, extra = {}, {}
    for k, v in fields.items():
        if k not in known:
            extra[k] = v
            continue
        try:
            values[k] = _coerce(v, types.get(k, float))
        except (TypeError, ValueError):
            extra[k] = v            # a value the column cannot hold is kept, not lost
    values["extra"] = _json(extra)
    return [values]


def _coerce(value: Any, kind: type) -> Any:
    if value is None or isinstance(value, datetime):
        return value
    if kind is bool:
        if isinstance(value, str):
            if value.lower() in ("true", "1", "yes", "on", "occupied"):
                return True
            if value.lower() in ("false", "0", "no", "off", "free"):
                return False
            raise ValueError(value)
        return bool(value)
    if kind is int:
        f = float(value)
        if not f.is_integer():
            raise ValueError(value)
        return int(f)
    return kind(value)


def rows_for(codec: str, family: str, record: dict[str, Any]) -> tuple[FamilyTable, list[dict[str, Any]]]:
    """The table and rows one decoded record becomes."""
    if codec in CODEC_ROWS:
        return CODEC_ROWS[codec][0], CODEC_ROWS[codec][1](record)
    table = FAMILIES.get(family)
    if table is None:
        raise ValueError(f"no readings table for family {family!r}")
    return table, field_rows(table, record)


def radio_row(u: Uplink, source: str, radio: dict[str, Any]) -> tuple | None:
    """A radio_readings row when the envelope carried any radio figure."""
    values = {"source": source, "rsrp_dbm": radio.get("rsrp_dbm"), "sinr_db": radio.get("sinr_db"),
              "rsrq_db": radio.get("rsrq_db"), "ecl": radio.get("ecl"), "pci": radio.get("pci"),
              "cell_id": radio.get("cell_id")}
    if all(v is None for k, v in values.items() if k != "source"):
        return None
    return RADIO.row(u, values)


# --------------------------------------------------------------------------- CJ/T 188 columnar path

def water_fast_mask(batch: Batch) -> np.ndarray:
    """The frames of a CJ/T 188 batch that `water_rows_from_batch` handles: decoded 901F water replies."""
    return (batch.status == 0) & (batch.columns["layout"] == WATER_CURRENT)


def water_columns(batch: Batch, uplinks: Sequence[Uplink], ok: np.ndarray,
                  received_at: np.ndarray) -> list[Column]:
    """`water_readings` columns (WATER.all_columns, in order) straight from the numba kernel's
    arrays for the frames in `ok`: no per-record dicts, no per-row tuples (`ingest.pgbinary`)."""
    c = batch.columns
    idx = np.flatnonzero(ok)
    gone = c["status_missing"][idx].astype(bool)             # FF..FF status bytes: status, valve, battery unknown
    meter_time = c["meter_time"][idx].astype(np.int64)
    no_time = meter_time == MISSING_TIME
    valves = np.array(VALVE_STATES, dtype=object)[c["valve"][idx]]
    valves[gone] = None
    chosen = [uplinks[i] for i in idx.tolist()]
    return [
        Column("timestamp with time zone", received_at[idx]),
        Column("text", [u.device_id for u in chosen]),
        Column("text", [u.transport for u in chosen]),
        Column("text", np.char.zfill(c["address"][idx].astype("U14"), 14).tolist()),
        Column("smallint", c["meter_type"][idx]),
        Column("double precision", c["flow_m3"][idx]),
        Column("double precision", c["settlement_flow_m3"][idx]),
        Column("timestamp with time zone", np.where(no_time, 0, meter_time - PG_EPOCH_S) * 1_000_000, no_time,
               micros=True),
        Column("integer", c["status"][idx], gone),
        Column("text", valves.tolist()),
        Column("boolean", c["battery_low"][idx], gone),
        Column("jsonb", [None] * len(idx)),
    ]
