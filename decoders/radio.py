"""Radio figures in one normalised shape, whatever carried them: RSRP (dBm), SINR (dB), RSRQ (dB),
ECL (0–2), PCI (0–503), cell id (28 bit).  Pure; docs/radio.md.

A device model says where its radio figures are (``[models."…".radio]`` in decoders/models/*.toml): per
figure one table with exactly one locator and an optional transform::

    rsrp_dbm = { analog_type = 0x80 }                        # GB/T 26875.3 analog value of this type
    rsrp_dbm = { field = "RSRP", transform = "negate" }      # a JSON / object-model field by name
    ecl = { field = "/4/0/13", transform = "oma_ce_level" }  # a SenML record name (name_map rules)

`declared` reads a decoded record with such a spec; `normalised` applies the ranges.  A figure out of
its range (or not a number) is None: a radio figure never rejects an uplink.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

FIGURES = ("rsrp_dbm", "sinr_db", "rsrq_db", "ecl", "pci", "cell_id")
# Accepted ranges, as in decoders.carrier (3GPP TS 36.133 measurement ranges, with margin).
RANGES: dict[str, tuple[float, float]] = {
    "rsrp_dbm": (-156.0, -44.0), "sinr_db": (-30.0, 40.0), "rsrq_db": (-35.0, 3.0),
    "ecl": (0, 2), "pci": (0, 503), "cell_id": (0, (1 << 28) - 1),
}
INTEGER_FIGURES = ("ecl", "pci", "cell_id")


def _oma_ce_level(value: float) -> float:
    """LwM2M object 4 resource 13: 0 no coverage enhancement in the cell (normal coverage: ECL 0),
    1..4 CE level 0..3.  NB-IoT has ECL 0..2, so CE level 3 (4) falls out of range."""
    return 0.0 if value == 0 else value - 1


TRANSFORMS: dict[str, Callable[[float], float]] = {
    "none": lambda v: v,
    "negate": lambda v: -abs(v),             # a positive magnitude (RSRP: 114 is −114 dBm)
    "tenths": lambda v: v / 10.0,            # modules that report SINR/RSRQ × 10
    "negate_tenths": lambda v: -abs(v) / 10.0,
    "oma_ce_level": _oma_ce_level,
    "cesq_rsrp": lambda v: -141.0 + v,       # 3GPP TS 27.007 +CESQ rsrp index
    "cesq_rsrq": lambda v: -20.0 + v / 2.0,  # +CESQ rsrq index
}
LOCATORS = ("field", "analog_type")


def spec_problem(spec: Any) -> str | None:
    """Why a model's radio table is invalid, or None when it is valid."""
    if not isinstance(spec, Mapping):
        return "radio must be a table of figures"
    for figure, entry in spec.items():
        if figure not in FIGURES:
            return f"radio figure {figure!r} is not one of {', '.join(FIGURES)}"
        if not isinstance(entry, Mapping):
            return f"radio.{figure} must be a table such as {{ field = \"RSRP\" }}"
        unknown = set(entry) - {*LOCATORS, "transform"}
        if unknown:
            return f"radio.{figure}: unknown keys {sorted(unknown)}; allowed: field, analog_type, transform"
        located = [k for k in LOCATORS if k in entry]
        if len(located) != 1:
            return f"radio.{figure} needs exactly one of field, analog_type"
        if "field" in entry and (not isinstance(entry["field"], str) or not entry["field"]):
            return f"radio.{figure}.field must be a non-empty string"
        kind = entry.get("analog_type")
        if "analog_type" in entry and (isinstance(kind, bool) or not isinstance(kind, int) or not 0 <= kind <= 255):
            return f"radio.{figure}.analog_type must be an integer 0..255, not {kind!r}"
        if entry.get("transform", "none") not in TRANSFORMS:
            return f"radio.{figure}.transform must be one of {', '.join(TRANSFORMS)}"
    return None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def normalised(values: Mapping[str, Any]) -> dict[str, Any]:
    """Every figure (None where absent, not a number or out of range); ECL, PCI and cell id as int."""
    out: dict[str, Any] = dict.fromkeys(FIGURES)
    for figure in FIGURES:
        value = values.get(figure)
        if figure == "cell_id" and isinstance(value, str) and not value.strip().isdigit():
            try:
                value = int(value.strip(), 16)       # cell ids are sometimes printed in hex (as decoders.carrier)
            except ValueError:
                value = None
        number = _number(value)
        if number is None:
            continue
        low, high = RANGES[figure]
        if figure in INTEGER_FIGURES:
            if number != int(number) or not low <= number <= high:
                continue
            out[figure] = int(number)
        elif low <= number <= high:
            out[figure] = number
    return out


def _senml_values(records: list[Mapping[str, Any]], names: Mapping[str, str]) -> dict[str, Any]:
    from .senml import values_named

    return values_named(records, names)


def declared(codec: str, record: Mapping[str, Any], spec: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The raw figures a model's radio spec finds in one decoded record, transformed (not range-checked):
    GB/T 26875.3 analog objects by type (the last object of that type in the frame), SenML records by
    name (the name_map matching rules; the latest time wins), other codecs' ``fields`` by name."""
    out: dict[str, Any] = {}
    by_field = {e["field"]: f for f, e in spec.items() if "field" in e}
    found: dict[str, Any] = {}
    if by_field:
        if codec.startswith("senml") and isinstance(record.get("records"), list):
            found = _senml_values(record["records"], by_field)
        else:
            fields = record.get("fields") or {}
            found = {figure: fields.get(name) for name, figure in by_field.items()}
    by_type = {e["analog_type"]: f for f, e in spec.items() if "analog_type" in e}
    if by_type:
        for obj in record.get("objects") or ():
            figure = by_type.get(obj.get("analog_type"))
            if figure is not None and obj.get("value") is not None:
                found[figure] = obj["value"]
    for figure, value in found.items():
        transform = spec[figure].get("transform", "none")
        if figure == "cell_id" and isinstance(value, str) and transform == "none":
            out[figure] = value                      # decimal or hex text: `normalised` reads it
            continue
        number = _number(value)
        if number is not None:
            out[figure] = TRANSFORMS[transform](number)
    return out


__all__ = ["FIGURES", "RANGES", "TRANSFORMS", "declared", "normalised", "spec_problem"]
