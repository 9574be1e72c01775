"""Fire: building panels behind a user-information transmission device (UITD), NB-IoT smoke
detectors, hydrant pressure monitors — GB/T 26875.3 frames — and the CTWing profile smoke detector
whose properties the carrier decodes.  Heartbeats, rare alarms and their restores, faults and their
restores, analog values (temperature, smoke, hydrant pressure)."""

from __future__ import annotations

import random
from typing import Any

import decoders
from decoders.gb26875_layout import ANALOG_VALUE, COMPONENT_STATE, UITD_STATE

from .base import DeviceContext, DeviceSim, Frame
from .nbiot import DAY_S, local_hour

SMOKE_DETECTOR = 0x28                 # GB/T 26875.3 component type of a point smoke detector
SYSTEM_FIRE_ALARM, SYSTEM_HYDRANT = 1, 11
ANALOG_TEMPERATURE, ANALOG_KPA = 3, 5
# The F9164-TD-NB's vendor analog types (PROTOCOLS.md §2): 0x80 looks like RSRP in dBm, 0x88 like the
# battery in mV.  0x81 (smoke obscuration, 0.01 dB/m) is our choice: the record shows no smoke type.
VENDOR_RSRP, VENDOR_BATTERY_MV, VENDOR_SMOKE = 0x80, 0x88, 0x81
_PLACES = ("走廊", "大厅", "楼梯间", "机房", "配电室", "仓库", "办公室", "会议室", "厨房", "车库")

FIRE_OPTIONS = {
    "kind": None,                         # panel | smoke | hydrant (default from the model)
    "alarm_per_day": 0.0,                 # alarms per device per day (most are false: cooking, dust)
    "fault_per_day": 0.0,                 # faults per device per day
    "alarm_clears_min": [2, 30],          # an alarm is reset after this many minutes
    "fault_clears_h": [0.5, 24],          # a fault is repaired after this many hours
    "detectors": [20, 120],               # panels: detectors on the loop
    "analog_interval_s": 3600,            # panels: temperature readings this often
    "battery_low": 0.0,                   # NB smoke detectors: share whose battery runs low in the run
    "pressure_kpa": [250, 400],           # hydrants: static pressure
    "low_pressure_per_day": 0.0,          # hydrants: pressure losses per day (a burst main, a shut valve)
}


def _poisson_times(rng: random.Random, start: float, end: float, per_day: float) -> list[float]:
    times, t = [], start
    while per_day > 0:
        t += rng.expovariate(per_day / DAY_S)
        if t >= end:
            break
        times.append(t)
    return times


class _Gb26875Device(DeviceSim):
    """What the GB/T 26875.3 devices share: an address, a serial number, the frame encoder."""

    def __init__(self, ctx: DeviceContext) -> None:
        super().__init__(ctx)
        self.source_address = ctx.rng.randrange(1, 1 << 48)
        self.serial = ctx.rng.randrange(1 << 16)
        self.with_description = True
        self.version = "1.1"

    def _frame(self, t: float, app_type: int, objects: list[dict[str, Any]], labels: tuple[str, ...] = (),
               delay_s: float = 0.0, radio=None) -> Frame:
        self.serial = (self.serial + 1) & 0xFFFF
        when = self.ctx.device_datetime(t + delay_s)
        for obj in objects:
            obj.setdefault("time", when)
        payload = decoders.encode("gb26875", {
            "serial": self.serial, "version": self.version, "sent_at": when, "source_address": self.source_address,
            "command": 2, "app_type": app_type, "objects": objects, "with_description": self.with_description,
        }, self.ctx.codec_settings)
        return Frame(payload, labels, delay_s=delay_s, radio=radio or self.fix())

    def _schedule(self, kind: str, per_day: float) -> None:
        for when in _poisson_times(self.ctx.rng, self.ctx.start, self.ctx.end, per_day):
            self.add_event(when, kind)


