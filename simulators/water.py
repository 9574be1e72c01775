"""Household water meters: a daily consumption curve per household kind, leaks (continuous night
flow), register roll-over at 999999.99 m³, battery decline into the battery-low status bit, meter
replacement (a new meter address, the register from zero) — sent as CJ/T 188 901F replies."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from datetime import UTC, datetime

import decoders

from .base import DeviceContext, DeviceSim, Frame, weighted_choice
from .nbiot import CHINA_OFFSET_S, DAY_S

REGISTER_LIMIT_M3 = 1_000_000.0        # XXXXXX.XX: 999999.99 m³ then 0.00

# Share of a day's use per local hour, by household kind (normalised below).  "family" is the
# classic morning + evening double peak; shops use water in opening hours; restaurants around meals.
_CURVES = {
    "family": [0.01, 0.005, 0.005, 0.005, 0.01, 0.03, 0.08, 0.09, 0.06, 0.045, 0.04, 0.05,
               0.055, 0.04, 0.03, 0.03, 0.035, 0.05, 0.08, 0.09, 0.08, 0.06, 0.04, 0.02],
    "single": [0.01, 0.005, 0.003, 0.003, 0.003, 0.01, 0.06, 0.12, 0.07, 0.02, 0.015, 0.02,
               0.03, 0.02, 0.015, 0.015, 0.02, 0.04, 0.08, 0.12, 0.13, 0.11, 0.07, 0.03],
    "elderly": [0.01, 0.005, 0.005, 0.005, 0.02, 0.07, 0.11, 0.09, 0.07, 0.06, 0.05, 0.06,
                0.05, 0.03, 0.03, 0.04, 0.06, 0.08, 0.07, 0.05, 0.04, 0.02, 0.01, 0.01],
    "shop": [0.002] * 7 + [0.03, 0.07, 0.09, 0.09, 0.09, 0.09, 0.08, 0.08, 0.08, 0.08, 0.08,
                           0.07, 0.05, 0.03, 0.01, 0.005, 0.003],
    "restaurant": [0.005, 0.003, 0.002, 0.002, 0.002, 0.005, 0.01, 0.02, 0.03, 0.06, 0.1, 0.13,
                   0.1, 0.04, 0.03, 0.04, 0.08, 0.12, 0.11, 0.07, 0.04, 0.02, 0.01, 0.005],
}
HOURLY = {kind: [share / sum(curve) for share in curve] for kind, curve in _CURVES.items()}
HOUSEHOLD_KINDS = tuple(HOURLY)
DAILY_M3 = {"family": (0.35, 0.8), "single": (0.08, 0.2), "elderly": (0.15, 0.35), "shop": (0.2, 0.8),
            "restaurant": (1.5, 5.0)}
WEEKEND_FACTOR = {"family": 1.08, "single": 1.1, "elderly": 1.0, "shop": 0.9, "restaurant": 1.15}
_HOURLY = _CURVES["family"]            # kept for older callers
_SCALE = 1 / sum(_HOURLY)


def seasonal_factor(t: float) -> float:
    """Jiangxi summers are hot: use peaks in late July, about ±18 % over the year."""
    day_of_year = datetime.fromtimestamp(t + CHINA_OFFSET_S, UTC).timetuple().tm_yday
    return 1.0 + 0.18 * math.cos(2 * math.pi * (day_of_year - 205) / 365.25)


@dataclass(slots=True)
class WaterMeter:
    """One meter's state; `advance` moves its register, `frame` is the 901F reply it sends."""

    device_id: str
    meter_address: str
    daily_m3: float                       # this household's mean daily use
    register_m3: float
    rng: random.Random
    settings: dict = field(default_factory=dict)
    serial: int = 0
    kind: str = "family"
    leak_m3h: float = 0.0                 # continuous flow of a leak, m³/h (0: none)
    status: int = 0                       # ST word sent with the next frame
    valve_closed: bool = False

    def advance(self, start: datetime, seconds: float) -> None:
        """Add the water used from `start` over `seconds` (China local time drives the curve)."""
        t = start.timestamp()
        end = t + seconds
        curve = HOURLY.get(self.kind, HOURLY["family"])
        season = seasonal_factor(t)
        while t < end:
            local = t + CHINA_OFFSET_S
            hour_end = t - local % 3600 + 3600
            step = min(end, hour_end) - t
            if not self.valve_closed:
                weekday = int(local // DAY_S + 3) % 7          # 1970-01-01 was a Thursday (3)
                factor = WEEKEND_FACTOR.get(self.kind, 1.0) if weekday >= 5 else 1.0
                hour = int(local % DAY_S // 3600)
                used = (self.daily_m3 * season * factor * curve[hour] * step / 3600
                        * max(0.0, self.rng.gauss(1.0, 0.3)))
                self.register_m3 = (self.register_m3 + used + self.leak_m3h * step / 3600) % REGISTER_LIMIT_M3
            t += step

    def frame(self, now: datetime) -> bytes:
        self.serial = (self.serial + 1) & 0xFF
        reading = math.floor(self.register_m3 * 100) / 100
        return decoders.encode("cjt188", {
            "meter_address": self.meter_address,
            "flow_m3": reading,
            "settlement_flow_m3": reading,
            "meter_time": now.replace(microsecond=0),
            "status": self.status,
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


# --------------------------------------------------------------------------- in a scenario

# Fleet options of the water family (scenario files), with their defaults.
WATER_OPTIONS = {
    "households": {"family": 0.7, "single": 0.15, "elderly": 0.1, "shop": 0.05},
    "leak": 0.0,                          # share of meters whose household has a leak (begun in the last week)
    "leak_onset": 0.0,                    # share of meters whose leak begins during the run
    "leak_m3h": [0.01, 0.06],             # leak flow range, m³/h (10-60 L/h: a running cistern)
    "rollover": 0.0,                      # share of meters whose register passes 999999.99 during the run
    "battery_low": 0.0,                   # share of meters whose battery crosses the low threshold
    "replacement": 0.0,                   # share of meters replaced during the run
    "valve_closed": 0.0,                  # share of meters with the valve shut (arrears)
    # Hourly interval data: with each report, a timed-freeze record (CJ/T 188-2018 DI D3xx) of the register
    # at each top of the hour of the last N hours since the previous report — how a meter that wakes once a
    # day delivers its hourly values (0: none).
    "freeze_hours": 0,
}
BATTERY_FULL_MV, BATTERY_LOW_MV = 3650.0, 3300.0      # ER26500 lithium cell, meter's low threshold
BATTERY_DECLINE_MV_PER_DAY = 0.15                      # about 6 years from full to low


class WaterMeterSim(DeviceSim):
    """A water meter in a scenario: wakes on its PSM schedule and sends its register."""

    def __init__(self, ctx: DeviceContext) -> None:
        super().__init__(ctx)
        rng, p = ctx.rng, ctx.params
        settings = ctx.codec_settings
        self._valve_shift = int(settings.get("valve_shift", 0))
        self._battery_bit = int(settings.get("battery_bit", 2))
        kind = weighted_choice(rng, p["households"])
        daily = rng.uniform(*DAILY_M3[kind])
        register = rng.uniform(0, 3000)
        if rng.random() < p["rollover"]:
            # Near the top so that the run's use carries it over 999999.99.
            days = max(ctx.end - ctx.start, 3600.0) / DAY_S
            register = REGISTER_LIMIT_M3 - daily * days * rng.uniform(0.1, 0.7) * 0.75
        self.meter = WaterMeter(ctx.device_id, _meter_address(rng), daily, register,
                                rng, settings=settings, kind=kind,
                                valve_closed=rng.random() < p["valve_closed"])
        leaking = rng.random() < p["leak"]
        onset = ctx.within_run(p["leak_onset"])
        self._leak_from = ctx.start - rng.uniform(0, 7 * DAY_S) if leaking else onset
        self._leak_m3h = rng.uniform(*p["leak_m3h"])
        crossing = ctx.within_run(p["battery_low"])
        if crossing is not None:
            self._battery_at_start = BATTERY_LOW_MV + (crossing - ctx.start) / DAY_S * BATTERY_DECLINE_MV_PER_DAY
        else:
            self._battery_at_start = rng.uniform(BATTERY_LOW_MV + 60, BATTERY_FULL_MV)
        self._replaced_at = ctx.within_run(p["replacement"])
        self._battery_reset: float | None = None
        self._last = ctx.start

    def battery_mv(self, t: float) -> float:
        if self._battery_reset is not None and t >= self._battery_reset:
            return BATTERY_FULL_MV - (t - self._battery_reset) / DAY_S * BATTERY_DECLINE_MV_PER_DAY
        return self._battery_at_start - (t - self.ctx.start) / DAY_S * BATTERY_DECLINE_MV_PER_DAY

    def _run_until(self, t: float) -> bool:
        """Advance the register to `t`, a leak starting on the way; True when it rolled over."""
        rolled = False
        if self._leak_from is not None and self._leak_from <= self._last:
            self.meter.leak_m3h = self._leak_m3h
        while self._last < t:
            step_end = t
            if self._leak_from is not None and self._last < self._leak_from < t:
                step_end = self._leak_from
            before = self.meter.register_m3
            self.meter.advance(datetime.fromtimestamp(self._last, UTC), step_end - self._last)
            rolled |= self.meter.register_m3 < before
            self._last = step_end
            if self._leak_from is not None and self._last >= self._leak_from:
                self.meter.leak_m3h = self._leak_m3h
        return rolled

    def report(self, t: float) -> list[Frame]:
        labels = []
        if self._replaced_at is not None and self._last < self._replaced_at <= t:
            self._run_until(self._replaced_at)
            self._replace(self._replaced_at)
            labels.append("replacement")
        freezes = []
        hours = int(self.ctx.params.get("freeze_hours", 0))
        if hours > 0:
            top = max(self._last, t - hours * 3600.0) // 3600 * 3600 + 3600
            while top <= t:
                if self._run_until(top):
                    labels.append("rollover")
                freezes.append((top, math.floor(self.meter.register_m3 * 100) / 100))
                top += 3600
        if self._run_until(t) and "rollover" not in labels:
            labels.append("rollover")
        if self.meter.leak_m3h > 0:
            labels.append("leak")
        battery_low = self.battery_mv(t) < BATTERY_LOW_MV
        if battery_low:
            labels.append("battery_low")
        if self.meter.valve_closed:
            labels.append("valve_closed")
        if self.ctx.codec.startswith("senml"):
            fix = self.fix()
            return [Frame(self._lwm2m_pack(t, fix), tuple(labels), radio=fix)]
        valve = 0b01 if self.meter.valve_closed else 0b00
        self.meter.status = (valve << self._valve_shift) | (int(battery_low) << self._battery_bit)
        payload = self.meter.frame(self.ctx.device_datetime(t))
        fix = self.fix()
        frames = [Frame(payload, tuple(labels), radio=fix)]
        for back, (top, register) in enumerate(reversed(freezes), start=1):      # one wake: the same radio fix
            frame = decoders.encode("cjt188", {
                "meter_address": self.meter.meter_address, "record_kind": "freeze", "periods_ago": back,
                "freeze_time": self.ctx.device_datetime(top).replace(microsecond=0), "flow_m3": register,
                "serial": (self.meter.serial + back) & 0xFF}, self.meter.settings)
            frames.append(Frame(frame, tuple(labels) + ("freeze",), radio=fix))
        return frames

    def _lwm2m_pack(self, t: float, fix) -> bytes:  # noqa: ANN001 - a simulators.nbiot.RadioFix
        """An LwM2M 1.1 meter's notification as SenML: water meter object 3424 (volume), device object 3
        (battery %), and connectivity monitoring object 4 as NB-IoT modules fill it (OMA 4.xml v1.3:
        bearer 7 NB-IoT, NRSRP dBm, cell id, SINR dB, CE level 1..3 for ECL 0..2), integers as the
        object defines them."""
        when = self.ctx.device_datetime(t)
        battery_pct = max(0.0, min(100.0, (self.battery_mv(t) - BATTERY_LOW_MV)
                                   / (BATTERY_FULL_MV - BATTERY_LOW_MV) * 100))
        values = [("/3424/0/1", math.floor(self.meter.register_m3 * 100) / 100, "m3"),
                  ("/3/0/9", float(round(battery_pct)), "%"), ("/4/0/0", 7.0, None),
                  ("/4/0/2", float(round(fix.rsrp_dbm)), "dBm"), ("/4/0/8", float(fix.cell_id), None),
                  ("/4/0/11", float(round(fix.sinr_db)), "dB"), ("/4/0/13", float(fix.ecl + 1), None)]
        records = [{"name": f"urn:imei:{self.ctx.device_id}{name}", "value": value, "unit": unit, "time": when}
                   for name, value, unit in values]
        return decoders.encode(self.ctx.codec, {"records": records}, self.ctx.codec_settings)

    def _replace(self, t: float) -> None:
        """A new meter on the same service point: new address, register from zero, fresh battery, a
        clock set on the day (the NB module and its registration stay with the service point)."""
        m = self.meter
        m.meter_address = _meter_address(self.ctx.rng)
        m.register_m3 = 0.0
        m.serial = 0
        self._battery_reset = t         # (a leak is in the plumbing: it goes on through the new meter)


def _meter_address(rng: random.Random) -> str:
    return f"{rng.randrange(10**13, 10**14):014d}"
