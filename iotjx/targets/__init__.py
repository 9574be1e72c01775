"""The targets catalogue: the plan's targets and the programme's, as data (TOML), each saying what counts.

The format is documented at the head of the bundled `catalogue.toml`; `load_catalogue` refuses anything
it does not describe (an unknown key, a site kind or device family that does not exist, a percent target
above 100, a minimum that cannot be met…) with a message naming the file and the target, so that a
mistyped catalogue stops the API and the CLI at start-up instead of reporting a wrong figure."""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

BUNDLED = Path(__file__).with_name("catalogue.toml")
MEASURES = ("site_share", "sites_meeting", "live_devices", "operator")
SITE_MEASURES = ("site_share", "sites_meeting")
FAMILIES = ("water", "fire", "traffic", "parking")
FAMILY_PILOT = {"water": "water", "fire": "fire", "traffic": "traffic", "parking": "traffic"}
A_GRADES = ("1A", "2A", "3A", "4A", "5A")
SOURCES = ("plan", "programme")

_TARGET_KEYS = {"id", "clause_zh", "clause_en", "target_zh", "target_en", "value", "unit", "deadline", "city",
                "measure"}
_MEASURE_KEYS = {"kind", "sites", "devices", "min_live", "min_live_share"}
_SITE_KEYS = {"kind", "min_grade", "grades", "model_site"}
_DEVICE_KEYS = {"family", "models", "network"}


@dataclass(frozen=True, slots=True)
class SiteCriteria:
    """Which catalogue sites a site measure counts: one kind, optionally a grade floor or list, model sites only."""

    kind: str
    min_grade: str | None = None           # "4A": 4A and 5A
    grades: tuple[str, ...] = ()           # exactly these grades
    model_site: bool = False               # only sites flagged as model sites (from their model_site_since)

    def describe(self) -> str:
        parts = [self.kind]
        if self.min_grade:
            parts.append(f"grade {self.min_grade}+")
        if self.grades:
            parts.append("grade " + "/".join(self.grades))
        if self.model_site:
            parts.append("model sites")
        return " ".join(parts)


@dataclass(frozen=True, slots=True)
class DeviceCriteria:
    """Which devices count: families and/or models, optionally one network."""

    families: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    network: str | None = None

    def describe(self) -> str:
        what = list(self.families) + list(self.models)
        return ", ".join(what) + (f" on {self.network}" if self.network else "")


@dataclass(frozen=True, slots=True)
class CoverageTarget:
    """One target: what is measured, against which value, by when."""

    target_id: str
    source: str                      # plan / programme
    value: float
    unit: str
    deadline: date
    measure: str                     # one of MEASURES
    clause_zh: str = ""
    clause_en: str = ""
    target_zh: str = ""
    target_en: str = ""
    city: int | None = None
    sites: tuple[SiteCriteria, ...] = ()
    devices: DeviceCriteria | None = None
    min_live: int = 1
    min_live_share: float | None = None   # percent

    @property
    def pilot(self) -> str | None:
        """The pilot the counted devices belong to, when they all belong to one."""
        if self.devices is None:
            return None
        pilots = {FAMILY_PILOT[f] for f in self.devices.families}
        return pilots.pop() if len(pilots) == 1 and not self.devices.models else None

    @property
    def network(self) -> str | None:
        return self.devices.network if self.devices else None

    @property
    def percent_unit(self) -> bool:
        return self.unit == "percent"

    def as_dict(self) -> dict[str, Any]:
        """What the API shows of the definition."""
        return {"target_id": self.target_id, "source": self.source, "clause_zh": self.clause_zh,
                "clause_en": self.clause_en, "target_zh": self.target_zh, "target_en": self.target_en,
                "value": self.value, "unit": self.unit, "deadline": self.deadline, "measure": self.measure,
                "city": self.city, "pilot": self.pilot, "network": self.network,
                "sites": [{"kind": s.kind, "min_grade": s.min_grade, "grades": list(s.grades),
                           "model_site": s.model_site} for s in self.sites],
                "devices": None if self.devices is None else {
                    "families": list(self.devices.families), "models": list(self.devices.models),
                    "network": self.devices.network},
                "min_live": self.min_live if self.measure in SITE_MEASURES else None,
                "min_live_share": self.min_live_share}


