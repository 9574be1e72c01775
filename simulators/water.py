"""Household water meters: a daily consumption curve, cumulative register, CJ/T 188 replies."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import decoders

# Share of daily use per local hour (morning and evening peaks), sums to 1.
_HOURLY = [0.01, 0.005, 0.005, 0.005, 0.01, 0.03, 0.08, 0.09, 0.06, 0.045, 0.04, 0.05,
           0.055, 0.04, 0.03, 0.03, 0.035, 0.05, 0.08, 0.09, 0.08, 0.06, 0.04, 0.02]
_SCALE = 1 / sum(_HOURLY)


@dataclass(slots=True)
class WaterMeter:
    """One meter's state; `advance` moves its clock and register, `frame` is what it sends."""

    device_id: str
    meter_address: str
    daily_m3: float                       # this household's mean daily use
    register_m3: float
    rng: random.Random
    settings: dict = field(default_factory=dict)
    serial: int = 0

    def advance(self, start: datetime, seconds: float) -> None:
        """Add the water used from `start` over `seconds` (China local time drives the curve)."""
        hour = (start + timedelta(hours=8)).hour
        share = _HOURLY[hour] * _SCALE
        used = self.daily_m3 * share * seconds / 3600 * max(0.0, self.rng.gauss(1.0, 0.3))
        self.register_m3 = (self.register_m3 + used) % 1_000_000

    def frame(self, now: datetime) -> bytes:
        self.serial = (self.serial + 1) & 0xFF
        return decoders.encode("cjt188", {
            "meter_address": self.meter_address,
            "flow_m3": math.floor(self.register_m3 * 100) / 100,
            "settlement_flow_m3": math.floor(self.register_m3 * 100) / 100,
            "meter_time": now.replace(microsecond=0),
            "status": 0,
            "serial": self.serial,
        }, self.settings)


def make_meters(fleet, seed: int = 0) -> list[WaterMeter]:
    """A WaterMeter for each simulated device of a planned fleet."""
    rng = random.Random(seed ^ 0x5EED)
    return [WaterMeter(device_id=d.record.device_id, meter_address=d.meter_address,
                       daily_m3=rng.uniform(0.15, 0.9), register_m3=rng.uniform(0, 800),
                       rng=random.Random(rng.random())) for d in fleet]


def utcnow() -> datetime:
    return datetime.now(UTC)
