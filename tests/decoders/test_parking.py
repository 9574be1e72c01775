"""Parking-sensor codec (Libelium Smart Parking layout): golden frames, reference == numba kernel."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import decoders
from decoders import DecodeError
from decoders.parking import (DEFAULT_SETTINGS, FRAME_KINDS, START2_KEYS, encode_report, random_report_fields,
                              sample_payloads)

CASES = Path(__file__).parent / "cases" / "parking"
CASE_NAMES = sorted(p.stem for p in CASES.glob("*.json"))
CRC_SETTINGS = [{"crc": kind} for kind in ("none", "modbus", "ccitt-false")]
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _outcome(payload: bytes, cfg: dict):
    try:
        return decoders.decode("parking", payload, cfg)
    except DecodeError as exc:
        return exc.reason


def _batch_outcomes(payloads: list[bytes], cfg: dict) -> list:
    batch = decoders.decode_batch("parking", payloads, cfg)
    return [batch.reason(i) or batch.record(i) for i in range(len(batch))]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_golden_case(name):
    frame = bytes.fromhex((CASES / f"{name}.hex").read_text().strip())
    case = json.loads((CASES / f"{name}.json").read_text())
    cfg = {**DEFAULT_SETTINGS, **case.get("settings", {})}
    batch = decoders.decode_batch("parking", [frame], cfg)
    if "reason" in case:
        with pytest.raises(DecodeError) as exc:
            decoders.decode("parking", frame, cfg)
        assert exc.value.reason == case["reason"]
        assert batch.reason(0) == case["reason"]
        return
    record = decoders.decode("parking", frame, cfg)
    for key, value in case["expected"].items():
        assert record[key] == value, key
    assert batch.record(0) == record


def test_real_frames_cover_every_frame_type():
    kinds = set()
    for name in CASE_NAMES:
        case = json.loads((CASES / f"{name}.json").read_text())
        if "expected" in case and "settings" not in case:
            kinds.add(case["expected"]["frame_kind"])
    assert kinds == set(FRAME_KINDS)


def test_fields_a_frame_type_does_not_carry_are_none():
    record = decoders.decode("parking", bytes.fromhex("829F665700000D9F00FF00"))
    assert record["temperature_c"] is None and record["mag_x"] is None and record["battery_mv"] is None


def test_unknown_crc_setting_is_refused():
    with pytest.raises(ValueError):
        decoders.decode_batch("parking", [bytes(11)], {"crc": "crc8"})


kinds_and_seeds = st.tuples(st.integers(0, 2**32), st.sampled_from(CRC_SETTINGS))


@FAST
@given(seeded=kinds_and_seeds)
def test_round_trip_and_kernel_agree_on_valid_reports(seeded):
    seed, cfg = seeded
    fields = random_report_fields(random.Random(seed))
    frame = encode_report(fields, cfg)
    record = decoders.decode("parking", frame, cfg)
    for key in ("occupied", "battery_low", "frame_type", "frame_counter"):
        assert record[key] == fields[key]
    kind = fields["frame_type"]
    carried = {0: ("temperature_c", "mag_x", "mag_y", "mag_z", "battery_mv"),
               2: ("resets", "config_id"),
               3: ("error_flags", "temperature_c", "mag_x", "mag_y", "mag_z", "battery_mv"),
               4: ("temperature_c", "mag_x", "mag_y", "mag_z", "battery_mv"),
               5: START2_KEYS}.get(kind, ("node_hour", "node_minute", "temperature_c", "mag_x", "mag_y", "mag_z"))
    for key in carried:
        assert record[key] == fields[key], key
    assert _batch_outcomes([frame], cfg) == [record]


@FAST
@given(payloads=st.lists(st.binary(max_size=16), max_size=10), cfg=st.sampled_from(CRC_SETTINGS))
def test_kernel_matches_reference_on_random_bytes(payloads, cfg):
    assert _batch_outcomes(payloads, cfg) == [_outcome(p, cfg) for p in payloads]


@FAST
@given(seed=st.integers(0, 2**32), cfg=st.sampled_from(CRC_SETTINGS),
       flips=st.lists(st.tuples(st.integers(0, 12), st.integers(0, 255)), min_size=1, max_size=3))
def test_kernel_matches_reference_on_mutated_reports(seed, cfg, flips):
    data = bytearray(encode_report(random_report_fields(random.Random(seed)), cfg))
    for pos, value in flips:
        data[pos % len(data)] = value
    payload = bytes(data)
    assert _batch_outcomes([payload], cfg) == [_outcome(payload, cfg)]


def test_sample_payloads_decode_and_vary():
    payloads = sample_payloads(60, seed=4)
    batch = decoders.decode_batch("parking", payloads)
    assert not batch.status.any()
    assert len({batch.record(i)["frame_kind"] for i in range(len(batch))}) >= 6
    assert sample_payloads(3, seed=4) == payloads[:3]