class CatalogueError(ValueError):
    """A targets catalogue that cannot be used; the message names the file and the target."""


def _strings(value: Any, what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{what} must be a non-empty list of names")
    if len(set(value)) != len(value):
        raise ValueError(f"{what} names one entry twice")
    return tuple(value)


def _unknown(table: dict, allowed: set[str], where: str) -> None:
    extra = sorted(set(table) - allowed)
    if extra:
        raise ValueError(f"unknown key(s) {', '.join(extra)} in {where} (allowed: {', '.join(sorted(allowed))})")


def _site_criteria(entry: Any) -> SiteCriteria:
    from iotjx.devices import SITE_KINDS

    if not isinstance(entry, dict):
        raise ValueError("each measure.sites entry must be a table such as { kind = \"campus\" }")
    _unknown(entry, _SITE_KEYS, "measure.sites")
    kind = entry.get("kind")
    if kind not in SITE_KINDS:
        raise ValueError(f"measure.sites kind {kind!r} is not a site kind ({', '.join(SITE_KINDS)})")
    min_grade = entry.get("min_grade")
    if min_grade is not None and (kind != "scenic_spot" or min_grade not in A_GRADES):
        raise ValueError(f"min_grade {min_grade!r} needs kind scenic_spot and one of {', '.join(A_GRADES)}")
    grades = _strings(entry["grades"], "measure.sites grades") if "grades" in entry else ()
    if min_grade and grades:
        raise ValueError("give min_grade or grades, not both")
    model_site = entry.get("model_site", False)
    if not isinstance(model_site, bool):
        raise ValueError("model_site must be true or false")
    return SiteCriteria(kind=kind, min_grade=min_grade, grades=grades, model_site=model_site)


def _device_criteria(entry: Any, models: dict[str, Any] | None) -> DeviceCriteria:
    from iotjx.model import NETWORKS

    if not isinstance(entry, dict):
        raise ValueError("measure.devices must be a table such as { family = [\"parking\"] }")
    _unknown(entry, _DEVICE_KEYS, "measure.devices")
    families = _strings(entry["family"], "measure.devices family") if "family" in entry else ()
    for f in families:
        if f not in FAMILIES:
            raise ValueError(f"family {f!r} is not one of {', '.join(FAMILIES)} "
                             "(traffic: lane and flow detectors; parking: parking sensors)")
    names = _strings(entry["models"], "measure.devices models") if "models" in entry else ()
    if not families and not names:
        raise ValueError("measure.devices must name the device family or models that count")
    network = entry.get("network")
    if network is not None and network not in NETWORKS:
        raise ValueError(f"network {network!r} is not one of {', '.join(NETWORKS)}")
    if models is not None:
        for name in names:
            if name not in models:
                raise ValueError(f"unknown device model {name!r}")
        counted = [m for m in models.values() if m.family in families or m.name in names]
        if network is not None and not any(m.network == network for m in counted):
            raise ValueError(f"no device model of {', '.join(families + names)} is a {network} model: "
                             "the target could never be met")
    return DeviceCriteria(families=families, models=names, network=network)


def _target(entry: dict, source: str, models: dict[str, Any] | None, cities: set[int]) -> CoverageTarget:
    _unknown(entry, _TARGET_KEYS, "the target")
    value = entry.get("value")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"value must be a number above 0, not {value!r}")
    unit = entry.get("unit", "devices")
    if not isinstance(unit, str) or not unit:
        raise ValueError("unit must be a non-empty string")
    deadline = entry.get("deadline")
    if not isinstance(deadline, date):
        raise ValueError("deadline must be a TOML date such as 2022-12-31")
    city = entry.get("city")
    if city is not None and city not in cities:
        raise ValueError(f"city {city!r} is not a division code of the eleven cities")
    measure = entry.get("measure", {"kind": "live_devices"})
    if not isinstance(measure, dict):
        raise ValueError("measure must be a table")
    _unknown(measure, _MEASURE_KEYS, "measure")
    kind = measure.get("kind")
    if kind not in MEASURES:
        raise ValueError(f"measure.kind {kind!r} is not one of {', '.join(MEASURES)}")
    sites: tuple[SiteCriteria, ...] = ()
    devices = None
    min_live, share = 1, None
    if kind == "operator":
        if set(measure) - {"kind"}:
            raise ValueError("an operator-entered target takes no sites, devices or minimums")
        if city is not None:
            raise ValueError("an operator-entered target is a province-wide figure: no city")
    else:
        if "devices" not in measure:
            raise ValueError("measure.devices must say which devices count (family and/or models)")
        devices = _device_criteria(measure["devices"], models)
    if kind in SITE_MEASURES:
        raw = measure.get("sites")
        if isinstance(raw, dict):
            raw = [raw]
        if not isinstance(raw, list) or not raw:
            raise ValueError("measure.sites must list the site criteria, e.g. [{ kind = \"campus\" }]")
        sites = tuple(_site_criteria(e) for e in raw)
        min_live = measure.get("min_live", 1)
        if isinstance(min_live, bool) or not isinstance(min_live, int) or not 1 <= min_live <= 1_000_000:
            raise ValueError(f"min_live must be a whole number 1..1000000, not {min_live!r}")
        share = measure.get("min_live_share")
        if share is not None and (isinstance(share, bool) or not isinstance(share, int | float)
                                  or not 0 < share <= 100):
            raise ValueError(f"min_live_share must be a percent above 0 and at most 100, not {share!r}")
        if kind == "site_share" and unit != "percent":
            raise ValueError("a site_share target is a percent: unit = \"percent\"")
    elif {"sites", "min_live", "min_live_share"} & set(measure):
        raise ValueError(f"sites, min_live and min_live_share belong to site measures, not {kind}")
    if unit == "percent" and value > 100:
        raise ValueError(f"a percent target cannot exceed 100, not {value}")
    if kind in ("sites_meeting", "live_devices") and unit == "percent":
        raise ValueError(f"{kind} counts {('sites' if kind == 'sites_meeting' else 'devices')}: its unit is not percent")
    if kind != "operator" and value != int(value):
        raise ValueError(f"{kind} counts whole sites or devices: value must be a whole number, not {value}")
    texts = {k: entry.get(k, "") for k in ("clause_zh", "clause_en", "target_zh", "target_en")}
    if not all(isinstance(v, str) for v in texts.values()):
        raise ValueError("clause and target texts must be strings")
    return CoverageTarget(target_id=entry["id"], source=source, value=float(value), unit=unit, deadline=deadline,
                          measure=kind, city=city, sites=sites, devices=devices, min_live=min_live,
                          min_live_share=None if share is None else float(share), **texts)