class UitdPanel(_Gb26875Device):
    """A building's fire panel behind a UITD: heartbeats (type 21), component alarms, faults and their
    restores (type 2, with the detector's location), hourly temperatures (type 3)."""

    def __init__(self, ctx: DeviceContext) -> None:
        super().__init__(ctx)
        rng, p = ctx.rng, ctx.params
        n = rng.randint(*p["detectors"])
        self.components = [(a, f"{rng.randint(1, 30)}楼{rng.choice(_PLACES)}烟感") for a in range(1, n + 1)]
        self.alarms: dict[int, str] = {}
        self.faults: dict[int, str] = {}
        self._schedule("alarm", p["alarm_per_day"])
        self._schedule("fault", p["fault_per_day"])
        step = float(p["analog_interval_s"])
        t = ctx.start + rng.uniform(0, step)
        while t < ctx.end:
            self.add_event(t, "analog")
            t += step

    def report(self, t: float) -> list[Frame]:
        flags = {"normal_running": True, "fire_alarm": bool(self.alarms), "fault": bool(self.faults)}
        return [self._frame(t, UITD_STATE, [{"flags": flags}])]

    def _component(self, t: float, address: int, description: str, *, fire: bool, fault: bool,
                   labels: tuple[str, ...]) -> Frame:
        obj = {"system_type": SYSTEM_FIRE_ALARM, "system_address": 1, "component_type": SMOKE_DETECTOR,
               "component_address": address, "description": description,
               "flags": {"normal_running": True, "fire_alarm": fire, "fault": fault, "started": fire}}
        return self._frame(t, COMPONENT_STATE, [obj], labels)

    def on_event(self, t: float, kind: str) -> list[Frame]:
        rng, p = self.ctx.rng, self.ctx.params
        if kind == "analog":
            picks = rng.sample(self.components, min(3, len(self.components)))
            base = 24.0 + 4.0 * (8 <= local_hour(t) < 20)
            objects = [{"system_type": SYSTEM_FIRE_ALARM, "system_address": 1, "component_type": SMOKE_DETECTOR,
                        "component_address": a, "analog_type": ANALOG_TEMPERATURE,
                        "value": round(base + rng.gauss(0, 1.5), 1)} for a, _ in picks]
            return [self._frame(t, ANALOG_VALUE, objects)]
        if kind in ("alarm", "fault"):
            address, description = rng.choice(self.components)
            active = self.alarms if kind == "alarm" else self.faults
            if address in active:
                return []
            active[address] = description
            if kind == "alarm":
                self.add_event(t + 60 * rng.uniform(*p["alarm_clears_min"]), f"restore:{address}")
            else:
                self.add_event(t + 3600 * rng.uniform(*p["fault_clears_h"]), f"fault_restore:{address}")
            return [self._component(t, address, description, fire=address in self.alarms,
                                    fault=address in self.faults, labels=(kind,))]
        what, _, addr = kind.partition(":")
        address = int(addr)
        (self.alarms if what == "restore" else self.faults).pop(address, None)
        description = dict(self.components)[address]
        return [self._component(t, address, description, fire=address in self.alarms,
                                fault=address in self.faults, labels=(what,))]


class NbSmokeDetector(_Gb26875Device):
    """An NB-IoT smoke detector (F9164-TD-NB style): a daily heartbeat (short type-2 state, then the
    type-3 vendor values RSRP, battery, smoke, temperature), alarms sent at once, low battery as a fault."""

    def __init__(self, ctx: DeviceContext) -> None:
        super().__init__(ctx)
        rng, p = ctx.rng, ctx.params
        self.with_description = False
        self.version = "2.255"
        self.component_address = rng.randrange(1, 1 << 32)
        self.alarm = False
        self.fault = False
        self.battery_start_mv = rng.uniform(2950, 3100)
        self.battery_low_at = ctx.within_run(p["battery_low"])
        if self.battery_low_at is not None:
            self.add_event(self.battery_low_at, "battery_low")
        self._schedule("alarm", p["alarm_per_day"])
        self._schedule("fault", p["fault_per_day"])

    def _state(self, t: float, labels: tuple[str, ...] = (), delay_s: float = 0.0) -> Frame:
        obj = {"system_type": SYSTEM_FIRE_ALARM, "system_address": 0, "component_type": SMOKE_DETECTOR,
               "component_address": self.component_address,
               "flags": {"normal_running": True, "fire_alarm": self.alarm, "fault": self.fault,
                         "started": self.alarm}}
        return self._frame(t, COMPONENT_STATE, [obj], labels, delay_s)

    def report(self, t: float) -> list[Frame]:
        rng = self.ctx.rng
        heartbeat = self._state(t)
        rsrp = heartbeat.radio.rsrp_dbm if heartbeat.radio else -100.0
        battery = 2700.0 if self.fault and self.battery_low_at is not None else self.battery_start_mv
        values = ((VENDOR_RSRP, round(rsrp)), (VENDOR_BATTERY_MV, round(battery)),
                  (VENDOR_SMOKE, rng.randrange(0, 6)), (ANALOG_TEMPERATURE, round(rng.gauss(26, 3), 1)))
        objects = [{"system_type": SYSTEM_FIRE_ALARM, "system_address": 0, "component_type": SMOKE_DETECTOR,
                    "component_address": self.component_address, "analog_type": kind,
                    **({"value": v} if kind == ANALOG_TEMPERATURE else {"raw": v})} for kind, v in values]
        # One wake-up, one radio measurement: both frames carry the same fix.
        return [heartbeat, self._frame(t, ANALOG_VALUE, objects, delay_s=rng.uniform(1.0, 3.0),
                                       radio=heartbeat.radio)]

    def on_event(self, t: float, kind: str) -> list[Frame]:
        p, rng = self.ctx.params, self.ctx.rng
        if kind == "alarm":
            if self.alarm:
                return []
            self.alarm = True
            self.add_event(t + 60 * rng.uniform(*p["alarm_clears_min"]), "restore")
            return [self._state(t, ("alarm",))]
        if kind == "restore":
            self.alarm = False
            return [self._state(t, ("restore",))]
        if kind == "battery_low":
            self.fault = True            # stays until someone changes the battery: beyond the run
            return [self._state(t, ("fault", "battery_low"))]
        if kind == "fault":
            if self.fault:
                return []
            self.fault = True
            self.add_event(t + 3600 * rng.uniform(*p["fault_clears_h"]), "fault_restore")
            return [self._state(t, ("fault",))]
        if kind == "fault_restore":
            self.fault = False
            return [self._state(t, ("fault_restore",))]
        return []


