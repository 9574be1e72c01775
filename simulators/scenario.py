"""Scenarios as data: a TOML file names the fleets (family, device model, cities, sizes, transports),
the behaviour rates and the simulated period.  `load_scenario` validates it and says what is wrong;
the format is documented in docs/simulators.md."""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import MappingProxyType
from typing import Any

from decoders.models import DeviceModel, get_model
from iotjx.db.migrations import CITIES

from .fire import FIRE_KINDS, FIRE_OPTIONS
from .fleet import CITY_WEIGHTS
from .nbiot import COVERAGE_CLASSES
from .traffic import PARKING_OPTIONS, TRAFFIC_OPTIONS
from .water import HOUSEHOLD_KINDS, WATER_OPTIONS

SCENARIOS_DIR = Path(__file__).with_name("scenarios")
CHINA = timezone(timedelta(hours=8))
TRANSPORTS = ("mqtt", "coap", "http")
ENVELOPE_CODECS = ("ctwing", "onenet")
FAMILY_OPTIONS: dict[str, dict[str, Any]] = {"water": WATER_OPTIONS, "fire": FIRE_OPTIONS,
                                             "traffic": TRAFFIC_OPTIONS, "parking": PARKING_OPTIONS}
DEFAULT_SITE_KIND = {"water": "residential", "fire": "building", "traffic": "intersection", "parking": "parking_lot"}
_FLEET_KEYS = {"name", "family", "model", "count", "city", "cities", "transport", "interval_s", "site_kind",
               "sites", "site_names", "coverage", "behaviour"}


class ScenarioError(ValueError):
    """A scenario file that cannot be run; the message names the file and the key."""


@dataclass(frozen=True, slots=True)
class Behaviour:
    """How the network and the devices' radios treat uplinks (rates are per uplink)."""

    duplicate: float = 0.0                # the same bytes arrive twice (a lost ACK, a re-push)
    late: float = 0.0                     # held by the device (no coverage) and sent later
    late_delay_s: tuple[float, float] = (1800.0, 21600.0)
    corrupt: float = 0.0                  # a frame damaged before it left the device
    retransmit_delay_s: tuple[float, float] = (2.0, 45.0)   # CoAP ACK_TIMEOUT × back-off, re-push delay
    wake_jitter_s: float = 120.0          # PSM back-off after each wake-up slot (NB-IoT)
    midnight_share: float = 0.0           # NB-IoT daily reporters that wake just after midnight
    midnight_spread_s: float = 300.0      # …within this many seconds
    clock_offset_s: float = 20.0          # standard deviation of a device clock's error when last set
    clock_drift_ppm: float = 20.0         # standard deviation of its drift since


@dataclass(frozen=True, slots=True)
class FleetSpec:
    """One fleet of a scenario: `count` devices of one model spread over cities and sites."""

    name: str
    family: str
    model: DeviceModel
    count: int
    cities: tuple[tuple[int, float], ...]          # (division code, weight)
    transports: tuple[tuple[str, float], ...]      # (transport, weight)
    interval_s: int
    site_kind: str
    sites: int                                     # per city
    site_names: tuple[str, ...]
    coverage: tuple[tuple[str, float], ...]
    behaviour: Behaviour
    options: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    description: str
    start: float                                   # simulated epoch seconds
    duration_s: float
    speed: float                                   # simulated seconds per real second
    seed: int
    fleets: tuple[FleetSpec, ...]
    source: str = ""

    @property
    def end(self) -> float:
        return self.start + self.duration_s

    @property
    def device_count(self) -> int:
        return sum(f.count for f in self.fleets)

    def scaled(self, factor: float) -> Scenario:
        """The same scenario with every fleet `factor` times its size (at least one device each)."""
        if factor <= 0:
            raise ScenarioError("scale must be positive")
        return replace(self, fleets=tuple(replace(f, count=max(1, round(f.count * factor))) for f in self.fleets))

    def with_duration(self, duration_s: float) -> Scenario:
        return replace(self, duration_s=float(duration_s))


def bundled_scenarios() -> list[str]:
    """Names of the scenarios shipped in simulators/scenarios/."""
    return sorted(p.stem for p in SCENARIOS_DIR.glob("*.toml"))


