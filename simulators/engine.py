"""The simulator: a discrete-event schedule over simulated time.  Devices wake (PSM slots, heartbeats,
events), emit frames; the network decides when and how each frame reaches the server (latency,
store-and-forward, duplicates, corruption, carrier envelopes); `records()` yields the uplinks in the
order they reach the server.  Nothing here reads a clock or a socket: the same scenario and seed give
the same records, however fast they are then sent."""

from __future__ import annotations

import base64
import hashlib
import heapq
import random
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import decoders

from .base import DeviceContext, DeviceSim, Frame
from .capture import UplinkRecord
from .fire import FIRE_KINDS, ProfileSmokeDetector
from .fleet import PlannedDevice, plan_scenario
from .nbiot import DeviceClock, RadioSite, WakeSchedule, corrupt_frame, fate
from .scenario import CHINA, FleetSpec, Scenario
from .traffic import LaneDetector, ParkingSensor
from .water import WaterMeterSim

CLOCK_SET_WITHIN_S = 90 * 86400.0     # device clocks were last set (install, platform time sync) this long ago


class SimulatedDevice:
    """A device in a run: its model (`sim`), its link (own random stream) and its carrier state."""

    __slots__ = ("planned", "spec", "sim", "link_rng", "sequence")

    def __init__(self, planned: PlannedDevice, spec: FleetSpec, sim: DeviceSim, link_rng: random.Random) -> None:
        self.planned = planned
        self.spec = spec
        self.sim = sim
        self.link_rng = link_rng
        self.sequence = 0                 # CTWing upPacketSN


def build_device(planned: PlannedDevice, spec: FleetSpec, scenario: Scenario, seed: int) -> SimulatedDevice:
    """The simulated device for a planned one: its own random streams, clock, radio and schedule."""
    device_id = planned.record.device_id
    rng = random.Random(f"{seed}:{device_id}")
    b = spec.behaviour
    clock = DeviceClock.draw(rng, b.clock_offset_s, b.clock_drift_ppm,
                             scenario.start - rng.uniform(0, CLOCK_SET_WITHIN_S))
    radio = RadioSite.place(planned.coverage, random.Random(f"{seed}:site:{planned.site_key}"), rng)
    schedule = WakeSchedule.plan(rng, spec.interval_s, network=spec.model.network, jitter_s=b.wake_jitter_s,
                                 midnight_share=b.midnight_share, midnight_spread_s=b.midnight_spread_s, clock=clock)
    params: dict[str, Any] = dict(spec.options)
    if spec.family == "traffic":
        params.update(division_code=planned.city, device_number=planned.number)
    ctx = DeviceContext(device_id=device_id, model=spec.model, rng=rng, clock=clock, radio=radio,
                        start=scenario.start, end=scenario.end, interval_s=float(spec.interval_s),
                        schedule=schedule, params=params)
    return SimulatedDevice(planned, spec, _model_sim(spec, ctx), random.Random(f"{seed}:{device_id}:link"))


def _model_sim(spec: FleetSpec, ctx: DeviceContext) -> DeviceSim:
    if spec.family == "water":
        return WaterMeterSim(ctx)
    if spec.family == "traffic":
        return LaneDetector(ctx)
    if spec.family == "parking":
        return ParkingSensor(ctx)
    if spec.model.codec == "ctwing" and spec.model.inner_codec is None:
        return ProfileSmokeDetector(ctx)
    kind = spec.options.get("kind") or ("smoke" if spec.model.network == "nbiot" else "panel")
    return FIRE_KINDS[kind](ctx)