class HydrantMonitor(_Gb26875Device):
    """A hydrant main's pressure (type 3, kPa) reported every interval; a loss of pressure is raised as
    a component fault and cleared when it returns.  Demand peaks pull the pressure down a little."""

    def __init__(self, ctx: DeviceContext) -> None:
        super().__init__(ctx)
        rng, p = ctx.rng, ctx.params
        self.static_kpa = rng.uniform(*p["pressure_kpa"])
        self.component_address = rng.randrange(1, 1 << 16)
        self.low_until: float | None = None
        self._schedule("low_pressure", p["low_pressure_per_day"])

    def _pressure(self, t: float) -> float:
        if self.low_until is not None and t < self.low_until:
            return max(0.0, self.ctx.rng.uniform(20, 90))
        hour = local_hour(t)
        demand = 0.15 if hour in (7, 8, 18, 19, 20) else 0.05 if 6 <= hour <= 22 else 0.0
        return self.static_kpa * (1 - demand) + self.ctx.rng.gauss(0, 4)

    def _object(self, **extra: Any) -> dict[str, Any]:
        return {"system_type": SYSTEM_HYDRANT, "system_address": 1, "component_type": 0,
                "component_address": self.component_address, **extra}

    def report(self, t: float) -> list[Frame]:
        labels = ("low_pressure",) if self.low_until is not None and t < self.low_until else ()
        value = round(self._pressure(t), 1)
        return [self._frame(t, ANALOG_VALUE, [self._object(analog_type=ANALOG_KPA, value=value)], labels)]

    def on_event(self, t: float, kind: str) -> list[Frame]:
        if kind == "low_pressure":
            if self.low_until is not None and t < self.low_until:
                return []
            self.low_until = t + 3600 * self.ctx.rng.uniform(*self.ctx.params["fault_clears_h"])
            self.add_event(self.low_until, "pressure_back")
            flags = {"normal_running": True, "fault": True}
            return [self._frame(t, COMPONENT_STATE, [self._object(flags=flags, description="消防管网压力低")],
                                ("fault", "low_pressure"))]
        if kind == "pressure_back":
            flags = {"normal_running": True, "fault": False}
            return [self._frame(t, COMPONENT_STATE, [self._object(flags=flags, description="消防管网压力恢复")],
                                ("fault_restore",))]
        return []


class ProfileSmokeDetector(DeviceSim):
    """A CTWing profile-product smoke detector (LiAn style): the carrier decodes its properties and
    pushes them as JSON, radio figures included (RSRP as a positive magnitude, as this vendor sends)."""

    def __init__(self, ctx: DeviceContext) -> None:
        super().__init__(ctx)
        self.alarm = False
        self.battery_pct = ctx.rng.randint(60, 100)
        for when in _poisson_times(ctx.rng, ctx.start, ctx.end, ctx.params["alarm_per_day"]):
            self.add_event(when, "alarm")

    def _push(self, labels: tuple[str, ...] = ()) -> Frame:
        fix = self.fix()
        data = {"Alarm_Status": int(self.alarm), "Battery_Level": self.battery_pct, "RSRP": round(-fix.rsrp_dbm),
                "SNR": round(fix.sinr_db), "ECL": fix.ecl, "Cell_ID": fix.cell_id, "PCI": fix.pci}
        return Frame(None, labels, service_data=data, radio=fix)

    def report(self, t: float) -> list[Frame]:
        return [self._push()]

    def on_event(self, t: float, kind: str) -> list[Frame]:
        if kind == "alarm" and not self.alarm:
            self.alarm = True
            self.add_event(t + 60 * self.ctx.rng.uniform(*self.ctx.params["alarm_clears_min"]), "restore")
            return [self._push(("alarm",))]
        if kind == "restore":
            self.alarm = False
            return [self._push(("restore",))]
        return []


FIRE_KINDS = {"panel": UitdPanel, "smoke": NbSmokeDetector, "hydrant": HydrantMonitor}
