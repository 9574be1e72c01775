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
        network = "cat1" if rng.random() < 0.1 else "nbiot"
        fleet.append(SimulatedDevice(
            record=DeviceRecord(device_id=device_id, model=model, network=network, city=str(city), site_kind=kind,
                                site_name=f"{CITY_NAMES[city]} {kind} {k + 1}",
                                reporting_interval_s=reporting_interval_s),
            city=city, meter_address=f"{rng.randrange(10**14):014d}"))
    return fleet