def resolve_scenario(name_or_path: str | Path) -> Path:
    """A scenario file: an existing path, or the name of a bundled one."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    bundled = SCENARIOS_DIR / f"{Path(str(name_or_path)).stem}.toml"
    if bundled.is_file():
        return bundled
    raise ScenarioError(f"no scenario {str(name_or_path)!r}: not a file, and the bundled ones are "
                        f"{', '.join(bundled_scenarios())}")


def load_scenario(name_or_path: str | Path) -> Scenario:
    """The scenario in a TOML file (or a bundled scenario by name), validated."""
    path = resolve_scenario(name_or_path)
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{path.name}: not valid TOML: {exc}") from None
    try:
        return parse_scenario(document, source=str(path))
    except ScenarioError as exc:
        raise ScenarioError(f"{path.name}: {exc}") from None


def parse_scenario(document: Mapping[str, Any], source: str = "") -> Scenario:
    """A scenario from an already parsed TOML document."""
    unknown = set(document) - {"scenario", "behaviour", "coverage", "fleet"}
    if unknown:
        raise ScenarioError(f"unknown top-level tables {sorted(unknown)}; allowed: scenario, behaviour, coverage, fleet")
    head = dict(document.get("scenario", {}))
    _only(head, {"name", "description", "start", "duration", "speed", "seed"}, "[scenario]")
    for key in ("name", "start", "duration"):
        if key not in head:
            raise ScenarioError(f"[scenario] needs {key!r}")
    behaviour = _behaviour(document.get("behaviour", {}), Behaviour(), "[behaviour]")
    coverage = _weights(document.get("coverage", {"good": 0.6, "fair": 0.25, "poor": 0.1, "deep": 0.05}),
                        COVERAGE_CLASSES, "[coverage]")
    tables = document.get("fleet", [])
    if not isinstance(tables, list) or not tables:
        raise ScenarioError("a scenario needs at least one [[fleet]]")
    fleets = tuple(_fleet(t, k, behaviour, coverage) for k, t in enumerate(tables))
    speed = float(head.get("speed", 1.0))
    if speed <= 0:
        raise ScenarioError("[scenario] speed must be positive")
    return Scenario(name=str(head["name"]), description=str(head.get("description", "")),
                    start=_start(head["start"]), duration_s=parse_duration(head["duration"]), speed=speed,
                    seed=int(head.get("seed", 1)), fleets=fleets, source=source)


def parse_duration(value: Any) -> float:
    """Seconds from an int or a string such as "90s", "15m", "36h", "2d"."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value)
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", str(value))
    if not match or float(match.group(1)) <= 0:
        raise ScenarioError(f"duration {value!r}: use seconds or a number with s, m, h or d (\"2d\")")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]


def _start(value: Any) -> float:
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise ScenarioError(f"start {value!r} is not an ISO date-time") from None
    if not isinstance(value, datetime):
        raise ScenarioError(f"start must be a date-time (2026-07-06T00:00:00+08:00), not {value!r}")
    return (value if value.tzinfo else value.replace(tzinfo=CHINA)).timestamp()


