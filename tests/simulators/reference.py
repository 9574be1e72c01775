"""What the tests compare the simulators and the gateway against: the plain-Python reference
decoders applied to captured records, and counting that follows only the capture."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import decoders
from decoders.carrier import unwrap
from decoders.models import get_model
from simulators.capture import UplinkRecord

ENVELOPES = ("ctwing", "onenet")


@dataclass(frozen=True, slots=True)
class Decoded:
    record: UplinkRecord
    fields: dict[str, Any] | None          # the inner codec's record (None: rejected or object model)
    reason: str | None = None              # the reference decoder's reject reason
    envelope: dict[str, Any] | None = None


def decode(record: UplinkRecord) -> Decoded:
    """The record as the reference decoders read it: envelope opened, inner frame decoded."""
    model = get_model(record.model)
    payload, envelope = record.payload, None
    codec, settings = model.codec, model.codec_settings()
    try:
        if model.codec in ENVELOPES:
            envelope, inner = unwrap(model.codec, payload, settings)
            if inner is None:
                return Decoded(record, None, None, envelope)
            payload, codec, settings = inner, model.inner_codec, dict(model.inner_settings)
        return Decoded(record, decoders.decode(codec, payload, settings), None, envelope)
    except decoders.DecodeError as exc:
        return Decoded(record, None, exc.reason, envelope)


def dedup_identity(record: UplinkRecord) -> tuple[str, bytes]:
    """What the gateway deduplicates on, as it receives it: device id and bytes; a carrier push names
    its device only inside the envelope, so the body alone (documented in ingest/pipeline.py)."""
    return ("" if record.transport == "http" else record.device_id, record.payload)


def repeats(records: Iterable[UplinkRecord]) -> int:
    """Uplinks whose identity arrived before: what the gateway must count as duplicates."""
    seen: set[tuple[str, bytes]] = set()
    n = 0
    for r in records:
        key = dedup_identity(r)
        n += key in seen
        seen.add(key)
    return n


def first_arrivals(records: Iterable[UplinkRecord]) -> list[UplinkRecord]:
    seen: set[tuple[str, bytes]] = set()
    out = []
    for r in records:
        key = dedup_identity(r)
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def expected_rows(records: Iterable[UplinkRecord]) -> Counter[str]:
    """Rows per readings table that the first arrival of each uplink must become (reference decoders)."""
    rows: Counter[str] = Counter()
    for r in first_arrivals(records):
        d = decode(r)
        family = get_model(r.model).family
        if d.reason is not None:
            continue
        if d.fields is None:
            rows[_TABLE[family]] += 1                  # an object-model push: one field-mapped row
            continue
        if family == "fire":
            rows["fire_events"] += max(1, len(d.fields.get("objects") or []))
        elif family == "traffic":
            rows["traffic_flow"] += max(1, len(d.fields.get("lanes") or []))
        else:
            rows[_TABLE[family]] += 1
    return rows


_TABLE = {"water": "water_readings", "fire": "fire_events", "traffic": "traffic_flow", "parking": "parking_events"}


def binomial_ok(successes: int, trials: int, p: float, z: float = 4.5) -> bool:
    """`successes` is within z standard deviations of Binomial(trials, p)'s mean (z = 4.5: a false
    alarm about once in 150,000 runs; the runs here are seeded, so the answer does not flicker)."""
    mean = trials * p
    sd = (trials * p * (1 - p)) ** 0.5
    return abs(successes - mean) <= z * max(sd, 1.0)


def poisson_ok(count: int, mean: float, z: float = 4.5) -> bool:
    return abs(count - mean) <= z * max(mean ** 0.5, 1.0)
