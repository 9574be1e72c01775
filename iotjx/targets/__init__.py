"""The targets catalogue: the plan's targets and the programme's, as data (TOML)."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

BUNDLED = Path(__file__).with_name("catalogue.toml")
MEASURES = ("site_share", "sites_with_live", "live_devices", "operator")


@dataclass(frozen=True, slots=True)
class CoverageTarget:
    """One target: what is measured, against which value, by when."""

    target_id: str
    source: str                      # plan / programme
    value: float
    unit: str
    deadline: date
    measure: str
    clause_zh: str = ""
    clause_en: str = ""
    target_zh: str = ""
    target_en: str = ""
    city: int | None = None
    pilot: str | None = None
    network: str | None = None
    site_kind: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def load_catalogue(path: Path | None = None) -> list[CoverageTarget]:
    """Every target in the catalogue; ValueError naming the entry for anything malformed."""
    path = path or BUNDLED
    with open(path, "rb") as fh:
        data = tomllib.load(fh)
    targets: list[CoverageTarget] = []
    seen: set[str] = set()
    for source in ("plan", "programme"):
        for entry in data.get(source, []):
            tid = entry.get("id")
            try:
                if not tid or tid in seen:
                    raise ValueError("missing or duplicate id")
                measure = dict(entry.get("measure", {"kind": "live_devices"}))
                kind = measure.pop("kind")
                if kind not in MEASURES:
                    raise ValueError(f"measure.kind {kind!r} is not one of {MEASURES}")
                deadline = entry["deadline"]
                if not isinstance(deadline, date):
                    raise ValueError("deadline must be a TOML date")
                targets.append(CoverageTarget(
                    target_id=tid, source=source, value=float(entry["value"]),
                    unit=entry.get("unit", "devices"), deadline=deadline, measure=kind,
                    clause_zh=entry.get("clause_zh", ""), clause_en=entry.get("clause_en", ""),
                    target_zh=entry.get("target_zh", ""), target_en=entry.get("target_en", ""),
                    city=entry.get("city"), pilot=measure.pop("pilot", entry.get("pilot")),
                    network=entry.get("network"), site_kind=measure.pop("site_kind", None), extra=measure))
            except (KeyError, ValueError, TypeError) as exc:
                raise ValueError(f"{path}: {source} target {tid!r}: {exc}") from exc
            seen.add(tid)
    return targets