def _only(table: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = set(table) - allowed
    if unknown:
        raise ScenarioError(f"{where}: unknown keys {sorted(unknown)}; allowed: {', '.join(sorted(allowed))}")


def _rate(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ScenarioError(f"{where} must be a rate between 0 and 1, not {value!r}")
    return float(value)


def _behaviour(table: Any, base: Behaviour, where: str) -> Behaviour:
    if not isinstance(table, Mapping):
        raise ScenarioError(f"{where} must be a table")
    names = {f.name: f for f in fields(Behaviour)}
    _only(table, set(names), where)
    values: dict[str, Any] = {}
    for key, value in table.items():
        default = getattr(base, key)
        if isinstance(default, tuple):
            if not (isinstance(value, list) and len(value) == 2 and 0 <= value[0] <= value[1]):
                raise ScenarioError(f"{where}.{key} must be [low, high], not {value!r}")
            values[key] = (float(value[0]), float(value[1]))
        elif key in ("duplicate", "late", "corrupt", "midnight_share"):
            values[key] = _rate(value, f"{where}.{key}")
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ScenarioError(f"{where}.{key} must be a non-negative number, not {value!r}")
        else:
            values[key] = float(value)
    return replace(base, **values)


def _weights(value: Any, allowed: tuple[str, ...], where: str) -> tuple[tuple[str, float], ...]:
    if isinstance(value, str):
        value = {value: 1.0}
    if not isinstance(value, Mapping) or not value:
        raise ScenarioError(f"{where} must name one of {', '.join(allowed)} or give them weights")
    out = []
    for key, weight in value.items():
        if key not in allowed:
            raise ScenarioError(f"{where}: {key!r} is not one of {', '.join(allowed)}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise ScenarioError(f"{where}.{key}: weight must be a non-negative number")
        out.append((key, float(weight)))
    if sum(w for _, w in out) <= 0:
        raise ScenarioError(f"{where}: the weights add up to zero")
    return tuple(out)


def city_code(value: Any) -> int:
    """A division code from a code, an English name or a Chinese name (with or without 市)."""
    text = str(value).strip()
    for code, zh, en in CITIES:
        if text in (str(code), zh, zh + "市") or text.lower() == en.lower():
            return code
    raise ScenarioError(f"unknown city {value!r}; Jiangxi's cities: {', '.join(en for _, _, en in CITIES)}")


def _cities(table: Mapping[str, Any], where: str) -> tuple[tuple[int, float], ...]:
    if "city" in table and "cities" in table:
        raise ScenarioError(f"{where}: give city or cities, not both")
    value = table.get("cities", table.get("city", "all"))
    if value == "all":
        return tuple((code, float(w)) for code, w in CITY_WEIGHTS.items())
    if isinstance(value, (str, int)):
        return ((city_code(value), 1.0),)
    if isinstance(value, list) and value:
        return tuple((city_code(v), 1.0) for v in value)
    if isinstance(value, Mapping) and value:
        return tuple((city_code(k), float(w)) for k, w in value.items())
    raise ScenarioError(f"{where}: cities must be \"all\", a city, a list of cities or a table of weights")


def _fleet(table: Any, index: int, behaviour: Behaviour, coverage: tuple[tuple[str, float], ...]) -> FleetSpec:
    where = f"[[fleet]] #{index + 1}"
    if not isinstance(table, Mapping):
        raise ScenarioError(f"{where} must be a table")
    if "model" not in table:
        raise ScenarioError(f"{where} needs a model (a name from decoders/models/*.toml)")
    try:
        model = get_model(str(table["model"]))
    except KeyError as exc:
        raise ScenarioError(f"{where}: {exc.args[0]}") from None
    where = f"[[fleet]] #{index + 1} ({table.get('name', model.name)})"
    family = str(table.get("family", model.family))
    if family != model.family:
        raise ScenarioError(f"{where}: model {model.name} is a {model.family} model, not {family}")
    options = dict(FAMILY_OPTIONS[family])
    _only(table, _FLEET_KEYS | set(options), where)
    for key in options:
        if key in table:
            options[key] = _option(table[key], options[key], f"{where}.{key}")
    count = table.get("count")
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ScenarioError(f"{where}: count must be a non-negative integer")
    envelope = model.codec in ENVELOPE_CODECS
    default_transport = "http" if envelope else "coap" if model.network == "nbiot" else "mqtt"
    transports = _weights(table.get("transport", default_transport), TRANSPORTS, f"{where}.transport")
    for transport, weight in transports:
        if weight and (transport == "http") != envelope:
            raise ScenarioError(f"{where}: {model.name} cannot use {transport}: carrier-platform models "
                                f"({', '.join(ENVELOPE_CODECS)}) arrive by HTTP push, the others by MQTT or CoAP")
    interval = table.get("interval_s", model.report_interval_s)
    if isinstance(interval, bool) or not isinstance(interval, int) or interval <= 0:
        raise ScenarioError(f"{where}: interval_s must be a positive integer")
    cities = _cities(table, where)
    names = table.get("site_names", [])
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise ScenarioError(f"{where}: site_names must be a list of names")
    per_city = count / max(1.0, len(cities))
    sites = table.get("sites", len(names) or max(1, math.ceil(per_city / 50)))
    if isinstance(sites, bool) or not isinstance(sites, int) or sites < 1:
        raise ScenarioError(f"{where}: sites must be a positive integer (sites per city)")
    site_kind = str(table.get("site_kind", DEFAULT_SITE_KIND[family]))
    from iotjx.devices import SITE_KINDS
    if site_kind not in SITE_KINDS:
        raise ScenarioError(f"{where}: site_kind must be one of {', '.join(SITE_KINDS)}")
    if family == "parking":
        options["site_kind"] = site_kind
    _check_family(family, model, options, where)
    fleet_coverage = _weights(table["coverage"], COVERAGE_CLASSES, f"{where}.coverage") if "coverage" in table \
        else coverage
    return FleetSpec(name=str(table.get("name", f"{model.name} #{index + 1}")), family=family, model=model,
                     count=count, cities=cities, transports=transports, interval_s=interval, site_kind=site_kind,
                     sites=sites, site_names=tuple(names), coverage=fleet_coverage,
                     behaviour=_behaviour(table.get("behaviour", {}), behaviour, f"{where}.behaviour"),
                     options=MappingProxyType(options))


def _option(value: Any, default: Any, where: str) -> Any:
    """A family option, checked against the type of its default."""
    if isinstance(default, float) and not isinstance(value, bool) and isinstance(value, (int, float)):
        if default <= 1.0 and where.rsplit(".", 1)[-1] in ("leak", "leak_onset", "rollover", "battery_low", "replacement",
                                                           "valve_closed"):
            return _rate(value, where)
        if value < 0:
            raise ScenarioError(f"{where} must not be negative")
        return float(value)
    if isinstance(default, list) and isinstance(value, list):
        return value
    if isinstance(default, dict) and isinstance(value, Mapping):
        return dict(value)
    if isinstance(default, int) and not isinstance(default, bool) and isinstance(value, int):
        return value
    if default is None and isinstance(value, (int, float, str)):
        return value
    raise ScenarioError(f"{where}: expected a value like {default!r}, not {value!r}")


def _check_family(family: str, model: DeviceModel, options: dict[str, Any], where: str) -> None:
    for key, default in FAMILY_OPTIONS[family].items():
        value = options[key]
        if isinstance(default, list) and len(default) == 2 and key not in ("device_types", "holidays"):
            if not (len(value) == 2 and all(isinstance(v, (int, float)) for v in value) and 0 <= value[0] <= value[1]):
                raise ScenarioError(f"{where}.{key} must be [low, high], not {value!r}")
    if family == "water":
        unknown = set(options["households"]) - set(HOUSEHOLD_KINDS)
        if unknown or not options["households"]:
            raise ScenarioError(f"{where}.households: weights of {', '.join(HOUSEHOLD_KINDS)}")
        options["households"] = dict(_weights(options["households"], HOUSEHOLD_KINDS, f"{where}.households"))
    if family == "fire":
        inner = model.inner_codec or model.codec
        if inner == "ctwing":
            if options["kind"] not in (None, "smoke"):
                raise ScenarioError(f"{where}: {model.name} is a profile smoke detector (kind smoke)")
        elif inner != "gb26875":
            raise ScenarioError(f"{where}: no fire simulator for codec {inner}")
        elif options["kind"] is not None and options["kind"] not in FIRE_KINDS:
            raise ScenarioError(f"{where}.kind must be one of {', '.join(FIRE_KINDS)}")
    if family == "traffic" and (model.inner_codec or model.codec) != "gbt43229":
        raise ScenarioError(f"{where}: traffic fleets simulate GB/T 43229 detectors, not {model.codec}")
    if family == "parking" and (model.inner_codec or model.codec) != "parking":
        raise ScenarioError(f"{where}: parking fleets simulate the parking codec's sensors, not {model.codec}")
    if family == "water" and (model.inner_codec or model.codec) not in ("cjt188", "senml-json", "senml-cbor"):
        raise ScenarioError(f"{where}: water fleets simulate CJ/T 188 and LwM2M (SenML) meters, not "
                            f"{model.inner_codec or model.codec}")