def load_catalogue(path: Path | None = None, *, check_models: bool = True) -> list[CoverageTarget]:
    """Every target in the catalogue; CatalogueError naming the file and target for anything malformed.
    With `check_models` (the default) device models named by a target must be bundled ones."""
    from iotjx.db.migrations import CITIES

    path = Path(path) if path is not None else BUNDLED
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise CatalogueError(f"{path}: cannot read the targets catalogue ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise CatalogueError(f"{path}: not TOML: {exc}") from None
    extra = sorted(set(data) - set(SOURCES))
    if extra:
        raise CatalogueError(f"{path}: unknown section(s) {', '.join(extra)} (targets are [[plan]] or [[programme]])")
    models = None
    if check_models:
        from decoders.models import load_models

        models = load_models()
    cities = {code for code, _zh, _en in CITIES}
    targets: list[CoverageTarget] = []
    seen: set[str] = set()
    for source in SOURCES:
        entries = data.get(source, [])
        if not isinstance(entries, list):
            raise CatalogueError(f"{path}: {source} must be an array of tables ([[{source}]])")
        for entry in entries:
            tid = entry.get("id") if isinstance(entry, dict) else None
            try:
                if not isinstance(tid, str) or not tid or len(tid) > 100:
                    raise ValueError("every target needs an id (1-100 characters)")
                if tid in seen:
                    raise ValueError("this id is used twice")
                targets.append(_target(entry, source, models, cities))
            except (KeyError, ValueError, TypeError) as exc:
                raise CatalogueError(f"{path}: {source} target {tid!r}: {exc}") from None
            seen.add(tid)
    if not targets:
        raise CatalogueError(f"{path}: no targets")
    return targets
