"""CJ/T 188 codec: golden frames from public sources, reference == numba kernel, encoder round trip."""

from __future__ import annotations

import json
import math
import random
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import decoders
from decoders import DecodeError
from decoders.cjt188 import DEFAULT_SETTINGS
from decoders.cjt188_encode import encode_reply, random_reply_fields, sample_payloads

CASES = Path(__file__).parent / "cases" / "cjt188"
CASE_NAMES = sorted(p.stem for p in CASES.glob("*.json"))
FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
VENDOR_SETTINGS = [{}, {"di_order": "low_first"}, {"di_order": "high_first"}, {"unit_before_value": True},
                   {"valve_shift": 6, "battery_bit": 5, "tz_offset_minutes": 0}]


def _outcome(payload: bytes, cfg: dict):
    try:
        return decoders.decode("cjt188", payload, cfg)
    except DecodeError as exc:
        return exc.reason


def _batch_outcomes(payloads: list[bytes], cfg: dict) -> list:
    batch = decoders.decode_batch("cjt188", payloads, cfg)
    return [batch.reason(i) or batch.record(i) for i in range(len(batch))]


def _same(a, b) -> bool:
    """Records equal, NaN-free floats compared exactly (the kernel does the same arithmetic)."""
    return a == b


def _expected_value(value):
    if isinstance(value, str) and value.endswith("+00:00"):
        return datetime.fromisoformat(value)
    return value


@pytest.mark.parametrize("name", CASE_NAMES)
def test_golden_case(name):
    frame = bytes.fromhex((CASES / f"{name}.hex").read_text())
    case = json.loads((CASES / f"{name}.json").read_text())
    assert case["source"]
    cfg = case.get("settings", {})
    batch = decoders.decode_batch("cjt188", [frame], cfg)
    if "reason" in case:
        with pytest.raises(DecodeError) as exc:
            decoders.decode("cjt188", frame, cfg)
        assert exc.value.reason == case["reason"]
        assert batch.reason(0) == case["reason"]
        return
    record = decoders.decode("cjt188", frame, cfg)
    for key, value in case["expected"].items():
        expected = _expected_value(value)
        if isinstance(expected, float):
            assert record[key] == pytest.approx(expected, rel=1e-12), key
        else:
            assert record[key] == expected, key
    assert batch.reason(0) is None
    assert batch.record(0) == record


def test_golden_cases_cover_every_record_kind_and_enough_real_frames():
    kinds, real_current = set(), 0
    for name in CASE_NAMES:
        case = json.loads((CASES / f"{name}.json").read_text())
        if "expected" in case:
            kinds.add(case["expected"].get("record_kind", "current"))
            real_current += "constructed" not in case["source"]
    assert kinds == {"current", "clock", "history", "freeze"}
    assert real_current >= 5


def test_existing_901f_keys_and_batch_columns_are_kept():
    """The gateway reads these: they must not change name or meaning."""
    frame = bytes.fromhex((CASES / "standard_example.hex").read_text())
    record = decoders.decode("cjt188", frame)
    assert {"meter_address", "meter_type", "control", "di", "serial", "flow_m3", "flow_unit",
            "settlement_flow_m3", "settlement_unit", "meter_time", "status", "valve", "battery_low"} <= set(record)
    cols = decoders.decode_batch("cjt188", [frame]).columns
    for name in ("meter_type", "address", "control", "serial", "flow_m3", "flow_unit", "settlement_flow_m3",
                 "settlement_unit", "meter_time", "status", "valve", "battery_low"):
        assert name in cols
    assert int(cols["address"][0]) == 78330011223344 and int(cols["status"][0]) == 0x8421
    assert int(cols["meter_time"][0]) == int(datetime(2015, 5, 11, 14, 1, 31, tzinfo=UTC).timestamp())
    assert cols["flow_m3"][0] == 556677.0 and int(cols["valve"][0]) == 1


def test_vendor_status_bit_map():
    frame = bytes.fromhex((CASES / "standard_example.hex").read_text())      # ST 0x8421
    msb = decoders.decode("cjt188", frame, {"valve_shift": 6, "battery_bit": 5})
    assert msb["valve"] == "open" and msb["battery_low"] is True             # 0x21 = 0b0010_0001
    assert decoders.decode("cjt188", frame)["battery_low"] is False


def test_ff_filled_status_is_missing():
    frame = encode_reply({"meter_address": "1", "flow_m3": 1.0, "status": None}, DEFAULT_SETTINGS)
    record = decoders.decode("cjt188", frame)
    assert record["status"] is None and record["valve"] is None and record["battery_low"] is None
    assert decoders.decode_batch("cjt188", [frame]).record(0) == record


