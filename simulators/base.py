"""What every simulated device shares: the frame it emits, the context it lives in, and the small
event calendar that merges periodic reports with things that happen to it (an alarm, a leak)."""

from __future__ import annotations

import heapq
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from decoders.models import DeviceModel

from .nbiot import DeviceClock, RadioFix, RadioSite, WakeSchedule


@dataclass(frozen=True, slots=True)
class Frame:
    """One uplink as the device produces it, before the network has its say."""

    payload: bytes | None                 # the device's bytes; None for an object-model (carrier-decoded) device
    labels: tuple[str, ...] = ()          # planted behaviours this uplink carries (see docs/simulators.md)
    service_data: Mapping[str, Any] | None = None   # object-model devices: the properties the carrier pushes
    delay_s: float = 0.0                  # sent this long after the wake-up (a second frame of one wake)
    radio: RadioFix | None = None         # the fix the module took for this uplink


@dataclass(slots=True)
class DeviceContext:
    """A device's identity and surroundings; `rng` is its own, seeded from the scenario seed and its id."""

    device_id: str
    model: DeviceModel
    rng: random.Random
    clock: DeviceClock
    radio: RadioSite
    start: float                          # simulated epoch seconds
    end: float
    interval_s: float                     # reporting interval
    schedule: WakeSchedule | None = None
    params: Mapping[str, Any] = field(default_factory=dict)    # the fleet's family options

    @property
    def codec(self) -> str:
        """The codec of the device's own bytes (the inner codec of a carrier envelope model)."""
        return self.model.inner_codec or self.model.codec

    @property
    def codec_settings(self) -> dict[str, Any]:
        if self.model.inner_codec:
            return dict(self.model.inner_settings)
        return self.model.codec_settings()

    def device_datetime(self, t: float) -> datetime:
        """The device clock's reading at true time `t`, to the second, as devices stamp frames."""
        return datetime.fromtimestamp(int(self.clock.device_time(t)), UTC)

    def within_run(self, share: float) -> float | None:
        """With probability `share`, a uniformly drawn moment of the run; else None."""
        if share > 0 and self.rng.random() < share:
            return self.rng.uniform(self.start, self.end)
        return None


class DeviceSim:
    """Base of the device models: `start` gives the first wake-up, `wake` the frames sent at a wake-up
    and the next one.  Subclasses fill `report` (the periodic uplink) and `on_event` (anything else)."""

    def __init__(self, ctx: DeviceContext) -> None:
        self.ctx = ctx
        self._events: list[tuple[float, int, str]] = []
        self._event_seq = 0
        self._slot: float | None = None
        self._next_report: float | None = None

    # ------------------------------------------------------------------ calendar
    def add_event(self, t: float, kind: str) -> None:
        if t < self.ctx.end:
            heapq.heappush(self._events, (t, self._event_seq, kind))
            self._event_seq += 1

    def start(self, t0: float) -> float | None:
        sched = self.ctx.schedule
        if sched is not None:
            self._slot = sched.first_slot(t0)
            self._next_report = sched.wake_at(self._slot, self.ctx.rng)
            while self._next_report < t0:
                self._advance_slot()
        return self._next_time()

    def _advance_slot(self) -> None:
        sched = self.ctx.schedule
        assert sched is not None and self._slot is not None
        self._slot += sched.interval_s
        self._next_report = sched.wake_at(self._slot, self.ctx.rng)

    def _next_time(self) -> float | None:
        times = [t for t in (self._next_report, self._events[0][0] if self._events else None) if t is not None]
        return min(times) if times else None

    def wake(self, t: float) -> tuple[list[Frame], float | None]:
        frames: list[Frame] = []
        while self._events and self._events[0][0] <= t:
            when, _, kind = heapq.heappop(self._events)
            frames.extend(self.on_event(when, kind))
        if self._next_report is not None and self._next_report <= t:
            frames.extend(self.report(self._next_report))
            self._advance_slot()
        return frames, self._next_time()

    # ------------------------------------------------------------------ the model's part
    def report(self, t: float) -> list[Frame]:
        return []

    def on_event(self, t: float, kind: str) -> list[Frame]:
        return []

    def fix(self) -> RadioFix:
        return self.ctx.radio.fix(self.ctx.rng)


def poisson(rng: random.Random, mean: float) -> int:
    """A Poisson draw (Knuth for small means, a rounded normal above 30)."""
    if mean <= 0:
        return 0
    if mean > 30:
        return max(0, round(rng.gauss(mean, mean ** 0.5)))
    limit, k, p = pow(2.718281828459045, -mean), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


def weighted_choice(rng: random.Random, weights: Mapping[str, float]) -> str:
    """A key drawn with probability proportional to its weight (keys in their given order)."""
    keys = list(weights)
    return rng.choices(keys, [weights[k] for k in keys])[0]
