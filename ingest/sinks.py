"""Where decoded readings go: one wide table per device family, rows built from batch columns."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np

from decoders import Batch
from decoders.cjt188 import MISSING_TIME, VALVE_STATES
from iotjx.model import Uplink


@dataclass(frozen=True, slots=True)
class Sink:
    """A family's readings table and how one decoded batch becomes its rows."""

    table: str
    columns: tuple[str, ...]
    rows: Callable[[Batch, Sequence[Uplink], np.ndarray], list[tuple]]


def _utc(epoch_s: float) -> datetime:
    return datetime.fromtimestamp(epoch_s, UTC)


def _water_rows(batch: Batch, uplinks: Sequence[Uplink], ok: np.ndarray) -> list[tuple]:
    c = batch.columns
    flow = c["flow_m3"]
    settlement = c["settlement_flow_m3"]
    meter_time = c["meter_time"]
    rows = []
    for i in np.flatnonzero(ok):
        u = uplinks[i]
        when = int(meter_time[i])
        rows.append((
            _utc(u.received_at), u.device_id, f"{int(c['address'][i]):014d}", int(c["meter_type"][i]),
            None if np.isnan(flow[i]) else float(flow[i]),
            None if np.isnan(settlement[i]) else float(settlement[i]),
            None if when == MISSING_TIME else _utc(when),
            int(c["status"][i]), VALVE_STATES[int(c["valve"][i])], bool(c["battery_low"][i]), u.transport,
        ))
    return rows


WATER = Sink(
    table="water_readings",
    columns=("time", "device_id", "meter_address", "meter_type", "flow_m3", "settlement_flow_m3",
             "meter_time", "status", "valve", "battery_low", "transport"),
    rows=_water_rows,
)

# codec name -> sink.  A codec without a sink here is refused at start-up, not at the first uplink.
SINKS: dict[str, Sink] = {"cjt188": WATER}
