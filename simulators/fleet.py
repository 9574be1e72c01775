"""A deterministic fleet across the eleven cities: ids, sites, models — what the registry holds."""

from __future__ import annotations

import random
from dataclasses import dataclass

from iotjx.devices import DeviceRecord
from iotjx.db.migrations import CITIES

# Rough weights: Nanchang is the main industrial area, Yingtan the programme's core base.
CITY_WEIGHTS = {360100: 5, 360200: 1, 360300: 1, 360400: 2, 360500: 1, 360600: 4, 360700: 3, 360800: 2,
                360900: 2, 361000: 1, 361100: 2}
CITY_NAMES = {code: en for code, _zh, en in CITIES}


def imei(rng: random.Random, tac: str = "86997503") -> str:
    """A 15-digit IMEI: 8-digit type allocation code, 6-digit serial, Luhn check digit."""
    body = tac + f"{rng.randrange(10**6):06d}"
    total = 0
    for i, ch in enumerate(body):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return body + str((10 - total % 10) % 10)


@dataclass(frozen=True, slots=True)
class SimulatedDevice:
    record: DeviceRecord
    city: int
    meter_address: str


def plan_water_fleet(n: int, seed: int = 0, *, model: str = "cjt188-nb-water-std",
                     reporting_interval_s: int | None = None, sites_per_city: int = 4) -> list[SimulatedDevice]:
    """`n` water meters spread over the eleven cities; the same seed gives the same fleet."""
    rng = random.Random(seed)
    codes = list(CITY_WEIGHTS)
    weights = [CITY_WEIGHTS[c] for c in codes]
    fleet, ids = [], set()
    while len(fleet) < n:
        city = rng.choices(codes, weights)[0]
        device_id = imei(rng)
        if device_id in ids:
            continue
        ids.add(device_id)
        k = rng.randrange(sites_per_city)
        kind = "community" if k == 0 else "residential"
        # A meter is on its model's network (the registry refuses any other).  The draw that once picked
        # a network is kept so that a seed still gives the same ids and meter addresses as before.
        rng.random()
        fleet.append(SimulatedDevice(
            record=DeviceRecord(device_id=device_id, model=model, city=str(city), site_kind=kind,
                                site_name=f"{CITY_NAMES[city]} {kind} {k + 1}",
                                reporting_interval_s=reporting_interval_s),
            city=city, meter_address=f"{rng.randrange(10**14):014d}"))
    return fleet


# --------------------------------------------------------------------------- scenario fleets

@dataclass(frozen=True, slots=True)
class PlannedDevice:
    """A device of a scenario: what the registry holds, and where the simulator puts it."""

    record: DeviceRecord
    fleet: int                  # index of its [[fleet]]
    transport: str              # mqtt / coap / http
    city: int
    coverage: str               # its site's coverage class
    site_key: str               # seeds the site's cell: devices of one site share it
    platform_id: str            # the carrier platform's id (CTWing 32-hex, OneNET integer); "" otherwise
    number: int                 # its number within its fleet and city (detector numbers)


def apportion(total: int, weights: list[float]) -> list[int]:
    """`total` split by `weights` (largest remainders): the same split every time."""
    s = sum(weights)
    exact = [total * w / s for w in weights]
    counts = [int(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[:total - sum(counts)]:
        counts[i] += 1
    return counts


def plan_scenario(scenario, seed: int | None = None) -> list[PlannedDevice]:
    """Every device of a scenario (a `simulators.scenario.Scenario`); deterministic given the seed."""
    seed = scenario.seed if seed is None else seed
    taken: set[str] = set()
    planned: list[PlannedDevice] = []
    for k, spec in enumerate(scenario.fleets):
        rng = random.Random(f"{seed}:fleet:{k}")
        codes = [c for c, _ in spec.cities]
        per_city = apportion(spec.count, [w for _, w in spec.cities])
        transports = [t for t, _ in spec.transports]
        t_weights = [w for _, w in spec.transports]
        classes = [c for c, _ in spec.coverage]
        c_weights = [w for _, w in spec.coverage]
        default_interval = spec.model.report_interval_s
        for city, n in zip(codes, per_city, strict=True):
            names = list(spec.site_names) or [f"{CITY_NAMES[city]} {spec.site_kind} {j + 1}"
                                              for j in range(spec.sites)]
            for number in range(1, n + 1):
                device_id = imei(rng, tac=_TAC.get(spec.family, "86997503"))
                while device_id in taken:
                    device_id = imei(rng, tac=_TAC.get(spec.family, "86997503"))
                taken.add(device_id)
                site = names[rng.randrange(len(names))]
                site_key = f"{city}:{spec.site_kind}:{site}"
                # The site's own draw: every fleet at this site sees the same coverage class.
                coverage = random.Random(f"{seed}:site:{site_key}").choices(classes, c_weights)[0]
                platform_id = ""
                if spec.model.codec == "ctwing":
                    platform_id = f"{rng.getrandbits(128):032x}"
                elif spec.model.codec == "onenet":
                    platform_id = str(rng.randrange(10**8, 10**9))
                record = DeviceRecord(
                    device_id=device_id, model=spec.model.name, network=spec.model.network, city=str(city),
                    site_kind=spec.site_kind, site_name=site,
                    reporting_interval_s=None if spec.interval_s == default_interval else spec.interval_s)
                planned.append(PlannedDevice(record, k, rng.choices(transports, t_weights)[0], city, coverage,
                                             site_key, platform_id, number))
    return planned


# Type allocation codes of NB-IoT / Cat-1 modules (8 digits) per family, so ids of fleets differ.
_TAC = {"water": "86997503", "fire": "86482104", "traffic": "86681505", "parking": "86773006"}