class Simulation:
    """A scenario's run: `devices` as planned, `records()` the uplinks in arrival order."""

    def __init__(self, scenario: Scenario, seed: int | None = None, *, onenet_token: str | None = None) -> None:
        self.scenario = scenario
        self.onenet_token = onenet_token          # signs OneNET pushes as the platform does
        self.seed = scenario.seed if seed is None else seed
        self.planned = plan_scenario(scenario, self.seed)
        self.labels: Counter[str] = Counter()        # planted behaviours seen so far
        self.frames = 0                              # frames the devices produced (before duplicates)

    @property
    def device_records(self):
        return [p.record for p in self.planned]

    def header(self) -> dict[str, Any]:
        """The capture header of this run (no wall-clock value in it)."""
        s = self.scenario
        return {"source": "simulator", "scenario": s.name, "seed": self.seed,
                "start": datetime.fromtimestamp(s.start, CHINA).isoformat(), "duration_s": s.duration_s,
                "speed": s.speed, "devices": len(self.planned)}

    def records(self) -> Iterator[UplinkRecord]:
        """Every uplink of the run, in the order it reaches the server.  Deliveries that the network
        holds past the end of the run (late ones) still come, after it."""
        s = self.scenario
        self.labels.clear()
        self.frames = 0
        devices = [build_device(p, s.fleets[p.fleet], s, self.seed) for p in self.planned]
        wakes: list[tuple[float, int]] = []
        for i, d in enumerate(devices):
            first = d.sim.start(s.start)
            if first is not None and first < s.end:
                wakes.append((first, i))
        heapq.heapify(wakes)
        arrivals: list[tuple[float, int, UplinkRecord]] = []
        order = 0
        while wakes:
            t, i = heapq.heappop(wakes)
            while arrivals and arrivals[0][0] <= t:
                yield heapq.heappop(arrivals)[2]
            device = devices[i]
            frames, next_t = device.sim.wake(t)
            for frame in frames:
                self.frames += 1
                for record in self._deliveries(device, t, frame):
                    heapq.heappush(arrivals, (record.t, order, record))
                    order += 1
            if next_t is not None and next_t < s.end:
                heapq.heappush(wakes, (next_t, i))
        while arrivals:
            yield heapq.heappop(arrivals)[2]

    def _deliveries(self, device: SimulatedDevice, t: float, frame: Frame) -> list[UplinkRecord]:
        """What the network makes of one frame: one record, a later one, two identical ones…"""
        rng, spec = device.link_rng, device.spec
        ecl = frame.radio.ecl if frame.radio else 0
        what = fate(rng, spec.behaviour, spec.model.network, ecl)
        labels = list(frame.labels)
        payload = frame.payload
        if payload is not None and what.corrupt:
            payload = corrupt_frame(device.sim.ctx.codec, payload, rng)
            labels.append("corrupt")
        sent = t + frame.delay_s
        arrive = sent + what.latency_s + what.held_s
        if what.held_s:
            labels.append("late")
        transport = device.planned.transport
        route = ""
        if transport == "http":
            route = spec.model.codec
            platform_at = arrive
            arrive += rng.uniform(0.2, 1.5)                  # the platform pushes what it received
            body = self._envelope(device, platform_at, payload, frame)
        else:
            body = payload if payload is not None else b""
        radio = frame.radio.as_dict() if frame.radio else None
        first = UplinkRecord(round(arrive, 3), device.planned.record.device_id, transport, body, route,
                             tuple(labels), round(sent, 3), spec.model.name, radio)
        for label in labels:
            self.labels[label] += 1
        out = [first]
        if what.duplicate_after_s is not None:
            again = round(arrive + what.duplicate_after_s, 3)
            out.append(UplinkRecord(again, first.device_id, transport, body, route, (*labels, "duplicate"),
                                    first.sent_t, first.model, radio))
            self.labels["duplicate"] += 1
        return out

    def _envelope(self, device: SimulatedDevice, platform_at: float, payload: bytes | None, frame: Frame) -> bytes:
        """The carrier platform's push for a frame: its JSON envelope around the device's bytes (or, for a
        profile product, the properties it decoded)."""
        model, planned = device.spec.model, device.planned
        device.sequence += 1
        fields: dict[str, Any] = {"imei": planned.record.device_id, "device_id": planned.platform_id,
                                  "received_at": datetime.fromtimestamp(round(platform_at, 3), UTC)}
        if model.codec == "ctwing":
            fields.update(sequence=device.sequence, product_id=f"1500{planned.fleet:04d}",
                          tenant_id="2000123456")
        if payload is not None:
            fields["inner_payload"] = payload
        else:
            fields["service_data"] = dict(frame.service_data or {})
        if model.codec == "onenet":
            fields["nonce"] = "".join(device.link_rng.choices(_NONCE_CHARS, k=8))
            if self.onenet_token:
                unsigned = decoders.encode(model.codec, fields, model.codec_settings())
                fields["signature"] = onenet_signature(self.onenet_token, fields["nonce"], _msg_text(unsigned))
        return decoders.encode(model.codec, fields, model.codec_settings())


_NONCE_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def onenet_signature(token: str, nonce: str, msg_text: str) -> str:
    """OneNET's push signature: base64(MD5(token + nonce + msg)), msg as the JSON text in the body."""
    return base64.b64encode(hashlib.md5((token + nonce + msg_text).encode()).digest()).decode()


def _msg_text(body: bytes) -> str:
    """The exact text of the `msg` member of a body as decoders.carrier.encode_onenet writes it."""
    text = body.decode()
    head, tail = '{"msg":', ',"msg_signature":'
    if not text.startswith(head) or tail not in text:
        raise ValueError("unexpected OneNET body layout: cannot sign it")
    return text[len(head):text.index(tail)]


def simulate(scenario: Scenario, seed: int | None = None) -> tuple[Simulation, list[UplinkRecord]]:
    """Run a scenario to the end in memory (tests, small runs)."""
    sim = Simulation(scenario, seed)
    return sim, list(sim.records())


__all__ = ["SimulatedDevice", "Simulation", "build_device", "simulate"]
