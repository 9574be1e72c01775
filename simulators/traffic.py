"""Traffic: GB/T 43229 vehicle detectors reporting per-lane volume, occupancy and speed with the rush
hours, and geomagnetic parking sensors at lots and scenic spots whose occupancy follows the hour, the
weekday, the season and the holidays."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

import decoders

from .base import DeviceContext, DeviceSim, Frame, poisson
from .nbiot import CHINA_OFFSET_S, DAY_S, local_hour

# Share of a lane's daily volume per local hour: weekday double peak (7-9, 17-19), flatter weekends.
_WEEKDAY = [0.8, 0.5, 0.35, 0.3, 0.4, 1.2, 3.5, 7.5, 8.0, 5.8, 5.0, 5.2, 5.3, 5.1, 5.3, 5.8, 6.6, 8.2, 8.0, 5.6,
            4.3, 3.5, 2.6, 1.6]
_WEEKEND = [1.2, 0.8, 0.5, 0.4, 0.4, 0.7, 1.5, 3.0, 4.6, 5.8, 6.4, 6.6, 6.4, 6.2, 6.2, 6.3, 6.5, 6.9, 6.6, 5.5,
            4.6, 3.8, 3.0, 2.0]
WEEKDAY_SHARE = [v / sum(_WEEKDAY) for v in _WEEKDAY]
WEEKEND_SHARE = [v / sum(_WEEKEND) for v in _WEEKEND]
# Vehicle classes of GB/T 43229: A >= 12 m, B 6-12 m, C < 6 m; shares and length ranges in m.
CLASSES = (("count_a", 0.04, (12.0, 16.0)), ("count_b", 0.09, (6.0, 11.9)), ("count_c", 0.87, (3.8, 5.6)))
DETECTOR_ZONE_M = 2.0                 # a loop's length: a vehicle occupies it for (length + zone) / speed
# Public holidays with heavy leisure travel (month, first day, last day); Spring Festival moves, so
# scenarios that need it give dates.
HOLIDAYS = ((1, 1, 1), (4, 4, 6), (5, 1, 5), (10, 1, 7))

TRAFFIC_OPTIONS = {
    "lanes": [2, 4],                      # lanes per detector (one approach)
    "lane_daily": [6000, 12000],          # vehicles per lane per day
    "free_speed_kmh": [50, 70],
    "capacity_vph": 1800,                 # vehicles per lane per hour at saturation
    "device_types": [2, 16, 64],          # loop, video, radar
}
PARKING_OPTIONS = {
    "dwell_h": None,                      # mean stay; default 1.5 h at lots, 3 h at scenic spots
    "battery_low": 0.0,
    "holidays": [],                       # extra holiday dates "YYYY-MM-DD" (e.g. the Spring Festival)
}


def _local(t: float) -> datetime:
    return datetime.fromtimestamp(t + CHINA_OFFSET_S, UTC)


def is_weekend(t: float) -> bool:
    return _local(t).weekday() >= 5


def is_holiday(t: float, extra: tuple[str, ...] = ()) -> bool:
    d = _local(t)
    return any(d.month == m and a <= d.day <= b for m, a, b in HOLIDAYS) or d.strftime("%Y-%m-%d") in extra


class LaneDetector(DeviceSim):
    """A detector on one approach: every interval, per lane, vehicles by class, time occupancy, mean
    speed (falling as the flow nears capacity), length, headway, gap, stops and presence samples."""

    def __init__(self, ctx: DeviceContext) -> None:
        super().__init__(ctx)
        rng, p = ctx.rng, ctx.params
        self.division_code = int(p["division_code"])
        self.device_number = int(p["device_number"])
        self.device_type = rng.choice(p["device_types"])
        lanes = rng.randint(*p["lanes"])
        # Inner lanes carry more than the kerb lane.
        self.lanes = [(c + 1, rng.uniform(*p["lane_daily"]) * (1.1 if c else 0.85)) for c in range(lanes)]
        self.free_speed = rng.uniform(*p["free_speed_kmh"])
        self.capacity = float(p["capacity_vph"])

    def lane(self, t: float, channel: int, daily: float) -> dict[str, Any]:
        rng, interval = self.ctx.rng, self.ctx.interval_s
        share = (WEEKEND_SHARE if is_weekend(t) else WEEKDAY_SHARE)[local_hour(t)]
        volume = min(254, poisson(rng, daily * share * interval / 3600))
        counts, lengths = {key: 0 for key, _, _ in CLASSES}, []
        for _ in range(volume):
            r, acc = rng.random(), 0.0
            for key, share, (lo, hi) in CLASSES:
                acc += share
                if r < acc or key == CLASSES[-1][0]:
                    counts[key] += 1
                    lengths.append(rng.uniform(lo, hi))
                    break
        record: dict[str, Any] = {"channel": channel, **counts, "presence_samples": 8}
        if volume == 0:
            return {**record, "occupancy_pct": 0.0, "speed_kmh": None, "length_m": None, "headway_s": None,
                    "gap_s": None, "stops": 0.0, "stop_duration_s": 0.0, "presence_occupied": 0}
        ratio = min(1.2, volume * 3600 / interval / self.capacity)
        speed = max(5.0, self.free_speed * (1 - 0.75 * ratio ** 2) + rng.gauss(0, 3))
        occupied_s = sum((length + DETECTOR_ZONE_M) / (speed / 3.6) for length in lengths)
        occupancy = min(100.0, 100 * occupied_s / interval)
        headway = interval / volume
        gap = max(0.0, headway - occupied_s / volume)
        stops = min(25.4, max(0.0, 0.2 + 1.5 * ratio ** 2 + rng.gauss(0, 0.1)))
        return {**record, "occupancy_pct": round(occupancy, 1), "speed_kmh": round(speed),
                "length_m": round(sum(lengths) / volume, 1),
                "headway_s": round(headway, 1) if headway <= 25.4 else None,     # one byte of tenths
                "gap_s": round(gap, 1) if gap <= 25.4 else None,
                "stops": round(stops, 1), "stop_duration_s": round(min(25.4, stops * rng.uniform(8, 20)), 1),
                "presence_occupied": min(8, round(occupancy / 100 * 8))}

    def report(self, t: float) -> list[Frame]:
        lanes = [self.lane(t, channel, daily) for channel, daily in self.lanes]
        payload = decoders.encode("gbt43229", {"division_code": self.division_code, "device_type": self.device_type,
                                               "device_number": self.device_number, "lanes": lanes},
                                  self.ctx.codec_settings)
        return [Frame(payload, radio=self.fix())]


class ParkingSensor(DeviceSim):
    """A geomagnetic sensor under one bay: an info frame at each arrival and departure, a keep-alive
    every interval, a daily update just after midnight.  Occupancy follows a two-state process whose
    arrival rate makes the bay busy with the probability of the hour, weekday, season and holidays."""

    def __init__(self, ctx: DeviceContext) -> None:
        super().__init__(ctx)
        rng, p = ctx.rng, ctx.params
        self.scenic = p.get("site_kind") == "scenic_spot"
        self.dwell_s = 3600 * float(p["dwell_h"] or (3.0 if self.scenic else 1.5))
        self.holidays = tuple(p["holidays"])
        self.base_mag = [rng.randrange(1500, 3500) for _ in range(3)]
        self.disturbance = [rng.randrange(-600, 600) for _ in range(3)]
        self.counter = rng.randrange(256)
        self.battery_mv = rng.randrange(3400, 3650)
        self.battery_low_at = ctx.within_run(p["battery_low"])
        self.occupied = rng.random() < self.occupancy_target(ctx.start)
        self._next_change(ctx.start)
        midnight = ctx.start - (ctx.start + CHINA_OFFSET_S) % DAY_S
        t = midnight + DAY_S + rng.uniform(0, 900)
        while t < ctx.end:
            self.add_event(t, "daily")
            t += DAY_S

    def occupancy_target(self, t: float) -> float:
        """Probability that the bay is taken at `t`."""
        hour, local = local_hour(t), _local(t)
        leisure = is_weekend(t) or is_holiday(t, self.holidays)
        if self.scenic:
            if not 8 <= hour < 18:
                return 0.03
            base = 0.95 if is_holiday(t, self.holidays) else 0.75 if leisure else 0.35
            season = 1.2 if local.month in (7, 8) else 0.6 if local.month in (12, 1, 2) else 1.0
            return min(0.97, base * season)
        day = [0.15] * 7 + [0.4, 0.7, 0.85, 0.85, 0.85, 0.8, 0.85, 0.85, 0.85, 0.85, 0.8, 0.6, 0.5, 0.4, 0.35,
                            0.25, 0.2]
        return day[hour] * (0.7 if leisure and 8 <= hour < 20 else 1.0)

    def _next_change(self, t: float) -> None:
        """Draw the next arrival or departure: exponential with the rate of the current hour; at the
        hour's end the rate changes, and memorylessness lets us draw again from there."""
        rng = self.ctx.rng
        while t < self.ctx.end:
            p = min(0.97, max(0.02, self.occupancy_target(t)))
            rate = 1 / self.dwell_s if self.occupied else p / (1 - p) / self.dwell_s
            hour_end = t - (t + CHINA_OFFSET_S) % 3600 + 3600
            when = t + rng.expovariate(rate)
            if when < hour_end:
                self.add_event(when, "change")
                return
            t = hour_end

    def _report(self, t: float, kind: int, labels: tuple[str, ...] = ()) -> Frame:
        rng = self.ctx.rng
        self.counter = (self.counter + 1) & 0xFF
        local = _local(self.ctx.clock.device_time(t) - CHINA_OFFSET_S)
        season = 8.0 * math.cos(2 * math.pi * (local.timetuple().tm_yday - 200) / 365.25)
        mags = [b + (d if self.occupied else 0) + rng.randrange(-15, 16) for b, d in zip(self.base_mag,
                                                                                        self.disturbance)]
        battery_low = self.battery_low_at is not None and t >= self.battery_low_at
        fields = {"frame_type": kind, "occupied": self.occupied, "battery_low": battery_low,
                  "frame_counter": self.counter, "temperature_c": round(20 + season + rng.gauss(0, 2)),
                  "mag_x": mags[0], "mag_y": mags[1], "mag_z": mags[2],
                  "battery_mv": 3200 if battery_low else self.battery_mv,
                  "node_hour": local.hour, "node_minute": local.minute, "resets": 0, "config_id": 1}
        if battery_low:
            labels += ("battery_low",)
        return Frame(decoders.encode("parking", fields, self.ctx.codec_settings), labels, radio=self.fix())

    def report(self, t: float) -> list[Frame]:
        return [self._report(t, 1)]

    def on_event(self, t: float, kind: str) -> list[Frame]:
        if kind == "change":
            self.occupied = not self.occupied
            self._next_change(t)
            return [self._report(t, 0, ("arrival",) if self.occupied else ("departure",))]
        if kind == "daily":
            return [self._report(t, 2)]
        return []