def test_energy_units_convert_to_kwh_and_power_to_watts():
    for unit, kwh in ((0x01, 1 / 3.6e6), (0x02, 1e-3), (0x05, 1.0), (0x08, 1e3), (0x0E, 1 / 3.6), (0x13, 1e11 / 3.6e6)):
        frame = encode_reply({"meter_address": "1", "meter_type": 0x20, "record_kind": "history",
                              "settlement_heat_kwh": kwh, "settlement_heat_unit": unit}, DEFAULT_SETTINGS)
        assert decoders.decode("cjt188", frame)["settlement_heat_kwh"] == pytest.approx(kwh, rel=1e-9)
    # 12.34 GJ/h (code 49) is 12.34e9 J / 3600 s
    frame = encode_reply({"meter_address": "1", "meter_type": 0x20, "heat_power_w": 12.34e9 / 3600,
                          "heat_power_unit": 0x49}, DEFAULT_SETTINGS)
    assert decoders.decode("cjt188", frame)["heat_power_w"] == pytest.approx(12.34e9 / 3600, rel=1e-9)


def test_unknown_di_order_is_refused():
    with pytest.raises(ValueError):
        decoders.decode_batch("cjt188", [b"\x68"], {"di_order": "middle"})


@FAST
@given(seed=st.integers(0, 2**32), cfg=st.sampled_from(VENDOR_SETTINGS),
       kind=st.sampled_from(["current", "clock", "history", "freeze", None]))
def test_round_trip_and_kernel_agree_on_valid_replies(seed, cfg, kind):
    rng = random.Random(seed)
    fields = random_reply_fields(rng, kind)
    enc = {**DEFAULT_SETTINGS, **cfg, "preamble": rng.randrange(5)}
    if enc["di_order"] == "any":
        enc["di_order"] = "low_first"
    frame = encode_reply(fields, enc)
    record = decoders.decode("cjt188", frame, {**cfg, "di_order": enc["di_order"]})
    assert record["meter_address"] == fields["meter_address"]
    assert record["record_kind"] == fields["record_kind"]
    for key, value in record.items():
        if key in fields and isinstance(value, float):
            assert value == pytest.approx(fields[key], rel=1e-9, abs=1e-9), key
        elif key in ("meter_time", "freeze_time", "status"):
            assert value == fields[key], key
    assert _batch_outcomes([frame], {**cfg, "di_order": enc["di_order"]}) == [record]


def _mutate(rng: random.Random, frame: bytes) -> bytes:
    b = bytearray(frame)
    for _ in range(rng.randrange(1, 4)):
        op = rng.randrange(4)
        if op == 0 and b:
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        elif op == 1 and b:
            del b[rng.randrange(len(b)):]
        elif op == 2:
            b.insert(rng.randrange(len(b) + 1), rng.randrange(256))
        elif b:
            b[rng.randrange(len(b))] = rng.randrange(256)
    return bytes(b)


@FAST
@given(seed=st.integers(0, 2**32), cfg=st.sampled_from(VENDOR_SETTINGS))
def test_kernel_agrees_with_reference_on_mutated_and_random_bytes(seed, cfg):
    rng = random.Random(seed)
    payloads = [_mutate(rng, p) for p in sample_payloads(20, seed)]
    payloads += [rng.randbytes(rng.randrange(40)) for _ in range(5)]
    # random bytes that pass framing and checksum, so the later checks get exercised too
    for _ in range(5):
        body = bytes([0x68, rng.choice((0x10, 0x20, 0x30, 0x40))]) + rng.randbytes(7) + bytes([0x81])
        data = rng.randbytes(rng.randrange(30))
        body += bytes([len(data)]) + data
        payloads.append(body + bytes([sum(body) & 0xFF, 0x16]))
    expected = [_outcome(p, cfg) for p in payloads]
    assert _batch_outcomes(payloads, cfg) == expected


def test_batch_never_raises_on_garbage_and_floats_are_finite():
    rng = random.Random(7)
    payloads = [rng.randbytes(rng.randrange(70)) for _ in range(3000)] + sample_payloads(500, 3)
    batch = decoders.decode_batch("cjt188", payloads)
    ok = batch.status == 0
    assert ok.sum() >= 500
    for name in ("flow_m3", "heat_kwh", "flow_rate_m3h"):
        col = batch.columns[name][ok]
        assert not np.isinf(col).any()
    assert all(not isinstance(v, float) or math.isfinite(v) for v in batch.record(len(batch) - 1).values())
